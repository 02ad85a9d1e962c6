"""``idemhook send``: sign a payload for a source and POST it to a running receiver."""

from __future__ import annotations

import urllib.error
import urllib.request

import click
from flask.cli import with_appcontext

from idemhook._cli.common import needs_sources, no_database
from idemhook._cli.sign import CLIENT_OPTION, KEY_OPTION, sign_for, source_argument
from idemhook._config.signing import endpoint_url
from idemhook._contract import (
    RESPONSE_HEADERS,
)

#: Answer headers worth printing: an API's own, and what a retry needs to know.
SHOWN_HEADERS = (*RESPONSE_HEADERS, "Idempotent-Replayed", "Retry-After")


def _header(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict:
    headers = {}
    for value in values:
        name, sep, text = value.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"{value!r}: expected 'Name: value'")
        headers[name.strip()] = text.strip()
    return headers


@no_database
@needs_sources
@click.command("send", short_help="Sign a JSON file and POST it to a running receiver.")
@with_appcontext
@click.argument("source")
@click.argument("payload", type=click.File("rb"))
@click.option(
    "--url", default="http://127.0.0.1:8000", show_default=True, help="Base URL of the receiver."
)
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    callback=_header,
    help="Extra header 'Name: value' (repeatable), e.g. an event ID read from a header.",
)
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for the answer.")
@CLIENT_OPTION
@KEY_OPTION
def send_command(
    source: str,
    payload: click.utils.LazyFile,
    url: str,
    headers: dict,
    timeout: float,
    client: str | None,
    key: str | None,
) -> None:
    """POST PAYLOAD (a JSON file, - for stdin) to SOURCE's endpoint, signed as its scheme requires.

    An idempotency-key source is posted to its path (if it has one), signed as --client,
    with --key as its Idempotency-Key (send the same --key again to see the replay).
    Prints the HTTP status, the answer's headers that matter (Location, ETag, Link, X-*,
    Idempotent-Replayed, Retry-After) and the answer; exits 1 unless the status is 2xx.
    """
    src = source_argument(source)
    target = endpoint_url(url, src)
    body, all_headers = sign_for(src, payload.read(), target, client, key, headers)
    request = urllib.request.Request(target, data=body, headers=all_headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, answer, answered = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:  # a 4xx/5xx still carries the receiver's JSON answer
        status, answer, answered = exc.code, exc.read(), exc.headers
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"could not reach {target}: {reason}") from None
    click.echo(f"HTTP {status}")
    for name, value in answered.items():
        if name in SHOWN_HEADERS or name.lower().startswith("x-"):
            click.echo(f"{name}: {value}")
    click.echo(answer.decode("utf-8", errors="replace").rstrip("\n"))
    if not 200 <= status < 300:
        raise SystemExit(1)
