"""The API's edge (app/api/inputs.py): NUL, lone surrogates, deep nesting, out-of-range cursors,
values longer than their column and oversized bodies are 4xx problems on SQLite and PostgreSQL."""
from __future__ import annotations

import base64
import io
import json

import pytest

from app.api.inputs import Limits
from app.extensions import db
from app.models import Consumer, WebhookEndpoint, WebhookMessage
from tests.factories import Identity
from tests.unit.api.support import auth, problem

SECRET_KEYS = "edge-tests-passphrase-of-at-least-32-characters"
ROUTES = """
upstreams:
  closed:
    targets: ["http://127.0.0.1:9"]
routes:
  - path: /async
    upstream: closed
    mode: async
  - path: /lenient
    upstream: closed
    mode: async
    allow_ambiguous_paths: true
  - path: /
    upstream: closed
"""
BOTH = pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)


@pytest.fixture
def database(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'edge.sqlite'}"
    return request.getfixturevalue("postgres_database")


@pytest.fixture
def build(make_app, database):
    """``build(**config)``: an app on ``database``; its connections are closed before the
    PostgreSQL database is dropped."""
    built = []

    def make(**config):
        app = make_app(routes=ROUTES, SQLALCHEMY_DATABASE_URI=database, WEBHOOK_SECRET_KEYS=SECRET_KEYS, **config)
        built.append(app)
        return app

    yield make
    for app in built:
        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()


@pytest.fixture
def app(build):
    return build()


@pytest.fixture
def admin(app) -> dict[str, str]:
    identity = Identity(app)
    return auth(identity.key(identity.consumer("root"), scopes=("admin",)))


def cursor(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


ID_PATHS = [
    "/_gateway/consumers/{}",
    "/_gateway/keys/{}",
    "/_gateway/jobs/{}",
    "/_gateway/jobs/{}/result",
    "/_gateway/webhooks/endpoints/{}",
    "/_gateway/webhooks/endpoints/{}/deliveries",
    "/_gateway/webhooks/deliveries/{}",
    "/_gateway/events/{}",
]


@BOTH
@pytest.mark.parametrize("path", ID_PATHS)
def test_a_path_id_no_row_can_have_is_a_404_saying_why(client, admin, path):
    for ident, shown in [("con%00x", "'con\\x00x'"), ("x" * 41, repr("x" * 41)), ("a%1Fb", "'a\\x1fb'")]:
        body = problem(client.get(path.format(ident), headers=admin), 404)

        assert body["detail"] == f"No resource has the id {shown}: ids are at most 40 characters, without control characters"


@BOTH
def test_an_id_of_the_right_shape_still_reaches_the_handler(client, admin):
    assert problem(client.get("/_gateway/consumers/con_missing", headers=admin), 404)["detail"] == "No consumer 'con_missing'"


@BOTH
@pytest.mark.parametrize(
    "query",
    ["consumer=a%00b", "cursor=%00", "status=failed%0A", "limit=1%00", "key%00=1"],
)
def test_a_query_parameter_with_a_control_character_is_a_400_naming_it(client, admin, query):
    name = query.split("=")[0].replace("%00", "\x00")

    body = problem(client.get(f"/_gateway/keys?{query}", headers=admin), 400)

    assert body["detail"] == f"The query parameter {name!r} holds a control character (U+0000-U+001F or U+007F)"


@BOTH
@pytest.mark.parametrize(
    "value",
    [
        ["0001-01-01T00:00:00+01:00", "con_x"],  # before datetime.min in UTC: OverflowError
        ["9999-12-31T23:59:59-01:00", "con_x"],  # after datetime.max in UTC
        ["2030-01-01T00:00:00+00:00", "con_\u0000"],
        ["2030-01-01T00:00:00+00:00", "x" * 41],
        ["2030-01-01T00:00:00+00:00", 7],
        "[" * 5000,
    ],
    ids=["year-1", "year-9999", "nul-id", "long-id", "number-id", "deep"],
)
def test_a_cursor_this_api_did_not_write_is_a_400(client, admin, value):
    encoded = cursor(value) if isinstance(value, list) else base64.urlsafe_b64encode(value.encode()).decode()

    body = problem(client.get(f"/_gateway/consumers?cursor={encoded}", headers=admin), 400)

    assert body["detail"].startswith("cursor ") and body["detail"].endswith(" is not one this API returned")


@BOTH
def test_a_cursor_at_the_last_representable_time_pages_as_any_other(client, admin):
    response = client.get(f"/_gateway/consumers?cursor={cursor(['9999-12-31T23:59:59+00:00', 'con_x'])}", headers=admin)

    assert response.status_code == 200
    assert [row["name"] for row in response.json["data"]] == ["root"]


CONTROLS = "must not contain control characters (U+0000-U+001F, U+007F)"
FIELDS = [
    ("/_gateway/consumers", {"name": "acme", "plan": "p\u0000"}, "plan", CONTROLS),
    ("/_gateway/consumers", {"name": "acme\u0000"}, "name", CONTROLS),
    # A trailing line break passes the name's own pattern (``$`` matches before it), then breaks
    # X-Consumer-Username on every proxied request of the consumer.
    ("/_gateway/consumers", {"name": "acme\n"}, "name", CONTROLS),
    ("/_gateway/keys", {"consumer": "root\u0000"}, "consumer", CONTROLS),
    ("/_gateway/keys", {"scopes": ["read\n"]}, "scopes.0", CONTROLS),
    ("/_gateway/events", {"type": "order.created", "id": "e\u0000"}, "id", CONTROLS),
    ("/_gateway/events", {"type": "order.created", "consumer": "\u0000"}, "consumer", CONTROLS),
    ("/_gateway/webhooks/endpoints", {"url": "https://example.com/", "description": "\u0000"}, "description", "must not contain NUL (U+0000)"),
    ("/_gateway/jobs", {"request": {"path": "/async", "query": "a=\u0000"}}, "request.query", "must not contain control characters"),
    ("/_gateway/jobs", {"request": {"path": "/\u0000"}}, "request.path", "must not contain control characters"),
    ("/_gateway/jobs", {"request": {"path": "/lenient/%00"}}, "request.path", "must not contain NUL (%00)"),
    ("/_gateway/jobs", {"request": {"path": "/async", "body_base64": "\u00e9t\u00e9"}}, "request.body_base64", "is not valid base64"),
]


@BOTH
@pytest.mark.parametrize(("url", "payload", "field", "message"), FIELDS, ids=[f"{row[0].rsplit('/', 1)[1]}-{row[2]}-{index}" for index, row in enumerate(FIELDS)])
def test_a_string_the_database_cannot_store_is_a_422_naming_the_field(client, admin, url, payload, field, message):
    body = problem(client.post(url, json=payload, headers=admin), 422, field)

    assert message in body["errors"][0]["message"]


@BOTH
@pytest.mark.parametrize(
    ("url", "make", "column", "field"),
    [
        ("/_gateway/consumers", lambda value: {"name": "acme", "plan": value}, Consumer.plan, "plan"),
        ("/_gateway/consumers", lambda value: {"name": value}, Consumer.name, "name"),
        ("/_gateway/events", lambda value: {"type": "order.created", "id": value}, WebhookMessage.event_id, "id"),
        ("/_gateway/webhooks/endpoints", lambda value: {"url": "https://example.com/", "description": value}, WebhookEndpoint.description, "description"),
    ],
    ids=["plan", "name", "event-id", "description"],
)
def test_a_value_longer_than_its_column_is_a_422(client, admin, url, make, column, field):
    length = column.type.length

    body = problem(client.post(url, json=make("a" * (length + 1)), headers=admin), 422, field)

    assert body["errors"][0]["message"] == f"String should have at most {length} characters"


@BOTH
def test_a_description_is_free_text_over_several_lines(build):
    app = build(WEBHOOK_ALLOW_HTTP=True, WEBHOOK_ALLOWED_NETWORKS=["127.0.0.0/8"])
    identity = Identity(app)
    headers = auth(identity.key(identity.consumer("alice")))

    response = app.test_client().post(
        "/_gateway/webhooks/endpoints", json={"url": "http://127.0.0.1:9/hook", "description": "one\ntwo\tthree"}, headers=headers
    )

    assert response.status_code == 201
    assert response.json["description"] == "one\ntwo\tthree"


@BOTH
def test_a_plan_as_long_as_its_column_is_stored(client, admin):
    plan = "p" * Consumer.plan.type.length

    response = client.post("/_gateway/consumers", json={"name": "acme", "plan": plan}, headers=admin)

    assert response.status_code == 201
    assert client.get(response.headers["Location"], headers=admin).json["plan"] == plan


def post_raw(client, url: str, data: bytes, headers: dict[str, str]):
    return client.post(url, data=data, content_type="application/json", headers=headers)


BODY_URLS = ["/_gateway/consumers", "/_gateway/keys", "/_gateway/events", "/_gateway/webhooks/endpoints", "/_gateway/jobs"]


@BOTH
@pytest.mark.parametrize("url", BODY_URLS)
def test_a_body_nested_100000_deep_is_a_400_naming_the_limit(client, admin, url):
    body = problem(post_raw(client, url, b"[" * 100_000, admin), 400)

    assert body["detail"] == "The request body nests arrays and objects deeper than 64 levels (API_MAX_JSON_DEPTH)"


@BOTH
def test_nesting_up_to_the_limit_is_accepted_and_one_level_more_is_not(build):
    app = build(API_MAX_JSON_DEPTH=5)
    identity = Identity(app)
    headers = auth(identity.key(identity.consumer("alice")))
    client = app.test_client()

    deepest = {"type": "order.created", "data": [[[[1]]]]}  # the body object and 4 arrays: 5 levels
    assert client.post("/_gateway/events", json=deepest, headers=headers).status_code == 202
    deeper = problem(client.post("/_gateway/events", json={"type": "order.created", "data": [[[[[1]]]]]}, headers=headers), 400)
    assert deeper["detail"] == "The request body nests arrays and objects deeper than 5 levels (API_MAX_JSON_DEPTH)"


@BOTH
@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b'{"name": "acme", "plan": "\\ud800"}', "a string holds the lone surrogate \\ud800, which is not Unicode"),
        (b'{"name": "acme", "plan": "\\udfff x"}', "a string holds the lone surrogate \\udfff, which is not Unicode"),
        (b'{"\\ud800": 1}', "a string holds the lone surrogate \\ud800, which is not Unicode"),
        (b'{"name": "acme", "plan": NaN}', "expected value at line 1 column 26"),
        (b'{"name": "acme", "plan": "\xff"}', "invalid unicode code point at line 1 column 27"),
    ],
    ids=["lead", "trail", "key", "nan", "not-utf8"],
)
def test_json_that_is_not_unicode_or_not_a_number_is_a_400_saying_where(client, admin, data, detail):
    body = problem(post_raw(client, "/_gateway/consumers", data, admin), 400)

    assert body["detail"] == f"The request body is not valid JSON: {detail}"


@BOTH
@pytest.mark.parametrize("number", [b"1e999", b"-1e400"])
def test_a_number_beyond_a_double_is_a_400(client, admin, number):
    body = problem(post_raw(client, "/_gateway/events", b'{"type": "order.created", "data": [' + number + b"]}", admin), 400)

    assert "a number too large for a double" in body["detail"]


@BOTH
def test_a_surrogate_pair_is_one_character(client, admin):
    response = post_raw(client, "/_gateway/events", b'{"type": "order.created", "data": "\\ud83d\\ude00"}', admin)

    assert response.status_code == 202
    assert client.get(response.headers["Location"], headers=admin).json["data"] == "\U0001f600"


class Unread(io.RawIOBase):
    """A request body that fails the test if the app reads a byte of it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise AssertionError("the body was read")


class Counted(io.RawIOBase):
    """``size`` bytes of JSON-ish text, counting how many the app read."""

    def __init__(self, size: int):
        self.size, self.given = size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.size - self.given)
        buffer[:count] = b" " * count
        self.given += count
        return count


@BOTH
@pytest.mark.parametrize(("url", "setting", "limit"), [("/_gateway/consumers", "API_MAX_BODY_SIZE", 1024 * 1024), ("/_gateway/jobs", "MAX_BODY_SIZE", 10 * 1024 * 1024)])
def test_a_body_over_its_limit_is_a_413_before_a_byte_is_read(client, admin, url, setting, limit):
    size = 30 * 1000 * 1000
    # The stream and its length straight into the environ: werkzeug's builder would measure it.
    environ = {"wsgi.input": Unread(), "CONTENT_LENGTH": str(size)}
    response = client.post(url, environ_overrides=environ, content_type="application/json", headers=admin)

    body = problem(response, 413)
    assert body["detail"] == f"The request body ({size} bytes) exceeds the limit of {limit} bytes ({setting})"


@BOTH
def test_a_chunked_body_is_read_no_further_than_the_limit(build):
    app = build(API_MAX_BODY_SIZE=1000)
    identity = Identity(app)
    headers = auth(identity.key(identity.consumer("root"), scopes=("admin",)))
    stream = Counted(30 * 1000 * 1000)

    # No Content-Length and a terminated input: a chunked body, as gunicorn passes it on.
    environ = {"wsgi.input": stream, "CONTENT_LENGTH": "", "wsgi.input_terminated": True}
    response = app.test_client().post("/_gateway/consumers", environ_overrides=environ, content_type="application/json", headers=headers)

    assert problem(response, 413)["detail"] == "The request body exceeds the limit of 1000 bytes (API_MAX_BODY_SIZE)"
    assert stream.given <= 1000 + 64 * 1024


@BOTH
def test_a_body_at_the_limit_is_read(build):
    app = build(API_MAX_BODY_SIZE=40)
    identity = Identity(app)
    headers = auth(identity.key(identity.consumer("root"), scopes=("admin",)))
    data = json.dumps({"name": "acme"}).encode().ljust(40)

    assert app.test_client().post("/_gateway/consumers", data=data, content_type="application/json", headers=headers).status_code == 201
    assert problem(app.test_client().post("/_gateway/consumers", data=data + b" ", content_type="application/json", headers=headers), 413)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"API_MAX_BODY_SIZE": 0, "API_MAX_JSON_DEPTH": 64}, "API_MAX_BODY_SIZE must be at least 1 byte, not 0"),
        ({"API_MAX_BODY_SIZE": 1, "API_MAX_JSON_DEPTH": 0}, "API_MAX_JSON_DEPTH must be from 1 to 200, not 0"),
        ({"API_MAX_BODY_SIZE": 1, "API_MAX_JSON_DEPTH": 201}, "API_MAX_JSON_DEPTH must be from 1 to 200, not 201"),
    ],
)
def test_limits_outside_their_range_stop_the_app_from_starting(config, message):
    with pytest.raises(ValueError, match=message):
        Limits.from_config(config)
