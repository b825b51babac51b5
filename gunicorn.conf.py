"""gunicorn settings for the gateway, from the environment the platform sets (Heroku-style)."""
import os
import sys
import tempfile

# prometheus-client's multiprocess mode: every worker writes its metrics to files in this
# directory and /metrics adds them up. Set here, before anything imports prometheus_client
# (which picks file-backed values when it is imported). A directory given in the environment
# is used as it is (whoever sets it empties it first; Heroku dynos start with a fresh disk).
_own_metrics_dir = None
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
else:
    _own_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="frontdoor-metrics-web-")



def _number(name: str, default: int) -> int:
    """The platform variable ``name`` as a whole number; a bad value reads as ``default`` here,
    and on_starting then stops the server naming it (app.config.Platform checks them)."""
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


bind = f"{os.environ.get('HOST') or '0.0.0.0'}:{_number('PORT', 8000)}"
worker_class = "app.server.GatewayWorker"  # gthread, reading requests in its loop under client deadlines
workers = _number("WEB_CONCURRENCY", 2)
threads = _number("WEB_THREADS", 8)
# Heroku's router gives a request 30 s; a worker that overruns is recycled after this.
timeout = _number("GUNICORN_TIMEOUT", 35)
graceful_timeout = 25  # SIGTERM: in-flight requests get this long, inside Heroku's 30 s
keepalive = 75  # longer than a load balancer's idle timeout, so it is never the one to close first
# Each worker listens on a socket of its own (SO_REUSEPORT) and the kernel spreads new connections
# over them. On one shared socket whichever worker wakes first accepts: kept-alive connections
# opened together (a load balancer's, a benchmark's) could all land in one worker, leaving the
# other's threads idle: make bench-jobs measured 32 of 32 in one worker in half its rounds, at
# about 550 submits/s against 830 when spread. The price (nginx's reuseport has it too): a worker
# that dies takes the connections still waiting in its socket's queue with it (they are reset).
reuse_port = True
accesslog = None  # the gateway logs one JSON line per request itself


def _without_access_lines():
    """gunicorn's Logger with its per-request access line turned off: a logconfig_dict turns
    gunicorn's access log on, and it then builds the line's atoms on every request (a few
    percent of a proxied request's CPU) only for the gunicorn.access logger to drop them."""
    from gunicorn.glogging import Logger

    class JSONLinesLogger(Logger):
        def access(self, resp, req, environ, request_time) -> None:
            return None

    return JSONLinesLogger


logger_class = _without_access_lines()
# gunicorn's own lines (start, workers booted and exiting, timeouts, errors) are JSON on stdout
# like the gateway's; the root logger is left to the app (app.observability.logging).
logconfig_dict = {
    "root": {"level": "WARNING", "handlers": []},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["json"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": False},
    },
    "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
    "formatters": {"json": {"()": "app.observability.logging.JSONFormatter"}},
}
# gunicorn's control socket defaults to one path per user (~/.gunicorn/gunicorn.ctl): two
# servers on a machine (web and the demo httpbin, or two dynos' worth in tests) take it from
# each other, and the first to stop deletes it. The gateway does not use it.
control_socket_disable = True
# Scheme and client address come from GATEWAY_TRUSTED_PROXY_HOPS (werkzeug ProxyFix), never
# from headers gunicorn would otherwise believe when they arrive from loopback.
secure_scheme_headers = {}
forwarded_allow_ips = ""


def on_starting(server):
    """Validate the GATEWAY_* and platform variables (app.config.environment_settings), the route file and
    the client limits (app.server.ClientLimits) in the master, so a bad setting, file or value
    stops the process with one clear line each."""
    from flask import Flask

    from app.config import environment_settings
    from app.gateway import routefile
    from app.server import ClientLimits

    path = os.environ.get("GATEWAY_CONFIG", "gateway.yaml")
    try:
        environment_settings(Flask("app", instance_relative_config=True), dict(os.environ))
        routefile.load(path, api_prefix=os.environ.get("GATEWAY_API_PREFIX", "/_gateway"))
        ClientLimits.from_environ(os.environ)
    except (routefile.RouteFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def post_worker_init(worker):
    """Move what the app built at start-up out of the cyclic GC's sight, and collect less often;
    write log lines from a thread of their own.

    A proxy allocates many short-lived objects per request; with the default threshold (700)
    the young generation is collected every few requests, each time walking objects that live
    as long as the process. (The approach of Instagram's "Dismissing Python Garbage Collection".)
    """
    import gc

    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    # Every request writes an access line and updates metrics: both from threads of their own.
    from app.observability import logging as gateway_logging
    from app.observability import metrics

    gateway_logging.write_in_background()
    metrics.update_in_background()


def worker_exit(server, worker):
    """Apply the metric updates and write the log lines still queued before the worker goes."""
    from app.observability import logging as gateway_logging
    from app.observability import metrics

    metrics.stop_background()
    gateway_logging.stop_background()


def child_exit(server, worker):
    """A worker is gone (stopped, recycled or killed): its live gauges no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics directory made above for this server (not one given in the environment)."""
    if _own_metrics_dir:
        import shutil

        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
