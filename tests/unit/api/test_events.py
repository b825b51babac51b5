"""``/_gateway/events``: publishing events as messages, idempotent on the caller's id, reading them back."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from app.extensions import db
from app.models import WebhookMessage
from app.webhooks import messages as webhook_messages
from tests.unit.api.support import auth, problem

EVENTS = "/_gateway/events"
SECRET_KEYS = "frontdoor-test-webhook-secret-key-0123456"  # a passphrase of 40 characters


@pytest.fixture
def events_app(make_app):
    """``events_app(**config)``: an app with webhook settings and its tables made."""

    def build(**config):
        app = make_app(**{"WEBHOOK_SECRET_KEYS": SECRET_KEYS, **config})
        with app.app_context():
            db.create_all()
        return app

    return build


@pytest.fixture
def app(events_app):
    return events_app()


@pytest.fixture(autouse=True)
def fanned_out(monkeypatch) -> list[list[str]]:
    """The message ids of each fan-out the API asked for (instead of a Celery message)."""
    calls: list[list[str]] = []
    monkeypatch.setattr(webhook_messages, "fan_out_later", lambda ids: calls.append(list(ids)))
    return calls


def messages(app, consumer: str | None = None) -> list[tuple[str, str, str | None]]:
    """``(consumer name, type, event id)`` of every message row, oldest first."""
    from app.models import Consumer

    with app.app_context():
        query = (
            select(Consumer.name, WebhookMessage.type, WebhookMessage.event_id)
            .join(Consumer, Consumer.id == WebhookMessage.consumer_id)
            .order_by(WebhookMessage.created_at)
        )
        return [tuple(row) for row in db.session.execute(query).all()]


def message_count(app) -> int:
    with app.app_context():
        return db.session.execute(select(func.count()).select_from(WebhookMessage)).scalar_one()


# --- publishing ---------------------------------------------------------------------------


def test_an_event_is_accepted_as_a_message_and_fanned_out_once(app, client, alice, fanned_out):
    response = client.post(EVENTS, json={"type": "order.created", "data": {"order": 7, "items": ["a", "b"]}}, headers=alice)

    assert response.status_code == 202
    body = response.json
    assert body["id"].startswith("msg_")
    assert response.headers["Location"] == f"http://localhost{EVENTS}/{body['id']}"
    assert "Idempotent-Replayed" not in response.headers
    assert (body["type"], body["event_id"]) == ("order.created", None)
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert body["created_at"] is not None
    assert fanned_out == [[body["id"]]]
    assert messages(app) == [("alice", "order.created", None)]

    read = client.get(response.headers["Location"], headers=alice)

    assert read.status_code == 200
    assert read.json == {**body, "data": {"order": 7, "items": ["a", "b"]}}


def test_data_defaults_to_an_empty_object_and_may_be_any_json(client, alice):
    bare = client.post(EVENTS, json={"type": "ping"}, headers=alice)
    listed = client.post(EVENTS, json={"type": "ping", "data": [1, "two", None]}, headers=alice)

    assert (bare.status_code, listed.status_code) == (202, 202)
    assert client.get(bare.headers["Location"], headers=alice).json["data"] == {}
    assert client.get(listed.headers["Location"], headers=alice).json["data"] == [1, "two", None]


def test_events_without_an_id_are_separate_messages(app, client, alice, fanned_out):
    first = client.post(EVENTS, json={"type": "order.created", "data": {"n": 1}}, headers=alice)
    second = client.post(EVENTS, json={"type": "order.created", "data": {"n": 1}}, headers=alice)

    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json["id"] != second.json["id"]
    assert fanned_out == [[first.json["id"]], [second.json["id"]]]
    assert message_count(app) == 2


# --- idempotency on the caller's id -------------------------------------------------------


def test_the_same_id_and_event_again_answers_the_earlier_message(app, client, alice, fanned_out):
    event = {"type": "order.created", "id": "order-7-created", "data": {"order": 7, "total": 12.5}}
    first = client.post(EVENTS, json=event, headers=alice)

    again = client.post(EVENTS, json={**event, "data": {"total": 12.5, "order": 7}}, headers=alice)  # keys reordered

    assert first.status_code == 202
    assert first.json["event_id"] == "order-7-created"
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    assert again.json == first.json
    assert fanned_out == [[first.json["id"]]]
    assert messages(app) == [("alice", "order.created", "order-7-created")]


@pytest.mark.parametrize(
    "change",
    [{"data": {"order": 8}}, {"type": "order.paid"}, {"data": {}}],
    ids=["other data", "other type", "no data"],
)
def test_the_same_id_for_another_event_is_a_409(app, client, alice, fanned_out, change):
    event = {"type": "order.created", "id": "evt-1", "data": {"order": 7}}
    first = client.post(EVENTS, json=event, headers=alice)

    response = client.post(EVENTS, json={**event, **change}, headers=alice)

    body = problem(response, 409)
    assert body["type"].endswith("/event-id-reused")
    assert "'evt-1'" in body["detail"] and first.json["id"] in body["detail"]
    assert fanned_out == [[first.json["id"]]]
    assert message_count(app) == 1
    assert client.get(first.headers["Location"], headers=alice).json["data"] == {"order": 7}


def test_an_id_is_scoped_to_its_consumer(app, client, alice, bob, fanned_out):
    mine = client.post(EVENTS, json={"type": "order.created", "id": "evt-1", "data": {"who": "alice"}}, headers=alice)
    theirs = client.post(EVENTS, json={"type": "order.created", "id": "evt-1", "data": {"who": "bob"}}, headers=bob)

    assert (mine.status_code, theirs.status_code) == (202, 202)
    assert mine.json["id"] != theirs.json["id"]
    assert sorted(messages(app)) == [("alice", "order.created", "evt-1"), ("bob", "order.created", "evt-1")]
    assert len(fanned_out) == 2


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", ["job.succeeded", "job.x", "webhook.test", "webhook.endpoint.disabled"])
def test_the_gateways_own_types_are_refused(app, client, alice, fanned_out, event_type):
    response = client.post(EVENTS, json={"type": event_type, "data": {}}, headers=alice)

    body = problem(response, 422, "type")
    assert "job." in body["detail"] and "webhook." in body["detail"]
    assert message_count(app) == 0
    assert fanned_out == []


@pytest.mark.parametrize("event_type", ["order created", "a..b", ".a", "a.", "job.*", "*", "", "ä.b", "a" * 256])
def test_a_type_that_is_not_an_event_type_name_is_refused(app, client, alice, event_type):
    response = client.post(EVENTS, json={"type": event_type, "data": {}}, headers=alice)

    problem(response, 422, "type")
    assert message_count(app) == 0


@pytest.mark.parametrize(
    ("payload", "field_name"),
    [
        ({"data": {}}, "type"),
        ({"type": 7}, "type"),
        ({"type": "a.b", "id": ""}, "id"),
        ({"type": "a.b", "id": "x" * 256}, "id"),
        ({"type": "a.b", "id": 12}, "id"),
        ({"type": "a.b", "colour": "red"}, "colour"),
        ({"type": "a.b", "consumer": 3}, "consumer"),
    ],
)
def test_invalid_fields_are_422s_naming_the_field(app, client, alice, fanned_out, payload, field_name):
    response = client.post(EVENTS, json=payload, headers=alice)

    problem(response, 422, field_name)
    assert message_count(app) == 0
    assert fanned_out == []


def test_a_body_that_is_not_json_is_a_400(app, client, alice):
    response = client.post(EVENTS, data=b'{"type": "a.b", ', content_type="application/json", headers=alice)

    assert problem(response, 400)["detail"] == "The request body is not valid JSON: EOF while parsing a value at line 1 column 16"
    assert message_count(app) == 0


def test_a_body_that_is_not_an_object_is_a_422(app, client, alice):
    response = client.post(EVENTS, json=[{"type": "a.b"}], headers=alice)

    assert problem(response, 422)["detail"] == "The request body must be a JSON object"


def test_data_up_to_max_payload_is_accepted_and_beyond_it_refused(events_app):
    app = events_app(WEBHOOK_MAX_PAYLOAD=100)
    client = app.test_client()
    from tests.factories import Identity

    headers = auth(Identity(app).key())
    at_limit = {"text": "x" * (100 - len(json.dumps({"text": ""}, separators=(",", ":"))))}
    over = {"text": at_limit["text"] + "x"}

    accepted = client.post(EVENTS, json={"type": "a.b", "data": at_limit}, headers=headers)
    refused = client.post(EVENTS, json={"type": "a.b", "data": over}, headers=headers)

    assert accepted.status_code == 202
    body = problem(refused, 422, "data")
    assert "101 bytes" in body["detail"] and "100 bytes" in body["detail"] and "WEBHOOK_MAX_PAYLOAD" in body["detail"]
    assert message_count(app) == 1


def test_the_payload_limit_counts_the_bytes_a_delivery_sends(events_app):
    app = events_app(WEBHOOK_MAX_PAYLOAD=100)
    client = app.test_client()
    from tests.factories import Identity

    headers = auth(Identity(app).key())
    data = {"text": "é" * 40}  # 91 bytes as UTF-8 JSON; 251 with \u escapes
    assert len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()) == 91

    response = client.post(EVENTS, json={"type": "a.b", "data": data}, headers=headers)

    assert response.status_code == 202, response.json


# --- publishing for another consumer ------------------------------------------------------


@pytest.mark.parametrize("reference", ["id", "name"])
def test_an_admin_may_publish_for_another_consumer(app, client, identity, admin, bob, fanned_out, reference):
    bob_id = identity.consumer_row("bob").id
    target = bob_id if reference == "id" else "bob"

    response = client.post(EVENTS, json={"type": "order.created", "data": {"n": 1}, "consumer": target}, headers=admin)

    assert response.status_code == 202
    assert fanned_out == [[response.json["id"]]]
    assert messages(app) == [("bob", "order.created", None)]
    assert client.get(response.headers["Location"], headers=bob).json["data"] == {"n": 1}
    problem(client.get(response.headers["Location"], headers=admin), 404)  # the message is bob's, not the admin's


def test_a_consumer_may_name_itself(app, client, alice):
    response = client.post(EVENTS, json={"type": "order.created", "consumer": "alice"}, headers=alice)

    assert response.status_code == 202
    assert messages(app) == [("alice", "order.created", None)]


def test_a_consumer_without_admin_cannot_publish_for_another(app, client, alice, bob, fanned_out):
    response = client.post(EVENTS, json={"type": "order.created", "consumer": "bob"}, headers=alice)

    body = problem(response, 403)
    assert body["detail"] == "Only a caller with the admin scope may publish events for another consumer"
    assert message_count(app) == 0
    assert fanned_out == []


def test_publishing_for_an_unknown_consumer_is_a_422(app, client, admin, fanned_out):
    response = client.post(EVENTS, json={"type": "order.created", "consumer": "nobody"}, headers=admin)

    body = problem(response, 422, "consumer")
    assert "'nobody'" in body["detail"]
    assert message_count(app) == 0
    assert fanned_out == []


# --- reading ------------------------------------------------------------------------------


def test_another_consumers_message_answers_like_a_missing_one(client, alice, bob):
    mine = client.post(EVENTS, json={"type": "order.created", "data": {"secret": "alice's"}}, headers=alice).json["id"]

    theirs = client.get(f"{EVENTS}/{mine}", headers=bob)
    missing = client.get(f"{EVENTS}/msg_doesnotexist", headers=bob)

    assert problem(theirs, 404)["detail"] == f"No event {mine!r}"
    assert problem(missing, 404)["detail"] == "No event 'msg_doesnotexist'"
    assert "alice's" not in theirs.get_data(as_text=True)
    assert client.get(f"{EVENTS}/{mine}", headers=alice).status_code == 200


@pytest.mark.parametrize(("method", "path"), [("post", EVENTS), ("get", f"{EVENTS}/msg_x")])
def test_without_a_credential_it_is_a_401(app, client, identity, fanned_out, method, path):
    response = getattr(client, method)(path, json={"type": "order.created"})

    problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="frontdoor"')
    assert message_count(app) == 0
    assert fanned_out == []
