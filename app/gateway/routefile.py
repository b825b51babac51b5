"""The route file: YAML with ``${VAR:-default}`` interpolation, validated into typed config."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from limits import parse_many
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.gateway.aggregate import AggregateCall
from app.gateway.breaker import Breaker
from app.gateway.cache import Cache
from app.gateway.cors import Cors
from app.gateway.forward import TLS, Timeout
from app.gateway.idempotency import Idempotency
from app.gateway.retry import Retries
from app.gateway.schema import METHODS, Method
from app.gateway.schema import Strict as _Strict
from app.gateway.transform import BodyRules, HeaderRules
from app.identity import Policy

RESERVED_PATHS = ("/healthz", "/readyz", "/metrics")
# Seconds a synchronous route may keep its client waiting: Heroku's router answers 503 (H12)
# after 30 s, and a web process stopping gives in-flight requests 25 s (gunicorn.conf.py).
SYNC_TIME_LIMIT = 30.0

log = logging.getLogger("frontdoor.routefile")

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a token (RFC 9110 section 5.1)
_OWNED = frozenset({"authorization", "x-api-key", "via", "x-request-id", "host", "content-length"})
_FIELD_VALUE = re.compile(r"[ \t\x21-\x7e]*")  # visible ASCII, spaces and tabs (section 5.5)


class RouteFileError(Exception):
    """The route file cannot be used; the message names the file, the key and, where known, the line."""


def shown(url: str) -> str:
    """``url`` as an error message may show it: userinfo, query and fragment replaced by ``***``
    (they may hold a credential, put there directly or by ${VAR})."""
    scheme, sep, rest = url.partition("://")
    prefix, rest = (scheme + sep, rest) if sep else ("", url)
    rest = re.sub(r"[?#].*", "?***", rest, flags=re.DOTALL)
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return prefix + authority + slash + path


class Upstream(_Strict):
    """A backend service: one or more targets (base URLs) with shared resilience settings."""

    targets: Annotated[tuple[str, ...], Field(min_length=1)]
    timeout: Timeout = Timeout()
    # For calls made by a job's worker (routes with ``mode: async``, POST /_gateway/jobs):
    # nobody is holding a connection open, so the wait can be far longer.
    job_timeout: Timeout = Timeout(read=240.0)
    retries: Retries = Retries()
    breaker: Breaker = Breaker()
    max_concurrency: Annotated[int, Field(ge=1)] | None = None  # bulkhead, per worker process
    tls: TLS = TLS()  # for https:// targets: verification and a client certificate

    @field_validator("targets")
    @classmethod
    def _targets_are_urls(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = []
        for target in targets:
            parts = urlsplit(target)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"target {shown(target)!r} is not an http(s) URL with a host")
            if parts.username is not None or parts.password is not None:
                # The gateway would not send them, and a target URL is shown in logs, metrics
                # and the admin API.
                raise ValueError(f"target {shown(target)!r} must not carry credentials (user:password@)")
            if parts.query or parts.fragment:
                raise ValueError(f"target {shown(target)!r} must not carry a query or fragment")
            cleaned.append(target.rstrip("/"))
        return tuple(cleaned)


class Route(_Strict):
    """A path prefix (with ``{param}`` segments) sent to one upstream."""

    path: str
    upstream: str | None = None  # where the route sends requests; or, instead, ``aggregate``
    name: str | None = None  # label for logs and metrics; defaults to the path
    methods: Annotated[tuple[Method, ...], Field(min_length=1)] | None = None  # None: every method
    strip_prefix: bool = False
    # Paths with an encoded '/' or '\', a '\', NUL, a ';' parameter or a segment ending in '.'
    # or white space are refused (400 ambiguous-path) unless this is true: an upstream that
    # normalises them could read them as another route's path (router.ambiguity).
    allow_ambiguous_paths: bool = False
    max_body_size: Annotated[int, Field(ge=0)] | None = None  # bytes; None: MAX_BODY_SIZE
    # Who may call: "required" (a valid credential), "optional" (anonymous callers too, but a
    # credential that is sent must be valid) or "none" (the gateway does not look).
    auth: Literal["required", "optional", "none"] = "optional"
    scopes: tuple[str, ...] = ()  # every one is required of the credential
    # Authorization and X-API-Key reach the upstream only when this is true (auth "none" routes
    # pass them untouched: the gateway has not read them).
    forward_credentials: bool = False
    # Per consumer (or client IP when anonymous) on this route, instead of the plan's limit:
    # "600/minute;20/second" (the limits library's notation), or "none" for no limit.
    rate_limit: str | None = None
    # "async": each request becomes a job (202 and a status URL) that a worker sends upstream.
    mode: Literal["sync", "async"] = "sync"
    # The route takes a request only when each of these headers has exactly this value (a
    # canary, "X-Version: v2"); routes with conditions are tried before the one without.
    match_headers: dict[str, str] = Field(default_factory=dict)
    request_headers: HeaderRules | None = None  # changes to what the upstream is sent
    response_headers: HeaderRules | None = None  # changes to what the client gets
    response_body: BodyRules | None = None  # JSON fields the client gets
    cache: Cache | None = None  # GET/HEAD answers kept and served without the upstream
    idempotency: Idempotency | None = None  # unsafe requests with Idempotency-Key answered once
    cors: Cors | None = None  # pages on other origins that may call (preflights answered here)
    # Several backend calls merged into one JSON answer, by name (instead of ``upstream``).
    aggregate: dict[str, AggregateCall] | None = None
    aggregate_mode: Literal["partial", "all"] = "partial"  # "all": any failed call fails the answer
    timeout: Annotated[float, Field(gt=0)] = 10.0  # seconds an aggregate answer may take in all

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() == "none":
            return None if value is None else "none"
        try:
            parse_many(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate limit such as '100/minute' or '10/second;1000/hour'") from None
        return value

    @model_validator(mode="after")
    def _scopes_need_auth(self) -> Route:
        if self.scopes and self.auth != "required":
            raise ValueError(f"scopes {list(self.scopes)} need 'auth: required' (auth is {self.auth!r})")
        for side in ("request_headers", "response_headers"):
            rules = getattr(self, side)
            owned = rules.owned() if rules is not None and side == "request_headers" else []
            if owned:
                raise ValueError(f"{side} cannot name {', '.join(owned)}: the gateway sets or checks these fields itself")
        if (self.upstream is None) == (self.aggregate is None):
            raise ValueError("a route needs either 'upstream' or 'aggregate' (and not both)")
        if self.aggregate is not None:
            if self.mode == "async":
                raise ValueError("an aggregate route cannot be 'mode: async'")
            names = set(self.aggregate)
            for name, call in self.aggregate.items():
                unknown = [dep for dep in call.depends_on if dep not in names or dep == name]
                if unknown:
                    raise ValueError(f"aggregate call {name!r} depends on {unknown}, which are not other calls of this route")
                for used in re.findall(r"\{([A-Za-z_][A-Za-z0-9_-]*)\.body\b", call.path):
                    if used not in call.depends_on:
                        raise ValueError(f"aggregate call {name!r} uses the answer of {used!r}, which must be in its depends_on")
            _acyclic(self.aggregate)
        if self.mode == "async" and self.forward_credentials:
            # The job's request is stored until it expires; a client's key must never be.
            raise ValueError("forward_credentials cannot be used with mode: async (jobs do not store credentials)")
        return self

    @cached_property
    def policy(self) -> Policy:
        return Policy(self.auth, frozenset(self.scopes))

    @field_validator("methods", mode="before")
    @classmethod
    def _upper(cls, methods: object) -> object:
        if isinstance(methods, list | tuple):
            return tuple(m.upper() if isinstance(m, str) else m for m in methods)
        return methods

    @field_validator("path")
    @classmethod
    def _path_shape(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("must start with '/'")
        if "?" in path or "#" in path:
            raise ValueError("must not carry a query or fragment")
        names: list[str] = []
        for segment in path.strip("/").split("/"):
            if "{" in segment or "}" in segment:
                param = _PARAM.match(segment)
                if not param:
                    raise ValueError(f"segment {segment!r} is not a whole '{{name}}' parameter")
                if param.group(1) in names:
                    raise ValueError(f"parameter {{{param.group(1)}}} appears twice")
                names.append(param.group(1))
        return path if path == "/" else path.rstrip("/")

    @property
    def label(self) -> str:
        return self.name or self.path


def _acyclic(calls: dict[str, AggregateCall]) -> None:
    done: set[str] = set()
    for _ in calls:
        ready = [name for name, call in calls.items() if name not in done and set(call.depends_on) <= done]
        if not ready:
            break
        done.update(ready)
    if len(done) != len(calls):
        raise ValueError(f"aggregate calls {sorted(set(calls) - done)} depend on each other in a cycle")


class RouteFile(_Strict):
    """The whole route file: named upstreams and the routes that use them."""

    upstreams: dict[str, Upstream] = Field(default_factory=dict)
    routes: tuple[Route, ...] = ()

    @model_validator(mode="after")
    def _references(self) -> RouteFile:
        known = ", ".join(sorted(self.upstreams)) or "none"
        for route in self.routes:
            named = [route.upstream] if route.upstream else [call.upstream for call in (route.aggregate or {}).values()]
            for upstream in named:
                if upstream not in self.upstreams:
                    raise ValueError(
                        f"route {route.path!r} names upstream {upstream!r}, which is not defined (defined: {known})"
                    )
        seen: dict[tuple, str] = {}
        for route in self.routes:
            condition = frozenset((name.lower(), value) for name, value in route.match_headers.items())
            for method in route.methods or METHODS:
                key = (route.path, method, condition)
                if key in seen:
                    what = f" with match_headers {dict(route.match_headers)}" if condition else ""
                    raise ValueError(f"route {route.path!r} is defined twice for {method}{what}")
                seen[key] = route.path
        return self


def reject_reserved(route_file: RouteFile, api_prefix: str) -> None:
    """Raise RouteFileError if a route lies on the gateway's own paths.

    The reserved paths are ``api_prefix`` (``/_gateway``), ``/healthz``, ``/readyz`` and
    ``/metrics``, and everything below them. A broader route such as ``/`` is allowed: the
    gateway's own paths are always matched first.
    """
    reserved = (api_prefix.rstrip("/"), *RESERVED_PATHS)
    for index, route in enumerate(route_file.routes):
        for path in reserved:
            if route.path == path or route.path.startswith(path + "/"):
                raise RouteFileError(
                    f"routes[{index}].path: {route.path!r} overlaps the reserved path {path!r}"
                )


def sync_budget(route: Route, upstreams: Mapping[str, Upstream]) -> float | None:
    """The longest a client of ``route`` may wait for an answer, in seconds, or None for a
    ``mode: async`` route (its client is answered 202 at once).

    An aggregate route ends at its ``timeout``. A route to one upstream waits, per attempt, up
    to the connect and then the read timeout (the read timeout bounds each wait between bytes;
    this counts the wait for the answer's headers), for ``retries.attempts`` attempts, plus the
    largest backoff before each retry. Any request may be tried that often: a failed connect
    is retried for every method, and a client's ``Idempotency-Key`` makes a POST retryable.
    """
    if route.mode == "async":
        return None
    if route.aggregate is not None:
        return route.timeout
    upstream = upstreams[route.upstream]
    timeout, retries = upstream.timeout, upstream.retries
    backoffs = sum(min(retries.max_backoff, retries.backoff * 2 ** (retry - 1)) for retry in range(1, retries.attempts))
    return retries.attempts * (timeout.connect + timeout.read) + backoffs


def over_budget(route_file: RouteFile, limit: float = SYNC_TIME_LIMIT) -> list[tuple[Route, float]]:
    """The synchronous routes that may keep a client waiting longer than ``limit`` seconds,
    each with its budget (seconds, from ``sync_budget``), in file order."""
    budgets = [(route, sync_budget(route, route_file.upstreams)) for route in route_file.routes]
    return [(route, budget) for route, budget in budgets if budget is not None and budget > limit]


def interpolate(value: object, env: Mapping[str, str], where: str = "") -> object:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of a loaded YAML tree.

    Interpolation happens on parsed scalars, so a variable can never change the file's
    structure. Raises RouteFileError naming the key when ``VAR`` is unset and has no default.
    """
    if isinstance(value, str):
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            raise RouteFileError(f"{where or 'value'}: environment variable {name} is not set")

        return _VARIABLE.sub(replace, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def load(
    path: str | Path, env: Mapping[str, str] | None = None, api_prefix: str = "/_gateway", sync_limit: float = SYNC_TIME_LIMIT
) -> RouteFile:
    """Read, interpolate and validate the route file at ``path``.

    Returns a frozen RouteFile. Raises RouteFileError with a message that names the file,
    the offending key (``routes[1].upstream``), its line when the key is in the file, and
    what is wrong. Logs a warning (``frontdoor.routefile``) for each synchronous route that
    may take longer than ``sync_limit`` seconds (``over_budget``); those do not stop the load.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RouteFileError(f"{path}: cannot read the route file: {exc.strerror}") from exc
    try:
        tree = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        # PyYAML names a string it parsed "<unicode string>": name the file instead.
        raise RouteFileError(f"{path}: not valid YAML: {str(exc).replace('<unicode string>', str(path))}") from exc
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise RouteFileError(f"{path}: the top level must be a mapping with 'upstreams' and 'routes'")
    references = _reference_errors(tree, root)
    try:
        tree = interpolate(tree, os.environ if env is None else env)
        route_file = RouteFile.model_validate(tree)
        reject_reserved(route_file, api_prefix)
    except RouteFileError as exc:
        raise RouteFileError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        # Every error at once: the fields', and the upstreams named but not defined (which the
        # model checks only once its fields are valid, and then without a line).
        found = [line for line in _describe(exc, root).split("; ") if not (references and _NOT_DEFINED in line)]
        raise RouteFileError(f"{path}: {'; '.join([*found, *references])}") from exc
    for route, budget in over_budget(route_file, sync_limit):
        # A warning, not an error: the file still works, but a client behind Heroku's router
        # is cut off at 30 s while the gateway keeps waiting (and a stopping dyno cuts it at 25 s).
        log.warning(
            "%s: route %r may take %g s (timeouts x attempts + backoff), over the %g s a synchronous "
            "request may take; lower its upstream's timeout or retries, or use mode: async",
            path, route.label, budget, sync_limit,
            extra={"route": route.label, "budget": budget, "limit": sync_limit},
        )
    return route_file


_NOT_DEFINED = "which is not defined"


def _reference_errors(tree: dict, root: yaml.Node | None) -> list[str]:
    """``routes[i].upstream (line N): ...`` for each upstream a route (or an aggregate's call)
    names that the file does not define, read from the file as written."""
    upstreams = tree.get("upstreams")
    defined = sorted(upstreams) if isinstance(upstreams, dict) else []
    routes = tree.get("routes")
    found = []
    for index, route in enumerate(routes if isinstance(routes, list) else []):
        if not isinstance(route, dict):
            continue
        named = [(["routes", index, "upstream"], route.get("upstream"))]
        calls = route.get("aggregate")
        if isinstance(calls, dict):
            named += [(["routes", index, "aggregate", name, "upstream"], call.get("upstream")) for name, call in calls.items() if isinstance(call, dict)]
        for loc, name in named:
            if isinstance(name, str) and name not in defined:
                line = _line_of(root, loc)
                where = f"{_dotted(loc)} (line {line})" if line else _dotted(loc)
                found.append(f"{where}: names upstream {name!r}, {_NOT_DEFINED} (defined: {', '.join(defined) or 'none'})")
    return found


def _describe(exc: ValidationError, root: yaml.Node | None) -> str:
    """One line per validation error: ``key (line N): what is wrong``."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = [part for part in error["loc"] if not _is_type_tag(part)]
        key = _dotted(loc)
        line = _line_of(root, loc)
        where = f"{key} (line {line})" if key and line else (key or "route file")
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}")
    return "; ".join(lines)


def _is_type_tag(part: object) -> bool:
    # pydantic adds union member names such as 'float' or 'function-after[...]' to locations
    return isinstance(part, str) and (part in {"float", "int", "str", "list", "tuple"} or "[" in part)


def _dotted(loc: list[object]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(node: yaml.Node | None, loc: list[object]) -> int | None:
    """The 1-based line of the YAML node at ``loc``, or of its nearest parent present in the file."""
    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line

