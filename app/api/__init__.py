"""The gateway's own resources under ``API_PREFIX`` (``/_gateway``), one blueprint per resource."""
from __future__ import annotations

from flask import Flask

from app.api import (
    admin_cache,
    admin_gateway,
    consumers,
    events,
    inputs,
    jobs,
    keys,
    openapi,
    problems,
    webhooks,
)

MODULES = (consumers, keys, jobs, webhooks, events, admin_cache, admin_gateway, openapi, problems)


def init_app(app: Flask) -> None:
    """Register every resource's blueprint under API_PREFIX, after the limits at its edge
    (``inputs``: the ``id`` converter its rules use, the query check)."""
    inputs.init_app(app, frozenset(module.bp.name for module in MODULES))
    prefix = app.config["API_PREFIX"].rstrip("/")
    for module in MODULES:
        app.register_blueprint(module.bp, url_prefix=prefix)
