"""Generated input (Hypothesis) over every operation of the served OpenAPI document and every kind
of route, on SQLite and PostgreSQL: NUL, lone surrogates, huge numbers, deep nesting and long
strings never make a 5xx, and every 4xx is problem+json.

The budget is fixed (``EXAMPLES`` per operation and per route kind, derandomized, no example
database), so a run is the same every time and the file runs in well under a minute.
"""
from __future__ import annotations

import base64
import json
import re
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.extensions import db
from tests.factories import Identity
from tests.stub_upstream import StubUpstream
from tests.unit.api.support import auth

EXAMPLES = 25
BUDGET = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Hypothesis warns when it prints a failing example holding the long strings; it is printed anyway.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
BOTH = pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
SECRET_KEYS = "property-tests-passphrase-of-at-least-32-characters"
API_LIMIT = 64 * 1024  # API_MAX_BODY_SIZE here: a generated long string passes it
ROUTE_LIMIT = 128 * 1024  # MAX_BODY_SIZE here: the job endpoint's limit and the routes'
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def routes(upstream: str) -> str:
    """One route of each kind, every one on the stand-in upstream."""
    return f"""
upstreams:
  stub:
    targets: ["{upstream}"]
    timeout: {{connect: 1.0, read: 2.0}}
routes:
  - path: /plain
    upstream: stub
  - path: /members
    upstream: stub
    auth: required
  - path: /cached
    upstream: stub
    cache: {{ttl: 60}}
  - path: /async
    upstream: stub
    mode: async
  - path: /loose
    upstream: stub
    mode: async
    allow_ambiguous_paths: true
  - path: /filtered
    upstream: stub
    response_body: {{deny: [secret, nested.secret], rename: {{kept: shown}}}}
  - path: /agg/{{item}}
    methods: [GET]
    aggregate:
      one: {{upstream: stub, path: "/one/{{item}}?q={{query.q}}", deny: [secret]}}
      two: {{upstream: stub, path: "/two?after={{one.body.kept}}", depends_on: [one]}}
"""


# -- what is generated -----------------------------------------------------------------------------


class Raw(bytes):
    """JSON text written as it is: what json.dumps will not write (1e999, NaN, 100,000 '[')."""


def dump(value: object) -> bytes:
    """``value`` as JSON text, with Raw parts as they are and lone surrogates as \\u escapes."""
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, dict):
        return b"{" + b",".join(dump(str(key)) + b":" + dump(item) for key, item in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(dump(item) for item in value) + b"]"
    return json.dumps(value).encode()


INTERESTING = [
    "", "\x00", "a\x00b", "\ud800", "\udfff", "x\ud83d", "\U0001f600", "\u00e9t\u00e9", "\x7f", "\r\n", " ",
    "x" * 65, "x" * 256, "x" * 3000, "x" * (API_LIMIT + 1), "x" * (ROUTE_LIMIT + 1),
    "root", "acme", "pro", "admin", "order.created", "job.x", "/async", "/async/anything", "/plain/x", "/filtered",
    "/_gateway/consumers", "/..", "%00", "http://127.0.0.1:9/hook", "https://127.0.0.1/hook", "whsec_" + "A" * 32,
    "GET", "post", "request", "batch", "a=1&b=2", "con_x", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
]
RAW = [
    Raw(b"1e999"), Raw(b"-1e999"), Raw(b"9" * 5000), Raw(b"NaN"), Raw(b"Infinity"), Raw(b"[" * 100_000),
    Raw(b"[" * 65 + b"]" * 65), Raw(b'{"a":' * 70 + b"1" + b"}" * 70), Raw(b'"\\ud800"'), Raw(b'"\\udc00\\ud800"'),
    Raw(b'"\xff\xfe"'), Raw(b"[1,]"), Raw(b""),
]
# A word that passes a field's pattern with something after it: a line break after a name
# matches ``^...$`` all the same.
suffixed = st.builds(
    lambda word, tail: word + tail, st.sampled_from(["acme", "read", "pro", "order.created"]), st.sampled_from(["\n", "\r\n", "\x00", "\t", " ", "\u2028", "\x7f"])
)
strings = st.one_of(st.sampled_from(INTERESTING), suffixed, st.text(st.characters(exclude_categories=()), max_size=12))
numbers = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([0, -1, 2**31, 2**63, 10**400, -(10**400), 1e308, -1e-320, 0.5]),
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, strings, st.sampled_from(RAW))


def values(names: list[str]) -> st.SearchStrategy:
    """Any JSON value, its object keys often the document's own property names."""
    keys = st.one_of(st.sampled_from(names), strings)
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4), max_leaves=10
    )


# Values a field of that name takes when it is right, so that a generated body often gets past
# its first check and the hostile value elsewhere in it reaches the code behind.
LIKELY = {
    "path": ["/async/anything", "/plain/x", "/filtered/x", "/async/%00", "/cached/a?b"],
    "url": ["http://127.0.0.1:9/hook", "https://127.0.0.1/hook"],
    "type": ["order.created", "job.succeeded"],
    "name": ["acme", "root"],
    "consumer": ["root", "other"],
    "scopes": [["admin"], []],
    "kind": ["request", "batch"],
    "method": ["GET", "POST"],
}


# A body each operation accepts: generated bodies are these with one part replaced by a hostile
# value, so that the value reaches the code behind the checks the rest of the body passes.
VALID = {
    ("post", "/_gateway/consumers"): {"name": "acme", "plan": "pro"},
    ("patch", "/_gateway/consumers/{consumer_id}"): {"plan": "pro", "disabled": False},
    ("post", "/_gateway/keys"): {"consumer": "other", "scopes": ["read"], "expires_in": 60},
    ("post", "/_gateway/keys/{key_id}/rotate"): {"expire_old_in": 60},
    ("post", "/_gateway/events"): {"type": "order.created", "data": {"a": [1, "b"]}, "id": "evt-1", "consumer": "root"},
    ("post", "/_gateway/jobs"): {
        "kind": "batch",
        "requests": [
            {"method": "POST", "path": "/async/anything", "query": "a=1", "headers": {"X-A": "1"}, "json": {"a": 1}},
            {"path": "/plain/x", "query": {"b": ["1", "2"]}, "body_base64": "eA=="},
        ],
    },
    ("post", "/_gateway/webhooks/endpoints"): {"url": "http://127.0.0.1:9/hook", "description": "d", "event_types": ["order.*"]},
    ("patch", "/_gateway/webhooks/endpoints/{endpoint_id}"): {"description": "d", "disabled": False, "event_types": ["order.created"]},
    ("post", "/_gateway/webhooks/endpoints/{endpoint_id}/rotate-secret"): {"secret": "whsec_" + base64.b64encode(b"k" * 32).decode()},
}


def parts_of(value: object, at: tuple = ()) -> list[tuple]:
    """The path of every part of ``value`` (itself, each key's value, each item), outermost first."""
    found = [at]
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(parts_of(item, (*at, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(parts_of(item, (*at, index)))
    return found


def replaced(value: object, at: tuple, new: object) -> object:
    """A copy of ``value`` with the part at ``at`` (or a new key there) set to ``new``."""
    if not at:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)  # type: ignore[call-overload]
    copy[at[0]] = new if len(at) == 1 else replaced(copy[at[0]], at[1:], new)  # a new key, too
    return copy


def one_part_hostile(valid: object, names: list[str]) -> st.SearchStrategy:
    """``valid`` with one part (or a new key) replaced by a hostile value."""
    hostile = st.one_of(scalars, st.sampled_from(RAW), values(names))
    at_part = st.tuples(st.sampled_from(parts_of(valid)[1:]), hostile).map(lambda pair: replaced(valid, *pair))
    objects = [path for path in parts_of(valid) if isinstance(replaced_get(valid, path), dict)]
    new_key = st.tuples(st.sampled_from(objects), st.sampled_from(names), hostile).map(lambda triple: replaced(valid, (*triple[0], triple[1]), triple[2]))
    return st.one_of(at_part, new_key)


def replaced_get(value: object, at: tuple) -> object:
    for step in at:
        value = value[step]  # type: ignore[index]
    return value


def from_schema(schema: dict, defs: dict, name: str = "") -> st.SearchStrategy:
    """Values of the JSON Schema ``schema`` (the document's subset: $ref, anyOf, enum, objects,
    arrays, scalars) whose every part may instead be a hostile value of any type."""
    hostile = st.one_of(scalars, st.sampled_from(RAW))
    if "$ref" in schema:
        target = schema["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: from_schema(defs[target], defs, name))
    if "anyOf" in schema:
        return st.one_of([from_schema(option, defs, name) for option in schema["anyOf"]])
    likely = st.sampled_from(LIKELY[name]) if name in LIKELY else st.nothing()
    if "enum" in schema:
        return st.one_of(st.sampled_from(schema["enum"]), st.sampled_from(schema["enum"]), likely, hostile)
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        if not properties:
            return st.one_of(st.dictionaries(strings, from_schema(schema.get("additionalProperties", {}), defs), max_size=3), hostile)
        required = {key: from_schema(value, defs, key) for key, value in properties.items() if key in schema.get("required", ())}
        optional = {key: from_schema(value, defs, key) for key, value in properties.items() if key not in required}
        shaped = st.fixed_dictionaries(required, optional=optional)
        return st.one_of(shaped, shaped, shaped, hostile)
    if kind == "array":
        return st.one_of(st.lists(from_schema(schema.get("items", {}), defs, name), max_size=3), likely, hostile)
    typed = {"string": strings, "integer": numbers, "number": numbers, "boolean": st.booleans(), "null": st.none()}.get(kind)
    if typed is None:  # {}: any JSON value
        return st.one_of(likely, hostile, st.deferred(lambda: values(sorted(LIKELY))))
    return st.one_of(likely, likely, typed, hostile)


def url_text() -> st.SearchStrategy[str]:
    """A path segment or query value as it travels in a URL: percent-encoded, NUL and control
    characters included (a lone surrogate cannot be in a URL; raw bytes %ff can)."""
    # At most 3000 characters: gunicorn refuses a request line over 4094 bytes before the app.
    fits = [text for text in INTERESTING if len(text) <= 3000 and not re.search("[\ud800-\udfff]", text)]
    plain = st.one_of(st.sampled_from(fits), st.text(max_size=12))
    return st.one_of(plain.map(lambda text: quote(text, safe="")), st.sampled_from(["%ff%fe", "%c0%80", "%2e%2e", "a%2Fb"]))


def cursors(names: list[str]) -> st.SearchStrategy[str]:
    return values(names).map(lambda value: base64.urlsafe_b64encode(dump(value)).decode().rstrip("="))


# -- the app ---------------------------------------------------------------------------------------


@pytest.fixture
def database(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'properties.sqlite'}"
    return request.getfixturevalue("postgres_database")


@pytest.fixture
def upstream():
    """A stand-in upstream: a JSON object with fields to filter for any method and path."""
    answer = {"kept": "k", "secret": "s", "nested": {"secret": 1, "other": [1, 2]}}
    with StubUpstream() as stub:
        for method in (*METHODS, "HEAD", "OPTIONS"):
            stub.add(method, re.compile(".*"), body=json.dumps(answer), content_type="application/json")
        yield stub


@pytest.fixture
def gateway(make_app, database, upstream):
    app = make_app(
        routes=routes(upstream.url),
        SQLALCHEMY_DATABASE_URI=database,
        WEBHOOK_SECRET_KEYS=SECRET_KEYS,
        WEBHOOK_ALLOW_HTTP=True,
        WEBHOOK_ALLOWED_NETWORKS=["127.0.0.0/8"],
        WEBHOOK_TIMEOUT=1.0,
        JOB_WAIT_MAX=0.05,  # a drawn ?wait= on a job no worker runs must not hold each example
        API_MAX_BODY_SIZE=API_LIMIT,
        MAX_BODY_SIZE=ROUTE_LIMIT,
    )
    yield app
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()  # before the PostgreSQL database is dropped


def assert_answered(response, what: str) -> None:
    """No 5xx; a 4xx is problem+json with a detail."""
    assert response.status_code < 500, f"{what}: {response.status_code} {response.data[:500]!r}"
    if response.status_code >= 400:
        assert response.headers["Content-Type"] == "application/problem+json", what
        assert response.json["detail"], what


# -- every operation of the document ---------------------------------------------------------------


def operations(document: dict) -> list[tuple[str, str, dict]]:
    return [(path, method, op) for path, item in document["paths"].items() for method, op in item.items()]


def property_names(document: dict) -> list[str]:
    names = {name for schema in document["components"]["schemas"].values() for name in schema.get("properties", {})}
    return sorted(names)


def requests_for(method: str, path: str, op: dict, ids: dict[str, list[str]], names: list[str], defs: dict) -> st.SearchStrategy[dict]:
    """A request to ``op``: its path parameters (a real id or generated text), some of its
    query and header parameters, and a body (its schema's shape with hostile parts, or any
    JSON text)."""
    parts: dict[str, st.SearchStrategy] = {}
    for param in op.get("parameters", []):
        name = param["name"]
        if param["in"] == "path":
            # Never empty: "/keys//rotate" is another path, not this operation with an empty id.
            parts[f"path:{name}"] = st.one_of(st.sampled_from(ids[name]), st.sampled_from(ids[name]), url_text().filter(bool))
        elif param["in"] == "query":
            generated = cursors(names) if name == "cursor" else st.one_of(url_text(), numbers.map(str))
            parts[f"query:{name}"] = st.one_of(st.none(), st.none(), generated)
        else:
            parts[f"header:{name}"] = st.one_of(st.none(), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300))
    if "requestBody" in op:
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        shaped = [one_part_hostile(VALID[(method, path)], names)] if (method, path) in VALID else []
        parts["body"] = st.one_of(*shaped, st.none(), from_schema(schema, defs), values(names))
    return st.fixed_dictionaries(parts)


def send(client, method: str, path: str, drawn: dict, headers: dict[str, str]):
    url = path
    query, extra = [], dict(headers)
    for key, value in drawn.items():
        where, _, name = key.partition(":")
        if where == "path":
            url = url.replace("{" + name + "}", value)
        elif where == "query" and value is not None:
            query.append(f"{name}={value}")
        elif where == "header" and value is not None:
            extra[name] = value
    if query:
        url += "?" + "&".join(query)
    body = drawn.get("body")
    data = None if body is None else dump(body)
    return client.open(url, method=method.upper(), data=data, content_type="application/json" if data is not None else None, headers=extra)


def exercise(client, method: str, path: str, op: dict, requests: st.SearchStrategy[dict], headers: dict[str, str]) -> None:
    """Send EXAMPLES generated requests to one operation; each must be answered with a status
    the document gives the operation."""

    @BUDGET
    @given(drawn=requests)
    def check(drawn):
        response = send(client, method, path, drawn, headers)
        what = f"{method.upper()} {path} {drawn!r:.300}"
        assert_answered(response, what)
        # Not 3xx: werkzeug redirects a path whose parameter decodes to '//' (an encoded '/', %2F)
        # to the merged path with a 308, on every rule; no operation of the document lists it.
        if not 300 <= response.status_code < 400:
            assert str(response.status_code) in op["responses"] or "default" in op["responses"], what

    check()


@BOTH
def test_no_operation_of_the_document_answers_a_5xx_for_generated_input(gateway, upstream):
    identity = Identity(gateway)
    admin = auth(identity.key(identity.consumer("root"), scopes=("admin",)))
    client = gateway.test_client()
    document = client.get("/_gateway/openapi.json").json
    names = property_names(document)
    # Real ids to reach past the lookup; the admin's own consumer and key are never among them,
    # so a generated PATCH or DELETE cannot lock the test out.
    other = identity.consumer("other")
    other_key = client.post("/_gateway/keys", json={"consumer": other}, headers=admin).json["id"]
    job = client.post("/_gateway/jobs", json={"request": {"path": "/async/x"}}, headers=admin).json["id"]
    endpoint = client.post("/_gateway/webhooks/endpoints", json={"url": f"{upstream.url}/hook"}, headers=admin).json["id"]
    message = client.post("/_gateway/events", json={"type": "order.created"}, headers=admin).json["id"]
    ids = {
        "consumer_id": [other], "key_id": [other_key], "job_id": [job], "endpoint_id": [endpoint], "message_id": [message],
        "delivery_id": ["dlv_missing"], "name": ["stub"], "target": ["0"], "slug": ["rate-limited"],
    }
    exercised = []
    # DELETE last: a revoked key, a canceled job or a deleted endpoint answers little else.
    for path, method, op in sorted(operations(document), key=lambda entry: entry[1] == "delete"):
        exercise(client, method, path, op, requests_for(method, path, op, ids, names, document["components"]["schemas"]), admin)
        exercised.append(f"{method.upper()} {path}")
    assert len(exercised) == len(operations(document)) > 30


# -- every kind of route -----------------------------------------------------------------------------

ROUTE_KINDS = ["/plain", "/members", "/cached", "/async", "/loose", "/filtered", "/agg"]


@st.composite
def proxied(draw, prefix: str) -> tuple[str, str, bytes | None, dict[str, str]]:
    method = "GET" if prefix == "/agg" else draw(st.sampled_from(METHODS))
    url = f"{prefix}/{draw(url_text())}"
    query = draw(st.lists(st.tuples(url_text(), url_text()), max_size=3))
    if prefix == "/agg":
        query.append(("q", draw(url_text())))
    if query:
        url += "?" + "&".join(f"{name}={value}" for name, value in query)
    body = None if method == "GET" else draw(st.one_of(st.none(), values(["kept", "secret"]).map(dump)))
    headers = draw(st.dictionaries(st.sampled_from(["X-Thing", "Accept", "Idempotency-Key", "Cache-Control"]),
                                   st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40), max_size=2))
    return method, url, body, headers


@BOTH
def test_no_route_kind_answers_a_5xx_for_generated_input(gateway):
    identity = Identity(gateway)
    key = auth(identity.key(identity.consumer("caller")))
    client = gateway.test_client()
    for prefix in ROUTE_KINDS:
        route(client, prefix, key)


def route(client, prefix: str, key: dict[str, str]) -> None:
    """Send EXAMPLES generated requests to the route under ``prefix``; each must be answered,
    and a filtering route's 200 never carries a denied field."""

    @BUDGET
    @given(request=proxied(prefix))
    def check(request):
        method, url, body, headers = request
        response = client.open(url, method=method, data=body, headers={**key, **headers})
        assert_answered(response, f"{method} {url!r:.300}")
        if prefix == "/filtered" and response.status_code == 200 and response.data:
            filtered = response.json
            assert "secret" not in filtered and "secret" not in filtered["nested"] and filtered["shown"] == "k"

    check()


@BOTH
def test_a_filtering_route_answers_a_deeply_nested_upstream_body_with_a_502_problem(gateway, upstream):
    upstream.reset()
    upstream.add("GET", re.compile(".*"), body=b"[" * 100_000 + b"]" * 100_000, content_type="application/json")

    response = gateway.test_client().get("/filtered/deep")

    assert response.status_code == 502
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json["type"] == "/_gateway/problems/unfilterable-body"
    assert response.json["detail"].startswith("The upstream's JSON body cannot be read (recursion limit exceeded")


@BOTH
def test_an_aggregate_part_nested_near_the_recursion_limit_fails_alone(gateway, upstream):
    # 985 levels parse with json.loads on the pool's thread, then broke the merged answer (a 500).
    upstream.reset()
    upstream.add("GET", re.compile("/one/.*"), body=b"[" * 985 + b"]" * 985, content_type="application/json")

    response = gateway.test_client().get("/agg/deep?q=1")

    assert response.status_code == 200
    assert response.json["one"] is None and response.json["two"] is None
    assert response.json["errors"]["one"]["detail"] == "the backend's answer is not valid JSON (recursion limit exceeded at line 1 column 202)"


@BOTH
def test_whatever_the_api_accepts_for_a_consumer_its_calls_through_a_route_are_answered(gateway):
    # What the API stores for a consumer (name, plan, scopes) travels to upstreams in
    # X-Consumer-* header fields: a value the API accepts must never break a proxied call.
    identity = Identity(gateway)
    admin = auth(identity.key(identity.consumer("root"), scopes=("admin",)))
    client = gateway.test_client()

    @BUDGET
    @given(name=strings, plan=st.one_of(st.none(), strings), scopes=st.lists(strings, max_size=2))
    def check(name, plan, scopes):
        made = client.post("/_gateway/consumers", data=dump({"name": name, "plan": plan}), content_type="application/json", headers=admin)
        assert_answered(made, f"consumer {name!r:.100} {plan!r:.100}")
        if made.status_code != 201:
            return
        key = client.post("/_gateway/keys", data=dump({"consumer": made.json["id"], "scopes": scopes}), content_type="application/json", headers=admin)
        assert_answered(key, f"key {scopes!r:.200}")
        if key.status_code == 201:
            assert_answered(client.get("/members/x", headers=auth(key.json["key"])), f"a call as {name!r:.100} with {scopes!r:.200}")

    check()
