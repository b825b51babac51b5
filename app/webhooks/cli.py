"""``flask webhooks …``: re-encrypt endpoint secrets after adding a key to WEBHOOK_SECRET_KEYS."""
from __future__ import annotations

import click
from flask import Flask
from flask.cli import AppGroup
from sqlalchemy import select, update
from sqlalchemy.orm import undefer

from app.extensions import db
from app.models import WebhookEndpoint
from app.webhooks.settings import SecretKeyUnset, box

webhooks_cli = AppGroup("webhooks", help="Maintain webhook endpoints.")


@webhooks_cli.command("rotate-key")
@click.option("--batch", default=500, show_default=True, help="Endpoints re-encrypted per transaction.")
def rotate_key(batch: int) -> None:
    """Re-encrypt every endpoint secret with the first key of WEBHOOK_SECRET_KEYS.

    Run it after putting a new key first in the list; once it has finished, the old keys can
    be removed. Prints how many endpoints were re-encrypted. Safe to run again.
    """
    try:
        found = box()
    except SecretKeyUnset as exc:
        raise click.ClickException(exc.detail) from None
    done, last = 0, ""
    while True:
        rows = list(
            db.session.execute(
                select(WebhookEndpoint)
                .options(undefer(WebhookEndpoint.secret_encrypted), undefer(WebhookEndpoint.previous_secret_encrypted))
                .where(WebhookEndpoint.id > last)
                .order_by(WebhookEndpoint.id)
                .limit(batch)
            ).scalars()
        )
        if not rows:
            break
        read = [(endpoint.id, endpoint.secret_encrypted, endpoint.previous_secret_encrypted) for endpoint in rows]
        db.session.rollback()  # read without holding anything; each write below checks what it read
        for endpoint_id, current, previous in read:
            # Conditional on the tokens read: a secret rotated through the API meanwhile is
            # already under the first key and is left as it is, never set back.
            db.session.execute(
                update(WebhookEndpoint)
                .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.secret_encrypted == current)
                .values(
                    secret_encrypted=found.rotate(current),
                    previous_secret_encrypted=None if previous is None else found.rotate(previous),
                )
            )
            db.session.commit()
        done += len(read)
        last = read[-1][0]
    click.echo(f"{done} endpoint secrets re-encrypted with the first key")


def init_app(app: Flask) -> None:
    app.cli.add_command(webhooks_cli)
