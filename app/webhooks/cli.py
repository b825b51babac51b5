"""``flask webhooks …``: endpoints and their deliveries as an operator reads them, and the
re-encryption of endpoint secrets after adding a key to WEBHOOK_SECRET_KEYS. Answers on stdout
(a tab-separated row each, or ``--json``), everything else on stderr."""
from __future__ import annotations

import json

import click
from flask import Flask
from flask.cli import AppGroup
from sqlalchemy import select, update
from sqlalchemy.orm import undefer

from app.auth import manage
from app.extensions import db
from app.models import Consumer, WebhookDelivery, WebhookEndpoint
from app.models.webhooks import DELIVERY_STATUSES
from app.webhooks import deliveries, endpoints
from app.webhooks.settings import SecretKeyUnset, box

webhooks_cli = AppGroup("webhooks", help="List endpoints and deliveries; maintain endpoint secrets.")
as_json = click.option("--json", "as_json", is_flag=True, help="One JSON array, as the API shows them, for scripts.")


@webhooks_cli.command("endpoints")
@click.option("--consumer", "reference", default=None, help="Only this consumer's endpoints (id or name).")
@as_json
def list_endpoints(reference: str | None, as_json: bool) -> None:
    """Print endpoints: id, consumer, state (enabled, failing since ..., disabled: reason), URL,
    event types ("*" for every type). Never a secret."""
    query = select(WebhookEndpoint).order_by(WebhookEndpoint.created_at)
    if reference is not None:
        consumer = manage.find_consumer(reference)
        if consumer is None:
            raise click.ClickException(f"no consumer has the id or name {reference!r}")
        query = query.where(WebhookEndpoint.consumer_id == consumer.id)
    found = list(db.session.execute(query).scalars())
    if as_json:
        click.echo(json.dumps([{**endpoints.endpoint_json(endpoint), "consumer_id": endpoint.consumer_id} for endpoint in found]))
        return
    names = {row.id: row.name for row in db.session.execute(select(Consumer.id, Consumer.name).where(Consumer.id.in_({e.consumer_id for e in found})))}
    for endpoint in found:
        shown = endpoints.endpoint_json(endpoint)
        if endpoint.disabled:
            state = f"disabled: {endpoint.disabled_reason or 'by its consumer'}"
        elif endpoint.failing_since is not None:
            state = f"failing since {shown['failing_since']}"
        else:
            state = "enabled"
        click.echo(f"{endpoint.id}\t{names.get(endpoint.consumer_id, endpoint.consumer_id)}\t{state}\t{endpoint.url}\t{','.join(shown['event_types']) or '*'}")


@webhooks_cli.command("deliveries")
@click.argument("endpoint_id")
@click.option("--status", type=click.Choice(DELIVERY_STATUSES), multiple=True, help="Only deliveries in this status (repeatable).")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="The newest this many.")
@as_json
def list_deliveries(endpoint_id: str, status: tuple[str, ...], limit: int, as_json: bool) -> None:
    """Print ENDPOINT_ID's deliveries, newest first: id, event type, status, attempts, the last
    attempt's status code or error, next attempt. ``--json``: each with its latest attempts."""
    if db.session.get(WebhookEndpoint, endpoint_id) is None:
        raise click.ClickException(f"no webhook endpoint has the id {endpoint_id!r}")
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if status:
        query = query.where(WebhookDelivery.status.in_(status))
    rows = list(db.session.execute(query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(limit)).scalars())
    shown = deliveries.with_attempts(rows)
    if as_json:
        click.echo(json.dumps(shown))
        return
    for delivery in shown:
        last = delivery["last_status_code"] if delivery["last_status_code"] is not None else (delivery["last_error"] or "-")
        click.echo(
            f"{delivery['id']}\t{delivery['message'].get('type', '-')}\t{delivery['status']}\t{delivery['attempt_count']}"
            f"\t{last}\t{delivery['next_attempt_at'] or '-'}"
        )


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
