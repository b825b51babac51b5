"""The gateway's own resources under ``API_PREFIX`` (``/_gateway``), one blueprint per resource."""
from __future__ import annotations

from flask import Flask

from app.api import (
    admin_cache,
    admin_gateway,
    consumers,
    events,
    jobs,
    keys,
    openapi,
    webhooks,
)


def init_app(app: Flask) -> None:
    prefix = app.config["API_PREFIX"].rstrip("/")
    for module in (consumers, keys, jobs, webhooks, events, admin_cache, admin_gateway, openapi):
        app.register_blueprint(module.bp, url_prefix=prefix)
