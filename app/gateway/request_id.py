"""Request id: keep a sane client ``X-Request-ID`` or make one; echo it on every response."""
from __future__ import annotations

import random
import re
import uuid

from flask import Flask, g, request
from werkzeug.wrappers import Response

HEADER = "X-Request-ID"
_SANE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def accept_or_generate(value: str | None) -> str:
    """Return ``value`` when it is a sane id (1-128 visible URL-safe characters), else a new one.

    A client-chosen id is kept so one id follows the work through every hop; anything that
    could break a log line or a header (spaces, control characters, very long) is replaced.
    """
    if value and _SANE.match(value):
        return value
    return new_id()


def new_id() -> str:
    """A random (version 4) UUID as 32 hex digits.

    From ``random``, not ``uuid.uuid4()``: an id only has to be unique, and ``os.urandom``
    gives up the GIL for its system call, which with many request threads cost a request a
    thread switch (bench/README.md). ``random`` is seeded from the OS and again in every
    forked process, so two gunicorn workers never share a sequence.
    """
    return uuid.UUID(int=random.getrandbits(128), version=4).hex


def _before() -> None:
    g.request_id = accept_or_generate(request.headers.get(HEADER))


def _after(response: Response) -> Response:
    response.headers[HEADER] = g.get("request_id") or accept_or_generate(None)
    return response


def init_app(app: Flask) -> None:
    """Give every request, the gateway's own included, an id before anything else runs."""
    app.before_request_funcs.setdefault(None, []).insert(0, _before)
    app.after_request(_after)
