"""``idemhook send``: sign a payload for a source and POST it to a running receiver."""

from __future__ import annotations

import urllib.error
import urllib.request

import click
from flask import current_app
from flask.cli import with_appcontext

from ..signing import signed_request, signing_url, webhook_url
from .common import needs_sources
from .sign import source_argument


def _header(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict:
    headers = {}
    for value in values:
        name, sep, text = value.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"{value!r}: expected 'Name: value'")
        headers[name.strip()] = text.strip()
    return headers


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
def send_command(
    source: str, payload: click.utils.LazyFile, url: str, headers: dict, timeout: float
) -> None:
    """POST PAYLOAD (a JSON file, - for stdin) to SOURCE's endpoint, signed as its scheme requires.

    Prints the HTTP status and the answer; exits 1 unless the status is 2xx.
    """
    src = source_argument(source)
    target = webhook_url(url, source)
    signed_over = signing_url(current_app, src, target)
    body, all_headers = signed_request(src, payload.read(), headers, url=signed_over)
    request = urllib.request.Request(target, data=body, headers=all_headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, answer = response.status, response.read()
    except urllib.error.HTTPError as exc:  # a 4xx/5xx still carries the receiver's JSON answer
        status, answer = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"could not reach {target}: {reason}") from None
    click.echo(f"HTTP {status}")
    click.echo(answer.decode("utf-8", errors="replace").rstrip("\n"))
    if not 200 <= status < 300:
        raise SystemExit(1)
