"""Webhooks: endpoints a consumer registers, the events (messages) it publishes, and their delivery.

Endpoints are in ``app.webhooks.endpoints``, messages and their fan-out in
``app.webhooks.messages``, the worker's batches (claim, sign, send, record) in
``app.webhooks.attempts``, beat's passes in ``app.webhooks.dispatch``, and what the API asks of
deliveries (test sends, redelivery, their JSON) in ``app.webhooks.deliveries``; the settings in
``app.webhooks.settings``. The flow follows Svix and the Standard Webhooks specification: a
message is recorded once, fan-out makes one delivery per matching enabled endpoint, and every
delivery of a message carries the message id as ``webhook-id``. Rows are committed before a
task names them.
"""
from __future__ import annotations

from flask import Flask

from app.webhooks import secrets, settings


def init_app(app: Flask) -> None:
    """Read the WEBHOOK_* settings and open the secret box: WEBHOOK_SECRET_KEYS, or on the
    embedded default (SQLite) a key kept under ``instance/``. Raises ValueError for a bad
    setting (an allowed network or a secret key that cannot be read)."""
    app.extensions["webhooks"] = settings.Settings.from_config(app.config)
    keys = secrets.key_list(app.config["WEBHOOK_SECRET_KEYS"])
    if not keys and app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        keys = [secrets.instance_key(app.instance_path)]
    elif not keys:
        settings.log.warning("GATEWAY_WEBHOOK_SECRET_KEYS is not set: webhook endpoints cannot be created or delivered to")
    app.extensions["webhook_box"] = secrets.SecretBox(keys) if keys else None
    from app.webhooks import cli

    cli.init_app(app)
