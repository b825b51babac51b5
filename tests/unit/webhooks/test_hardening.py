"""Webhook behaviour under abuse and contention: test sends within the cap, one endpoint's
backlog beside another's retries, answers Postgres cannot store, long silences, long histories."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from app.extensions import db
from app.models import WebhookDelivery, WebhookEndpoint
from app.models.base import utcnow
from app.webhooks import attempts
from tests.unit.webhooks.conftest import BOTH, Reply


def _sending(hooks, delivery_id: str) -> None:
    """Make ``delivery_id`` look claimed by a live worker."""

    def mark():
        db.session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(status="sending", attempts=1, tries=1, lease_expires_at=hooks_now(hooks) + timedelta(seconds=60))
        )
        db.session.commit()

    hooks.call(mark)


def hooks_now(hooks):
    """The app's time now (the ``clock`` fixture moves it)."""
    return hooks.call(utcnow)


@BOTH
def test_a_test_send_takes_a_slot_and_is_refused_when_none_is_free(make_hooks, receiver):
    hooks = make_hooks(WEBHOOK_ENDPOINT_CONCURRENCY=1)
    consumer = hooks.consumer()
    key = hooks.identity.key(consumer)
    endpoint = hooks.endpoint(consumer, receiver.url)
    [busy] = hooks.publish(consumer)
    _sending(hooks, busy)
    client = hooks.app.test_client()

    refused = client.post(f"/_gateway/webhooks/endpoints/{endpoint}/test", headers={"X-API-Key": key})

    assert refused.status_code == 409
    assert refused.mimetype == "application/problem+json"
    assert int(refused.headers["Retry-After"]) >= 1
    assert receiver.received == []
    hooks.call(lambda: (db.session.execute(update(WebhookDelivery).values(status="succeeded", lease_expires_at=None)), db.session.commit()))
    assert client.post(f"/_gateway/webhooks/endpoints/{endpoint}/test", headers={"X-API-Key": key}).json["status_code"] == 200


@BOTH
def test_an_answer_with_a_nul_byte_is_recorded_not_taken_for_a_lost_worker(hooks, receiver):
    receiver.reply(Reply(200, body=b"ok\x00fine"))
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    [delivery_id] = hooks.publish(consumer)

    assert hooks.deliver(delivery_id) == "succeeded"

    [attempt] = hooks.attempts(delivery_id)
    assert attempt.status_code == 200 and attempt.response_excerpt == "ok\ufffdfine"
    assert hooks.delivery(delivery_id).status == "succeeded"


@BOTH
def test_one_endpoints_backlog_does_not_hold_back_another_endpoints_retries(make_hooks, receiver, make_receiver):
    hooks = make_hooks(WEBHOOK_ENDPOINT_CONCURRENCY=1)
    busy_consumer, other_consumer = hooks.consumer(), hooks.consumer()
    hooks.endpoint(busy_consumer, receiver.url)
    hooks.endpoint(other_consumer, make_receiver().url)
    backlog = [hooks.publish(busy_consumer)[0] for _ in range(12)]
    [other] = hooks.publish(other_consumer)
    # Everything due, the backlog's the oldest.
    for position, delivery_id in enumerate([*backlog, other]):
        hooks.call(
            lambda d=delivery_id, p=position: (
                db.session.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.id == d)
                    .values(next_attempt_at=hooks_now(hooks) - timedelta(seconds=100 - p))
                ),
                db.session.commit(),
            )
        )

    claimed = {work.delivery_id for work in hooks.call(attempts.claim, 5)}

    assert claimed == {backlog[0], other}  # one slot each, the oldest of each endpoint


def test_a_failure_after_a_long_silence_starts_a_new_run_rather_than_disabling(hooks, receiver, clock):
    consumer = hooks.consumer()
    endpoint = hooks.endpoint(consumer, receiver.url)
    receiver.reply(503)
    [first] = hooks.publish(consumer)
    hooks.deliver(first)
    started = hooks.endpoint_row(endpoint).failing_since
    assert started is not None
    clock.advance(6 * 24 * 3600)  # nothing sent for six days: no failures either

    receiver.reply(503)
    [second] = hooks.publish(consumer)
    hooks.deliver(second)

    row = hooks.endpoint_row(endpoint)
    assert not row.disabled
    assert row.failing_since > started + timedelta(days=5)  # a new run, from this failure


def test_a_delivery_lists_its_latest_twenty_attempts(hooks, receiver):
    consumer = hooks.consumer()
    key = hooks.identity.key(consumer)
    endpoint = hooks.endpoint(consumer, receiver.url)
    [delivery_id] = hooks.publish(consumer)
    client = hooks.app.test_client()
    for _ in range(23):
        hooks.deliver(delivery_id)
        assert client.post(f"/_gateway/webhooks/deliveries/{delivery_id}/redeliver", headers={"X-API-Key": key}).status_code == 202
    hooks.deliver(delivery_id)

    listed = client.get(f"/_gateway/webhooks/endpoints/{endpoint}/deliveries", headers={"X-API-Key": key}).json["data"][0]

    assert listed["attempt_count"] == 24
    assert [attempt["number"] for attempt in listed["attempts"]] == list(range(5, 25))


def test_an_event_whose_data_utf8_cannot_carry_is_a_400_naming_the_lone_surrogate(hooks):
    # RFC 8259 section 8.2 / RFC 7493: a lone surrogate is not Unicode, so not the I-JSON the API takes.
    key = hooks.identity.key(hooks.consumer())
    response = hooks.app.test_client().post(
        "/_gateway/events", data=b'{"type": "order.created", "data": {"x": "\\ud800"}}', headers={"X-API-Key": key, "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    assert "lone surrogate \\ud800" in response.json["detail"]


@pytest.mark.parametrize("host", ["bücher.example", "例え.jp"])
def test_an_internationalised_host_is_checked_and_sent_in_its_ascii_form(host):
    from app.webhooks.guard import Guard
    from app.webhooks.sender import host_field

    asked = []
    target = Guard(resolver=lambda name, port: asked.append(name) or ["93.184.215.14"]).check(f"https://{host}/hook")

    assert asked == [host.encode("idna").decode()] and asked[0].isascii()
    assert host_field(target) == asked[0]


def test_deleting_an_endpoint_takes_its_row_before_its_deliveries(hooks, receiver):
    consumer = hooks.consumer()
    key = hooks.identity.key(consumer)
    endpoint = hooks.endpoint(consumer, receiver.url)
    hooks.publish(consumer)
    statements = []
    from sqlalchemy import event

    engine = hooks.call(lambda: db.engine)
    listener = lambda conn, cursor, statement, *args: statements.append(statement.split()[0:3])
    event.listen(engine, "before_cursor_execute", listener)
    try:
        assert hooks.app.test_client().delete(f"/_gateway/webhooks/endpoints/{endpoint}", headers={"X-API-Key": key}).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    writes = [words for words in statements if words[0] in ("UPDATE", "DELETE") and "api_keys" not in words]  # last used
    assert writes[0][:2] == ["UPDATE", "webhook_endpoints"]
    assert hooks.call(lambda: db.session.get(WebhookEndpoint, endpoint)) is None
