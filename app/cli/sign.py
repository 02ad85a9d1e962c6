"""``idemhook sign``: print a ready-to-paste curl of a correctly signed event."""

from __future__ import annotations

import shlex

import click
from flask import current_app
from flask.cli import with_appcontext

from ..signing import find_source, signed_request, signing_url, webhook_url
from ..sources import Source
from .common import needs_sources


def source_argument(name: str) -> Source:
    """The configured source ``name``, or a usage error listing the configured ones."""
    try:
        return find_source(current_app, name)
    except KeyError as exc:
        raise click.BadParameter(exc.args[0], param_hint="SOURCE") from None


@needs_sources
@click.command("sign", short_help="Print a curl command that posts a signed JSON file.")
@with_appcontext
@click.argument("source")
@click.argument("payload", type=click.File("rb"), default="-")
@click.option(
    "--url", default="http://127.0.0.1:8000", show_default=True, help="Base URL of the receiver."
)
def sign_command(source: str, payload: click.utils.LazyFile, url: str) -> None:
    """Print a curl command that POSTs PAYLOAD (a JSON file, - for stdin) signed for SOURCE."""
    src = source_argument(source)
    target = webhook_url(url, source)
    body, headers = signed_request(
        src, payload.read(), url=signing_url(current_app, src, target)
    )
    parts = ["curl", "-sS", "-X", "POST", target]
    for name, value in headers.items():
        parts += ["-H", f"{name}: {value}"]
    parts += ["--data-binary", body.decode("utf-8")]
    click.echo(" ".join(shlex.quote(p) for p in parts))
