"""CORS (the Fetch standard's CORS protocol, https://fetch.spec.whatwg.org/#http-cors-protocol):
which pages on other origins may call a route, answered by the gateway itself.

A route's ``cors:`` section (and ``GATEWAY_API_CORS_*`` for the gateway's own API) is a
``Cors``. A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is
answered by the gateway, before authentication, and never reaches the upstream: 204 with the
``Access-Control-Allow-*`` fields when the origin is allowed, a 403 problem without them when it
is not. Every other answer to an allowed origin, errors included (401, 429, 503), carries
``Access-Control-Allow-Origin`` and the exposed fields; an upstream's own ``Access-Control-*``
fields are replaced. A disallowed origin gets no CORS field at all, so its page cannot read
the answer.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from werkzeug.datastructures import Headers

from app.errors import ProblemError
from app.gateway.schema import METHODS, Method, Strict

# What a page may read of an answer besides the CORS-safelisted fields: the rate-limit fields
# (draft-ietf-httpapi-ratelimit-headers and the X- ones), the request id, and what the
# gateway's answers point with.
EXPOSED = (
    "RateLimit",
    "RateLimit-Policy",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
    "X-Request-ID",
    "Location",
    "ETag",
)
# What a page may send besides the safelisted fields: the credentials the gateway reads, a JSON
# body's type, an idempotency key, its own request id and trace context.
ALLOWED_HEADERS = ("Authorization", "X-API-Key", "Content-Type", "Idempotency-Key", "X-Request-ID", "traceparent", "tracestate")
# "https://app.example.com", "http://localhost:3000", "https://*.example.com" (one or more labels).
_ORIGIN = re.compile(r"(?P<scheme>https?)://(?P<host>(\*\.)?[a-z0-9-]+(\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])(:(?P<port>[0-9]{1,5}))?")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a field name (RFC 9110 section 5.6.2)
_VARY_PREFLIGHT = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


class CorsOriginRefused(ProblemError):
    """403: a preflight from an origin the route's ``cors.origins`` does not list."""

    status, title, slug = 403, "Forbidden", "cors-origin-refused"


class Cors(Strict):
    """Who may call cross-origin, and with what.

    ``origins``: ``scheme://host[:port]`` exactly, ``scheme://*.domain`` for any subdomain, or
    ``"*"`` for any origin (not with ``credentials``: browsers refuse it). ``methods``: what a
    page may send (default: the route's methods, or every method). ``headers``: request fields a
    page may send (``["*"]``: any it asks for). ``expose_headers``: response fields it may read.
    ``credentials``: cookies and HTTP authentication go along (``Access-Control-Allow-Credentials``).
    ``max_age``: seconds a browser may reuse a preflight's answer.
    """

    origins: Annotated[tuple[str, ...], Field(min_length=1)]
    methods: Annotated[tuple[Method, ...], Field(min_length=1)] | None = None
    headers: tuple[str, ...] = ALLOWED_HEADERS
    expose_headers: tuple[str, ...] = EXPOSED
    credentials: bool = False
    max_age: Annotated[int, Field(ge=0, le=86400)] = 600

    @field_validator("origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        normal = []
        for origin in value:
            lowered = origin.strip().lower().rstrip("/")
            if lowered != "*" and not _ORIGIN.fullmatch(lowered):
                raise ValueError(f"{origin!r} is not an origin such as 'https://app.example.com', 'https://*.example.com' or '*'")
            normal.append(lowered)
        return tuple(normal)

    @field_validator("headers", "expose_headers")
    @classmethod
    def _field_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [name for name in value if name != "*" and not _TOKEN.fullmatch(name)]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))} is not a header field name")
        return value

    @model_validator(mode="after")
    def _wildcard_without_credentials(self) -> Cors:
        if self.credentials and "*" in self.origins:
            raise ValueError("origins '*' cannot go with credentials: true (browsers refuse it); list the origins")
        return self

    @cached_property
    def _exact(self) -> frozenset[str]:
        return frozenset(origin for origin in self.origins if "*" not in origin)

    @cached_property
    def _patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(
            re.compile(re.escape(origin).replace(r"\*\.", r"[a-z0-9-]+(?:\.[a-z0-9-]+)*\."))
            for origin in self.origins
            if origin != "*" and "*" in origin
        )

    @cached_property
    def _any(self) -> bool:
        return "*" in self.origins

    def allows(self, origin: str) -> bool:
        """Whether a page of ``origin`` (the request's ``Origin``) may call."""
        lowered = origin.lower()
        if self._any or lowered in self._exact:
            return True
        return any(pattern.fullmatch(lowered) for pattern in self._patterns)

    def _allow_origin(self, origin: str) -> list[tuple[str, str]]:
        if self._any and not self.credentials:
            return [("Access-Control-Allow-Origin", "*")]
        fields = [("Access-Control-Allow-Origin", origin)]
        if self.credentials:
            fields.append(("Access-Control-Allow-Credentials", "true"))
        return fields

    def preflight(self, origin: str, requested_headers: str | None, route_methods: Iterable[str] | None) -> Headers:
        """The fields of the 204 answering a preflight from ``origin``.

        Raises CorsOriginRefused (403, no CORS field) when the origin is not allowed. A method
        or field not allowed is left to the browser, which compares the lists."""
        if not self.allows(origin):
            raise CorsOriginRefused(f"Origin {origin} may not call this route cross-origin", headers={"Vary": _VARY_PREFLIGHT})
        methods = list(self.methods or route_methods or METHODS)
        if "GET" in methods and "HEAD" not in methods:
            methods.append("HEAD")  # served wherever GET is
        if "*" in self.headers:
            allowed = ", ".join(name.strip() for name in (requested_headers or "").split(",") if _TOKEN.fullmatch(name.strip()))
        else:
            allowed = ", ".join(self.headers)
        fields = Headers(self._allow_origin(origin))
        fields.add("Access-Control-Allow-Methods", ", ".join(methods))
        if allowed:
            fields.add("Access-Control-Allow-Headers", allowed)
        fields.add("Access-Control-Max-Age", str(self.max_age))
        fields.add("Vary", _VARY_PREFLIGHT)
        fields.add("Content-Length", "0")
        return fields

    def apply(self, headers: Headers, origin: str | None) -> None:
        """Set the CORS fields of an actual (not preflight) answer on ``headers``, in place:
        any ``Access-Control-*`` field already there (an upstream's) goes; ``Vary`` gains
        ``Origin`` unless every origin gets the same answer."""
        for name in {name for name in headers.keys() if name.lower().startswith("access-control-")}:  # noqa: SIM118
            del headers[name]
        if not (self._any and not self.credentials):
            varies = [part.strip() for line in headers.getlist("Vary") for part in line.split(",") if part.strip()]
            if "*" not in varies and "origin" not in {part.lower() for part in varies}:
                headers["Vary"] = ", ".join([*varies, "Origin"])  # every Vary line, as one
        if origin is None or not self.allows(origin):
            return
        for name, value in self._allow_origin(origin):
            headers.add(name, value)
        if self.expose_headers:
            headers.add("Access-Control-Expose-Headers", ", ".join(self.expose_headers))


def requested_method(method: str, headers: Mapping[str, str]) -> str | None:
    """The method a CORS preflight asks about (``Access-Control-Request-Method``), or None when
    the request is not a preflight: an ``OPTIONS`` with ``Origin`` and that field."""
    if method != "OPTIONS" or not headers.get("Origin"):
        return None
    asked = (headers.get("Access-Control-Request-Method") or "").strip().upper()
    return asked if asked in METHODS else None
