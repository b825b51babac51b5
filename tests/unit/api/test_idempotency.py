"""``Idempotency-Key`` on every POST of the gateway's API that creates something: a repeat
creates nothing and gets the first answer again; another request with the key is a 422."""
from __future__ import annotations

import pytest

from app.extensions import db
from app.webhooks import messages as webhook_messages
from tests.unit.api.support import auth, problem

SECRET_KEYS = "frontdoor-test-webhook-secret-key-0123456"  # a passphrase of 40 characters


@pytest.fixture
def app(make_app, monkeypatch):
    monkeypatch.setattr(webhook_messages, "fan_out_later", lambda ids: None)
    app = make_app(WEBHOOK_SECRET_KEYS=SECRET_KEYS, WEBHOOK_ALLOW_HTTP=True, WEBHOOK_ALLOWED_NETWORKS=["127.0.0.0/8"])
    with app.app_context():
        db.create_all()
    return app


# (path, a body, another body): each POST that creates something.
CREATES = [
    ("/_gateway/consumers", {"name": "acme"}, {"name": "other"}),
    ("/_gateway/keys", {"scopes": []}, {"scopes": [], "expires_in": 60}),
    ("/_gateway/webhooks/endpoints", {"url": "http://127.0.0.1:9/hook"}, {"url": "http://127.0.0.1:9/other"}),
    ("/_gateway/events", {"type": "order.created", "data": {"n": 1}}, {"type": "order.created", "data": {"n": 2}}),
]


def credential_scope(client, headers: dict[str, str]) -> str:
    """Whose idempotency keys a request with ``headers`` uses: its consumer and API key."""
    mine = [row for row in client.get("/_gateway/keys", headers=headers).json["data"] if headers["X-API-Key"].startswith(row["prefix"])]
    return f"{mine[0]['consumer']}/{mine[0]['id']}"


# Answers that show a secret once, and its field: kept without their body.
SECRET_SHOWN_ONCE = {"/_gateway/keys": "key", "/_gateway/webhooks/endpoints": "secret"}


@pytest.mark.parametrize(("path", "first", "other"), CREATES, ids=[path.rsplit("/", 1)[1] for path, _, _ in CREATES])
def test_a_repeat_with_the_same_key_creates_nothing_and_gets_the_first_answer(client, admin, path, first, other):
    headers = {**admin, "Idempotency-Key": "create-1"}
    made = client.post(path, json=first, headers=headers)
    assert made.status_code in (201, 202), made.json
    again = client.post(path, json=first, headers=headers)
    assert again.headers["Location"] == made.headers["Location"]  # the same resource
    if path in SECRET_SHOWN_ONCE:
        # The first answer showed a secret; it was not kept, and is not shown again.
        assert problem(again, 409)["type"].endswith("/conflict")
        assert made.json[SECRET_SHOWN_ONCE[path]] not in again.get_data(as_text=True)
    else:
        assert again.status_code == made.status_code
        assert again.json == made.json
        assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in made.headers
    if path != "/_gateway/events":  # (events are read one by one)
        listed = [row["id"] for row in client.get(path, headers=admin).json["data"]]
        assert listed.count(made.json["id"]) == 1
    # Another request with the key: refused, nothing created.
    reused = problem(client.post(path, json=other, headers=headers), 422)
    assert reused["type"].endswith("/idempotency-key-reused")
    # Another key: another resource.
    fresh = client.post(path, json=other, headers={**admin, "Idempotency-Key": "create-2"})
    assert fresh.status_code == made.status_code and fresh.json["id"] != made.json["id"]


def test_keys_are_the_credentials_own(client, identity):
    alice = identity.consumer("alice")
    first_key, second_key = auth(identity.key(alice)), auth(identity.key(alice))
    bob = auth(identity.key(identity.consumer("bob")))
    made = [client.post("/_gateway/events", json={"type": "order.created"}, headers={**headers, "Idempotency-Key": "k"}) for headers in (first_key, second_key, bob)]
    assert [answer.status_code for answer in made] == [202, 202, 202]
    assert len({answer.json["id"] for answer in made}) == 3  # another credential, even of the same consumer, replays nothing
    assert not any("Idempotent-Replayed" in answer.headers for answer in made)


def test_a_refused_request_is_not_kept_so_the_fixed_one_goes_through_with_the_same_key(client, admin):
    headers = {**admin, "Idempotency-Key": "fix-me"}
    problem(client.post("/_gateway/consumers", json={"name": ""}, headers=headers), 422)
    fixed = client.post("/_gateway/consumers", json={"name": "fixed"}, headers=headers)
    assert fixed.status_code == 201 and "Idempotent-Replayed" not in fixed.headers


def test_a_repeat_while_the_first_is_unanswered_is_a_409(app, client, admin):
    from app.api.idempotency import fingerprint
    from app.models import IdempotentRequest

    body = {"name": "slow"}
    with app.test_request_context("/_gateway/consumers", method="POST", json=body):
        digest = fingerprint()
    scope = credential_scope(client, admin)
    with app.app_context():
        db.session.add(IdempotentRequest(scope=scope, key="in-flight", fingerprint=digest, status=None))
        db.session.commit()
    answer = client.post("/_gateway/consumers", json=body, headers={**admin, "Idempotency-Key": "in-flight"})
    assert problem(answer, 409)["type"].endswith("/idempotency-key-in-flight")
    assert answer.headers["Retry-After"] == "1"


def test_a_key_that_is_not_visible_ascii_is_a_400(client, admin):
    answer = client.post("/_gateway/consumers", json={"name": "x"}, headers={**admin, "Idempotency-Key": "a b"})
    assert problem(answer, 400)["type"].endswith("/bad-idempotency-key")


def test_a_key_older_than_a_day_is_forgotten(app, client, admin):
    from datetime import timedelta

    from sqlalchemy import func, select, update

    from app.models import IdempotentRequest
    from app.models.base import utcnow

    headers = {**admin, "Idempotency-Key": "old"}
    first = client.post("/_gateway/consumers", json={"name": "first"}, headers=headers)
    with app.app_context():
        db.session.execute(update(IdempotentRequest).values(created_at=utcnow() - timedelta(hours=25)))
        db.session.commit()
    client.post("/_gateway/consumers", json={"name": "other"}, headers={**admin, "Idempotency-Key": "new"})
    with app.app_context():  # the old key went when the new one came
        assert db.session.execute(select(func.count()).select_from(IdempotentRequest)).scalar_one() == 1
    again = client.post("/_gateway/consumers", json={"name": "first"}, headers=headers)
    assert again.status_code == 409 and first.status_code == 201  # not replayed: created anew, and the name is taken


def test_a_claim_left_by_a_process_that_died_lapses(app, client, admin):
    from datetime import timedelta

    from app.api.idempotency import CLAIM_LEASE, fingerprint
    from app.models import IdempotentRequest
    from app.models.base import utcnow

    body = {"name": "after-crash"}
    with app.test_request_context("/_gateway/consumers", method="POST", json=body):
        digest = fingerprint()
    with app.app_context():
        db.session.add(IdempotentRequest(scope=credential_scope(client, admin), key="orphan", fingerprint=digest, status=None,
                                         created_at=utcnow() - CLAIM_LEASE - timedelta(seconds=1)))
        db.session.commit()
    answer = client.post("/_gateway/consumers", json=body, headers={**admin, "Idempotency-Key": "orphan"})
    assert answer.status_code == 201
