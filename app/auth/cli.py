"""``flask consumers …`` and ``flask keys …``: bootstrapping identity from a shell."""
from __future__ import annotations

import click
from flask import Flask
from flask.cli import AppGroup
from sqlalchemy import select

from app.auth import manage
from app.extensions import db
from app.models import ApiKey, Consumer

consumers_cli = AppGroup("consumers", help="Create and list consumers.")
keys_cli = AppGroup("keys", help="Create, list and revoke API keys.")


def _consumer(reference: str) -> Consumer:
    consumer = manage.find_consumer(reference)
    if consumer is None:
        raise click.ClickException(f"no consumer has the id or name {reference!r}")
    return consumer


@consumers_cli.command("create")
@click.argument("name")
@click.option("--plan", default=None, help="Rate-limit plan (one of RATELIMIT_PLANS).")
def create_consumer(name: str, plan: str | None) -> None:
    """Create the consumer NAME and print its id."""
    try:
        consumer = manage.create_consumer(name, plan)
    except (manage.Invalid, manage.Conflict) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(consumer.id)


@consumers_cli.command("list")
def list_consumers() -> None:
    """Print every consumer: id, name, plan, and whether it is disabled."""
    for consumer in db.session.execute(select(Consumer).order_by(Consumer.created_at)).scalars():
        state = "disabled" if consumer.disabled else "enabled"
        click.echo(f"{consumer.id}\t{consumer.name}\t{consumer.plan or '-'}\t{state}")


@keys_cli.command("create")
@click.option("--consumer", "reference", required=True, help="The consumer's id or name.")
@click.option("--scopes", default="", help="Comma-separated scopes, e.g. admin or orders:read,orders:write.")
@click.option("--expires-in", type=click.FloatRange(min=0, min_open=True), default=None, help="Seconds until the key expires.")
def create_key(reference: str, scopes: str, expires_in: float | None) -> None:
    """Create a key and print it on stdout: it is shown this once and never stored."""
    consumer = _consumer(reference)
    try:
        minted = manage.create_key(consumer, [s.strip() for s in scopes.split(",") if s.strip()], expires_in)
    except manage.Invalid as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"created {minted.row.id} for {consumer.name}; the key is shown once:", err=True)
    click.echo(minted.key)


@keys_cli.command("list")
@click.option("--consumer", "reference", default=None, help="Only this consumer's keys (id or name).")
def list_keys(reference: str | None) -> None:
    """Print keys: id, prefix, consumer, status, scopes, expiry. Never the keys themselves."""
    query = select(ApiKey).order_by(ApiKey.created_at)
    if reference is not None:
        query = query.where(ApiKey.consumer_id == _consumer(reference).id)
    for key in db.session.execute(query).scalars():
        shown = manage.key_json(key)
        click.echo(
            f"{key.id}\t{key.prefix}…\t{key.consumer.name}\t{shown['status']}\t"
            f"{','.join(shown['scopes']) or '-'}\t{shown['expires_at'] or 'never'}"
        )


@keys_cli.command("revoke")
@click.argument("key_id")
def revoke_key(key_id: str) -> None:
    """Revoke KEY_ID; every gateway process refuses it within AUTH_CACHE_TTL seconds."""
    key = db.session.get(ApiKey, key_id)
    if key is None:
        raise click.ClickException(f"no key has the id {key_id!r}")
    manage.revoke_key(key)
    click.echo(f"revoked {key.id}")


def init_app(app: Flask) -> None:
    app.cli.add_command(consumers_cli)
    app.cli.add_command(keys_cli)
