"""The portal: server-rendered pages under ``API_PREFIX/portal`` for consumers (keys, webhook
endpoints and deliveries, jobs) and operators (routes, upstreams and breakers, cache, consumers)."""
from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    """Register the portal's pages (after the API: they use its ``id`` converter)."""
    from app.portal import account, jobs, keys, operator, webhooks  # noqa: F401 - each adds its pages to the blueprint
    from app.portal.web import bp

    app.register_blueprint(bp, url_prefix=app.config["API_PREFIX"].rstrip("/") + "/portal")
