"""Frontdoor: an API gateway. ``create_app()`` wires it, one ``init_app`` per module."""
from __future__ import annotations

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from app import auth, config, errors, extensions, health, jobs, ratelimit, webhooks
from app.gateway import fastpath, request_id
from app.observability import logging as logs
from app.observability import metrics, tracing


def create_app(test_config: dict | None = None) -> Flask:
    """Build the gateway app: defaults, then the environment (or ``test_config`` instead).

    Raises RouteFileError when the route file is invalid.
    """
    app = Flask(__name__, instance_relative_config=True)
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
    from app import api, gateway

    # The order of these three is the order of their before_request hooks: match the route,
    # then authenticate by its policy, then count the request against the consumer's limit.
    gateway.init_app(app)
    auth.init_app(app)
    ratelimit.init_app(app)
    jobs.init_app(app)  # after the gateway: it checks the upstreams' job timeouts
    webhooks.init_app(app)
    api.init_app(app)

    from tasks import celery_init_app

    celery_init_app(app)
    # Outermost first: ProxyFix sets the client's scheme, host and address that everything
    # behind it sees, the cache fast path included (they are part of a cache key). With
    # tracing on, every request goes through the app, where its span is made.
    if not tracing.enabled():
        app.wsgi_app = fastpath.wrap(app, app.wsgi_app)
    hops = int(app.config["TRUSTED_PROXY_HOPS"])
    if hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops)
    return app
