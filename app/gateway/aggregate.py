"""Aggregate routes (Backend for Frontend, after KrakenD's merger): named backend calls, run in
parallel where they are independent, merged into one JSON object by name."""
from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Annotated, Literal
from urllib.parse import parse_qs, quote

from pydantic import Field, field_validator
from werkzeug.datastructures import Headers

from app.errors import ProblemError
from app.gateway.fields import FieldRules, parse
from app.gateway.schema import Method, Strict
from app.gateway.transform import is_json
from app.gateway.types import (
    GatewayRequest,
    GatewayResponse,
    Handler,
    UpstreamTimeout,
    UpstreamUnreachable,
)

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
MAX_PART = 10 * 1024 * 1024  # bytes read of one backend answer

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class AggregateCall(Strict):
    """One named backend call of an aggregate route. ``path`` is a template: ``{param}`` from
    the route's path, ``{query.name}`` from the client's query, ``{call.body.field}`` from an
    earlier call named in ``depends_on``. ``allow``/``deny``/``rename`` filter its JSON."""

    upstream: str
    path: str
    method: Method = "GET"
    required: bool = False
    depends_on: tuple[str, ...] = ()
    timeout: Annotated[float, Field(gt=0)] | None = None  # read timeout, seconds; default: the upstream's
    list_format: Literal["csv", "repeat"] = "csv"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    rename: dict[str, str] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _starts_with_slash(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("must start with '/'")
        return path


def shared_pool(size: int) -> ThreadPoolExecutor:
    """The process's one bounded pool for backend calls, created on first use (after a fork)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="aggregate")
        return _pool


class UnsafeValue(ValueError):
    """A template value that would change which resource a path names (empty, ``.``, ``..``)."""


class PartFailed(ProblemError):
    """A required backend call of an aggregate failed (502, or 504 when it timed out)."""

    status, title, slug = 502, "Bad Gateway", "aggregate-part-failed"


class PartTimedOut(PartFailed):
    status, title = 504, "Gateway Timeout"


@dataclass(frozen=True)
class Part:
    """One named backend call: ``path`` is a template (``/users/{user_id}``,
    ``/prices?ids={orders.body.ids}``, ``{query.q}``); ``handler`` is the upstream's pipeline."""

    name: str
    method: str
    path: str
    handler: Handler
    required: bool = False
    depends_on: tuple[str, ...] = ()
    timeout: float | None = None  # seconds, inside the route's deadline
    list_format: str = "csv"  # a list value: "csv" (a,b) or "repeat" (x=a&x=b, in the query)
    fields: FieldRules = field(default_factory=FieldRules)


def _lookup(name: str, params: dict[str, str], query: dict[str, list[str]], results: dict[str, object]) -> object:
    """The value of a placeholder: a path parameter, ``query.<name>``, or ``<part>.body.<path>``.

    Raises KeyError when it has none (a query parameter not sent, a field that is missing
    or null): a call is never made to a path with a hole in it."""
    if name in params:
        return params[name]
    head, _, rest = name.partition(".")
    if head == "query":
        values = query.get(rest)
        if not values:
            raise KeyError(name)
        return values if len(values) != 1 else values[0]
    if head in results and rest.startswith("body"):
        value = results[head]
        for key in rest.split(".")[1:]:
            if isinstance(value, list):
                value = [item.get(key) if isinstance(item, dict) else None for item in value]
            elif isinstance(value, dict):
                value = value.get(key)
            else:
                value = None
        if value is None:
            raise KeyError(name)
        return value
    raise KeyError(name)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def fill(template: str, params: dict[str, str], query: dict[str, list[str]], results: dict[str, object], list_format: str) -> str:
    """The path and query of a call, placeholders filled and percent-encoded. A list becomes
    ``a,b`` or, with ``list_format`` "repeat" and as a whole query value, ``x=a&x=b``."""
    path, _, query_template = template.partition("?")

    def one(match: re.Match[str], safe: str) -> str:
        value = _lookup(match.group(1), params, query, results)
        if isinstance(value, list):
            return ",".join(quote(_text(item), safe="") for item in value)
        return quote(_text(value), safe=safe)

    def segment(match: re.Match[str]) -> str:
        text = one(match, "")
        if text in ("", ".", "..") or text.lower() in ("%2e", "%2e%2e", ".%2e", "%2e."):
            # "/users/{id}" with id ".." would mean another resource to the upstream.
            raise UnsafeValue(f"{{{match.group(1)}}} has the value {text!r}, which cannot stand in a path")
        return text

    filled_path = _PLACEHOLDER.sub(segment, path)
    pairs = []
    for pair in filter(None, query_template.split("&")):
        key, _, value = pair.partition("=")
        whole = _PLACEHOLDER.fullmatch(value)
        resolved = _lookup(whole.group(1), params, query, results) if whole else None
        if whole and list_format == "repeat" and isinstance(resolved, list):
            pairs.extend(f"{key}={quote(_text(item), safe='')}" for item in resolved)
        else:
            pairs.append(f"{key}={_PLACEHOLDER.sub(lambda m: one(m, ''), value)}")
    return filled_path + ("?" + "&".join(pairs) if pairs else "")


def aggregate(parts: list[Part], all_or_nothing: bool, deadline: float, pool: Callable[[], ThreadPoolExecutor]) -> Handler:
    """Build an aggregate route's handler: every part runs as soon as the parts it depends on
    have answered, on the shared ``pool``, all within ``deadline`` seconds.

    The answer is a JSON object with each part's (filtered) body under its name. A part that
    fails (no answer, an answer of 400 or more, not JSON, a timeout, or a failed dependency)
    is ``null`` with its problem in ``errors``, and the answer carries
    ``X-Gateway-Completed: false``; when the part is ``required``, or the route is
    ``all_or_nothing``, the whole request fails: PartFailed (502) or PartTimedOut (504),
    naming the part.
    """
    by_name = {part.name: part for part in parts}

    def handle(req: GatewayRequest) -> GatewayResponse:
        started = time.monotonic()
        query = _query(req.query)
        results: dict[str, object] = {}
        errors: dict[str, dict] = {}
        running: dict[Future, Part] = {}
        waiting = list(parts)
        private = False  # a part said its answer is not for a shared cache
        executor = pool()

        def launch_ready() -> None:
            for part in list(waiting):
                failed = [dep for dep in part.depends_on if dep in errors]
                if failed:
                    waiting.remove(part)
                    errors[part.name] = _problem(PartFailed(f"not called: {', '.join(failed)} failed"), part)
                elif all(dep in results for dep in part.depends_on):
                    waiting.remove(part)
                    try:
                        target = fill(part.path, req.params, query, results, part.list_format)
                    except KeyError as exc:
                        errors[part.name] = _problem(PartFailed(f"its path names {{{exc.args[0]}}}, which has no value"), part)
                        continue
                    except UnsafeValue as exc:
                        errors[part.name] = _problem(PartFailed(str(exc)), part)
                        continue
                    running[executor.submit(_call, part, req, target)] = part

        launch_ready()
        while running:
            remaining = deadline - (time.monotonic() - started)
            done, _ = wait(list(running), timeout=max(remaining, 0), return_when=FIRST_COMPLETED)
            if not done:
                for future, part in running.items():
                    future.cancel()
                    errors[part.name] = _problem(PartTimedOut(f"no answer within the route's {deadline:g} s"), part)
                running.clear()
                break
            for future in done:
                part = running.pop(future)
                try:
                    body, shareable = future.result()
                    results[part.name] = part.fields.apply(body)
                    private = private or not shareable
                except ProblemError as exc:
                    errors[part.name] = _problem(exc, part)
                except Exception as exc:  # noqa: BLE001 - e.g. a body that broke off: that part failed
                    errors[part.name] = _problem(PartFailed(f"the call failed: {type(exc).__name__}"), part)
            launch_ready()
        for part in waiting:  # never launched: the deadline passed first
            errors.setdefault(part.name, _problem(PartTimedOut("not called before the route's deadline"), part))
        for name, part in by_name.items():
            if name in errors and (all_or_nothing or part.required):
                error = errors[name]
                failure = PartTimedOut if error["status"] == 504 else PartFailed
                raise failure(f"The call {name!r} failed: {error['detail']}", part=name)
        merged: dict[str, object] = {name: results.get(name) for name in by_name}
        headers = Headers([("Content-Type", "application/json")])
        if errors:
            merged["errors"] = errors
            headers["X-Gateway-Completed"] = "false"
            headers["Cache-Control"] = "no-store"  # an incomplete answer is not kept by any cache
        else:
            headers["X-Gateway-Completed"] = "true"
            if private:
                headers["Cache-Control"] = "private"
        body = json.dumps(merged).encode()
        headers["Content-Length"] = str(len(body))
        return GatewayResponse(status=200, headers=headers, body=[body])

    return handle


def _query(query: str) -> dict[str, list[str]]:
    return parse_qs(query, keep_blank_values=True)


def _problem(error: ProblemError, part: Part) -> dict:
    return {"status": error.status, "title": error.title, "detail": error.detail, "part": part.name}


def _call(part: Part, client: GatewayRequest, target: str) -> tuple[object, bool]:
    """Make one backend call; return its parsed JSON body, and whether a shared cache may keep
    it (not ``private``/``no-store``, no cookie). Raises ProblemError."""
    path, _, query = target.partition("?")
    req = GatewayRequest(
        method=part.method,
        path=client.path,
        query=query,
        headers=Headers([("Accept", "application/json")]),
        client_addr=client.client_addr,
        scheme=client.scheme,
        host=client.host,
        route=client.route,
        upstream_path=path,
        request_id=client.request_id,
        principal=client.principal,
        trace=client.trace,  # this runs on the pool's thread, outside the request
    )
    try:
        response = part.handler(req)
    except UpstreamTimeout as exc:
        raise PartTimedOut(exc.detail) from exc
    except UpstreamUnreachable as exc:
        raise PartFailed(exc.detail) from exc
    try:
        chunks, size = [], 0
        for chunk in response.body:
            size += len(chunk)
            if size > MAX_PART:
                raise PartFailed(f"the answer is larger than {MAX_PART} bytes")
            chunks.append(chunk)
    finally:
        response.close()
    if response.status >= 400:
        raise PartFailed(f"the backend answered {response.status}")
    said = ", ".join(response.headers.getlist("Cache-Control")).lower()
    shareable = "private" not in said and "no-store" not in said and "Set-Cookie" not in response.headers
    body = b"".join(chunks)
    if not body:
        return None, shareable
    if not is_json(response.headers.get("Content-Type")):
        raise PartFailed("the backend's answer is not JSON")
    try:
        # Bounded depth (fields.parse): a part nested near Python's recursion limit would
        # otherwise parse here and fail as the merged answer is written, a 500.
        return parse(body), shareable
    except ValueError as exc:
        raise PartFailed(f"the backend's answer is not valid JSON ({exc})") from None
