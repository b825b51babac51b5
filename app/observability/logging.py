"""JSON logs on stdout, one access line per request, each carrying the request id."""
from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime

from flask import Flask, g, request
from werkzeug.wrappers import Response

# Attributes every LogRecord has; anything else passed through ``extra=`` is a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``msg``, ``pid``, then the extras."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value is not None:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


access = logging.getLogger("frontdoor.access")


def configure(level: str = "INFO") -> None:
    """Send the ``frontdoor`` loggers to stdout as JSON, once per process."""
    # What the logging HOWTO's "Optimization" section lists as not worth collecting per record:
    # the caller's file and line (a stack walk), thread and multiprocessing names. The access
    # line is written for every request; these cost a sixth of a pass-through request's CPU.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter())
    handler._frontdoor = True
    # pybreaker logs its Redis errors; they belong in the same JSON stream, not as bare tracebacks.
    for name, logger_level in (("frontdoor", level), ("pybreaker", "WARNING")):
        logger = logging.getLogger(name)
        if not any(getattr(h, "_frontdoor", False) for h in logger.handlers):
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(logger_level)


def _start() -> None:
    g.started = time.perf_counter()


def _log_when_done(response: Response) -> Response:
    ctx, client = g._get_current_object(), request._get_current_object()
    started = ctx.get("started")
    target = ctx.get("target")
    fields = {
        "request_id": ctx.get("request_id"),
        "method": client.method,
        "path": client.path,
        "route": ctx.get("route"),
        "consumer": ctx.get("consumer_id"),
        "target": target,
        "status": response.status_code,
        "upstream_ms": round(ctx.get("upstream_seconds", 0.0) * 1000, 3) if target else None,
    }

    def emit() -> None:
        # Logged when the body has been sent, so a streamed download's whole time is counted.
        if started is not None:
            fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
        access.info("request", extra=fields)

    response.call_on_close(emit)
    return response


def init_app(app: Flask) -> None:
    """Configure JSON logging and log one line per request."""
    configure(app.config.get("LOG_LEVEL", "INFO"))
    app.before_request(_start)
    app.after_request(_log_when_done)
