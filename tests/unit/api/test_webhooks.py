"""``/_gateway/webhooks``: endpoints and their secrets, the SSRF guard at registration, rotation,
test sends to a real receiver, the delivery log, redelivery, and ownership."""
from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import standardwebhooks
import svix.webhooks
from sqlalchemy import select

from app.extensions import db
from app.models import WebhookEndpoint, WebhookMessage
from app.observability.logging import JSONFormatter
from app.webhooks import attempts, messages
from tests.factories import Identity
from tests.unit.api.support import all_pages, auth, problem

ENDPOINTS = "/_gateway/webhooks/endpoints"
DELIVERIES = "/_gateway/webhooks/deliveries"
EVENTS = "/_gateway/events"
SECRET_KEYS = "frontdoor-test-webhook-secret-key-0123456"  # a passphrase of 40 characters
# The settings every test app has: http and loopback receivers are allowed, for the local receiver.
LOCAL = {"WEBHOOK_ALLOW_HTTP": True, "WEBHOOK_ALLOWED_NETWORKS": ["127.0.0.0/8"], "WEBHOOK_SECRET_KEYS": SECRET_KEYS}


# --- a receiver ---------------------------------------------------------------------------


@dataclass
class Seen:
    """One request the receiver got: headers with lower-case names, the raw body."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"thanks"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering


@dataclass
class Receiver:
    """A webhook receiver on a loopback port: records each request and answers with the
    reply set for its path (``receiver.replies["/down"] = Reply(500, b"boom")``), 200 otherwise."""

    server: ThreadingHTTPServer
    seen: list[Seen] = field(default_factory=list)
    replies: dict[str, Reply] = field(default_factory=dict)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"


@pytest.fixture
def receiver():
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            found = holder[0]
            found.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            reply = found.replies.get(self.path, Reply())
            time.sleep(reply.delay)
            self.send_response(reply.status)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(reply.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(Receiver(server))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield holder[0]
    server.shutdown()
    server.server_close()
    thread.join(5)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def verify(secret: str, seen: Seen, library=standardwebhooks.Webhook) -> dict:
    """What a receiver does: verify the delivery with ``secret``; raises WebhookVerificationError."""
    return library(secret).verify(seen.body, seen.headers)


# --- apps, callers, helpers ---------------------------------------------------------------


@pytest.fixture
def webhooks_app(make_app):
    """``webhooks_app(**config)``: an app whose webhooks may go to loopback over http, tables made."""

    def build(**config):
        app = make_app(**{**LOCAL, **config})
        with app.app_context():
            db.create_all()
        return app

    return build


@pytest.fixture
def app(webhooks_app):
    return webhooks_app()


@dataclass
class Enqueued:
    """What would have gone to Celery: fan-out message ids and delivery ids, call by call."""

    fan_outs: list[list[str]] = field(default_factory=list)
    deliveries: list[list[str]] = field(default_factory=list)


@pytest.fixture(autouse=True)
def enqueued(monkeypatch) -> Enqueued:
    calls = Enqueued()
    monkeypatch.setattr(messages, "fan_out_later", lambda ids: calls.fan_outs.append(list(ids)))

    def wake(ids: list[str] | None = None) -> bool:
        if ids:
            calls.deliveries.append(list(ids))
        return True

    monkeypatch.setattr(attempts, "wake", wake)
    return calls


def create(client, headers: dict[str, str], url: str, **fields: object) -> dict:
    response = client.post(ENDPOINTS, json={"url": url, **fields}, headers=headers)
    assert response.status_code == 201, response.json
    return response.json


def publish(client, headers: dict[str, str], event_type: str = "order.created", data: object = None) -> str:
    response = client.post(EVENTS, json={"type": event_type, "data": data if data is not None else {"n": 1}}, headers=headers)
    assert response.status_code == 202, response.json
    return response.json["id"]


def fan_out(app, message_id: str) -> list[str]:
    """What the fan-out task does, without the enqueue: the new delivery ids."""
    with app.app_context():
        return messages.fan_out(message_id)


def deliver(app, delivery_id: str) -> str | None:
    """What the deliver task does, for this delivery alone: one attempt; ``"succeeded"`` or
    ``"failed"`` (whether or not a retry follows), None when it was not claimed."""
    with app.app_context():
        works = attempts.claim(10, [delivery_id])
        status = attempts.record(works, attempts.send_batch(works)).get(delivery_id)
    return None if status is None else ("succeeded" if status == "succeeded" else "failed")


def one_delivery(app, client, headers: dict[str, str], event_type: str = "order.created") -> str:
    """Publish an event and fan it out to the caller's single endpoint; the delivery id."""
    (delivery_id,) = fan_out(app, publish(client, headers, event_type))
    return delivery_id


def stored_secrets(app, endpoint_id: str) -> tuple[bytes, bytes | None]:
    with app.app_context():
        return db.session.execute(
            select(WebhookEndpoint.secret_encrypted, WebhookEndpoint.previous_secret_encrypted).where(WebhookEndpoint.id == endpoint_id)
        ).one()


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def secret_bytes(secret: str) -> bytes:
    assert secret.startswith("whsec_")
    return base64.b64decode(secret.removeprefix("whsec_"), validate=True)


def a_secret(size: int = 32, fill: int = 7) -> str:
    return "whsec_" + base64.b64encode(bytes([fill]) * size).decode()


# --- creating and reading endpoints -------------------------------------------------------


def test_an_endpoint_is_created_with_its_location_and_a_generated_secret(client, alice, receiver):
    response = client.post(
        ENDPOINTS, json={"url": receiver.url(), "description": "orders", "event_types": ["order.*", "job.succeeded"]}, headers=alice
    )

    assert response.status_code == 201
    body = response.json
    assert body["id"].startswith("ep_")
    assert response.headers["Location"] == f"http://localhost{ENDPOINTS}/{body['id']}"  # absolute, as on every 201/202
    assert body["url"] == receiver.url()
    assert body["description"] == "orders"
    assert body["event_types"] == ["order.*", "job.succeeded"]
    assert (body["disabled"], body["disabled_reason"], body["failing_since"], body["secret_rotating_until"]) == (False, None, None, None)
    assert len(secret_bytes(body["secret"])) >= 24
    read = client.get(response.headers["Location"], headers=alice)
    assert read.status_code == 200
    assert read.json == {key: value for key, value in body.items() if key != "secret"}


def test_generated_secrets_differ(client, alice, receiver):
    first = create(client, alice, receiver.url())["secret"]
    second = create(client, alice, receiver.url())["secret"]

    assert first != second


def test_the_secret_is_shown_on_create_and_on_its_own_url_only(client, alice, receiver):
    made = create(client, alice, receiver.url())
    url = f"{ENDPOINTS}/{made['id']}"

    one = client.get(url, headers=alice)
    listed = client.get(ENDPOINTS, headers=alice)
    patched = client.patch(url, json={"description": "changed"}, headers=alice)
    shown = client.get(f"{url}/secret", headers=alice)

    for response in (one, listed, patched):
        assert response.status_code == 200
        assert made["secret"] not in response.get_data(as_text=True)
        assert made["secret"].removeprefix("whsec_") not in response.get_data(as_text=True)
    assert "secret" not in one.json and "secret" not in patched.json
    assert all("secret" not in row for row in listed.json["data"])
    assert shown.status_code == 200
    assert shown.json == {"secret": made["secret"]}


def test_the_secret_is_stored_encrypted(app, client, alice, receiver):
    made = create(client, alice, receiver.url())

    stored, previous = stored_secrets(app, made["id"])

    assert previous is None
    assert stored.startswith(b"gAAAAA")  # a Fernet token
    raw = secret_bytes(made["secret"])
    for plain in (made["secret"].encode(), made["secret"].removeprefix("whsec_").encode(), raw):
        assert plain not in stored


@pytest.fixture
def log_lines():
    """Every log line the process writes meanwhile (the gateway's and its libraries'), as JSON text."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(logging.DEBUG)
    handler.setFormatter(JSONFormatter())
    loggers = [logging.getLogger(), logging.getLogger("frontdoor")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield lines
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_the_secret_never_reaches_the_logs(app, client, alice, receiver, log_lines):
    made = create(client, alice, receiver.url())
    endpoint = f"{ENDPOINTS}/{made['id']}"
    client.get(f"{endpoint}/secret", headers=alice)
    client.get(ENDPOINTS, headers=alice)
    rotated = client.post(f"{endpoint}/rotate-secret", headers=alice).json["secret"]
    supplied = a_secret(fill=9)
    client.post(f"{endpoint}/rotate-secret", json={"secret": supplied}, headers=alice)
    assert client.post(f"{endpoint}/test", headers=alice).json["succeeded"] is True
    assert deliver(app, one_delivery(app, client, alice)) == "succeeded"

    assert len(receiver.seen) == 2
    text = "\n".join(log_lines)
    assert "webhook attempt" in text  # the capture works: the gateway's own lines are here
    for secret in (made["secret"], rotated, supplied):
        assert secret.removeprefix("whsec_") not in text


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("sk_" + base64.b64encode(bytes(32)).decode(), "must start with 'whsec_'"),
        ("whsec_not*base64!", "must be 'whsec_' followed by standard base64"),
        ("whsec_" + base64.b64encode(bytes(16)).decode(), "must encode 24 to 64 bytes, not 16"),
        ("whsec_" + base64.b64encode(bytes(65)).decode(), "must encode 24 to 64 bytes, not 65"),
    ],
)
def test_a_supplied_secret_is_validated(app, client, alice, receiver, secret, message):
    response = client.post(ENDPOINTS, json={"url": receiver.url(), "secret": secret}, headers=alice)

    body = problem(response, 422, "secret")
    assert body["errors"][0]["message"] == message
    assert client.get(ENDPOINTS, headers=alice).json["data"] == []


def test_a_supplied_secret_is_used(app, client, alice, receiver):
    secret = a_secret(24)

    made = create(client, alice, receiver.url(), secret=secret)

    assert made["secret"] == secret
    assert client.get(f"{ENDPOINTS}/{made['id']}/secret", headers=alice).json == {"secret": secret}
    client.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice)
    verify(secret, receiver.seen[0])


@pytest.mark.parametrize("event_types", [["job.*"], ["*"], ["order.created", "job.succeeded"], ["a-b_c.D9"], []])
def test_event_type_filters_that_are_accepted(client, alice, receiver, event_types):
    made = create(client, alice, receiver.url(), event_types=event_types)

    assert made["event_types"] == event_types


def test_repeated_event_types_are_kept_once(client, alice, receiver):
    made = create(client, alice, receiver.url(), event_types=["job.*", "order.created", "job.*"])

    assert made["event_types"] == ["job.*", "order.created"]


@pytest.mark.parametrize("bad", ["job.*.x", "a..b", "order created", "", "*.job", "job.", "job.**"])
def test_event_type_filters_that_are_refused(client, alice, receiver, bad):
    created = client.post(ENDPOINTS, json={"url": receiver.url(), "event_types": ["ok.one", bad]}, headers=alice)
    made = create(client, alice, receiver.url(), event_types=["ok.one"])
    patched = client.patch(f"{ENDPOINTS}/{made['id']}", json={"event_types": [bad]}, headers=alice)

    for response in (created, patched):
        body = problem(response, 422, "event_types")
        assert repr(bad) in body["detail"]
    assert client.get(f"{ENDPOINTS}/{made['id']}", headers=alice).json["event_types"] == ["ok.one"]


@pytest.mark.parametrize(
    ("payload", "field_name"),
    [
        ({}, "url"),
        ({"url": ""}, "url"),
        ({"url": "https://example.com/" + "a" * 2048}, "url"),
        ({"url": "https://example.com/", "description": "d" * 501}, "description"),
        ({"url": "https://example.com/", "colour": "red"}, "colour"),
        ({"url": "https://example.com/", "event_types": "job.*"}, "event_types"),
        ({"url": "https://example.com/", "disabled": "sometimes"}, "disabled"),
    ],
)
def test_invalid_endpoint_bodies_are_422s_naming_the_field(client, alice, payload, field_name):
    response = client.post(ENDPOINTS, json=payload, headers=alice)

    problem(response, 422, field_name)


def test_a_body_that_is_not_json_is_a_400(client, alice):
    response = client.post(ENDPOINTS, data=b'{"url": ', content_type="application/json", headers=alice)

    body = problem(response, 400)
    assert body["detail"] == "The request body is not valid JSON: EOF while parsing a value at line 1 column 8"


def test_an_endpoint_may_be_created_disabled(client, alice, receiver):
    made = create(client, alice, receiver.url(), disabled=True)

    assert made["disabled"] is True
    assert made["disabled_reason"] == "disabled when registered"
    assert made["disabled_at"] is not None


# --- changing and deleting ----------------------------------------------------------------


def test_patch_changes_url_description_and_event_types(client, alice, receiver):
    made = create(client, alice, receiver.url("/old"), description="before", event_types=["order.*"])

    response = client.patch(
        f"{ENDPOINTS}/{made['id']}", json={"url": receiver.url("/new"), "description": "after", "event_types": ["job.*"]}, headers=alice
    )

    assert response.status_code == 200
    assert (response.json["url"], response.json["description"], response.json["event_types"]) == (receiver.url("/new"), "after", ["job.*"])
    assert parse_time(response.json["updated_at"]) > parse_time(made["updated_at"])
    read = client.get(f"{ENDPOINTS}/{made['id']}", headers=alice).json
    assert read == response.json
    client.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice)
    assert [seen.path for seen in receiver.seen] == ["/new"]


def test_patch_cannot_change_the_secret(client, alice, receiver):
    made = create(client, alice, receiver.url())

    response = client.patch(f"{ENDPOINTS}/{made['id']}", json={"secret": a_secret()}, headers=alice)

    problem(response, 422, "secret")
    assert client.get(f"{ENDPOINTS}/{made['id']}/secret", headers=alice).json == {"secret": made["secret"]}


def test_patch_leaves_fields_it_does_not_name(client, alice, receiver):
    made = create(client, alice, receiver.url(), description="kept", event_types=["order.*"])

    response = client.patch(f"{ENDPOINTS}/{made['id']}", json={"description": ""}, headers=alice)

    assert response.status_code == 200
    assert (response.json["url"], response.json["description"], response.json["event_types"]) == (receiver.url(), "", ["order.*"])


def test_patch_empties_event_types_to_mean_every_type(app, client, alice, receiver):
    made = create(client, alice, receiver.url(), event_types=["order.*"])
    assert fan_out(app, publish(client, alice, "invoice.sent")) == []

    response = client.patch(f"{ENDPOINTS}/{made['id']}", json={"event_types": []}, headers=alice)

    assert response.json["event_types"] == []
    assert len(fan_out(app, publish(client, alice, "invoice.sent"))) == 1


def test_an_endpoint_is_disabled_and_enabled_again_with_a_clean_record(app, client, alice, receiver):
    receiver.replies["/hook"] = Reply(500, b"down")
    made = create(client, alice, receiver.url())
    assert deliver(app, one_delivery(app, client, alice)) == "failed"
    failing = client.get(f"{ENDPOINTS}/{made['id']}", headers=alice).json
    assert failing["failing_since"] is not None

    disabled = client.patch(f"{ENDPOINTS}/{made['id']}", json={"disabled": True}, headers=alice)

    assert disabled.status_code == 200
    assert disabled.json["disabled"] is True
    assert disabled.json["disabled_reason"] == "disabled by its consumer"
    assert disabled.json["disabled_at"] is not None
    assert fan_out(app, publish(client, alice)) == []  # a disabled endpoint gets no deliveries

    enabled = client.patch(f"{ENDPOINTS}/{made['id']}", json={"disabled": False}, headers=alice)

    assert enabled.status_code == 200
    assert (enabled.json["disabled"], enabled.json["disabled_reason"], enabled.json["disabled_at"]) == (False, None, None)
    assert enabled.json["failing_since"] is None
    assert client.get(f"{ENDPOINTS}/{made['id']}", headers=alice).json == enabled.json
    assert len(fan_out(app, publish(client, alice))) == 1


def test_an_endpoint_whose_receiver_answers_410_is_shown_disabled(app, client, alice, receiver, enqueued):
    receiver.replies["/gone"] = Reply(410, b"gone")
    made = create(client, alice, receiver.url("/gone"))

    assert deliver(app, one_delivery(app, client, alice)) == "failed"

    shown = client.get(f"{ENDPOINTS}/{made['id']}", headers=alice).json
    assert (shown["disabled"], shown["disabled_reason"]) == (True, "the receiver answered 410 Gone")
    _event, (message_id,) = enqueued.fan_outs  # the event published, then the webhook.endpoint.disabled event, for the other endpoints
    event = client.get(f"{EVENTS}/{message_id}", headers=alice).json
    assert event["type"] == "webhook.endpoint.disabled"
    assert (event["data"]["endpoint_id"], event["data"]["reason"]) == (made["id"], "the receiver answered 410 Gone")
    enabled = client.patch(f"{ENDPOINTS}/{made['id']}", json={"disabled": False}, headers=alice).json
    assert (enabled["disabled"], enabled["disabled_reason"], enabled["failing_since"]) == (False, None, None)


def test_a_deleted_endpoint_answers_404_and_its_deliveries_go_with_it(app, client, alice, receiver):
    made = create(client, alice, receiver.url())
    delivery_id = one_delivery(app, client, alice)
    deliver(app, delivery_id)

    response = client.delete(f"{ENDPOINTS}/{made['id']}", headers=alice)

    assert response.status_code == 200
    assert response.json == {name: value for name, value in made.items() if name != "secret"}  # the endpoint as it was
    again = client.delete(f"{ENDPOINTS}/{made['id']}", headers=alice)
    body = problem(again, 404)
    assert body["detail"] == f"No webhook endpoint {made['id']!r}"
    problem(client.get(f"{ENDPOINTS}/{made['id']}", headers=alice), 404)
    problem(client.get(f"{DELIVERIES}/{delivery_id}", headers=alice), 404)
    assert client.get(ENDPOINTS, headers=alice).json["data"] == []


def test_the_list_pages_with_a_cursor_newest_first_without_repeats(client, alice, bob, receiver):
    made = [create(client, alice, receiver.url(f"/{n}"))["id"] for n in range(5)]
    create(client, bob, receiver.url("/bob"))

    pages = all_pages(client, ENDPOINTS, alice, limit=2)

    assert [len(page) for page in pages] == [2, 2, 1]
    ids = [row["id"] for page in pages for row in page]
    assert ids == made[::-1]


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=two", "cursor=nonsense"])
def test_bad_paging_parameters_are_400s(client, alice, query):
    problem(client.get(f"{ENDPOINTS}?{query}", headers=alice), 400)


def test_a_consumer_may_have_at_most_max_endpoints(webhooks_app, receiver):
    app = webhooks_app(WEBHOOK_MAX_ENDPOINTS=2)
    client, identity = app.test_client(), Identity(app)
    alice, bob = auth(identity.key()), auth(identity.key())
    first = create(client, alice, receiver.url())
    create(client, alice, receiver.url())

    refused = client.post(ENDPOINTS, json={"url": receiver.url()}, headers=alice)

    body = problem(refused, 422)
    assert "WEBHOOK_MAX_ENDPOINTS" in body["detail"] and "2 endpoints" in body["detail"]
    assert len(client.get(ENDPOINTS, headers=alice).json["data"]) == 2
    create(client, bob, receiver.url())  # the cap is per consumer
    assert client.delete(f"{ENDPOINTS}/{first['id']}", headers=alice).status_code == 200
    create(client, alice, receiver.url())


# --- ownership and authentication ---------------------------------------------------------

ENDPOINT_CALLS = [
    ("get", "", None),
    ("patch", "", {"description": "mine now"}),
    ("delete", "", None),
    ("get", "/secret", None),
    ("post", "/rotate-secret", None),
    ("post", "/test", None),
    ("get", "/deliveries", None),
]


@pytest.mark.parametrize(("method", "suffix", "payload"), ENDPOINT_CALLS)
def test_another_consumers_endpoint_answers_like_a_missing_one(app, client, alice, bob, receiver, method, suffix, payload):
    made = create(client, alice, receiver.url(), description="alice's")
    call = getattr(client, method)
    kwargs = {"json": payload} if payload is not None else {}

    theirs = call(f"{ENDPOINTS}/{made['id']}{suffix}", headers=bob, **kwargs)
    missing = call(f"{ENDPOINTS}/ep_doesnotexist{suffix}", headers=bob, **kwargs)

    assert problem(theirs, 404)["detail"] == f"No webhook endpoint {made['id']!r}"
    assert problem(missing, 404)["detail"] == "No webhook endpoint 'ep_doesnotexist'"
    assert made["secret"] not in theirs.get_data(as_text=True)
    still = client.get(f"{ENDPOINTS}/{made['id']}", headers=alice)
    assert still.status_code == 200
    assert still.json["description"] == "alice's"
    assert client.get(f"{ENDPOINTS}/{made['id']}/secret", headers=alice).json["secret"] == made["secret"]
    assert receiver.seen == []


@pytest.mark.parametrize(("method", "suffix"), [("get", ""), ("post", "/redeliver")])
def test_another_consumers_delivery_answers_like_a_missing_one(app, client, alice, bob, receiver, enqueued, method, suffix):
    create(client, alice, receiver.url())
    delivery_id = one_delivery(app, client, alice)
    deliver(app, delivery_id)
    create(client, bob, receiver.url())

    theirs = getattr(client, method)(f"{DELIVERIES}/{delivery_id}{suffix}", headers=bob)
    missing = getattr(client, method)(f"{DELIVERIES}/dlv_doesnotexist{suffix}", headers=bob)

    assert problem(theirs, 404)["detail"] == f"No webhook delivery {delivery_id!r}"
    assert problem(missing, 404)["detail"] == "No webhook delivery 'dlv_doesnotexist'"
    assert client.get(f"{DELIVERIES}/{delivery_id}", headers=alice).json["status"] == "succeeded"
    assert enqueued.deliveries == []


def test_a_consumer_lists_only_its_own_endpoints(client, alice, bob, receiver):
    mine = create(client, alice, receiver.url())

    assert [row["id"] for row in client.get(ENDPOINTS, headers=alice).json["data"]] == [mine["id"]]
    assert client.get(ENDPOINTS, headers=bob).json == {"data": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", ENDPOINTS),
        ("post", ENDPOINTS),
        ("get", f"{ENDPOINTS}/ep_x"),
        ("get", f"{ENDPOINTS}/ep_x/secret"),
        ("post", f"{ENDPOINTS}/ep_x/rotate-secret"),
        ("post", f"{ENDPOINTS}/ep_x/test"),
        ("get", f"{DELIVERIES}/dlv_x"),
        ("post", f"{DELIVERIES}/dlv_x/redeliver"),
    ],
)
def test_without_a_credential_every_call_is_a_401(client, identity, method, path):
    response = getattr(client, method)(path, json={"url": "https://example.com/"})

    problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="frontdoor"')


# --- the SSRF guard at registration -------------------------------------------------------


@pytest.fixture
def strict(webhooks_app):
    """An app with the default guard (https, public addresses only) and a caller's headers."""
    app = webhooks_app(WEBHOOK_ALLOW_HTTP=False, WEBHOOK_ALLOWED_NETWORKS=[])
    return app.test_client(), auth(Identity(app).key())


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/", "scheme must be https, not 'http'"),
        ("https://127.0.0.1/", "127.0.0.1 is loopback"),
        ("https://[::1]/", "::1 is loopback"),
        ("https://10.0.0.1/", "10.0.0.1 is private"),
        ("https://192.168.1.20:8443/hook", "192.168.1.20 is private"),
        ("https://169.254.169.254/latest/meta-data/", "169.254.169.254 is link-local"),
        ("https://[fd00::1]/", "fd00::1 is unique-local"),
        ("https://0.0.0.0/", "0.0.0.0 is unspecified"),
        ("https://[::ffff:127.0.0.1]/", "127.0.0.1 is loopback"),
        ("https://localhost/", "localhost resolves to 127.0.0.1"),
        ("https://2130706433/", "2130706433 resolves to 127.0.0.1"),
        ("https://0177.0.0.1/", "0177.0.0.1 resolves to 127.0.0.1"),
        ("https://0x7f.0.0.1/", "0x7f.0.0.1 resolves to 127.0.0.1"),
        ("https://127.1/", "127.1 resolves to 127.0.0.1"),
        ("https://user:pw@example.com/", "must not carry credentials"),
        ("ftp://example.com/", "scheme must be https"),
        ("example.com/hook", "scheme must be https"),
        ("https://no-such-host.invalid/", "does not resolve"),
    ],
)
def test_registration_refuses_urls_the_guard_does_not_allow(strict, url, reason):
    client, headers = strict

    response = client.post(ENDPOINTS, json={"url": url}, headers=headers)

    body = problem(response, 422, "url")
    assert reason in body["detail"], body["detail"]
    assert client.get(ENDPOINTS, headers=headers).json["data"] == []


def test_a_loopback_url_is_accepted_when_its_network_is_allow_listed(webhooks_app, strict):
    strict_client, strict_headers = strict
    app = webhooks_app(WEBHOOK_ALLOW_HTTP=False)  # 127.0.0.0/8 allow-listed, https only
    client, headers = app.test_client(), auth(Identity(app).key())

    problem(strict_client.post(ENDPOINTS, json={"url": "https://127.0.0.1:8443/hook"}, headers=strict_headers), 422, "url")
    made = create(client, headers, "https://127.0.0.1:8443/hook")
    ipv6 = client.post(ENDPOINTS, json={"url": "https://[::1]:8443/hook"}, headers=headers)

    assert made["url"] == "https://127.0.0.1:8443/hook"
    assert "::1 is loopback" in problem(ipv6, 422, "url")["detail"]  # only 127.0.0.0/8 is listed
    assert "scheme must be https" in problem(client.post(ENDPOINTS, json={"url": "http://127.0.0.1/"}, headers=headers), 422, "url")["detail"]


def test_patch_to_a_private_url_is_refused_and_nothing_changes(client, alice, receiver):
    made = create(client, alice, receiver.url(), description="before")

    response = client.patch(f"{ENDPOINTS}/{made['id']}", json={"url": "https://10.1.2.3/hook", "description": "after"}, headers=alice)

    assert "10.1.2.3 is private" in problem(response, 422, "url")["detail"]
    read = client.get(f"{ENDPOINTS}/{made['id']}", headers=alice).json
    assert (read["url"], read["description"]) == (receiver.url(), "before")


# --- secret rotation ----------------------------------------------------------------------


def test_after_a_rotation_deliveries_carry_both_signatures(client, alice, receiver):
    made = create(client, alice, receiver.url())
    old = made["secret"]
    endpoint = f"{ENDPOINTS}/{made['id']}"

    response = client.post(f"{endpoint}/rotate-secret", headers=alice)

    assert response.status_code == 200
    new = response.json["secret"]
    assert new != old and len(secret_bytes(new)) >= 24
    until = parse_time(response.json["previous_valid_until"])
    assert abs(until - (datetime.now(UTC) + timedelta(hours=24))) < timedelta(seconds=10)
    assert client.get(f"{endpoint}/secret", headers=alice).json == {"secret": new}
    assert parse_time(client.get(endpoint, headers=alice).json["secret_rotating_until"]) == until

    assert client.post(f"{endpoint}/test", headers=alice).json["succeeded"] is True

    (seen,) = receiver.seen
    signatures = seen.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(part.startswith("v1,") for part in signatures)
    for secret in (new, old):
        assert verify(secret, seen)["type"] == "webhook.test"
        assert verify(secret, seen, svix.webhooks.Webhook)["type"] == "webhook.test"
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verify(a_secret(fill=1), seen)
    # newest first: the first signature is the new secret's, the second the old one's
    first, second = ({**seen.headers, "webhook-signature": part} for part in signatures)
    verify(new, Seen(seen.method, seen.path, first, seen.body))
    verify(old, Seen(seen.method, seen.path, second, seen.body))
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verify(old, Seen(seen.method, seen.path, first, seen.body))


def test_after_the_overlap_only_the_new_secret_signs(webhooks_app, receiver):
    app = webhooks_app(WEBHOOK_SECRET_OVERLAP=1.0)
    client, alice = app.test_client(), auth(Identity(app).key())
    made = create(client, alice, receiver.url())
    endpoint = f"{ENDPOINTS}/{made['id']}"
    rotated = client.post(f"{endpoint}/rotate-secret", headers=alice).json
    until = parse_time(rotated["previous_valid_until"])
    client.post(f"{endpoint}/test", headers=alice)
    assert len(receiver.seen[0].headers["webhook-signature"].split(" ")) == 2

    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 0.1)
    client.post(f"{endpoint}/test", headers=alice)

    seen = receiver.seen[1]
    assert len(seen.headers["webhook-signature"].split(" ")) == 1
    verify(rotated["secret"], seen)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verify(made["secret"], seen)
    assert client.get(endpoint, headers=alice).json["secret_rotating_until"] is None


def test_rotation_with_a_supplied_secret_uses_it(client, alice, receiver):
    made = create(client, alice, receiver.url())
    endpoint = f"{ENDPOINTS}/{made['id']}"
    supplied = a_secret(48, fill=3)

    response = client.post(f"{endpoint}/rotate-secret", json={"secret": supplied}, headers=alice)

    assert response.status_code == 200
    assert response.json["secret"] == supplied
    assert client.get(f"{endpoint}/secret", headers=alice).json == {"secret": supplied}
    client.post(f"{endpoint}/test", headers=alice)
    verify(supplied, receiver.seen[0])


def test_rotation_with_a_bad_secret_changes_nothing(app, client, alice, receiver):
    made = create(client, alice, receiver.url())
    endpoint = f"{ENDPOINTS}/{made['id']}"

    response = client.post(f"{endpoint}/rotate-secret", json={"secret": "whsec_short"}, headers=alice)

    problem(response, 422, "secret")
    assert client.get(f"{endpoint}/secret", headers=alice).json == {"secret": made["secret"]}
    assert client.get(endpoint, headers=alice).json["secret_rotating_until"] is None
    assert stored_secrets(app, made["id"])[1] is None


# --- test sends ---------------------------------------------------------------------------


def test_a_test_send_reaches_the_receiver_signed_and_answers_with_the_attempt(client, alice, receiver):
    made = create(client, alice, receiver.url("/hook?from=frontdoor"))
    receiver.replies["/hook?from=frontdoor"] = Reply(202, b'{"ok": true}')
    before = int(time.time())

    response = client.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice)

    assert response.status_code == 200
    attempt = response.json
    assert attempt["id"].startswith("atm_")
    assert (attempt["trigger"], attempt["number"], attempt["status_code"], attempt["succeeded"]) == ("test", 1, 202, True)
    assert attempt["response"] == '{"ok": true}'
    assert attempt["error"] is None
    assert isinstance(attempt["duration_ms"], int) and 0 <= attempt["duration_ms"] < 5000
    assert (attempt["url"], attempt["address"]) == (receiver.url("/hook?from=frontdoor"), "127.0.0.1")
    assert attempt["request_id"] == response.headers["X-Request-ID"]
    (seen,) = receiver.seen
    assert (seen.method, seen.path) == ("POST", "/hook?from=frontdoor")
    assert seen.headers["webhook-id"].startswith("msg_")
    assert before - 1 <= int(seen.headers["webhook-timestamp"]) <= time.time() + 1
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["user-agent"].startswith("Frontdoor-Webhooks/")
    body = seen.json
    assert set(body) == {"type", "timestamp", "data"}
    assert body["type"] == "webhook.test"
    assert abs(parse_time(body["timestamp"]) - datetime.now(UTC)) < timedelta(seconds=10)
    assert body["data"]["endpoint_id"] == made["id"]
    assert verify(made["secret"], seen) == body
    assert verify(made["secret"], seen, svix.webhooks.Webhook) == body
    # the message is the caller's own event, readable by its id
    message = client.get(f"{EVENTS}/{seen.headers['webhook-id']}", headers=alice)
    assert message.status_code == 200
    assert (message.json["type"], message.json["data"]) == ("webhook.test", body["data"])


def test_a_receiver_rejects_a_tampered_or_old_delivery(client, alice, receiver):
    made = create(client, alice, receiver.url())
    client.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice)
    (seen,) = receiver.seen

    tampered = Seen(seen.method, seen.path, seen.headers, seen.body.replace(b"webhook.test", b"webhook.tost"))
    old = Seen(seen.method, seen.path, {**seen.headers, "webhook-timestamp": str(int(seen.headers["webhook-timestamp"]) - 600)}, seen.body)
    for forged in (tampered, old):
        for library in (standardwebhooks.Webhook, svix.webhooks.Webhook):
            with pytest.raises(standardwebhooks.WebhookVerificationError):
                verify(made["secret"], forged, library)


def test_a_test_send_to_a_failing_receiver_is_a_200_with_the_failed_attempt(client, alice, receiver):
    receiver.replies["/hook"] = Reply(500, b"boom")
    made = create(client, alice, receiver.url())

    response = client.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice)

    assert response.status_code == 200
    assert (response.json["succeeded"], response.json["status_code"], response.json["response"]) == (False, 500, "boom")
    assert response.json["error"] is None
    assert len(receiver.seen) == 1
    # a test is never retried and does not count against the endpoint's health
    (row,) = client.get(f"{ENDPOINTS}/{made['id']}/deliveries", headers=alice).json["data"]
    assert (row["status"], row["next_attempt_at"], row["last_status_code"]) == ("failed", None, 500)
    assert client.get(f"{ENDPOINTS}/{made['id']}", headers=alice).json["failing_since"] is None


def test_a_test_send_to_a_receiver_that_is_down_records_the_error(client, alice):
    url = f"http://127.0.0.1:{closed_port()}/hook"
    made = create(client, alice, url)

    response = client.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice)

    assert response.status_code == 200
    attempt = response.json
    assert (attempt["succeeded"], attempt["status_code"], attempt["response"]) == (False, None, None)
    assert attempt["error"].startswith("connection failed")
    assert attempt["url"] == url


def test_a_test_send_checks_the_url_again_before_sending(webhooks_app, client, alice, receiver):
    made = create(client, alice, receiver.url())  # allowed here: 127.0.0.0/8 is allow-listed
    # the same database, served by a gateway whose allow-list no longer has loopback
    unlisted = webhooks_app(WEBHOOK_ALLOWED_NETWORKS=[]).test_client()

    response = unlisted.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice)

    assert response.status_code == 200
    attempt = response.json
    assert (attempt["succeeded"], attempt["status_code"], attempt["address"]) == (False, None, None)
    assert attempt["error"].startswith("refused: the address 127.0.0.1 is loopback")
    assert receiver.seen == []


def test_a_test_send_to_a_slow_receiver_times_out(webhooks_app, receiver):
    app = webhooks_app(WEBHOOK_TIMEOUT=0.3)
    client, alice = app.test_client(), auth(Identity(app).key())
    receiver.replies["/hook"] = Reply(200, b"late", delay=1.0)
    made = create(client, alice, receiver.url())

    attempt = client.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice).json

    assert (attempt["succeeded"], attempt["status_code"]) == (False, None)
    assert "timeout" in attempt["error"]
    assert 300 <= attempt["duration_ms"] < 1000


def test_a_test_send_to_a_disabled_endpoint_is_made(client, alice, receiver):
    made = create(client, alice, receiver.url(), disabled=True)

    response = client.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice)

    assert response.json["succeeded"] is True
    assert len(receiver.seen) == 1


def test_a_redirect_is_not_followed(client, alice, receiver):
    receiver.replies["/hook"] = Reply(307, b"", {"Location": receiver.url("/elsewhere")})
    made = create(client, alice, receiver.url())

    response = client.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice)

    assert (response.json["succeeded"], response.json["status_code"]) == (False, 307)
    assert [seen.path for seen in receiver.seen] == ["/hook"]


# --- the delivery log ---------------------------------------------------------------------


def test_deliveries_are_listed_newest_first_with_their_message_and_attempts(app, client, alice, receiver):
    made = create(client, alice, receiver.url())
    first = one_delivery(app, client, alice, "order.created")
    second = one_delivery(app, client, alice, "order.paid")
    assert deliver(app, first) == "succeeded"

    response = client.get(f"{ENDPOINTS}/{made['id']}/deliveries", headers=alice)

    assert response.status_code == 200
    assert response.json["next_cursor"] is None
    newer, older = response.json["data"]
    assert (newer["id"], older["id"]) == (second, first)
    assert newer["message"]["id"] != older["message"]["id"]
    assert newer["message"]["id"].startswith("msg_")
    assert (newer["message"]["type"], older["message"]["type"]) == ("order.paid", "order.created")
    assert (newer["status"], newer["attempts"], newer["attempt_count"]) == ("pending", [], 0)
    assert (older["status"], older["attempt_count"], older["last_status_code"]) == ("succeeded", 1, 200)
    (attempt,) = older["attempts"]
    assert (attempt["number"], attempt["status_code"], attempt["response"], attempt["error"], attempt["trigger"]) == (
        1, 200, "thanks", None, "scheduled",
    )
    assert isinstance(attempt["duration_ms"], int)
    assert receiver.seen[0].headers["webhook-id"] == older["message"]["id"]
    assert client.get(f"{DELIVERIES}/{first}", headers=alice).json == older


def test_the_response_excerpt_is_at_most_4_kib(client, alice, receiver):
    receiver.replies["/hook"] = Reply(200, b"x" * 10_000)
    made = create(client, alice, receiver.url())

    attempt = client.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice).json

    assert attempt["response"] == "x" * 4096
    (row,) = client.get(f"{ENDPOINTS}/{made['id']}/deliveries", headers=alice).json["data"]
    assert row["attempts"][0]["response"] == "x" * 4096


def test_an_excerpt_cut_inside_a_character_ends_before_it(client, alice, receiver):
    text = "€" * 3000  # 3 bytes each: 4096 bytes end one byte into the 1366th
    receiver.replies["/hook"] = Reply(200, text.encode())
    made = create(client, alice, receiver.url())

    excerpt = client.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice).json["response"]

    assert len(excerpt.encode()) <= 4096
    assert excerpt == "€" * 1365


def test_the_delivery_log_filters_by_status(app, client, alice, receiver):
    made = create(client, alice, receiver.url())
    done = one_delivery(app, client, alice)
    waiting = one_delivery(app, client, alice)
    deliver(app, done)
    url = f"{ENDPOINTS}/{made['id']}/deliveries"

    def ids(query: str) -> list[str]:
        response = client.get(f"{url}?{query}", headers=alice)
        assert response.status_code == 200, response.json
        return [row["id"] for row in response.json["data"]]

    assert ids("status=succeeded") == [done]
    assert ids("status=pending") == [waiting]
    assert ids("status=failed,pending") == [waiting]
    assert ids("status=failed") == []
    assert ids("status=") == [waiting, done]


def test_an_unknown_status_filter_is_a_400(client, alice, receiver):
    made = create(client, alice, receiver.url())

    response = client.get(f"{ENDPOINTS}/{made['id']}/deliveries?status=pending,lost", headers=alice)

    body = problem(response, 400)
    assert body["detail"] == "status lost is not one of pending, sending, succeeded, failed"


def test_the_delivery_log_pages(app, client, alice, receiver):
    made = create(client, alice, receiver.url())
    made_ids = [one_delivery(app, client, alice) for _ in range(3)]

    pages = all_pages(client, f"{ENDPOINTS}/{made['id']}/deliveries", alice, limit=2)

    assert [row["id"] for page in pages for row in page] == made_ids[::-1]


# --- redelivery ---------------------------------------------------------------------------


def test_a_redelivery_is_sent_again_with_the_same_webhook_id(app, client, alice, receiver, enqueued):
    made = create(client, alice, receiver.url())
    delivery_id = one_delivery(app, client, alice)
    assert deliver(app, delivery_id) == "succeeded"

    response = client.post(f"{DELIVERIES}/{delivery_id}/redeliver", headers=alice)

    assert response.status_code == 202
    assert response.headers["Location"] == f"http://localhost{DELIVERIES}/{delivery_id}"
    assert (response.json["id"], response.json["status"], response.json["finished_at"]) == (delivery_id, "pending", None)
    assert enqueued.deliveries == [[delivery_id]]
    assert client.get(response.headers["Location"], headers=alice).json["status"] == "pending"

    assert deliver(app, delivery_id) == "succeeded"

    first, second = receiver.seen
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert second.body == first.body
    verify(made["secret"], second)
    after = client.get(f"{DELIVERIES}/{delivery_id}", headers=alice).json
    assert after["status"] == "succeeded"
    assert [(row["number"], row["trigger"], row["status_code"]) for row in after["attempts"]] == [(1, "scheduled", 200), (2, "manual", 200)]


def test_a_failed_delivery_may_be_redelivered(webhooks_app, receiver, enqueued):
    app = webhooks_app(WEBHOOK_RETRY_SCHEDULE=[])  # one attempt, then failed
    client, alice = app.test_client(), auth(Identity(app).key())
    receiver.replies["/hook"] = Reply(503, b"later")
    create(client, alice, receiver.url())
    delivery_id = one_delivery(app, client, alice)
    deliver(app, delivery_id)
    assert client.get(f"{DELIVERIES}/{delivery_id}", headers=alice).json["status"] == "failed"
    receiver.replies["/hook"] = Reply(200, b"ok")

    assert client.post(f"{DELIVERIES}/{delivery_id}/redeliver", headers=alice).status_code == 202
    assert deliver(app, delivery_id) == "succeeded"

    assert client.get(f"{DELIVERIES}/{delivery_id}", headers=alice).json["status"] == "succeeded"
    assert len({seen.headers["webhook-id"] for seen in receiver.seen}) == 1


def test_redelivery_to_a_disabled_endpoint_is_a_409(app, client, alice, receiver, enqueued):
    made = create(client, alice, receiver.url())
    delivery_id = one_delivery(app, client, alice)
    deliver(app, delivery_id)
    client.patch(f"{ENDPOINTS}/{made['id']}", json={"disabled": True}, headers=alice)

    response = client.post(f"{DELIVERIES}/{delivery_id}/redeliver", headers=alice)

    body = problem(response, 409)
    assert made["id"] in body["detail"] and "disabled" in body["detail"]
    assert client.get(f"{DELIVERIES}/{delivery_id}", headers=alice).json["status"] == "succeeded"
    assert enqueued.deliveries == []


def test_redelivery_while_an_attempt_is_in_flight_is_a_409(app, client, alice, receiver, enqueued):
    create(client, alice, receiver.url())
    delivery_id = one_delivery(app, client, alice)
    with app.app_context():
        assert attempts.claim(1, [delivery_id])  # a worker holds it now

    response = client.post(f"{DELIVERIES}/{delivery_id}/redeliver", headers=alice)

    body = problem(response, 409)
    assert "being sent right now" in body["detail"]
    assert client.get(f"{DELIVERIES}/{delivery_id}", headers=alice).json["status"] == "sending"
    assert enqueued.deliveries == []


def test_a_webhook_message_row_per_test_send(app, client, alice, receiver):
    made = create(client, alice, receiver.url())

    client.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice)
    client.post(f"{ENDPOINTS}/{made['id']}/test", headers=alice)

    ids = [seen.headers["webhook-id"] for seen in receiver.seen]
    assert len(set(ids)) == 2
    with app.app_context():
        types = db.session.execute(select(WebhookMessage.type).where(WebhookMessage.id.in_(ids))).scalars().all()
    assert types == ["webhook.test", "webhook.test"]
