"""``idemhook sign``: print a ready-to-paste curl of a correctly signed event."""

from __future__ import annotations

import shlex

import click
from flask import current_app
from flask.cli import with_appcontext

from idemhook._cli.common import needs_sources, no_database
from idemhook._config.signing import endpoint_url, find_source, signed_request, signing_url
from idemhook._config.sources import Source

#: --client and --key, shared by `idemhook sign` and `idemhook send`.
CLIENT_OPTION = click.option(
    "--client",
    help="idempotency-key sources: the client to sign as (default: the first one).",
)
KEY_OPTION = click.option(
    "--key",
    help="idempotency-key sources: the Idempotency-Key to send (default: a new UUID); "
    "the same key again is a retry.",
)


def source_argument(name: str) -> Source:
    """The configured source ``name``, or a usage error listing the configured ones."""
    try:
        return find_source(current_app, name)
    except KeyError as exc:
        raise click.BadParameter(exc.args[0], param_hint="SOURCE") from None


def sign_for(
    src: Source,
    payload: bytes,
    url: str,
    client: str | None,
    key: str | None,
    headers: dict[str, str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Sign ``payload`` (with ``headers``) for ``src`` as ``client`` with ``key``."""
    if not src.own_secret:
        raise click.BadParameter(
            f"source {src.name!r} has no secret of its own: each of its tenants signs with its "
            "own, kept encrypted (idemhook secrets); nothing here can sign for them",
            param_hint="SOURCE",
        )
    try:
        return signed_request(
            src,
            payload,
            headers,
            url=signing_url(current_app, src, url),
            client=client,
            key=key,
        )
    except (KeyError, ValueError) as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="--client") from None


@no_database
@needs_sources
@click.command("sign", short_help="Print a curl command that posts a signed JSON file.")
@with_appcontext
@click.argument("source")
@click.argument("payload", type=click.File("rb"), default="-")
@click.option(
    "--url", default="http://127.0.0.1:8000", show_default=True, help="Base URL of the receiver."
)
@CLIENT_OPTION
@KEY_OPTION
def sign_command(
    source: str, payload: click.utils.LazyFile, url: str, client: str | None, key: str | None
) -> None:
    """Print a curl command that POSTs PAYLOAD (a JSON file, - for stdin) signed for SOURCE.

    An idempotency-key source is posted to its path (if it has one), signed as --client,
    with --key as its Idempotency-Key.
    """
    src = source_argument(source)
    target = endpoint_url(url, src)
    body, headers = sign_for(src, payload.read(), target, client, key)
    parts = ["curl", "-sS", "-X", "POST", target]
    for name, value in headers.items():
        parts += ["-H", f"{name}: {value}"]
    parts += ["--data-binary", body.decode("utf-8")]
    click.echo(" ".join(shlex.quote(p) for p in parts))
