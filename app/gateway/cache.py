"""Cache stage: a shared response cache for GET/HEAD (RFC 9111), with single flight and
stale-if-error (RFC 5861), reporting itself in ``Cache-Status`` (RFC 9211) and ``Age``."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated

from pydantic import Field
from werkzeug.datastructures import Headers

from app.errors import ProblemError
from app.gateway.cachestore import CacheStore, Entry
from app.gateway.schema import Strict
from app.gateway.types import (
    GatewayRequest,
    GatewayResponse,
    Handler,
    Middleware,
    UpstreamUnreachable,
    new_headers,
    unchanged,
)

if TYPE_CHECKING:
    from app.gateway.pipeline import Context

log = logging.getLogger("frontdoor.cache")

NAME = "frontdoor"  # the cache's name in Cache-Status
# Set by the gateway on the way upstream: an answer that varies on them is not the client's to key.
GATEWAY_FIELDS = ("x-consumer-", "x-forwarded-", "via", "x-request-id")
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CACHEABLE = frozenset({200, 203, 204, 300, 301, 404, 410})  # heuristically cacheable (RFC 9110 section 15.1)
ERRORS = frozenset({500, 502, 503, 504})  # answers a stale entry may stand in for (RFC 5861 section 4)
_DIRECTIVE = re.compile(r"\s*([a-zA-Z-]+)\s*(?:=\s*\"?([^\",]*)\"?)?\s*(?:,|$)")
_GLOB = re.compile(r"([*?\[])")


class Cache(Strict):
    """A route's response cache (GET and HEAD): ``ttl`` seconds fresh unless the upstream's
    Cache-Control says otherwise; ``public`` shares entries between consumers;
    ``stale_if_error`` seconds past freshness an entry may stand in for a failed upstream;
    bodies over ``max_size`` bytes are not stored."""

    ttl: Annotated[float, Field(gt=0)]
    public: bool = False
    stale_if_error: Annotated[float, Field(ge=0)] = 0.0
    max_size: Annotated[int, Field(gt=0)] = 1024 * 1024


def directives(value: str | None) -> dict[str, str | None]:
    """``Cache-Control`` as ``{directive: argument or None}``, names lower-cased (RFC 9111 section 5.2)."""
    found: dict[str, str | None] = {}
    for match in _DIRECTIVE.finditer(value or ""):
        if match.group(1):
            found[match.group(1).lower()] = match.group(2)
    return found


def _seconds(value: str | None) -> float | None:
    try:
        return max(float(int(value or "")), 0.0)
    except ValueError:
        return None


def glob_escape(text: str) -> str:
    """``text`` as a glob that matches only itself: ``*``, ``?`` and ``[`` become one-character
    classes, which Redis ``SCAN MATCH`` and fnmatch read alike."""
    return _GLOB.sub(r"[\1]", text)


def base_key(key_prefix: str, label: str, req: GatewayRequest, public: bool) -> str:
    """``{prefix}:cache:{route}:GET:{path}?{sorted query}:{consumer}`` (``public`` or
    ``anonymous`` in place of a consumer id); HEAD shares GET's entries. ``label`` names the
    route, with its match_headers when it has any (see ``route_key``)."""
    query = sorted_query(req.query)
    who = "public" if public else (req.principal.consumer_id if req.principal else "anonymous")
    # The path as the upstream gets it (still percent-encoded), and the scheme and host it is
    # told in X-Forwarded-*: two requests the upstream could answer differently never share.
    return f"{key_prefix}:cache:{label}:GET:{req.raw_path or req.path}?{query}:{who}:{req.scheme}://{req.host}"


def sorted_query(query: str) -> str:
    """The query with its parameters ordered by name; repeated ones keep their order."""
    return "&".join(sorted((part for part in query.split("&") if part), key=lambda part: part.split("=", 1)[0]))


def route_key(label: str, match_headers: dict[str, str]) -> str:
    """The route's part of its cache keys: its label, and for a route chosen by headers (a
    canary on a shared path) a digest of them, so that such routes never share entries."""
    if not match_headers:
        return label
    condition = "&".join(sorted(f"{name.lower()}={value}" for name, value in match_headers.items()))
    return f"{label}#{hashlib.sha256(condition.encode()).hexdigest()[:12]}"


def _variant(base: str, vary: list[str], headers: Headers) -> str:
    if not vary:
        return base + "|"
    values = "\n".join(f"{name}={headers.get(name, '')}" for name in vary)
    return base + "|" + hashlib.sha256(values.encode()).hexdigest()[:32]


def cache(
    label: str,
    rules: Cache | None,
    store: CacheStore | None,
    key_prefix: str,
    lock_wait: float,
    clock: Callable[[], float] = time.time,
) -> Middleware:
    """Build the cache stage for route ``label`` (none without ``rules``).

    GET answers are stored for their freshness lifetime: the upstream's ``s-maxage`` or
    ``max-age``, else ``rules.ttl``; not when it says ``no-store`` or ``private``, sets a cookie,
    varies on ``*``, is larger than ``rules.max_size``, or has an uncacheable status. The key
    is the path, the sorted query, the values of the headers the upstream's ``Vary`` names,
    and the consumer unless ``rules.public``. A client's ``no-cache`` skips the lookup, its
    ``no-store`` the storing. Concurrent misses for one key wait up to ``lock_wait`` seconds
    for the first to fill it. When the upstream fails (a 502/503/504 problem, or one of
    ERRORS) an entry stale by at most ``rules.stale_if_error`` seconds is served instead.
    A store that fails is logged and skipped: the cache never fails a request.
    """
    if rules is None or store is None:
        return lambda next_handler: next_handler
    def middleware(next_handler: Handler) -> Handler:
        def handle(req: GatewayRequest) -> GatewayResponse:
            # The client's headers as sent: later stages replace req.headers with what goes
            # upstream. Taken only when the request may go upstream (a hit needs no copy).
            client = req.headers
            if req.method not in ("GET", "HEAD"):
                client = Headers(client)
                base = base_key(key_prefix, label, req, rules.public)
                response = next_handler(req)
                if req.method in UNSAFE and response.status < 400:  # RFC 9111 section 4.4: now stale
                    _invalidate(store, base, client)
                return response
            asked = directives(req.headers.get("Cache-Control"))
            base = base_key(key_prefix, label, req, rules.public)
            vary, entry = _lookup(store, base, req.headers)
            now = clock()
            if entry is not None and not entry.is_fresh(now):
                # A near copy (cachestore.RedisStore) may be older than the shared entry.
                vary, entry = _lookup(store, base, req.headers, shared=True)
            variant = _variant(base, vary, req.headers)
            if entry is not None and "no-cache" not in asked and entry.is_fresh(now):
                return _hit(entry, now, req)
            fwd = "request" if "no-cache" in asked else ("stale" if entry is not None else "miss")
            # A store that fails makes every request its own leader: no waiting on a dead store.
            leader = _safe(lambda: store.lock(variant, lock_wait), True)
            if not leader and "no-cache" not in asked:
                waited, leader = _wait(store, base, variant, req.headers, lock_wait, clock)
                if waited is not None:
                    return _hit(waited, clock(), req, collapsed=True)
            if leader and "no-cache" not in asked:
                # Between the lookup above and the lock, another request may have stored the
                # entry and let go of the lock: look once more before going upstream.
                stored_meanwhile = _fresh(store, base, req.headers, clock)
                if stored_meanwhile is not None:
                    _safe(lambda: store.unlock(variant), None)
                    return _hit(stored_meanwhile, clock(), req, collapsed=True)
            client = Headers(client)
            try:
                try:
                    response = next_handler(req)
                except ProblemError as exc:
                    stale = _usable_stale(entry, clock(), rules)
                    if stale is None or exc.status not in ERRORS:
                        raise
                    return _stale(stale, clock(), req, f"fwd-status={exc.status}")
                if response.status in ERRORS:
                    stale = _usable_stale(entry, clock(), rules)
                    if stale is not None:
                        response.close()
                        return _stale(stale, clock(), req, f"fwd-status={response.status}")
                stored = False
                if req.method == "GET" and "no-store" not in asked:
                    lifetime = _lifetime(response, rules, credentials=_sent_credentials(req.principal, client))
                    if lifetime:
                        stored = _store(store, base, client, response, lifetime, rules, clock)
                ours = f"{NAME}; fwd={fwd}" + ("; stored" if stored else "")
                _add_status(response.headers, ours)
                return response
            finally:
                if leader:
                    _safe(lambda: store.unlock(variant), None)

        return handle

    return middleware


def _safe(action: Callable, default):
    import redis  # here, not at the top: the route file loads this module for its model

    try:
        return action()
    except (redis.RedisError, OSError, ValueError) as exc:
        log.warning("cache store unavailable", extra={"error": repr(exc)})
        return default


def _lookup(store: CacheStore, base: str, headers: Headers, shared: bool = False) -> tuple[list[str], Entry | None]:
    """The Vary names stored for ``base`` and the entry for these request headers. One round
    trip for answers without Vary (most): the Vary record and the plain entry come together.
    ``shared``: read past any near copy (CacheStore.get_many)."""
    raw_vary, raw = _safe(lambda: store.get_many([base + "|vary", _variant(base, [], headers)], shared), [None, None])
    vary = json.loads(raw_vary) if raw_vary and raw_vary != b"[]" else []  # most answers vary on nothing
    if vary:
        raw = _safe(lambda: store.get(_variant(base, vary, headers), shared), None)
    return vary, (Entry.decode(raw) if raw else None)


def _wait(store: CacheStore, base: str, variant: str, headers: Headers, limit: float, clock) -> tuple[Entry | None, bool]:
    """Another request is fetching this key: poll for its entry for up to ``limit`` seconds.

    Returns ``(entry, False)`` once it is stored, or ``(None, True)`` when the lock came free
    without an entry (the answer was not storable) and this request took it: it goes upstream
    itself at once rather than waiting out ``limit``. ``(None, False)`` after ``limit``.
    """
    deadline = time.monotonic() + limit
    delay = 0.005
    while time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
        entry = _fresh(store, base, headers, clock)
        if entry is not None:
            return entry, False
        if _safe(lambda: store.lock(variant, limit), True):
            return None, True
    return None, False


def _fresh(store: CacheStore, base: str, headers: Headers, clock) -> Entry | None:
    """The stored entry for these request headers if it is still fresh, else None (as the
    shared store has it: this is asked while another request may be storing it)."""
    _, entry = _lookup(store, base, headers, shared=True)
    return entry if entry is not None and entry.is_fresh(clock()) else None


def _usable_stale(entry: Entry | None, now: float, rules: Cache) -> Entry | None:
    if entry is None or now - entry.stored_at > entry.fresh_for + rules.stale_if_error:
        return None
    return entry


def _age(entry: Entry, now: float) -> int:
    return max(int(now - entry.stored_at), 0)


def _respond(entry: Entry, now: float, req: GatewayRequest, status: str) -> GatewayResponse:
    # One pass over the stored fields and one Headers built from them: this runs for every hit.
    fields, earlier = [], []
    for name, value in entry.headers:
        lower = name.lower()
        if lower == "cache-status":
            earlier.extend(part.strip() for part in value.split(","))
        elif lower != "age":
            fields.append((name, value))
    fields.append(("Age", str(_age(entry, now))))  # RFC 9111 section 5.1
    # The stored member of this cache is from when it was fetched: replace it with this one,
    # after any upstream cache's (RFC 9211 section 2).
    members = [part for part in earlier if part and not part.startswith(NAME + ";")]
    fields.append(("Cache-Status", ", ".join([*members, status])))
    body = [] if req.method == "HEAD" else [entry.body]
    return GatewayResponse(status=entry.status, headers=new_headers(fields), body=body)


def _hit(entry: Entry, now: float, req: GatewayRequest, collapsed: bool = False) -> GatewayResponse:
    ttl = int(entry.fresh_for - (now - entry.stored_at))
    return _respond(entry, now, req, f"{NAME}; hit; ttl={ttl}" + ("; collapsed" if collapsed else ""))


def _stale(entry: Entry, now: float, req: GatewayRequest, why: str) -> GatewayResponse:
    ttl = int(entry.fresh_for - (now - entry.stored_at))
    return _respond(entry, now, req, f"{NAME}; fwd=stale; {why}; ttl={ttl}; detail=stale-if-error")


def _sent_credentials(principal, headers: Headers) -> bool:
    """A credential went upstream that the gateway did not check (an ``auth: none`` route)."""
    return principal is None and ("Authorization" in headers or "X-API-Key" in headers)


def _add_status(headers: Headers, member: str) -> None:
    """Append this cache's member to ``Cache-Status``, after any upstream cache's (RFC 9211 section 2)."""
    earlier = [value for value in headers.getlist("Cache-Status") if value]
    headers["Cache-Status"] = ", ".join([*earlier, member])


def _lifetime(response: GatewayResponse, rules: Cache, credentials: bool = False) -> float:
    """Seconds ``response`` may be served from this (shared) cache; 0: not to be stored.

    An answer to a request carrying a credential the gateway did not check is stored only
    when the upstream allows it (``public`` or ``s-maxage``, RFC 9111 section 3.5).
    """
    if response.status not in CACHEABLE:
        return 0.0
    headers = response.headers
    said = directives(", ".join(headers.getlist("Cache-Control")))
    if "no-store" in said or "private" in said or "no-cache" in said:
        return 0.0
    if credentials and "public" not in said and "s-maxage" not in said:
        return 0.0
    if "Set-Cookie" in headers or "*" in headers.get("Vary", ""):
        return 0.0
    varies = {name.strip().lower() for value in headers.getlist("Vary") for name in value.split(",")}
    if any(name.startswith(GATEWAY_FIELDS) for name in varies):
        return 0.0  # keyed by what the gateway sends, not by what the client sent
    for directive in ("s-maxage", "max-age"):  # RFC 9111 section 4.2.1: s-maxage first for a shared cache
        if directive in said:
            return _seconds(said[directive]) or 0.0
    return rules.ttl


def _store(store: CacheStore, base: str, request_headers: Headers, response: GatewayResponse, fresh_for: float, rules: Cache, clock) -> bool:
    """Read ``response``'s body (up to ``rules.max_size`` bytes) and store it; the response's
    body is replaced by what was read, followed by the rest when it was too large to store.
    The upstream's ``Age`` counts as time already spent (RFC 9111 section 4.2.3)."""
    max_size = rules.max_size
    age = _seconds(response.headers.get("Age")) or 0.0
    if age >= fresh_for:
        return False
    chunks, complete = read_at_most(response, max_size)
    if not complete:
        return False
    body = b"".join(chunks)
    response.body = [body]
    vary = sorted({name.strip().lower() for value in response.headers.getlist("Vary") for name in value.split(",") if name.strip()})
    stored_headers = [(name, value) for name, value in response.headers.items() if name.lower() != "age"]
    entry = Entry(response.status, stored_headers, body, clock() - age, fresh_for)
    variant = _variant(base, vary, request_headers)
    keep = fresh_for - age + rules.stale_if_error

    def write() -> bool:
        return store.set(base + "|vary", json.dumps(vary).encode(), keep) and store.set(variant, entry.encode(), keep)

    return _safe(write, False)


def _invalidate(store: CacheStore, base: str, headers: Headers) -> None:
    """Drop the caller's stored answer for this URL (its variant and Vary record)."""
    _, entry = _lookup(store, base, headers)
    vary_raw = _safe(lambda: store.get(base + "|vary"), None)
    vary = json.loads(vary_raw) if vary_raw else []
    variant = _variant(base, vary, headers)
    if entry is not None or vary_raw is not None:
        _safe(lambda: store.delete(glob_escape(variant)) + store.delete(glob_escape(base + "|vary")), 0)


def _chain(first: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from first
    yield from rest


def read_at_most(response: GatewayResponse, limit: int) -> tuple[list[bytes], bool]:
    """Read ``response``'s body up to ``limit`` bytes: ``(chunks, True)`` when that was all of
    it (the body is then those chunks), else ``(chunks, False)`` with the body left to stream
    on. A body that breaks off closes the response and raises UpstreamUnreachable (502),
    before any byte went to the client."""
    chunks: list[bytes] = []
    size = 0
    source = iter(response.body)
    try:
        for chunk in source:
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                response.body = _chain(chunks, source)
                return chunks, False
    except ProblemError:
        response.close()
        raise
    except Exception as exc:
        response.close()
        raise UpstreamUnreachable("The upstream closed the connection before its body was complete") from exc
    response.body = [b"".join(chunks)]
    return chunks, True


def build(ctx: Context) -> Middleware:
    """The route's response cache (no stage without ``cache:``, nor in a job's worker: a job's
    answer is its own stored result)."""
    if ctx.for_job or ctx.route.cache is None:
        return unchanged
    settings = ctx.settings
    return cache(route_key(ctx.route.label, ctx.route.match_headers), ctx.route.cache, settings.cache_store, settings.key_prefix, settings.cache_lock_wait)
