"""Cache stage: what is stored and served (RFC 9111), Cache-Status (RFC 9211) and Age,
single flight and stale-if-error, with stand-in upstreams, stores and a fake clock."""
from __future__ import annotations

import itertools
import threading
import time

import pytest
import redis
from werkzeug.datastructures import Headers

from app.errors import ProblemError
from app.gateway import admin
from app.gateway.cache import Cache, cache
from app.gateway.cachestore import MemoryStore, RedisStore
from app.gateway.routefile import RouteFileError
from app.gateway.types import (
    BreakerOpen,
    GatewayRequest,
    GatewayResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from app.identity import Principal
from tests.unit.gateway.stand_ins import Answers, make_request
from tests.unit.jobs.support import upstream_server

TTL = 60  # the route's ttl in most tests, seconds


class Clock:
    """A clock the test moves: epoch seconds, as ``time.time`` gives them."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def origin(*headers: tuple[str, str], status: int = 200, body=None) -> Answers:
    """An upstream that answers ``answer <n>`` to its n-th call, with ``headers``;
    ``body(req)`` gives the body instead when set."""
    count = itertools.count(1)

    def respond(req: GatewayRequest) -> GatewayResponse:
        text = body(req) if body else f"answer {next(count)}"
        return GatewayResponse(status, Headers([("Content-Type", "text/plain"), *headers]), [text.encode()])

    return Answers(respond)


def stage(upstream, clock=None, store=None, *, ttl: float = TTL, public=False, stale_if_error: float = 0, max_size=1024, lock_wait=1.0, label="users"):
    rules = Cache(ttl=ttl, public=public, stale_if_error=stale_if_error, max_size=max_size)
    store = MemoryStore(1 << 20) if store is None else store
    return cache(label, rules, store, "test", lock_wait, clock or Clock())(upstream)


def fetch(handle, req: GatewayRequest | None = None) -> tuple[int, Headers, bytes]:
    """Send ``req`` (a GET of /users/1 by default) through ``handle``, read and close the answer."""
    response = handle(req or make_request("GET", "/users/1"))
    try:
        return response.status, response.headers, b"".join(response.body)
    finally:
        response.close()


def principal(consumer_id: str) -> Principal:
    return Principal(consumer_id, consumer_id, None, frozenset(), f"key_{consumer_id}")


# --- what is stored, and how it is reported -------------------------------------------


def test_without_rules_or_a_store_the_stage_is_absent():
    upstream = Answers(200)
    rules = Cache(ttl=TTL, public=False, stale_if_error=0, max_size=1024)

    assert cache("users", None, MemoryStore(1024), "test", 1.0)(upstream) is upstream
    assert cache("users", rules, None, "test", 1.0)(upstream) is upstream


def test_a_miss_is_stored_and_the_next_request_is_a_hit_with_age():
    upstream, clock = origin(), Clock()
    handle = stage(upstream, clock)

    status, headers, body = fetch(handle)
    assert (status, body) == (200, b"answer 1")
    assert headers["Cache-Status"] == "frontdoor; fwd=miss; stored"
    assert "Age" not in headers

    clock.advance(15)
    status, headers, body = fetch(handle)
    assert (status, body) == (200, b"answer 1")
    assert headers["Cache-Status"] == "frontdoor; hit; ttl=45"
    assert headers["Age"] == "15"
    assert headers["Content-Type"] == "text/plain"
    assert len(upstream.calls) == 1


def test_an_expired_entry_is_fetched_again_and_replaced():
    upstream, clock = origin(), Clock()
    handle = stage(upstream, clock)
    fetch(handle)

    clock.advance(TTL - 1)
    assert fetch(handle)[1]["Cache-Status"] == "frontdoor; hit; ttl=1"
    clock.advance(1)
    _status, headers, body = fetch(handle)

    assert body == b"answer 2"
    assert headers["Cache-Status"] == "frontdoor; fwd=stale; stored"  # it had one, too old to use
    assert fetch(handle)[2] == b"answer 2"
    assert len(upstream.calls) == 2


def test_the_query_is_part_of_the_key_in_any_order():
    upstream = origin()
    handle = stage(upstream)

    first = fetch(handle, make_request("GET", "/users", query="a=1&b=2"))[2]
    reordered = fetch(handle, make_request("GET", "/users", query="b=2&a=1"))
    other = fetch(handle, make_request("GET", "/users", query="a=2&b=2"))

    assert reordered[2] == first == b"answer 1" and reordered[1]["Cache-Status"].startswith("frontdoor; hit")
    assert other[2] == b"answer 2"


def test_routes_do_not_share_entries_in_one_store():
    store = MemoryStore(1 << 20)
    users, orders = stage(origin(), store=store, label="users"), stage(origin(), store=store, label="orders")

    fetch(users)

    assert fetch(orders)[1]["Cache-Status"] == "frontdoor; fwd=miss; stored"


@pytest.mark.parametrize(
    "header",
    [
        ("Cache-Control", "no-store"),
        ("Cache-Control", "private"),
        ("Cache-Control", "no-cache"),
        ("Cache-Control", "public, max-age=300, private"),
        ("Cache-Control", "max-age=0"),
        ("Cache-Control", "max-age=soon"),
        ("Set-Cookie", "session=abc; HttpOnly"),
        ("Vary", "*"),
    ],
)
def test_answers_the_upstream_forbids_a_shared_cache_to_keep_are_not_stored(header):
    upstream = origin(header)
    handle = stage(upstream)

    status, headers, body = fetch(handle)
    again = fetch(handle)

    assert (status, body) == (200, b"answer 1")
    assert headers["Cache-Status"] == "frontdoor; fwd=miss"
    assert headers[header[0]] == header[1]  # the client still gets the upstream's header
    assert again[2] == b"answer 2" and again[1]["Cache-Status"] == "frontdoor; fwd=miss"


@pytest.mark.parametrize(
    ("cache_control", "fresh_for"),
    [
        ("s-maxage=30, max-age=600", 30),
        ("max-age=600, s-maxage=30", 30),
        ("public, max-age=120", 120),
        ("PUBLIC, Max-Age=120", 120),
        ('max-age="120"', 120),
        (None, TTL),
    ],
)
def test_s_maxage_beats_max_age_beats_the_route_ttl(cache_control, fresh_for):
    upstream, clock = origin(*([("Cache-Control", cache_control)] if cache_control else [])), Clock()
    handle = stage(upstream, clock)
    fetch(handle)

    assert fetch(handle)[1]["Cache-Status"] == f"frontdoor; hit; ttl={fresh_for}"
    clock.advance(fresh_for - 1)
    assert fetch(handle)[1]["Cache-Status"] == "frontdoor; hit; ttl=1"
    clock.advance(1)
    assert fetch(handle)[2] == b"answer 2"


@pytest.mark.parametrize(("status", "stored"), [(200, True), (404, True), (301, True), (201, False), (206, False), (302, False), (500, False)])
def test_only_heuristically_cacheable_statuses_are_stored(status, stored):
    upstream = origin(status=status)
    handle = stage(upstream)

    first = fetch(handle)
    second = fetch(handle)

    assert first[0] == second[0] == status
    assert first[1]["Cache-Status"] == "frontdoor; fwd=miss" + ("; stored" if stored else "")
    assert second[2] == (b"answer 1" if stored else b"answer 2")


def test_a_body_larger_than_max_size_is_delivered_whole_but_not_stored():
    chunks = [b"0123456789", b"abcdefghijklmno", b"KLMNO", b"pqrst"]  # over 20 bytes at the second
    upstream = Answers(lambda req: GatewayResponse(200, Headers(), iter(list(chunks))))
    handle = stage(upstream, max_size=20)

    _status, headers, body = fetch(handle)

    assert body == b"".join(chunks)
    assert headers["Cache-Status"] == "frontdoor; fwd=miss"
    assert fetch(handle)[1]["Cache-Status"] == "frontdoor; fwd=miss"
    assert len(upstream.calls) == 2
    assert len(upstream.closed) == 2  # the upstream's connection is released either way


def test_a_body_of_exactly_max_size_is_stored():
    upstream = Answers(lambda req: GatewayResponse(200, Headers(), [b"0123456789", b"abcdefghij"]))
    handle = stage(upstream, max_size=20)

    fetch(handle)
    _status, headers, body = fetch(handle)

    assert body == b"0123456789abcdefghij"
    assert headers["Cache-Status"].startswith("frontdoor; hit")


# --- what the client asks ---------------------------------------------------------------


def test_a_client_no_cache_is_forwarded_and_its_answer_replaces_the_entry():
    upstream = origin()
    handle = stage(upstream)
    fetch(handle)

    _status, headers, body = fetch(handle, make_request("GET", "/users/1", headers={"Cache-Control": "no-cache"}))

    assert body == b"answer 2"
    assert headers["Cache-Status"] == "frontdoor; fwd=request; stored"
    _status, headers, body = fetch(handle)
    assert body == b"answer 2" and headers["Cache-Status"].startswith("frontdoor; hit")


def test_a_client_no_store_answer_is_not_stored_but_an_entry_may_serve_it():
    upstream = origin()
    handle = stage(upstream)
    no_store = {"Cache-Control": "no-store"}

    first = fetch(handle, make_request("GET", "/users/1", headers=no_store))
    plain = fetch(handle)
    served = fetch(handle, make_request("GET", "/users/1", headers=no_store))

    assert first[1]["Cache-Status"] == "frontdoor; fwd=miss"
    assert plain[2] == b"answer 2" and plain[1]["Cache-Status"] == "frontdoor; fwd=miss; stored"
    assert served[2] == b"answer 2" and served[1]["Cache-Status"].startswith("frontdoor; hit")


def test_each_consumer_has_its_own_entries_unless_the_route_is_public():
    upstream = origin()
    handle = stage(upstream)

    alice = fetch(handle, make_request("GET", "/users/me", principal=principal("con_alice")))[2]
    bob = fetch(handle, make_request("GET", "/users/me", principal=principal("con_bob")))[2]
    anonymous = fetch(handle, make_request("GET", "/users/me"))[2]
    alice_again = fetch(handle, make_request("GET", "/users/me", principal=principal("con_alice")))[2]

    assert (alice, bob, anonymous, alice_again) == (b"answer 1", b"answer 2", b"answer 3", b"answer 1")


def test_a_public_route_serves_one_entry_to_every_consumer():
    upstream = origin()
    handle = stage(upstream, public=True)

    fetch(handle, make_request("GET", "/users/1", principal=principal("con_alice")))
    _status, headers, body = fetch(handle, make_request("GET", "/users/1", principal=principal("con_bob")))
    anonymous = fetch(handle, make_request("GET", "/users/1"))

    assert body == anonymous[2] == b"answer 1"
    assert headers["Cache-Status"].startswith("frontdoor; hit")
    assert len(upstream.calls) == 1


def test_vary_keeps_one_variant_per_value_of_the_named_headers():
    upstream = origin(("Vary", "Accept-Language"), body=lambda req: f"hello in {req.headers.get('Accept-Language', 'none')}")
    handle = stage(upstream)

    def get(language: str | None):
        return fetch(handle, make_request("GET", "/users/1", headers={"Accept-Language": language} if language else {}))

    assert get("en")[2] == b"hello in en"
    assert get("fr")[2] == b"hello in fr"
    english, french, other = get("en"), get("fr"), get(None)

    assert english[2] == b"hello in en" and english[1]["Cache-Status"].startswith("frontdoor; hit")
    assert french[2] == b"hello in fr" and french[1]["Cache-Status"].startswith("frontdoor; hit")
    assert other[2] == b"hello in none" and other[1]["Cache-Status"] == "frontdoor; fwd=miss; stored"
    assert len(upstream.calls) == 3


def test_head_is_answered_from_the_get_entry_without_a_body():
    upstream = Answers(lambda req: GatewayResponse(200, Headers([("Content-Type", "text/plain"), ("Content-Length", "6")]), [b"answer"]))
    handle = stage(upstream)
    fetch(handle)

    status, headers, body = fetch(handle, make_request("HEAD", "/users/1"))

    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == "6"  # the GET's, as HEAD promises (RFC 9110 section 9.3.2)
    assert headers["Cache-Status"].startswith("frontdoor; hit")
    assert len(upstream.calls) == 1


def test_a_head_miss_is_forwarded_as_head_and_not_stored():
    upstream = origin()
    handle = stage(upstream)

    head = fetch(handle, make_request("HEAD", "/users/1"))
    get = fetch(handle)

    assert [call.method for call in upstream.calls] == ["HEAD", "GET"]
    assert head[1]["Cache-Status"] == "frontdoor; fwd=miss"
    assert get[1]["Cache-Status"] == "frontdoor; fwd=miss; stored"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_never_cached_nor_served_from_the_cache(method):
    upstream = origin()
    handle = stage(upstream)
    fetch(handle)  # a GET entry for the same URL

    first = fetch(handle, make_request(method, "/users/1"))
    second = fetch(handle, make_request(method, "/users/1"))

    assert (first[2], second[2]) == (b"answer 2", b"answer 3")
    assert "Cache-Status" not in first[1] and "Cache-Status" not in second[1]


# --- stale-if-error -------------------------------------------------------------------


def ok(req: GatewayRequest) -> GatewayResponse:
    return GatewayResponse(200, Headers([("Content-Type", "text/plain")]), [b"good"])


FAILURES = [
    pytest.param(UpstreamUnreachable("connection refused"), 502, id="unreachable-502"),
    pytest.param(UpstreamTimeout("read timed out"), 504, id="timeout-504"),
    pytest.param(BreakerOpen("breaker open", headers={"Retry-After": "5"}), 503, id="breaker-open-503"),
    pytest.param(503, 503, id="answered-503"),
    pytest.param(500, 500, id="answered-500"),
]


@pytest.mark.parametrize(("failure", "status"), FAILURES)
def test_a_failing_upstream_is_replaced_by_the_stale_entry_within_the_grace(failure, status):
    upstream, clock = Answers(ok, failure), Clock()
    handle = stage(upstream, clock, stale_if_error=30)
    fetch(handle)
    clock.advance(TTL + 10)  # ten seconds stale, twenty of grace left

    status_served, headers, body = fetch(handle)

    assert (status_served, body) == (200, b"good")
    assert headers["Cache-Status"] == f"frontdoor; fwd=stale; fwd-status={status}; ttl=-10; detail=stale-if-error"
    assert headers["Age"] == str(TTL + 10)
    assert len(upstream.calls) == 2
    if isinstance(failure, int):
        assert len(upstream.closed) == 2  # the failed answer's connection was released too


@pytest.mark.parametrize(("failure", "status"), FAILURES)
def test_beyond_the_grace_the_error_goes_through(failure, status):
    upstream, clock = Answers(ok, failure), Clock()
    handle = stage(upstream, clock, stale_if_error=30)
    fetch(handle)
    clock.advance(TTL + 31)

    if isinstance(failure, ProblemError):
        with pytest.raises(type(failure)):
            fetch(handle)
    else:
        status_served, headers, body = fetch(handle)
        assert (status_served, body) == (status, f"status {status}".encode())
        assert headers["Cache-Status"] == "frontdoor; fwd=stale"


def test_without_stale_if_error_an_expired_entry_never_stands_in():
    upstream, clock = Answers(ok, UpstreamUnreachable("down")), Clock()
    handle = stage(upstream, clock, stale_if_error=0)
    fetch(handle)
    clock.advance(TTL + 1)

    with pytest.raises(UpstreamUnreachable):
        fetch(handle)


def test_an_error_that_is_not_the_upstreams_failing_is_not_hidden():
    class Refused(ProblemError):
        status, title, slug = 403, "Forbidden", "refused"

    upstream, clock = Answers(ok, Refused("no")), Clock()
    handle = stage(upstream, clock, stale_if_error=30)
    fetch(handle)
    clock.advance(TTL + 1)

    with pytest.raises(Refused):
        fetch(handle)


def test_once_the_upstream_is_back_the_stale_entry_is_replaced():
    upstream, clock = Answers(ok, 503, ok), Clock()
    handle = stage(upstream, clock, stale_if_error=30)
    fetch(handle)
    clock.advance(TTL + 1)
    assert fetch(handle)[2] == b"good"  # stale, standing in for the 503

    _status, headers, _body = fetch(handle)  # the upstream is back

    assert headers["Cache-Status"] == "frontdoor; fwd=stale; stored"
    assert len(upstream.calls) == 3


# --- a failing store --------------------------------------------------------------------


class BrokenStore:
    """A store whose Redis is gone: every call raises."""

    def __init__(self, error: Exception | None = None):
        self.error = error or redis.ConnectionError("Connection refused")

    def get(self, key, shared=False):
        raise self.error

    def get_many(self, keys, shared=False):
        raise self.error

    def set(self, key, value, ttl):
        raise self.error

    def lock(self, key, ttl):
        raise self.error

    def unlock(self, key):
        raise self.error

    def delete(self, pattern):
        raise self.error


@pytest.mark.parametrize("error", [redis.ConnectionError("refused"), redis.TimeoutError("Timeout reading from socket"), OSError("reset")])
def test_a_store_that_fails_never_fails_the_request(error):
    upstream = origin()
    handle = stage(upstream, store=BrokenStore(error), lock_wait=0.05)

    first = fetch(handle)
    second = fetch(handle)

    assert (first[0], first[2], second[2]) == (200, b"answer 1", b"answer 2")
    assert first[1]["Cache-Status"] == "frontdoor; fwd=miss"  # not "stored": nothing was


def test_a_store_that_fails_only_to_write_still_answers():
    class ReadOnly(MemoryStore):
        def set(self, key, value, ttl):
            raise redis.ReadOnlyError("You can't write against a read only replica.")

    upstream = origin()
    handle = stage(upstream, store=ReadOnly(1 << 20))

    status, headers, body = fetch(handle)

    assert (status, body) == (200, b"answer 1")
    assert headers["Cache-Status"] == "frontdoor; fwd=miss"


def test_a_store_that_fails_adds_no_wait():
    handle = stage(origin(), store=BrokenStore(), lock_wait=5.0)

    started = time.monotonic()
    status, _headers, _body = fetch(handle)

    assert status == 200
    assert time.monotonic() - started < 2.5  # not the 5 s of lock_wait (half of it: room for a loaded machine)


# --- single flight ----------------------------------------------------------------------


class CountingLocks(MemoryStore):
    """A MemoryStore that counts the threads that have asked for a lock, so a test knows when
    every request has asked (a waiting request asks again while it polls: threads, not calls)."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes)
        self.askers: set[int] = set()
        self.counted = threading.Condition()

    def lock(self, key: str, ttl: float) -> bool:
        taken = super().lock(key, ttl)
        with self.counted:
            self.askers.add(threading.get_ident())
            self.counted.notify_all()
        return taken

    def wait_for(self, askers: int, timeout: float = 5.0) -> None:
        with self.counted:
            assert self.counted.wait_for(lambda: len(self.askers) >= askers, timeout), f"{len(self.askers)} requests asked for a lock"


def run_together(handle, count: int) -> tuple[list[threading.Thread], list]:
    """Start ``count`` threads that send one GET each through ``handle`` at once; the threads,
    and the list their answers (or exceptions) land in."""
    results: list = [None] * count
    start = threading.Barrier(count)

    def one(index: int) -> None:
        start.wait()
        try:
            results[index] = fetch(handle)
        except BaseException as exc:  # noqa: BLE001 - reported by the test's assertions
            results[index] = exc

    threads = [threading.Thread(target=one, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    return threads, results


def test_fifty_concurrent_misses_make_one_upstream_call():
    store = CountingLocks(1 << 20)
    release = threading.Event()
    calls = itertools.count(1)

    def slow(req: GatewayRequest) -> GatewayResponse:
        release.wait(5)
        return GatewayResponse(200, Headers([("Content-Type", "text/plain")]), [f"slow answer {next(calls)}".encode()])

    upstream = Answers(slow)
    handle = stage(upstream, store=store, lock_wait=5.0)
    threads, results = run_together(handle, 50)
    try:
        store.wait_for(50)  # every request has tried to lead; 49 are waiting for the leader
    finally:
        release.set()
        for thread in threads:
            thread.join(10)

    assert len(upstream.calls) == 1
    assert all(not isinstance(result, BaseException) for result in results), results
    assert {(status, body) for status, _, body in results} == {(200, b"slow answer 1")}
    statuses = sorted(headers["Cache-Status"] for _, headers, _ in results)
    assert statuses.count("frontdoor; fwd=miss; stored") == 1
    assert [status for status in statuses if "collapsed" in status] == [f"frontdoor; hit; ttl={TTL}; collapsed"] * 49


def test_a_waiting_request_goes_upstream_itself_after_lock_wait():
    store = CountingLocks(1 << 20)
    release = threading.Event()
    upstream = Answers(lambda req: release.wait(5) and ok(req), ok)  # the leader is held, the follower is not
    handle = stage(upstream, store=store, lock_wait=0.2)
    threads, results = run_together(handle, 2)
    try:
        store.wait_for(2)
        deadline = time.monotonic() + 2
        while len(upstream.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(upstream.calls) == 2  # while the leader is still held
    finally:
        release.set()
        for thread in threads:
            thread.join(5)

    assert [result[0] for result in results] == [200, 200]
    assert sorted(result[1]["Cache-Status"] for result in results) == ["frontdoor; fwd=miss; stored"] * 2


def test_requests_waiting_on_an_answer_that_is_not_stored_are_not_held_for_lock_wait():
    store = CountingLocks(1 << 20)
    release = threading.Event()
    upstream = Answers(lambda req: release.wait(5) and GatewayResponse(200, Headers([("Cache-Control", "private")]), [b"mine"]))
    handle = stage(upstream, store=store, lock_wait=5.0)
    threads, results = run_together(handle, 5)
    store.wait_for(5)
    release.set()
    released = time.monotonic()
    for thread in threads:
        thread.join(10)

    assert [result[0] for result in results] == [200] * 5
    assert time.monotonic() - released < 2.5  # not the 5 s of lock_wait (half of it: room for a loaded machine)


def test_an_entry_stored_between_a_lookup_and_its_lock_is_served_not_fetched_again():
    class LeaderFinishesFirst(MemoryStore):
        """The first lock asked for waits until a whole other request has stored the entry and
        let go of the lock: the moment between one request's miss and its lock."""

        other: object = None

        def lock(self, key: str, ttl: float) -> bool:
            other, self.other = self.other, None
            if other is not None:
                other()
            return super().lock(key, ttl)

    store = LeaderFinishesFirst(1 << 20)
    upstream = origin()
    handle = stage(upstream, store=store)
    others: list = []
    store.other = lambda: others.append(fetch(handle))

    status, headers, body = fetch(handle)

    assert [(other[2], other[1]["Cache-Status"]) for other in others] == [(b"answer 1", "frontdoor; fwd=miss; stored")]
    assert (status, body, headers["Cache-Status"]) == (200, b"answer 1", f"frontdoor; hit; ttl={TTL}; collapsed")
    assert len(upstream.calls) == 1


# --- RFC 9111 requirements the stage does not meet -------------------------------------


def test_an_answer_to_a_request_with_authorization_is_not_served_to_another_caller():
    upstream = origin(body=lambda req: f"data of {req.headers['Authorization']}")
    handle = stage(upstream)

    fetch(handle, make_request("GET", "/users/me", headers={"Authorization": "Bearer alice"}))
    _status, _headers, body = fetch(handle, make_request("GET", "/users/me", headers={"Authorization": "Bearer bob"}))

    assert body == b"data of Bearer bob"


def test_the_age_the_upstream_reports_counts_against_freshness():
    upstream, clock = origin(("Cache-Control", "max-age=60"), ("Age", "50")), Clock()
    handle = stage(upstream, clock)
    fetch(handle)
    clock.advance(5)

    _status, headers, _body = fetch(handle)

    assert headers["Age"] == "55"
    assert headers["Cache-Status"] == "frontdoor; hit; ttl=5"


def test_the_upstream_caches_cache_status_is_kept():
    upstream = origin(("Cache-Status", "origin-cdn; hit"))
    handle = stage(upstream)

    _status, headers, _body = fetch(handle)

    assert headers["Cache-Status"] == "origin-cdn; hit, frontdoor; fwd=miss; stored"


def test_a_successful_unsafe_request_invalidates_the_url():
    upstream = origin()
    handle = stage(upstream)
    fetch(handle)

    fetch(handle, make_request("PUT", "/users/1"))
    _status, _headers, body = fetch(handle)

    assert body == b"answer 3"


def test_cache_status_says_stored_only_when_the_store_kept_it():
    upstream = Answers(lambda req: GatewayResponse(200, Headers(), [b"x" * 500]))
    handle = stage(upstream, store=MemoryStore(100), max_size=1024)

    first = fetch(handle)
    second = fetch(handle)

    assert second[2] == b"x" * 500 and len(upstream.calls) == 2  # it was not kept
    assert first[1]["Cache-Status"] == "frontdoor; fwd=miss"


# --- through the app ------------------------------------------------------------------------


def cached_routes(upstream_url: str, extra: str = "") -> str:
    return f"""
upstreams:
  bin:
    targets: ["{upstream_url}"]
routes:
  - path: /cached
    upstream: bin
    strip_prefix: true
    cache: {{ttl: 60, max_size: 2048}}
{extra}"""


def test_a_route_with_cache_serves_repeats_from_the_cache(make_app):
    upstream = upstream_server()
    client = make_app(routes=cached_routes(upstream.url)).test_client()
    path = f"/cached/anything/{time.monotonic_ns()}"

    first = client.get(path)
    second = client.get(path)

    assert first.status_code == second.status_code == 200
    assert first.headers["Cache-Status"] == "frontdoor; fwd=miss; stored"
    assert second.headers["Cache-Status"] in ("frontdoor; hit; ttl=60", "frontdoor; hit; ttl=59")  # whole seconds left
    assert second.headers["Age"] == "0"
    assert second.json == first.json
    assert upstream.hits(path.removeprefix("/cached")) == 1


def test_cache_max_bytes_bounds_the_in_process_store(make_app):
    upstream = upstream_server()
    client = make_app(routes=cached_routes(upstream.url), CACHE_MAX_BYTES=200).test_client()
    path = f"/cached/anything/{time.monotonic_ns()}"  # httpbin's echo is larger than 200 bytes

    client.get(path)

    assert client.get(path).headers["Cache-Status"].startswith("frontdoor; fwd=miss")
    assert upstream.hits(path.removeprefix("/cached")) == 2


@pytest.mark.redis
def test_with_redis_every_process_serves_the_entry_one_stored(make_app, redis_url):
    upstream = upstream_server()
    shared = {"REDIS_URL": redis_url, "KEY_PREFIX": f"test-{time.monotonic_ns()}"}
    first_process = make_app(routes=cached_routes(upstream.url), **shared).test_client()
    second_process = make_app(routes=cached_routes(upstream.url), **shared).test_client()
    path = f"/cached/anything/{time.monotonic_ns()}"

    stored = first_process.get(path)
    served = second_process.get(path)

    assert stored.headers["Cache-Status"] == "frontdoor; fwd=miss; stored"
    assert served.headers["Cache-Status"] in ("frontdoor; hit; ttl=60", "frontdoor; hit; ttl=59")
    assert served.json == stored.json
    assert upstream.hits(path.removeprefix("/cached")) == 1


@pytest.mark.redis
def test_with_redis_a_purge_reaches_another_process_within_its_near_ttl(make_app, redis_url):
    upstream = upstream_server()
    shared = {"REDIS_URL": redis_url, "KEY_PREFIX": f"test-{time.monotonic_ns()}", "CACHE_NEAR_TTL": 0.5}
    first, second = (make_app(routes=cached_routes(upstream.url), **shared) for _ in range(2))
    path = f"/cached/anything/{time.monotonic_ns()}"
    first.test_client().get(path)
    time.sleep(1.1)
    assert second.test_client().get(path).headers["Age"] == "1"  # the old entry, now kept near

    with first.app_context():
        deleted = admin.purge_cache(first, first.wsgi_app.control.current(), prefix="/cached")
    purged_at = time.monotonic()

    assert deleted == 2  # the entry and its Vary record
    assert first.test_client().get(path).headers["Cache-Status"] == "frontdoor; fwd=miss; stored"  # here: at once
    while (served := second.test_client().get(path)).headers["Age"] == "1":
        assert time.monotonic() - purged_at < 0.5  # the old entry, from the near copy, only so long
        time.sleep(0.02)
    assert served.headers["Age"] == "0"  # then the one stored after the purge, from Redis
    assert upstream.hits(path.removeprefix("/cached")) == 2


@pytest.mark.redis
def test_with_a_near_copy_an_entry_another_process_refreshed_is_served_not_fetched_again(redis_url):
    clock, upstream, label = Clock(), origin(), f"users-{time.monotonic_ns()}"
    near = RedisStore(redis.Redis.from_url(redis_url), MemoryStore(1 << 20), near_ttl=30)
    other = RedisStore(redis.Redis.from_url(redis_url))
    here, there = stage(upstream, clock, near, label=label), stage(upstream, clock, other, label=label)
    assert fetch(here)[2] == b"answer 1"  # stored, and kept near

    clock.advance(TTL + 1)  # stale everywhere
    assert fetch(there)[2] == b"answer 2"  # the other process refreshes it
    status, headers, body = fetch(here)

    assert (status, body) == (200, b"answer 2")
    assert headers["Cache-Status"].startswith("frontdoor; hit")
    assert "collapsed" not in headers["Cache-Status"]  # read again at once, not after a lock
    assert len(upstream.calls) == 2


@pytest.mark.parametrize("cache_field", ["{ttl: 0}", "{ttl: 5, stale_if_error: -1}", "{ttl: 5, max_size: 0}", "{ttl: 5, shared: true}", "{public: true}"])
def test_an_invalid_cache_field_is_refused_at_start(make_app, cache_field):
    routes = f"""
upstreams:
  bin:
    targets: ["http://127.0.0.1:9"]
routes:
  - path: /cached
    upstream: bin
    cache: {cache_field}
"""
    with pytest.raises(RouteFileError, match=r"routes\[0\]\.cache"):
        make_app(routes=routes)


def test_a_canary_route_on_the_same_path_has_entries_of_its_own(make_app):
    upstream = upstream_server()
    extra = """
  - path: /cached
    upstream: bin
    strip_prefix: true
    match_headers: {X-Version: v2}
    request_headers: {add: {X-Backend: canary}}
    cache: {ttl: 60}
"""
    client = make_app(routes=cached_routes(upstream.url, extra)).test_client()

    canary = client.get("/cached/headers", headers={"X-Version": "v2"})
    stable = client.get("/cached/headers")

    assert canary.json["headers"]["X-Backend"] == "canary"
    assert "X-Backend" not in stable.json["headers"]


# --- what the second review found -----------------------------------------------------------


def rewriting(upstream, **upstream_headers: str):
    """A stand-in for the later stages: they replace req.headers with what goes upstream."""

    def handle(req: GatewayRequest) -> GatewayResponse:
        req.headers = Headers([*req.headers.items(), *upstream_headers.items()])
        return upstream(req)

    return handle


def test_variants_are_keyed_by_the_clients_headers_not_by_what_went_upstream():
    upstream = origin(("Vary", "Accept-Encoding"))
    handle = stage(rewriting(upstream, **{"Accept-Encoding": "identity"}))
    gzip = make_request("GET", "/users/1", headers={"Accept-Encoding": "gzip"})

    fetch(handle, gzip)
    _status, headers, _body = fetch(handle, make_request("GET", "/users/1", headers={"Accept-Encoding": "gzip"}))

    assert headers["Cache-Status"].startswith("frontdoor; hit")
    assert len(upstream.calls) == 1


def test_an_answer_varying_on_a_field_the_gateway_sets_is_not_stored():
    upstream = origin(("Vary", "X-Consumer-ID"))
    handle = stage(upstream, public=True)

    first = fetch(handle)
    fetch(handle, make_request("GET", "/users/1", headers={"X-Consumer-ID": "con_someone"}))

    assert first[1]["Cache-Status"] == "frontdoor; fwd=miss"
    assert len(upstream.calls) == 2


def test_the_raw_path_and_the_host_are_part_of_the_key():
    upstream = origin()
    handle = stage(upstream, public=True)

    fetch(handle, make_request("GET", "/users/a%2Fb", raw_path="/users/a%2Fb"))
    _s, plain, _b = fetch(handle, make_request("GET", "/users/a/b", raw_path="/users/a/b"))
    _s, other_host, _b = fetch(handle, make_request("GET", "/users/a/b", raw_path="/users/a/b", host="evil.example"))

    assert plain["Cache-Status"].startswith("frontdoor; fwd=miss")
    assert other_host["Cache-Status"].startswith("frontdoor; fwd=miss")
    assert len(upstream.calls) == 3


def test_a_body_that_breaks_off_is_a_502_and_the_upstream_is_released():
    def broken():
        yield b"{"
        raise OSError("connection reset")

    upstream = Answers(lambda req: GatewayResponse(200, Headers(), broken()))
    handle = stage(upstream)

    with pytest.raises(UpstreamUnreachable):
        handle(make_request("GET", "/users/1"))
    assert len(upstream.closed) == 1


def test_a_safe_method_other_than_get_does_not_invalidate():
    upstream = origin()
    handle = stage(upstream)
    fetch(handle)

    fetch(handle, make_request("OPTIONS", "/users/1"))
    _status, headers, _body = fetch(handle)

    assert headers["Cache-Status"].startswith("frontdoor; hit")
