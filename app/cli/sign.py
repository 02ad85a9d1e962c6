"""``idemhook sign``: print a ready-to-paste curl of a correctly signed event."""

from __future__ import annotations

import shlex

import click
from flask import current_app

from ..schemes import Delivery


@click.command("sign")
@click.argument("source")
@click.argument("payload", type=click.File("rb"), default="-")
@click.option(
    "--url", default="http://127.0.0.1:8000", show_default=True, help="Base URL of the receiver."
)
def sign_command(source: str, payload: click.utils.LazyFile, url: str) -> None:
    """Print a curl command that POSTs PAYLOAD (a JSON file, - for stdin) signed for SOURCE."""
    receiver = current_app.extensions["idemhook.receiver"]
    if source not in receiver.sources:
        raise click.BadParameter(f"no source named {source!r}", param_hint="SOURCE")
    src = receiver.sources[source]
    body = payload.read()
    target = f"{url.rstrip('/')}/webhooks/{source}"
    headers = {"Content-Type": src.content_types[0]}
    headers.update(src.scheme.sign(Delivery(body, method="POST", url=target)))
    parts = ["curl", "-sS", "-X", "POST", target]
    for name, value in headers.items():
        parts += ["-H", f"{name}: {value}"]
    parts += ["--data-binary", body.decode("utf-8")]
    click.echo(" ".join(shlex.quote(p) for p in parts))
