"""The proxy: the route file, every route's pipeline, and the WSGI app that serves them."""
from __future__ import annotations

import weakref
from functools import partial

from flask import Flask


def init_app(app: Flask) -> None:
    """Build the gateway from the route file (``app.extensions["gateway"]``).

    Raises RouteFileError when the file is invalid: a gateway never serves half a config.
    ``app.extensions["gateway_control"]`` applies reloads and breaker holds made anywhere
    (``app.gateway.control``). The proxy app itself is put in front of the Flask app by
    ``wrap`` once every domain has been wired in.
    """
    from celery.signals import worker_init

    from app.extensions import redis_client
    from app.gateway import cli, control, runtime

    app.extensions["gateway"] = runtime.load_gateway(app)
    store = control.store_for(app, redis_client(app))
    app.extensions["gateway_control"] = control.Control(
        app, store, float(app.config["CONTROL_SYNC_INTERVAL"]), lambda route_file, digest, running: runtime.build_gateway(app, route_file, digest, running)
    )
    # A Celery worker runs jobs through the gateway too: it looks for changes as each task
    # pushes the app context (web processes look on each request, in the entry).
    worker_init.connect(partial(_follow_in_worker, weakref.ref(app)), weak=False)
    cli.init_app(app)


def wrap(app: Flask) -> None:
    """Make the process's WSGI entry split by path: the gateway's own paths to the Flask app,
    every other path to the proxy app (``app.gateway.proxy``)."""
    from app.gateway.proxy import Entry, ProxyApp
    from app.observability import tracing

    proxy = ProxyApp(app.extensions["auth"], app.extensions["ratelimit_proxy"], app.config["API_PREFIX"].rstrip("/") + "/problems/")
    app.wsgi_app = Entry(app.extensions["gateway_control"], app.wsgi_app, tracing.instrument_wsgi(proxy))


def _follow_in_worker(app_ref: weakref.ref, **_: object) -> None:
    """worker_init: in a Celery worker, look for reloads and breaker holds made elsewhere
    whenever a task pushes the app context (at most every CONTROL_SYNC_INTERVAL seconds)."""
    from flask import appcontext_pushed

    app = app_ref()
    if app is not None:
        appcontext_pushed.connect(_look_for_changes, app)


def _look_for_changes(sender: Flask, **_: object) -> None:
    sender.extensions["gateway_control"].current()
