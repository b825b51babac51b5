"""JSON logs on stdout (stderr under a flask command), one access line per request, each carrying the request id."""
from __future__ import annotations

import copy
import json
import logging
import os
import queue
import sys
import threading
import time
from contextvars import ContextVar
from functools import partial
from logging.handlers import QueueHandler, QueueListener

import click
from flask import Flask, g, has_request_context, request
from flask.cli import FlaskGroup
from werkzeug.wrappers import Response

from app.observability import metrics

# Attributes every LogRecord has; anything else passed through ``extra=`` is a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``,
    ``msg``, ``pid``, then the extras, and ``exc`` (the traceback) when there is one."""

    _encode = json.JSONEncoder(default=str).encode
    _second: tuple[int, str] = (-1, "")  # the last second formatted, which most lines share

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value is not None:
                line[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        return self._encode(line)

    def _timestamp(self, created: float) -> str:
        """``2026-11-21T14:28:44.209+00:00``, as ``datetime.isoformat(timespec="milliseconds")``."""
        second = int(created)
        cached = self._second
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._second = cached
        return f"{cached[1]}.{int((created - second) * 1000):03d}+00:00"


access = logging.getLogger("frontdoor.access")


class AccessRecord(logging.LogRecord):
    """The record of an access line, the request's fields among its attributes. It holds what
    ``Logger.info(msg, extra=fields)`` would make, built from a template: ``LogRecord.__init__``,
    ``Logger.makeRecord`` and ``Logger._log`` work out, per line, attributes that are the
    same for every access line (source file, module, level): about a quarter of the line's CPU
    (measured in one process, 2026-12-07)."""

    _template: dict | None = None

    def __init__(self, name: str, fields: dict):
        template = AccessRecord._template
        if template is None:
            template = AccessRecord._template = vars(logging.LogRecord(name, logging.INFO, "(unknown file)", 0, "request", (), None))
        attributes = self.__dict__
        attributes.update(template)
        attributes.update(fields)
        self.name = name
        self.created = created = time.time()
        self.msecs = int((created - int(created)) * 1000) + 0.0
        self.relativeCreated = (created - logging._startTime) * 1000
        self.process = os.getpid()
        if logging.logThreads:
            self.thread, self.threadName = threading.get_ident(), threading.current_thread().name


class _Handoff(QueueHandler):
    """Puts each record on a queue for the writer thread. What the record refers to that may
    change (message arguments, a traceback's frames) is resolved here, in the logging thread."""

    def handle(self, record: logging.LogRecord) -> bool:
        # Handler.handle without the handler's lock: the queue is thread-safe by itself. With
        # many request threads that lock convoys under the GIL (a thread holding it is switched
        # out, the others block on it): it doubled a cache hit's CPU in 8 threads (bench/README.md).
        rv = self.filter(record)
        if rv:
            self.emit(record)
        return rv

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if not record.args and not record.exc_info:
            return record  # nothing left to resolve (an access line): no copy to make
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatter.formatException(record.exc_info)
            record.exc_info = None
        return record


class _BurstWriter(logging.StreamHandler):
    """Writes the lines that arrived together with one write: it holds formatted lines until
    the queue it is fed from is empty (or ``most`` are held), so under load a burst of access
    lines costs one system call, and an idle process writes each line as it comes."""

    def __init__(self, stream, source: queue.SimpleQueue, most: int = 256):
        super().__init__(stream)
        self.source, self.most, self.held = source, most, []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.held.append(self.format(record) + self.terminator)
        except Exception:  # noqa: BLE001 (as StreamHandler.emit: a bad record is reported, never raised)
            self.handleError(record)
        if self.source.empty() or len(self.held) >= self.most:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            if self.held:
                self.stream.write("".join(self.held))
                self.held.clear()
            super().flush()


class _Listener(QueueListener):
    """A QueueListener that looks at its queue every ``metrics.BACKGROUND_INTERVAL`` seconds when it is
    empty, rather than blocking on it: a blocked writer is woken by every line put on the
    queue (a context switch and a hand-over of the GIL per request), which cost more than
    writing the line. A burst is handled line after line, then written at once (_BurstWriter)."""

    def dequeue(self, block: bool) -> logging.LogRecord:
        while True:
            try:
                return self.queue.get_nowait()
            except queue.Empty:
                if not block:
                    raise
                time.sleep(metrics.BACKGROUND_INTERVAL)



# pybreaker logs its Redis errors; they belong in the same JSON stream, not as bare tracebacks.
_LOGGERS = ("frontdoor", "pybreaker")
_background: _Listener | None = None


# The request id of the work this thread is doing outside a Flask request: a proxied request's
# (app/gateway/proxy.py), or a Celery task's, from its message headers (app/observability/tasks.py).
work_request_id: ContextVar[str | None] = ContextVar("frontdoor_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request this thread serves (the gateway's API or the proxy), or of the
    request that started the task it runs."""
    if has_request_context():
        return g.get("request_id")
    return work_request_id.get()


def _with_request_id(record: logging.LogRecord) -> bool:
    # Every line of one piece of work carries its request id, whoever logged it.
    if getattr(record, "request_id", None) is None:
        record.request_id = current_request_id()
    return True


def _ours(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if getattr(h, "_frontdoor", False)]


def _install(handler: logging.Handler) -> None:
    """Make ``handler`` the one the ``frontdoor`` and ``pybreaker`` loggers write through, and
    the root logger's (what other libraries log: Celery's own lines, a driver's warnings)."""
    handler._frontdoor = True
    handler.addFilter(_with_request_id)
    for logger in (*map(logging.getLogger, _LOGGERS), logging.getLogger()):
        for old in _ours(logger):
            logger.removeHandler(old)
        logger.addHandler(handler)
        if logger is not logging.root:
            logger.propagate = False


def _stdout_handler(stream) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    return handler


def _log_stream():
    """stdout, where a platform collects a service's logs; stderr under a ``flask`` command, so
    that ``KEY=$(flask keys create ...)`` captures the command's answer and nothing else."""
    context = click.get_current_context(silent=True)
    return sys.stderr if context is not None and isinstance(context.find_root().command, FlaskGroup) else sys.stdout


def configure(level: str = "INFO") -> None:
    """Send the ``frontdoor`` loggers, and whatever reaches the root logger (at its level:
    WARNING unless a Celery worker's ``--loglevel`` says otherwise), to stdout as JSON (stderr
    under a ``flask`` command: ``_log_stream``), once per process."""
    # What the logging HOWTO's "Optimization" section lists as not worth collecting per record:
    # the caller's file and line (a stack walk), thread and multiprocessing names. The access
    # line is written for every request; these cost a sixth of a pass-through request's CPU.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    if not _ours(logging.getLogger("frontdoor")):
        _install(_stdout_handler(_log_stream()))
    logging.getLogger("frontdoor").setLevel(level)
    logging.getLogger("pybreaker").setLevel("WARNING")


def write_in_background() -> None:
    """Format and write the ``frontdoor`` log lines in a thread of their own rather than in the
    thread that logs them (the logging cookbook's "Dealing with handlers that block"): a
    request thread only puts its record on a queue. For the web workers, where every request
    writes an access line (``gunicorn.conf.py``); call after ``configure``. Lines keep their
    order, and ``stop_background`` writes what is queued; a process killed outright loses the
    lines still queued (at most a burst)."""
    global _background
    ours = _ours(logging.getLogger("frontdoor"))
    if _background is not None or not ours:
        return
    source: queue.SimpleQueue = queue.SimpleQueue()
    writer = _BurstWriter(ours[0].stream, source)
    writer.setFormatter(JSONFormatter())
    handoff = _Handoff(source)
    handoff.setFormatter(writer.formatter)
    _install(handoff)
    _background = _Listener(source, writer)
    _background.start()


def stop_background() -> None:
    """Write every queued line, then write in the logging thread again."""
    global _background
    if _background is None:
        return
    listener, _background = _background, None
    listener.stop()
    writer = listener.handlers[0]
    writer.flush()
    _install(_stdout_handler(writer.stream))


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

    rule = client.url_rule
    # Metrics name the gateway's own endpoints by their URL rule; a proxied path by its route.
    route = fields["route"] or (rule.rule if rule is not None and client.endpoint != "proxy" else None)
    upstream_seconds = ctx.get("upstream_seconds") if target else None
    response.call_on_close(partial(request_done, fields, started, route, upstream_seconds, response.headers.get("Cache-Status")))
    return response


def request_done(fields: dict, started: float | None, route: str | None, upstream_seconds: float | None, cache_status: str | None) -> None:
    """Once a request's body has been sent (so a streamed download's whole time counts): its
    metrics (``metrics.request_done``) and its access line, ``fields`` with ``duration_ms``
    (milliseconds since ``started``, a ``time.perf_counter()`` reading; None: not timed).
    The app's hook and the cache fast path both end a request here."""
    seconds = None if started is None else time.perf_counter() - started
    if seconds is not None:
        fields["duration_ms"] = round(seconds * 1000, 3)
    metrics.request_done(route, fields["method"], fields["status"], seconds, upstream_seconds, cache_status)
    if access.isEnabledFor(logging.INFO):
        access.handle(AccessRecord(access.name, fields))


def init_app(app: Flask) -> None:
    """Configure JSON logging and log one line per request."""
    configure(app.config.get("LOG_LEVEL", "INFO"))
    app.before_request(_start)
    app.after_request(_log_when_done)
