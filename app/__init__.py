"""Frontdoor: an API gateway. ``create_app()`` wires it, one ``init_app`` per module.

Imports happen inside ``create_app``: importing a light module of the package (the route file's
models, ``python -m app.gateway.check``) must not load Flask's extensions, SQLAlchemy or Celery.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask


def create_app(test_config: dict | None = None) -> Flask:
    """Build the gateway app: defaults, then the environment (or ``test_config`` instead).

    The app's WSGI entry splits by path: the gateway's own surface (``API_PREFIX``, /healthz,
    /readyz, /metrics) is this Flask app; every other path is the proxy app
    (``app.gateway.proxy``). Raises RouteFileError when the route file is invalid.
    """
    from flask import Flask
    from werkzeug.middleware.proxy_fix import ProxyFix

    from app import (
        api,
        auth,
        config,
        errors,
        extensions,
        gateway,
        health,
        jobs,
        models,  # noqa: F401 - registers the tables with db.metadata (Flask-Migrate reads it)
        portal,
        ratelimit,
        webhooks,
    )
    from app.api import cors as api_cors
    from app.gateway import request_id
    from app.observability import logging as logs
    from app.observability import metrics, tracing
    from tasks import celery_init_app

    # No static route: every path outside the gateway's own goes to the proxy (a route at
    # /static included), and the gateway serves no files of its own from there.
    app = Flask(__name__, instance_relative_config=True, static_folder=None)
    # JSON keys in the order the gateway writes them (a resource's fields as its schema lists
    # them), the same from every endpoint, the proxy's answers included; not Flask's sorted order.
    app.json.sort_keys = False
    app.config.from_mapping(config.defaults(app))
    if test_config is None:
        config.from_environment(app)
    else:
        app.config.from_mapping(test_config)
    config.finalise(app)

    logs.init_app(app)
    request_id.init_app(app)
    tracing.init_app(app)
    errors.init_app(app)
    extensions.init_app(app)
    health.init_app(app)
    metrics.init_app(app)
    # The order of these is the order of their before_request hooks on the gateway's own API:
    # a CORS preflight answered, authenticate, then count the request against the consumer's limit.
    api_cors.init_app(app)
    auth.init_app(app)
    ratelimit.init_app(app)
    gateway.init_app(app)  # after ratelimit: every route's limit is parsed as the file loads
    jobs.init_app(app)  # after the gateway: it checks the upstreams' job timeouts
    webhooks.init_app(app)
    api.init_app(app)
    portal.init_app(app)  # after the API: its pages use the API's id converter
    celery_init_app(app)

    gateway.wrap(app)  # the entry: own paths to the Flask app, the rest to the proxy app
    # Outermost: ProxyFix sets the client's scheme, host and address that everything behind it
    # sees, the proxy's rate limits and cache keys included. X-Forwarded-Host has a count of
    # its own: a router may set the others and pass a client's X-Forwarded-Host on (Heroku's).
    hops = config.trusted_hops(app.config, "TRUSTED_PROXY_HOPS")
    host_hops = config.trusted_hops(app.config, "TRUSTED_FORWARDED_HOST_HOPS")
    if hops or host_hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=host_hops, x_port=hops)
    return app
