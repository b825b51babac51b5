"""``flask consumers …`` and ``flask keys …``: bootstrapping identity from a shell.

Answers go to stdout (lists: a tab-separated row each, or ``--json``), everything else to
stderr, so that ``$(flask ...)`` captures the answer alone."""
from __future__ import annotations

import json

import click
from flask import Flask
from flask.cli import AppGroup
from sqlalchemy import select

from app.auth import manage
from app.extensions import db
from app.models import ApiKey, Consumer

consumers_cli = AppGroup("consumers", help="Create, list, disable, enable consumers and set their plan.")
keys_cli = AppGroup("keys", help="Create, list, rotate and revoke API keys.")
as_json = click.option("--json", "as_json", is_flag=True, help="One JSON array, as the admin API shows them, for scripts.")


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
@as_json
def list_consumers(as_json: bool) -> None:
    """Print every consumer: id, name, plan, and whether it is disabled."""
    consumers = list(db.session.execute(select(Consumer).order_by(Consumer.created_at)).scalars())
    if as_json:
        click.echo(json.dumps([manage.consumer_json(consumer) for consumer in consumers]))
        return
    for consumer in consumers:
        state = "disabled" if consumer.disabled else "enabled"
        click.echo(f"{consumer.id}\t{consumer.name}\t{consumer.plan or '-'}\t{state}")


def _update(reference: str, **change) -> Consumer:
    try:
        return manage.update_consumer(_consumer(reference), **change)
    except manage.Invalid as exc:
        raise click.ClickException(str(exc)) from exc


@consumers_cli.command("disable")
@click.argument("reference")
def disable_consumer(reference: str) -> None:
    """Disable the consumer REFERENCE (id or name): its keys and tokens are refused by every
    process within AUTH_CACHE_TTL seconds."""
    click.echo(f"disabled {_update(reference, disabled=True).id}")


@consumers_cli.command("enable")
@click.argument("reference")
def enable_consumer(reference: str) -> None:
    """Enable the consumer REFERENCE (id or name) again."""
    click.echo(f"enabled {_update(reference, disabled=False).id}")


@consumers_cli.command("set-plan")
@click.argument("reference")
@click.argument("plan")
def set_plan(reference: str, plan: str) -> None:
    """Put the consumer REFERENCE on PLAN (one of RATELIMIT_PLANS; "-" for the default limit)."""
    consumer = _update(reference, plan=None if plan == "-" else plan, set_plan=True)
    click.echo(f"{consumer.id}\t{consumer.plan or '-'}")


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
@as_json
def list_keys(reference: str | None, as_json: bool) -> None:
    """Print keys: id, prefix, consumer, status, scopes, expiry. Never the keys themselves."""
    query = select(ApiKey).order_by(ApiKey.created_at)
    if reference is not None:
        query = query.where(ApiKey.consumer_id == _consumer(reference).id)
    found = list(db.session.execute(query).scalars())
    if as_json:
        click.echo(json.dumps([manage.key_json(key) for key in found]))
        return
    for key in found:
        shown = manage.key_json(key)
        click.echo(
            f"{key.id}\t{key.prefix}…\t{key.consumer.name}\t{shown['status']}\t"
            f"{','.join(shown['scopes']) or '-'}\t{shown['expires_at'] or 'never'}"
        )


@keys_cli.command("rotate")
@click.argument("key_id")
@click.option("--expire-old-in", type=click.FloatRange(min=0), default=None,
              help="Seconds the old key keeps working (default: until it expires, or never).")
def rotate_key(key_id: str, expire_old_in: float | None) -> None:
    """Make a new key with KEY_ID's consumer and scopes and print it on stdout (shown this once)."""
    key = db.session.get(ApiKey, key_id)
    if key is None:
        raise click.ClickException(f"no key has the id {key_id!r}")
    try:
        minted = manage.rotate_key(key, expire_old_in)
    except (manage.Invalid, manage.Conflict) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"created {minted.row.id} in place of {key_id}; the key is shown once:", err=True)
    click.echo(minted.key)


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
