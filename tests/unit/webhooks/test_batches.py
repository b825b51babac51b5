"""Batches: one claim sends many deliveries at once, each outcome recorded, connections kept alive, caps kept."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import text

from app.extensions import db
from app.webhooks import attempts
from app.webhooks.messages import ENDPOINT_DISABLED
from app.webhooks.sender import POOLS
from tests.unit.webhooks.conftest import BOTH, SCHEDULE, Reply


@BOTH
def test_one_batch_records_each_outcome_of_a_mixed_set_of_receivers(make_hooks, make_receiver, clock, enqueued):
    hooks = make_hooks(WEBHOOK_TIMEOUT=0.5)
    consumer = hooks.consumer()
    replies = {
        "ok": Reply(200),
        "error": Reply(500, body=b"boom"),
        "gone": Reply(410),
        "busy": Reply(429, headers={"Retry-After": "120"}),
        "hung": Reply(200, delay=3.0),  # past WEBHOOK_TIMEOUT
    }
    receivers = {name: make_receiver() for name in replies}
    endpoints = {name: hooks.endpoint(consumer, receivers[name].url) for name in replies}
    for name, reply in replies.items():
        receivers[name].reply(reply)
    deliveries = hooks.publish(consumer)  # one message, one delivery per endpoint
    by_endpoint = {row.endpoint_id: row.id for row in hooks.deliveries()}
    assert len(deliveries) == 5

    started = time.monotonic()
    statuses = hooks.batch()
    took = time.monotonic() - started

    # Sent at once: the hung receiver cost its timeout once, not on top of the others.
    assert took < 2.5, took
    delivery = {name: by_endpoint[endpoints[name]] for name in replies}
    assert statuses == {
        delivery["ok"]: "succeeded",
        delivery["error"]: "pending",
        delivery["gone"]: "failed",
        delivery["busy"]: "pending",
        delivery["hung"]: "pending",
    }
    attempt = {name: hooks.attempts(delivery[name])[0] for name in replies}
    assert {name: (row.status_code, row.succeeded) for name, row in attempt.items()} == {
        "ok": (200, True), "error": (500, False), "gone": (410, False), "busy": (429, False), "hung": (None, False),
    }
    assert attempt["error"].response_excerpt == "boom"
    assert "timeout" in attempt["hung"].error and attempt["hung"].duration_ms >= 500
    assert len({row.created_at for row in attempt.values()}) == 1  # recorded together, in one transaction
    rows = {name: hooks.delivery(delivery[name]) for name in replies}
    assert rows["error"].next_attempt_at == attempt["error"].created_at + timedelta(seconds=SCHEDULE[0])
    assert rows["busy"].next_attempt_at == attempt["busy"].created_at + timedelta(seconds=120)  # Retry-After, not the schedule
    assert rows["hung"].next_attempt_at == attempt["hung"].created_at + timedelta(seconds=SCHEDULE[0])
    assert all(row.lease_expires_at is None for row in rows.values())
    assert hooks.endpoint_row(endpoints["gone"]).disabled is True
    assert [hooks.endpoint_row(endpoints[name]).disabled for name in ("ok", "error", "busy", "hung")] == [False] * 4
    assert hooks.endpoint_row(endpoints["ok"]).failing_since is None
    assert hooks.endpoint_row(endpoints["error"]).failing_since == attempt["error"].created_at
    assert len(hooks.messages(ENDPOINT_DISABLED)) == 1
    assert [len(receivers[name].received) for name in replies] == [1] * 5


@pytest.fixture
def keep_alive_receiver(make_receiver):
    """A receiver that keeps connections open and takes 20 ms per answer."""
    yield make_receiver(keep_alive=True, default=Reply(delay=0.02))
    POOLS.clear()  # its pooled connections, to a port that is gone


@BOTH
def test_a_workers_batches_reuse_kept_alive_connections_and_keep_the_endpoints_cap(make_hooks, keep_alive_receiver, enqueued):
    hooks = make_hooks(WEBHOOK_ENDPOINT_CONCURRENCY=4, WEBHOOK_BATCH_SIZE=20)
    consumer = hooks.consumer()
    hooks.endpoint(consumer, keep_alive_receiver.url)
    deliveries = [hooks.publish(consumer)[0] for _ in range(24)]

    # Two workers at once, each claiming and sending batches until nothing is due.
    counts: list[dict] = []
    workers = [threading.Thread(target=lambda: counts.append(hooks.call(attempts.deliver, None, 30.0))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)

    assert sum(found.get("succeeded", 0) for found in counts) == 24
    assert {hooks.delivery(delivery_id).status for delivery_id in deliveries} == {"succeeded"}
    peers = [request.peer for request in keep_alive_receiver.received]
    assert len(peers) == 24
    assert keep_alive_receiver.most_in_flight <= 4  # the endpoint's cap, across both workers
    # Connections were kept alive and reused: at most one per slot, not one per delivery.
    assert len(set(peers)) <= 4, sorted(set(peers))


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgres"], indirect=True)
def test_a_worker_that_finds_its_freed_endpoint_held_by_another_claim_hands_its_due_deliveries_on(make_hooks, receiver, enqueued, monkeypatch):
    hooks = make_hooks(WEBHOOK_ENDPOINT_CONCURRENCY=4)
    consumer = hooks.consumer()
    endpoint = hooks.endpoint(consumer, receiver.url)
    first, second = hooks.publish(consumer)[0], hooks.publish(consumer)[0]
    recorded = attempts.record
    holder: list = []

    def record_then_another_claim_holds_the_endpoint(works, sent, now=None):
        statuses = recorded(works, sent, now)
        # Another worker's claim takes the endpoint's row now (it counted the slot as taken).
        connection = db.engine.connect()
        connection.execute(text("SELECT id FROM webhook_endpoints WHERE id = :id FOR UPDATE"), {"id": endpoint})
        holder.append(connection)
        return statuses

    monkeypatch.setattr(attempts, "record", record_then_another_claim_holds_the_endpoint)
    with hooks.app.app_context():
        try:
            counts = attempts.deliver([first])
        finally:
            for connection in holder:
                connection.rollback()
                connection.close()

    assert counts == {"succeeded": 1}
    assert hooks.delivery(second).status == "pending"
    assert enqueued.wakes == 1  # not left for beat's next pass
    monkeypatch.setattr(attempts, "record", recorded)
    assert hooks.deliver(second) == "succeeded"


def test_a_claim_that_takes_an_endpoints_share_asks_another_worker_to_help_once(make_hooks, receiver, enqueued):
    hooks = make_hooks(WEBHOOK_ENDPOINT_CONCURRENCY=4)  # two per claim
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    deliveries = [hooks.publish(consumer)[0] for _ in range(6)]

    counts = hooks.call(attempts.deliver, None, 30.0)

    assert counts == {"succeeded": 6}  # three batches of two
    assert enqueued.wakes == 1  # after the first: another worker's batch can overlap; not again
    assert {hooks.delivery(delivery_id).status for delivery_id in deliveries} == {"succeeded"}


@BOTH
def test_a_task_for_new_deliveries_claims_again_only_while_their_endpoints_have_more_due(make_hooks, make_receiver, enqueued):
    """A deliver task named for a fan-out's deliveries sends them; it claims again only when
    the endpoints it sent to have more due (their slots are free again), and then takes
    whatever is due. Work due only elsewhere came with a message of its own (or waits for
    beat's next pass): the task ends without claiming for it, and hands nothing on."""
    hooks = make_hooks()
    consumer, other = hooks.consumer(), hooks.consumer()
    hooks.endpoint(consumer, make_receiver().url)
    hooks.endpoint(other, make_receiver().url)
    elsewhere = hooks.publish(other)[0]  # due, and no task has taken it
    new = hooks.publish(consumer)[0]

    # A drain long enough never to end a call here: what is asserted is the claims, not the clock
    # (under load a call took longer than the default drain, which then hands on with a wake).
    assert hooks.call(attempts.deliver, [new], 30.0) == {"succeeded": 1}
    assert (hooks.delivery(new).status, hooks.delivery(elsewhere).status) == ("succeeded", "pending")

    waiting = hooks.publish(consumer)[0]
    newer = hooks.publish(consumer)[0]
    assert hooks.call(attempts.deliver, [newer], 30.0) == {"succeeded": 3}
    assert {hooks.delivery(delivery_id).status for delivery_id in (newer, waiting, elsewhere)} == {"succeeded"}
    assert enqueued.wakes == 0


@BOTH
def test_a_batch_resolves_and_checks_each_url_once_and_sends_every_attempt_to_that_address(make_hooks, make_receiver, enqueued):
    hooks = make_hooks(WEBHOOK_ENDPOINT_CONCURRENCY=8)
    consumer = hooks.consumer()
    first, second = make_receiver(), make_receiver()
    hooks.endpoint(consumer, first.url)
    hooks.endpoint(consumer, second.url)
    for _ in range(3):
        hooks.publish(consumer)  # one delivery to each endpoint per message
    guard = hooks.app.extensions["webhooks"].guard
    resolved: list[str] = []
    real = guard.resolver

    def resolver(host: str, port: int) -> list[str]:
        resolved.append(f"{host}:{port}")
        return real(host, port)

    guard.resolver = resolver
    try:
        statuses = hooks.batch()
    finally:
        guard.resolver = real

    assert sorted(statuses.values()) == ["succeeded"] * 6
    assert sorted(resolved) == sorted(f"127.0.0.1:{receiver.server.server_address[1]}" for receiver in (first, second))
    assert len(first.received) == len(second.received) == 3


@BOTH
def test_a_url_the_guard_refuses_fails_every_attempt_of_the_batch_to_it_and_sends_none(make_hooks, make_receiver, enqueued):
    hooks = make_hooks(WEBHOOK_ENDPOINT_CONCURRENCY=8)
    consumer = hooks.consumer()
    receiver = make_receiver()
    hooks.endpoint(consumer, receiver.url)
    deliveries = [hooks.publish(consumer)[0] for _ in range(3)]
    guard = hooks.app.extensions["webhooks"].guard
    real = guard.resolver
    guard.resolver = lambda host, port: ["169.254.169.254"]  # rebound to the metadata address
    try:
        statuses = hooks.batch()
    finally:
        guard.resolver = real

    assert set(statuses) == set(deliveries)
    assert receiver.received == []
    assert {attempt.error.split(":")[0] for delivery_id in deliveries for attempt in hooks.attempts(delivery_id)} == {"refused"}
