"""Equivalence: the gateway answers a fixed request matrix exactly as ``equivalence.json`` recorded.

Recorded on the proxy path as it was before its rewrite (Flask request cycle, requests,
flask-limiter), so that the rewrite can show it changes nothing a client sees. Each case (``CASES``) builds a fresh app with ``create_app`` (the embedded default: SQLite in
tmp_path, no Redis, Celery on ``memory://``), drives it through its WSGI entry with Flask's test
client, in front of a real HTTP upstream on 127.0.0.1 (``EchoUpstream``, a werkzeug server in a
thread: no ``responses``, so any HTTP client the forward stage uses is exercised). Every answer
is compared in full: status, every header as a sorted list of (lower-case name, value) pairs,
duplicates included, and the body (JSON parsed, anything else byte for byte), after
``normalise`` has replaced what varies from run to run (ids, clocks, secrets) with placeholders.

Re-recording, only when a change in what clients see is intended::

    FRONTDOOR_RECORD_EQUIVALENCE=1 python -m pytest -p no:xdist tests/unit/gateway/test_equivalence.py

writes ``equivalence.json`` instead of comparing, and every test of the run then fails saying
so, so that a recording run can never pass for a check. Run it without the variable afterwards,
and review the file's diff before committing it. (Without ``-p no:xdist`` parallel workers
would write the file at once.)
"""
from __future__ import annotations

import base64
import difflib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from werkzeug.serving import make_server
from werkzeug.test import TestResponse

from tests.factories import Identity
from tests.services import free_port

EXPECTED = Path(__file__).with_name("equivalence.json")
RECORDING = os.environ.get("FRONTDOOR_RECORD_EQUIVALENCE") == "1"

SLOW_SECONDS = 1.0  # the upstream's /slow waits this long; the route's read timeout is 0.3 s
STALE_TTL = 0.5  # seconds fresh on the stale-if-error route: the case waits this out
USER_AGENT = "frontdoor-equivalence/1"  # the test client's own is Werkzeug/<version>
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID}-00f067aa0ba902b7-01"
CONSUMER = "eq-consumer"
SCOPE = "eq:read"

ROUTES = """
upstreams:
  echo:
    targets: ["{url}"]
    timeout: {{connect: 1.0, read: 5.0}}
  slow:
    targets: ["{url}"]
    timeout: {{connect: 1.0, read: 0.3}}
  fragile:
    targets: ["{url}"]
    breaker: {{fail_max: 1, reset_timeout: 600}}
  dead:
    targets: ["http://127.0.0.1:{closed}"]
    timeout: {{connect: 0.5, read: 1.0}}
routes:
  - path: /pass
    name: pass
    upstream: echo
    strip_prefix: true
  - path: /private
    name: private
    upstream: echo
    strip_prefix: true
    auth: required
    scopes: ["{scope}"]
  - path: /only-get
    name: only-get
    upstream: echo
    methods: [GET]
  - path: /small
    name: small
    upstream: echo
    max_body_size: 10
  - path: /limited
    name: limited
    upstream: echo
    rate_limit: "2/minute"
  - path: /dead
    name: dead
    upstream: dead
  - path: /fragile
    name: fragile
    upstream: fragile
    strip_prefix: true
  - path: /slow
    name: slow
    upstream: slow
  - path: /cached
    name: cached
    upstream: echo
    auth: none
    cache: {{ttl: 30, public: true}}
  - path: /stale
    name: stale
    upstream: echo
    cache: {{ttl: {stale_ttl}, stale_if_error: 600}}
  - path: /screen/{{id}}
    name: screen
    aggregate:
      item: {{upstream: echo, path: "/items/{{id}}?tag={{query.tag}}"}}
      broken: {{upstream: echo, path: /fail}}
  - path: /async
    name: async
    upstream: echo
    strip_prefix: true
    mode: async
"""


# --- the upstream ---------------------------------------------------------------------------


@dataclass
class EchoUpstream:
    """A deterministic upstream: every answer is JSON with fixed ``Date`` and ``Server`` fields.

    ``/slow...`` waits SLOW_SECONDS, ``/fail...`` answers 500, ``/stale...`` answers 503 while
    ``failing`` is set; anything else (and those, once they answer 200) echoes the request:
    method, path, query, every header it received (sorted, its own address as ``<upstream>``)
    and the body as text.
    """

    url: str = ""
    failing: bool = False

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/slow"):
            time.sleep(SLOW_SECONDS)
        if path.startswith("/fail"):
            return self._answer(start_response, "500 Internal Server Error", {"error": "failing on purpose"})
        if path.startswith("/stale") and self.failing:
            return self._answer(start_response, "503 Service Unavailable", {"error": "down for now"})
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        echo = {
            "method": environ["REQUEST_METHOD"],
            "path": path,
            "query": environ.get("QUERY_STRING", ""),
            "headers": sorted(self._headers(environ)),
            "body": body.decode("utf-8", "replace"),
        }
        return self._answer(start_response, "200 OK", echo)

    def _headers(self, environ: dict) -> Iterable[tuple[str, str]]:
        own = self.url.removeprefix("http://")
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                name = key[5:].replace("_", "-").lower()
                yield name, "<upstream>" if name == "host" and value == own else value
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
                yield key.replace("_", "-").lower(), value

    @staticmethod
    def _answer(start_response: Callable, status: str, document: dict) -> list[bytes]:
        data = json.dumps(document).encode()
        # Fixed Date and Server: werkzeug adds its own only when the app gives none.
        start_response(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("Date", "Thu, 01 Jan 1970 00:00:00 GMT"),
                ("Server", "eq-upstream"),
            ],
        )
        return [data]


@pytest.fixture(scope="module")
def echo_upstream():
    upstream = EchoUpstream()
    server = make_server("127.0.0.1", 0, upstream, threaded=True)
    upstream.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="equivalence-upstream", daemon=True)
    thread.start()
    yield upstream
    server.shutdown()
    server.server_close()


# --- normalisation --------------------------------------------------------------------------

_TRACEPARENT = re.compile(r"\b00-([0-9a-f]{32})-[0-9a-f]{16}-([0-9a-f]{2})\b")
_JOB_ID = re.compile(r"\bjob_[A-Za-z0-9_-]{22}")
_TIMESTAMP = re.compile(r"\b\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})")
_SECONDS = re.compile(r"-?\d+")
_URLLIB3_AGENT = re.compile(r"\bpython-urllib3/[0-9][0-9A-Za-z.+-]*")


def normalise(response: TestResponse, known: dict[str, str], retry_after_is_clock: bool) -> dict:
    """The parts of ``response`` a client can rely on: ``{"status", "headers", "body"}``, with
    what differs between two runs of the same request replaced by ``<placeholders>``.

    ``known`` maps literal values of this run (consumer id, API keys, a request id the gateway
    generated) to their placeholders. ``retry_after_is_clock`` says whether this answer's
    ``Retry-After`` counts down to a moment (a window, a breaker) or is a configured constant.
    """

    def scrub(text: str) -> str:
        # Random per run: the consumer's id (the upstream sees X-Consumer-ID), the API keys (a
        # leak upstream then shows as "<api-key>", never the secret itself), the request ids the
        # gateway made up when the client sent none. Replaced wherever they appear, so a problem
        # body's request_id or the upstream's X-Request-ID reads "<request-id-N>" only when it
        # is the id of the N-th response that carried one.
        for value, placeholder in known.items():
            text = text.replace(value, placeholder)
        # traceparent: a new span id per hop, and a new trace id unless the client sent one;
        # the trace id the client sent is kept, to show the trace is continued.
        text = _TRACEPARENT.sub(
            lambda m: f"00-{m[1] if m[1] == CLIENT_TRACE_ID else '<trace-id>'}-<span-id>-{m[2]}", text
        )
        # Job ids are random, their timestamps the clock's.
        text = _JOB_ID.sub("<job-id>", text)
        text = _TIMESTAMP.sub("<timestamp>", text)
        # urllib3's default User-Agent (sent on calls that carry no client's, an aggregate's)
        # names its version: which client library it is stays compared, not its release.
        return _URLLIB3_AGENT.sub("python-urllib3/<version>", text)

    def clock(text: str, placeholder: str = "<seconds>") -> str:
        return placeholder if _SECONDS.fullmatch(text) else text  # anything else is compared as it is

    headers = []
    for name, value in response.headers.items():
        name = name.lower()
        if name in ("date", "server"):
            # Written by the server (gunicorn's, werkzeug's) in production, by nobody under the
            # test client: kept as present-or-not, so an upstream's leaking through would show.
            value = f"<{name}>"
        elif name == "age":
            value = clock(value)  # seconds since the entry was stored
        elif name == "x-ratelimit-reset":
            value = clock(value, "<epoch-seconds>")  # when the window resets, by the clock
        elif name == "retry-after" and retry_after_is_clock:
            value = clock(value)  # seconds until a window slot or a breaker's probe: the clock's
        elif name == "ratelimit":
            value = re.sub(r";t=\d+", ";t=<seconds>", value)  # t= counts down to the window's reset
        elif name == "cache-status":
            value = re.sub(r"ttl=-?\d+", "ttl=<seconds>", value)  # the entry's remaining freshness
        headers.append([name, scrub(value)])
    headers.sort()

    data = response.get_data()
    content_type = response.headers.get("Content-Type", "")
    body: dict
    try:
        if not re.search(r"[/+]json\b", content_type):
            raise ValueError("not JSON")
        body = {"json": _scrub_json(json.loads(data), scrub)}
    except ValueError:  # JSON it does not say it is, or is not
        try:
            body = {"text": data.decode("utf-8")}  # byte for byte: nothing is replaced
        except UnicodeDecodeError:
            body = {"base64": base64.b64encode(data).decode()}
    return {"status": response.status_code, "headers": headers, "body": body}


def _scrub_json(value, scrub: Callable[[str], str]):
    """``value`` with ``scrub`` applied to every string in it, keys included."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [_scrub_json(item, scrub) for item in value]
    if isinstance(value, dict):
        return {scrub(key): _scrub_json(item, scrub) for key, item in value.items()}
    return value


# --- a case's session with the gateway ------------------------------------------------------


@dataclass
class Session:
    """One case's gateway: a fresh app, its test client, a consumer with two keys (``key`` holds
    SCOPE, ``unscoped`` nothing), and the steps taken so far, normalised."""

    client: FlaskClient
    upstream: EchoUpstream
    key: str
    unscoped: str
    known: dict[str, str]
    steps: list[dict] = field(default_factory=list)
    generated: int = 0  # request ids the gateway made up so far

    def call(self, method: str, path: str, *, headers: dict | None = None, data: bytes | None = None, retry_after_is_clock: bool = False) -> TestResponse:
        """Send one request, record its normalised answer as the next step, and return the answer."""
        sent = {"User-Agent": USER_AGENT, **(headers or {})}
        response = self.client.open(path, method=method, headers=sent, data=data, buffered=True)
        request_id = response.headers.get("X-Request-ID")
        if request_id and request_id != sent.get("X-Request-ID") and request_id not in self.known:
            # Generated, so random; numbered in the order they appear in the case, so that a
            # cached answer shows the id of the request that stored it. A client's own is kept.
            self.generated += 1
            self.known[request_id] = f"<request-id-{self.generated}>"
        self.steps.append({"request": f"{method} {path}", **normalise(response, self.known, retry_after_is_clock)})
        return response


@pytest.fixture
def session(make_app, echo_upstream):
    echo_upstream.failing = False
    routes = ROUTES.format(url=echo_upstream.url, closed=free_port(), scope=SCOPE, stale_ttl=STALE_TTL)
    app = make_app(routes=routes)
    identity = Identity(app)  # creates the tables: keys, and the jobs of the async route
    consumer = identity.consumer(CONSUMER)
    key, unscoped = identity.key(consumer, scopes=(SCOPE,)), identity.key(consumer)
    known = {consumer: "<consumer-id>", key: "<api-key>", unscoped: "<unscoped-api-key>"}
    return Session(app.test_client(), echo_upstream, key, unscoped, known)


# --- the matrix -----------------------------------------------------------------------------

CASES: dict[str, Callable[[Session], None]] = {}


def case(name: str):
    """Register the decorated function as the case ``name``: it makes its requests with ``s.call``."""

    def register(run: Callable[[Session], None]) -> Callable[[Session], None]:
        CASES[name] = run
        return run

    return register


@case("pass-through-get-with-query")
def pass_through_get_with_query(s: Session) -> None:
    # A client traceparent: the upstream sees the same trace id with the gateway's hop.
    s.call("GET", "/pass/items/7?b=2&a=1&a=3&q=x%20y", headers={"traceparent": CLIENT_TRACEPARENT, "Accept": "application/json"})


@case("pass-through-post-with-body")
def pass_through_post_with_body(s: Session) -> None:
    s.call("POST", "/pass/items?x=1", headers={"Content-Type": "application/json"}, data=b'{"name": "widget", "n": 3}')


@case("auth-200-consumer-fields-upstream")
def auth_200_consumer_fields_upstream(s: Session) -> None:
    # X-Consumer-* reach the upstream (a client's own are dropped); the key does not.
    s.call("GET", "/private/me", headers={"X-API-Key": s.key, "X-Consumer-ID": "forged"})
    s.call("GET", "/private/me", headers={"Authorization": f"Bearer {s.key}"})


@case("auth-401-no-credential")
def auth_401_no_credential(s: Session) -> None:
    s.call("GET", "/private/me")


@case("auth-403-scope-missing")
def auth_403_scope_missing(s: Session) -> None:
    s.call("GET", "/private/me", headers={"X-API-Key": s.unscoped})


@case("no-route-404")
def no_route_404(s: Session) -> None:
    s.call("GET", "/nowhere/at/all")


@case("method-not-on-route-405")
def method_not_on_route_405(s: Session) -> None:
    s.call("POST", "/only-get/x", data=b"{}")


@case("body-too-large-413")
def body_too_large_413(s: Session) -> None:
    s.call("POST", "/small", headers={"Content-Type": "text/plain"}, data=b"x" * 11)


@case("rate-limited-429")
def rate_limited_429(s: Session) -> None:
    s.call("GET", "/limited/a")
    s.call("GET", "/limited/a")
    s.call("GET", "/limited/a", retry_after_is_clock=True)  # seconds until the oldest hit leaves the window


@case("upstream-unreachable-502")
def upstream_unreachable_502(s: Session) -> None:
    s.call("GET", "/dead/x")


@case("breaker-open-503")
def breaker_open_503(s: Session) -> None:
    s.call("GET", "/fragile/fail")  # the upstream's 500, passed on; fail_max 1 opens the breaker
    s.call("GET", "/fragile/ok", retry_after_is_clock=True)  # seconds until the half-open probe


@case("upstream-timeout-504")
def upstream_timeout_504(s: Session) -> None:
    s.call("GET", "/slow/x")


@case("cache-miss-then-hit")
def cache_miss_then_hit(s: Session) -> None:
    # A public route without a limit: the hit is the one the cache fast path answers.
    s.call("GET", "/cached/thing?b=2&a=1")
    s.call("GET", "/cached/thing?a=1&b=2")


@case("cache-stale-if-error")
def cache_stale_if_error(s: Session) -> None:
    s.call("GET", "/stale/thing")
    time.sleep(STALE_TTL + 0.1)
    s.upstream.failing = True
    s.call("GET", "/stale/thing")


@case("aggregate-partial")
def aggregate_partial(s: Session) -> None:
    s.call("GET", "/screen/7?tag=a")


@case("async-202")
def async_202(s: Session) -> None:
    # Retry-After here is JOB_RETRY_AFTER (1), a configured constant: compared as it is.
    s.call("POST", "/async/reports?month=5", headers={"Content-Type": "text/plain"}, data=b"hello")


@case("gateway-own-path-healthz")
def gateway_own_path_healthz(s: Session) -> None:
    s.call("GET", "/healthz")


@case("client-request-id-echoed")
def client_request_id_echoed(s: Session) -> None:
    response = s.call("GET", "/pass/echo", headers={"X-Request-ID": "eq-client-7"})
    # Asserted here as well: the generic comparison turns generated ids into placeholders.
    assert response.headers.getlist("X-Request-ID") == ["eq-client-7"]
    assert ["x-request-id", "eq-client-7"] in response.json["headers"]
    # One that is not sane (a space) is replaced: the upstream gets the replacement.
    response = s.call("GET", "/pass/echo", headers={"X-Request-ID": "not sane"})
    replaced = response.headers["X-Request-ID"]
    assert replaced != "not sane" and ["x-request-id", replaced] in response.json["headers"]


# --- the tests ------------------------------------------------------------------------------


def _load() -> dict:
    return json.loads(EXPECTED.read_text()) if EXPECTED.exists() else {}


def _record(name: str, steps: list[dict]) -> None:
    recorded = _load()
    recorded[name] = steps
    ordered = {key: recorded[key] for key in CASES if key in recorded}  # matrix order; dropped cases go
    EXPECTED.write_text(_dumps(ordered) + "\n")


# A list of two strings (a header field) on one line: the file and its diffs stay readable.
_PAIR = re.compile(r'\[\s+("(?:[^"\\]|\\.)*"),\s+("(?:[^"\\]|\\.)*")\s+\]')


def _dumps(value) -> str:
    return _PAIR.sub(r"[\1, \2]", json.dumps(value, indent=2, ensure_ascii=False))


@pytest.mark.parametrize("name", list(CASES))
def test_the_gateway_answers_as_recorded(session, name):
    CASES[name](session)
    if RECORDING:
        _record(name, session.steps)
        pytest.fail(f"recorded {name!r} in {EXPECTED.name} (FRONTDOOR_RECORD_EQUIVALENCE=1): a recording run is not a check")
    expected = _load().get(name)
    assert expected is not None, f"no answer recorded for {name!r}: record with FRONTDOOR_RECORD_EQUIVALENCE=1"
    if session.steps != expected:
        diff = difflib.unified_diff(_dumps(expected).splitlines(), _dumps(session.steps).splitlines(), "recorded", "now", lineterm="", n=4)
        pytest.fail(f"{name}: the answers differ from {EXPECTED.name}\n" + "\n".join(diff), pytrace=False)


def test_the_recording_holds_exactly_the_matrix():
    if RECORDING:
        pytest.fail("FRONTDOOR_RECORD_EQUIVALENCE=1: a recording run is not a check")
    assert list(_load()) == list(CASES)
