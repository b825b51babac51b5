"""Delivery: batches (claim, attempt, record), the retry schedule, leases, dispatch, sweep, redeliver and test sends."""
from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from prometheus_client import REGISTRY
from sqlalchemy import text
from standardwebhooks import Webhook

from app.extensions import db
from app.models import WebhookDelivery, WebhookEndpoint
from app.webhooks import attempts, deliveries
from app.webhooks.messages import ENDPOINT_DISABLED, TEST_EVENT
from app.webhooks.sender import Result
from tests.services import wait_until
from tests.unit.webhooks.conftest import BOTH, SCHEDULE, Reply


def retry(hooks, clock, enqueued, delivery_id: str) -> str | None:
    """Move time to just before the delivery is due (no worker claims it, and beat wakes none),
    then just past (beat wakes a worker, which claims it), and make the attempt; return its outcome."""
    wait = (hooks.delivery(delivery_id).next_attempt_at - clock()).total_seconds()
    # 3 s early: the clock is real time plus an offset, and on a loaded machine (a CI worker
    # beside the integration tests) more than half a second passed between here and dispatch.
    clock.advance(wait - 3)
    assert hooks.dispatch()["due"] == 0
    assert hooks.deliver(delivery_id) is None
    clock.advance(3.1)
    enqueued.clear()
    assert hooks.dispatch()["due"] == 1
    assert enqueued.wakes == 1
    return hooks.deliver(delivery_id)


def verified(hooks, endpoint_id: str, request) -> dict:
    """The body of a request the receiver got, verified as Standard Webhooks with the endpoint's secret."""
    return Webhook(hooks.secret(endpoint_id)).verify(request.body, request.headers)


# -- the retry schedule -------------------------------------------------------------------------


@BOTH
def test_a_receiver_that_fails_then_recovers_gets_the_same_signed_message_until_it_succeeds(hooks, receiver, clock, enqueued):
    consumer = hooks.consumer()
    endpoint = hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer, "order.created", {"order": 42})
    (message_id,) = {row.message_id for row in hooks.deliveries()}
    receiver.reply(500, 500, 200)

    assert hooks.deliver(delivery_id) == "failed"
    row = hooks.delivery(delivery_id)
    (first,) = hooks.attempts(delivery_id)
    assert (row.status, row.last_status_code) == ("pending", 500)
    assert row.next_attempt_at == first.created_at + timedelta(seconds=SCHEDULE[0])
    assert retry(hooks, clock, enqueued, delivery_id) == "failed"
    second = hooks.attempts(delivery_id)[1]
    assert hooks.delivery(delivery_id).next_attempt_at == second.created_at + timedelta(seconds=SCHEDULE[1])
    assert retry(hooks, clock, enqueued, delivery_id) == "succeeded"

    attempts = hooks.attempts(delivery_id)
    assert [(row.number, row.status_code, row.succeeded, row.trigger) for row in attempts] == [
        (1, 500, False, "scheduled"),
        (2, 500, False, "scheduled"),
        (3, 200, True, "scheduled"),
    ]
    assert all(row.url == receiver.url and row.address == "127.0.0.1" for row in attempts)
    row = hooks.delivery(delivery_id)
    assert (row.status, row.attempts, row.next_attempt_at, row.last_error) == ("succeeded", 3, None, None)
    assert row.finished_at == attempts[-1].created_at
    assert hooks.endpoint_row(endpoint).failing_since is None  # the success ended the failure record

    assert len(receiver.received) == 3
    assert {request.headers["webhook-id"] for request in receiver.received} == {message_id}
    for request in receiver.received:
        body = verified(hooks, endpoint, request)
        assert body["type"] == "order.created"
        assert body["data"] == {"order": 42}
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"].startswith("Frontdoor-Webhooks/")
    assert len({request.body for request in receiver.received}) == 1  # the same bytes every time
    assert hooks.dispatch()["due"] == 0


def test_after_the_last_scheduled_try_the_delivery_fails(hooks, receiver, clock, enqueued):
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    receiver.reply(*[500] * 10)

    assert hooks.deliver(delivery_id) == "failed"
    for number, delay in enumerate(SCHEDULE, start=1):
        last = hooks.attempts(delivery_id)[-1]
        assert last.number == number
        assert hooks.delivery(delivery_id).next_attempt_at == last.created_at + timedelta(seconds=delay)
        assert retry(hooks, clock, enqueued, delivery_id) == "failed"

    row = hooks.delivery(delivery_id)
    assert (row.status, row.attempts, row.tries, row.next_attempt_at) == ("failed", 4, 4, None)
    assert row.finished_at is not None
    clock.advance(10 * SCHEDULE[-1])
    assert hooks.dispatch()["due"] == 0
    assert hooks.deliver(delivery_id) is None
    assert len(hooks.attempts(delivery_id)) == len(receiver.received) == 1 + len(SCHEDULE)


@pytest.mark.parametrize(
    ("status", "retry_after", "wait"),
    [
        (503, "7", 7),
        (429, "7", 7),
        (429, "100000", 30),  # capped by WEBHOOK_MAX_RETRY_AFTER
        (500, "7", SCHEDULE[0]),  # only 429 and 503 are asked to wait
    ],
)
def test_retry_after_sets_when_the_next_attempt_is_due(make_hooks, receiver, clock, enqueued, status, retry_after, wait):
    hooks = make_hooks(WEBHOOK_MAX_RETRY_AFTER=30)
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    receiver.reply(Reply(status, {"Retry-After": retry_after}))

    assert hooks.deliver(delivery_id) == "failed"

    (attempt,) = hooks.attempts(delivery_id)
    assert attempt.status_code == status
    assert hooks.delivery(delivery_id).next_attempt_at == attempt.created_at + timedelta(seconds=wait)
    assert retry(hooks, clock, enqueued, delivery_id) == "succeeded"


# -- what an attempt records ----------------------------------------------------------------------


def test_a_redirect_is_a_failed_attempt_and_is_not_followed(hooks, make_receiver, receiver):
    elsewhere = make_receiver()
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    receiver.reply(Reply(307, {"Location": elsewhere.url}))

    assert hooks.deliver(delivery_id) == "failed"

    (attempt,) = hooks.attempts(delivery_id)
    assert (attempt.status_code, attempt.succeeded) == (307, False)
    assert hooks.delivery(delivery_id).status == "pending"
    assert len(receiver.received) == 1
    assert elsewhere.received == []


def test_the_response_excerpt_is_the_first_4096_bytes_and_the_duration_is_recorded(hooks, receiver):
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    receiver.reply(Reply(500, body=b"a" * 4000 + b"b" * 6000, delay=0.3))

    hooks.deliver(delivery_id)

    (attempt,) = hooks.attempts(delivery_id)
    assert attempt.response_excerpt == "a" * 4000 + "b" * 96
    assert 300 <= attempt.duration_ms < 2000
    assert deliveries.attempt_json(attempt)["response"] == attempt.response_excerpt


@pytest.mark.parametrize("body", ["€".encode() * 2000, b"\xff" * 5000], ids=["utf8-cut", "binary"])
def test_the_stored_excerpt_is_at_most_4096_bytes_whatever_the_body(hooks, receiver, body):
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    receiver.reply(Reply(500, body=body))

    hooks.deliver(delivery_id)

    (attempt,) = hooks.attempts(delivery_id)
    assert attempt.status_code == 500
    assert len(attempt.response_excerpt.encode()) <= 4096


def test_a_network_failure_stores_the_error_and_no_status_code(hooks, closed_url):
    consumer = hooks.consumer()
    hooks.endpoint(consumer, closed_url)
    (delivery_id,) = hooks.publish(consumer)

    assert hooks.deliver(delivery_id) == "failed"

    (attempt,) = hooks.attempts(delivery_id)
    assert attempt.status_code is None
    assert attempt.response_excerpt is None
    assert attempt.error.startswith("connection failed")
    row = hooks.delivery(delivery_id)
    assert (row.status, row.last_status_code, row.last_error) == ("pending", None, attempt.error)


def test_an_attempt_cut_by_the_soft_time_limit_is_recorded_as_failed_and_retried(hooks, receiver, monkeypatch):
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)

    def hung(work, signing, config, trace=(), check=None):  # stuck outside the HTTP exchange (a DNS lookup that never returns)
        raise SoftTimeLimitExceeded

    monkeypatch.setattr(attempts, "attempt", hung)
    assert hooks.deliver(delivery_id) == "failed"

    (attempt,) = hooks.attempts(delivery_id)
    assert (attempt.status_code, attempt.url) == (None, receiver.url)
    assert "took longer than" in attempt.error
    row = hooks.delivery(delivery_id)
    assert (row.status, row.lease_expires_at) == ("pending", None)
    assert row.next_attempt_at == attempt.created_at + timedelta(seconds=SCHEDULE[0])


def test_a_receiver_slower_than_the_timeout_is_a_failed_attempt(make_hooks, receiver):
    hooks = make_hooks(WEBHOOK_TIMEOUT=0.3)
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    receiver.reply(Reply(200, delay=1.0))

    assert hooks.deliver(delivery_id) == "failed"

    (attempt,) = hooks.attempts(delivery_id)
    assert (attempt.status_code, attempt.succeeded) == (None, False)
    assert "timeout" in attempt.error
    assert 300 <= attempt.duration_ms < 1000


# -- disabling endpoints ------------------------------------------------------------------------


@BOTH
def test_a_410_disables_the_endpoint_fails_its_deliveries_and_tells_the_consumer(hooks, make_receiver, enqueued):
    gone, watcher = make_receiver(), make_receiver()
    consumer = hooks.consumer()
    endpoint = hooks.endpoint(consumer, gone.url)
    watching = hooks.endpoint(consumer, watcher.url, [ENDPOINT_DISABLED])
    first, second = (hooks.publish(consumer)[0] for _ in range(2))
    gone.reply(410)

    assert hooks.deliver(first) == "failed"

    row = hooks.endpoint_row(endpoint)
    assert row.disabled is True
    assert "410" in row.disabled_reason
    assert row.disabled_at is not None
    assert (hooks.delivery(first).status, hooks.delivery(first).next_attempt_at) == ("failed", None)
    assert hooks.delivery(second).status == "failed"
    assert "410" in hooks.delivery(second).last_error
    assert hooks.deliver(second) is None
    assert len(gone.received) == 1

    (message,) = hooks.messages(ENDPOINT_DISABLED)
    assert message["consumer_id"] == consumer
    assert message["data"]["endpoint_id"] == endpoint
    assert message["data"]["url"] == gone.url
    assert "410" in message["data"]["reason"]
    assert enqueued.messages == [message["id"]]

    (notice,) = hooks.fan_out(message["id"])  # not to the disabled endpoint
    assert hooks.delivery(notice).endpoint_id == watching
    assert hooks.deliver(notice) == "succeeded"
    (request,) = watcher.received
    body = verified(hooks, watching, request)
    assert body["type"] == "webhook.endpoint.disabled"
    assert body["data"]["endpoint_id"] == endpoint
    assert hooks.publish(consumer) == []  # the disabled endpoint gets no new deliveries


def test_an_endpoint_failing_longer_than_disable_after_is_disabled(make_hooks, receiver, clock, enqueued):
    hooks = make_hooks(WEBHOOK_DISABLE_AFTER=25)
    consumer = hooks.consumer()
    endpoint = hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    receiver.reply(*[500] * 5)

    hooks.deliver(delivery_id)
    since = hooks.endpoint_row(endpoint).failing_since
    assert since == hooks.attempts(delivery_id)[0].created_at
    retry(hooks, clock, enqueued, delivery_id)  # failing for 10 s
    assert hooks.endpoint_row(endpoint).disabled is False
    assert hooks.endpoint_row(endpoint).failing_since == since
    retry(hooks, clock, enqueued, delivery_id)  # failing for 30 s

    row = hooks.endpoint_row(endpoint)
    assert row.disabled is True
    assert row.disabled_reason.startswith("every attempt failed since")
    assert hooks.delivery(delivery_id).status == "failed"  # no try of the schedule is left to it
    (message,) = hooks.messages(ENDPOINT_DISABLED)
    assert message["data"]["endpoint_id"] == endpoint
    assert enqueued.messages == [message["id"]]


def test_a_success_in_between_resets_the_failure_record(make_hooks, receiver, clock, enqueued):
    hooks = make_hooks(WEBHOOK_DISABLE_AFTER=25)
    consumer = hooks.consumer()
    endpoint = hooks.endpoint(consumer, receiver.url)
    (first,) = hooks.publish(consumer)
    receiver.reply(500, 200, 500, 500)

    hooks.deliver(first)  # fails at 0 s
    assert hooks.endpoint_row(endpoint).failing_since is not None
    assert retry(hooks, clock, enqueued, first) == "succeeded"  # at 10 s
    assert hooks.endpoint_row(endpoint).failing_since is None
    clock.advance(20)
    (second,) = hooks.publish(consumer)
    hooks.deliver(second)  # fails at 30 s: 30 s after the first failure, but not failing since then
    assert retry(hooks, clock, enqueued, second) == "failed"  # at 40 s

    row = hooks.endpoint_row(endpoint)
    assert row.disabled is False
    assert row.failing_since == hooks.attempts(second)[0].created_at
    assert hooks.messages(ENDPOINT_DISABLED) == []
    assert hooks.delivery(second).status == "pending"


# -- claims, leases and the concurrency cap -------------------------------------------------------


def test_a_duplicate_deliver_makes_no_second_attempt(hooks, receiver):
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)

    assert hooks.deliver(delivery_id) == "succeeded"
    assert hooks.deliver(delivery_id) is None

    assert len(hooks.attempts(delivery_id)) == 1
    assert len(receiver.received) == 1


@BOTH
def test_with_the_endpoint_at_its_cap_a_claim_leaves_the_delivery_pending(make_hooks, receiver, clock, enqueued):
    hooks = make_hooks(WEBHOOK_ENDPOINT_CONCURRENCY=1)
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (busy,) = hooks.publish(consumer)
    (waiting,) = hooks.publish(consumer)

    work = hooks.claim(busy)  # a worker is sending it, under a live lease
    assert work is not None
    assert hooks.delivery(busy).status == "sending"
    assert hooks.claim(waiting) is None

    row = hooks.delivery(waiting)
    assert (row.status, row.attempts) == ("pending", 0)
    clock.advance(30)  # the lease (60 s) is still live
    assert hooks.batch() == {}

    hooks.call(lambda: attempts.record([work], attempts.send_batch([work])))
    assert hooks.delivery(busy).status == "succeeded"
    assert hooks.deliver(waiting) == "succeeded"
    assert len(receiver.received) == 2


@BOTH
def test_a_claim_takes_no_more_per_endpoint_than_its_free_slots_nor_half_its_cap_oldest_first(make_hooks, make_receiver, clock, enqueued):
    hooks = make_hooks(WEBHOOK_ENDPOINT_CONCURRENCY=4)
    consumer, other = hooks.consumer(), hooks.consumer()
    crowded_receiver, idle_receiver = make_receiver(), make_receiver()
    crowded = hooks.endpoint(consumer, crowded_receiver.url)
    idle = hooks.endpoint(other, idle_receiver.url)
    crowded_deliveries = [hooks.publish(consumer)[0] for _ in range(6)]
    idle_deliveries = [hooks.publish(other)[0] for _ in range(5)]
    assert hooks.claim(crowded_deliveries[0]) is not None  # one slot of four taken

    first = hooks.call(attempts.claim, 50)  # two each: half the cap, so that another worker's batch overlaps
    second = hooks.call(attempts.claim, 50)  # what is left: one slot of the crowded endpoint, two of the idle one

    assert sorted(work.delivery_id for work in first) == sorted([*crowded_deliveries[1:3], *idle_deliveries[:2]])
    assert sorted(work.delivery_id for work in second) == sorted([crowded_deliveries[3], *idle_deliveries[2:4]])
    assert hooks.batch() == {}  # every slot taken
    works = first + second
    statuses = hooks.call(lambda: attempts.record(works, attempts.send_batch(works)))
    assert statuses == {work.delivery_id: "succeeded" for work in works}
    assert (len(crowded_receiver.received), len(idle_receiver.received)) == (3, 4)
    assert sorted(work.endpoint_id for work in works) == sorted([crowded] * 3 + [idle] * 4)


def test_dispatch_wakes_a_worker_per_batch_of_due_deliveries_and_no_more_than_eight(make_hooks, receiver, clock, enqueued):
    hooks = make_hooks(WEBHOOK_BATCH_SIZE=2)
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    for _ in range(5):
        hooks.publish(consumer)
    counts = hooks.dispatch()
    assert (counts["due"], counts["woken"], enqueued.wakes) == (5, 3, 3)
    for _ in range(20):
        hooks.publish(consumer)
    enqueued.clear()
    counts = hooks.dispatch()
    assert (counts["due"], counts["woken"], enqueued.wakes) == (16, 8, 8)  # the rest waits for the workers' loops
    assert enqueued.deliveries == []  # a wake names no delivery: the worker claims what is due


def test_the_worker_whose_attempt_ends_takes_the_delivery_that_waited_for_its_slot(make_hooks, receiver, enqueued):
    hooks = make_hooks(WEBHOOK_ENDPOINT_CONCURRENCY=1)
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (slow,) = hooks.publish(consumer)
    (waiting,) = hooks.publish(consumer)
    receiver.reply(Reply(200, delay=0.5))
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(hooks.call(attempts.deliver, [slow])))
    worker.start()
    try:
        wait_until(lambda: receiver.received, 5, "the slow attempt reaching the receiver", interval=0.01)
        assert hooks.deliver(waiting) is None  # a second worker: no free slot
    finally:
        worker.join(5)

    assert outcome == [{"succeeded": 2}]
    assert [hooks.delivery(delivery_id).status for delivery_id in (slow, waiting)] == ["succeeded", "succeeded"]
    assert len(receiver.received) == 2


@BOTH
def test_a_lapsed_lease_is_recorded_as_a_lost_attempt_and_the_delivery_retried(hooks, receiver, clock, enqueued):
    consumer = hooks.consumer()
    endpoint = hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    assert hooks.claim(delivery_id) is not None  # the worker holding it dies here

    clock.advance(59)
    assert hooks.dispatch()["lost"] == 0  # the lease (60 s) has not lapsed
    clock.advance(2)
    counts = hooks.dispatch()

    assert counts["lost"] == 1
    (lost,) = hooks.attempts(delivery_id)
    assert (lost.number, lost.status_code, lost.error) == (1, None, attempts.LOST)
    assert lost.url == receiver.url
    row = hooks.delivery(delivery_id)
    assert (row.status, row.lease_expires_at) == ("pending", None)
    assert row.next_attempt_at == lost.created_at + timedelta(seconds=SCHEDULE[0])
    assert hooks.endpoint_row(endpoint).failing_since is None  # a dead worker says nothing of the receiver
    assert hooks.dispatch()["lost"] == 0

    assert retry(hooks, clock, enqueued, delivery_id) == "succeeded"
    assert [(row.number, row.status_code) for row in hooks.attempts(delivery_id)] == [(1, None), (2, 200)]
    assert len(receiver.received) == 1


@BOTH
def test_a_record_with_a_stale_attempt_number_changes_nothing(hooks, receiver, clock, enqueued):
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    stale = hooks.claim(delivery_id)
    clock.advance(61)
    hooks.dispatch()  # the lease lapsed: attempt 1 recorded as lost
    clock.advance(SCHEDULE[0] + 1)
    current = hooks.claim(delivery_id)
    assert (stale.number, current.number) == (1, 2)

    # The first worker was only slow: its late answer is not recorded.
    assert hooks.call(attempts.record, [stale], [attempts.Sent(Result(200, 5, "late"), "127.0.0.1")]) == {}

    row = hooks.delivery(delivery_id)
    assert (row.status, row.attempts, row.last_status_code) == ("sending", 2, None)
    assert [attempt.error for attempt in hooks.attempts(delivery_id)] == [attempts.LOST]
    hooks.call(lambda: attempts.record([current], attempts.send_batch([current])))
    assert hooks.delivery(delivery_id).status == "succeeded"
    assert [attempt.number for attempt in hooks.attempts(delivery_id)] == [1, 2]


@BOTH
def test_concurrent_claims_for_one_endpoint_respect_its_cap(make_hooks, receiver, database):
    hooks = make_hooks(WEBHOOK_ENDPOINT_CONCURRENCY=1)
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    deliveries = [hooks.publish(consumer)[0] for _ in range(3)]
    results: dict[int, object] = {}
    start = threading.Barrier(3)

    def claim(n: int) -> None:
        start.wait(5)
        try:
            results[n] = hooks.call(attempts.claim, 10)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            results[n] = exc

    workers = [threading.Thread(target=claim, args=(n,)) for n in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)

    assert all(isinstance(found, list) for found in results.values()), results
    assert sorted(len(found) for found in results.values()) == [0, 0, 1], results
    assert sorted(hooks.delivery(delivery_id).status for delivery_id in deliveries) == ["pending", "pending", "sending"]


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgres"], indirect=True)
def test_a_claim_skips_an_endpoint_another_claim_holds_without_waiting(make_hooks, make_receiver, clock, enqueued):
    # A claim that waited for the lock would wait for this test forever: fail in 2 s instead.
    hooks = make_hooks(SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"options": "-c lock_timeout=2s"}})
    consumer, other_consumer = hooks.consumer(), hooks.consumer()
    held_endpoint = hooks.endpoint(consumer, make_receiver().url)
    hooks.endpoint(other_consumer, make_receiver().url)
    (held,) = hooks.publish(consumer)
    (free,) = hooks.publish(other_consumer)

    with hooks.app.app_context(), db.engine.connect() as other:
        other.execute(text("SELECT id FROM webhook_endpoints WHERE id = :id FOR UPDATE"), {"id": held_endpoint})
        started = time.monotonic()
        assert [work.delivery_id for work in hooks.call(attempts.claim, 10)] == [free]  # SKIP LOCKED: no waiting
        assert time.monotonic() - started < 1.5
        other.rollback()

    assert [work.delivery_id for work in hooks.call(attempts.claim, 10)] == [held]


@BOTH
def test_two_attempts_answered_410_at_once_disable_the_endpoint_once(make_hooks, receiver, clock, monkeypatch):
    hooks = make_hooks(WEBHOOK_ENDPOINT_CONCURRENCY=2)
    consumer = hooks.consumer()
    endpoint = hooks.endpoint(consumer, receiver.url)
    (failing,) = hooks.publish(consumer)
    receiver.reply(500)
    hooks.deliver(failing)  # the endpoint is failing already
    assert hooks.endpoint_row(endpoint).failing_since is not None
    works = [hooks.claim(hooks.publish(consumer)[0]) for _ in range(2)]
    assert all(works)

    original, disabling = attempts.disable, threading.Event()

    def slow_disable(found, reason, now):
        message_id = original(found, reason, now)
        if threading.current_thread().name == "first":
            disabling.set()
            time.sleep(0.5)  # the first worker has disabled the endpoint but not committed yet
        return message_id

    monkeypatch.setattr(attempts, "disable", slow_disable)
    gone = [attempts.Sent(Result(410, 3, "gone"), "127.0.0.1")]
    first = threading.Thread(target=hooks.call, args=(attempts.record, works[:1], gone), name="first")
    first.start()
    try:
        assert disabling.wait(5)
        hooks.call(attempts.record, works[1:], gone)
    finally:
        first.join(10)

    assert [attempt.status_code for attempt in hooks.attempts()] == [500, 410, 410]
    assert hooks.endpoint_row(endpoint).disabled is True
    assert len(hooks.messages(ENDPOINT_DISABLED)) == 1


# -- redeliver and test sends -------------------------------------------------------------------


def test_redeliver_sends_the_same_message_again_with_a_new_schedule(make_hooks, receiver, clock, enqueued):
    hooks = make_hooks(WEBHOOK_RETRY_SCHEDULE=[10])  # two tries
    consumer = hooks.consumer()
    endpoint = hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    receiver.reply(500, 500, 500, 200)
    hooks.deliver(delivery_id)
    retry(hooks, clock, enqueued, delivery_id)
    assert hooks.delivery(delivery_id).status == "failed"
    enqueued.clear()

    row = hooks.call(lambda: deliveries.redeliver(db.session.get(WebhookDelivery, delivery_id)))

    assert (row.status, row.trigger, row.tries, row.finished_at) == ("pending", "manual", 0, None)
    assert enqueued.deliveries == [delivery_id]
    assert hooks.deliver(delivery_id) == "failed"
    # A new schedule: the manual attempt was its first try, so another one is due after SCHEDULE[0].
    row = hooks.delivery(delivery_id)
    assert row.status == "pending"
    assert row.next_attempt_at == hooks.attempts(delivery_id)[-1].created_at + timedelta(seconds=10)
    assert retry(hooks, clock, enqueued, delivery_id) == "succeeded"

    assert [(row.number, row.trigger, row.status_code) for row in hooks.attempts(delivery_id)] == [
        (1, "scheduled", 500),
        (2, "scheduled", 500),
        (3, "manual", 500),
        (4, "scheduled", 200),
    ]
    assert len({request.headers["webhook-id"] for request in receiver.received}) == 1
    for request in receiver.received:
        verified(hooks, endpoint, request)


def test_redeliver_is_refused_while_the_delivery_is_being_sent(hooks, receiver, enqueued):
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    hooks.claim(delivery_id)

    with pytest.raises(deliveries.DeliveryBusy):
        hooks.call(lambda: deliveries.redeliver(db.session.get(WebhookDelivery, delivery_id)))

    row = hooks.delivery(delivery_id)
    assert (row.status, row.trigger, row.tries) == ("sending", "scheduled", 1)
    assert enqueued.deliveries == []


def send_test(hooks, endpoint_id: str, request_id: str | None = None):
    """``deliveries.send_test`` as the API calls it; returns the attempt row."""
    attempt_id = hooks.call(lambda: deliveries.send_test(db.session.get(WebhookEndpoint, endpoint_id), request_id).id)
    (found,) = [row for row in hooks.attempts() if row.id == attempt_id]
    return found


@pytest.mark.parametrize("status", [500, 410])
def test_a_test_send_to_a_disabled_endpoint_is_one_attempt_that_changes_nothing_else(hooks, receiver, clock, enqueued, status):
    consumer = hooks.consumer()
    endpoint = hooks.endpoint(consumer, receiver.url, ["order.*"], disabled=True)
    receiver.reply(status)

    attempt = send_test(hooks, endpoint, "req-test")

    assert (attempt.trigger, attempt.status_code, attempt.succeeded, attempt.request_id) == ("test", status, False, "req-test")
    (request,) = receiver.received
    body = verified(hooks, endpoint, request)
    assert body["type"] == TEST_EVENT
    assert body["data"]["endpoint_id"] == endpoint
    row = hooks.delivery(attempt.delivery_id)
    assert (row.status, row.next_attempt_at) == ("failed", None)  # never retried
    found = hooks.endpoint_row(endpoint)
    assert (found.disabled, found.disabled_reason, found.failing_since) == (True, "disabled when registered", None)
    assert hooks.messages(ENDPOINT_DISABLED) == []
    clock.advance(3600)
    assert hooks.dispatch()["due"] == 0
    assert len(receiver.received) == 1


def test_a_test_send_neither_disables_a_failing_endpoint_nor_clears_its_failure_record(make_hooks, receiver, clock):
    hooks = make_hooks(WEBHOOK_DISABLE_AFTER=25)
    consumer = hooks.consumer()
    endpoint = hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    receiver.reply(500, 410, 200)
    hooks.deliver(delivery_id)
    since = hooks.endpoint_row(endpoint).failing_since
    clock.advance(30)

    for expected in (410, 200):
        attempt = send_test(hooks, endpoint)
        assert attempt.status_code == expected
        found = hooks.endpoint_row(endpoint)
        assert (found.disabled, found.failing_since) == (False, since)


# -- the guard at delivery time -------------------------------------------------------------------


def test_a_delivery_to_a_network_no_longer_allowed_is_refused_and_sends_nothing(make_hooks, receiver):
    registered = make_hooks()  # 127.0.0.0/8 allowed
    consumer = registered.consumer()
    registered.endpoint(consumer, receiver.url)
    (delivery_id,) = registered.publish(consumer)
    stricter = make_hooks(WEBHOOK_ALLOWED_NETWORKS=[])  # the same database, without the allow-list

    assert stricter.deliver(delivery_id) == "failed"

    (attempt,) = stricter.attempts(delivery_id)
    assert attempt.error.startswith("refused")
    assert "loopback" in attempt.error
    assert (attempt.status_code, attempt.address) == (None, None)
    assert stricter.delivery(delivery_id).status == "pending"  # retried on schedule, in case the setting returns
    assert receiver.received == []


# -- retention ------------------------------------------------------------------------------------


def test_sweep_deletes_final_deliveries_their_attempts_and_messages_past_retention(make_hooks, make_receiver, clock):
    hooks = make_hooks(WEBHOOK_RETENTION=100, WEBHOOK_RETRY_SCHEDULE=[])  # one try: a failure is final
    ok, failing = make_receiver(), make_receiver()
    failing.reply(*[500] * 5)
    consumer = hooks.consumer()
    hooks.endpoint(consumer, ok.url, ["order.*", "both"])
    hooks.endpoint(consumer, failing.url, ["bad.*"])
    kept = hooks.endpoint(consumer, make_receiver().url, ["kept.*", "both"])
    (succeeded,) = hooks.publish(consumer, "order.created")
    (failed,) = hooks.publish(consumer, "bad.thing")
    (pending,) = hooks.publish(consumer, "kept.later")
    mixed = hooks.publish(consumer, "both")
    unmatched = hooks.message(consumer, "nobody.cares")
    hooks.fan_out(unmatched)
    unsent = hooks.message(consumer, "order.unsent")  # not fanned out yet
    assert hooks.deliver(succeeded) == "succeeded"
    assert hooks.deliver(failed) == "failed"
    assert hooks.delivery(failed).status == "failed"
    (mixed_done,) = [delivery_id for delivery_id in mixed if hooks.delivery(delivery_id).endpoint_id != kept]
    assert hooks.deliver(mixed_done) == "succeeded"
    messages_before = {row["type"]: row["id"] for row in hooks.messages()}

    clock.advance(90)
    assert hooks.sweep() == {"deliveries": 0, "messages": 0}
    clock.advance(20)
    assert hooks.sweep() == {"deliveries": 3, "messages": 3}

    left = {row.id: row.status for row in hooks.deliveries()}
    assert left == {pending: "pending", next(d for d in mixed if d != mixed_done): "pending"}
    assert hooks.attempts() == []
    assert sorted(row["type"] for row in hooks.messages()) == ["both", "kept.later", "order.unsent"]
    assert messages_before["order.unsent"] == unsent
    assert hooks.sweep() == {"deliveries": 0, "messages": 0}


def test_delivery_json_lists_the_attempts_a_consumer_sees(hooks, receiver):
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    receiver.reply(Reply(502, body=b"bad gateway"))
    hooks.deliver(delivery_id)

    found = json.loads(json.dumps(deliveries.delivery_json(hooks.delivery(delivery_id), attempts=hooks.attempts(delivery_id))))

    assert found["status"] == "pending"
    assert found["attempt_count"] == 1
    assert found["last_status_code"] == 502
    (attempt,) = found["attempts"]
    assert (attempt["number"], attempt["status_code"], attempt["response"], attempt["succeeded"]) == (1, 502, "bad gateway", False)


def test_attempts_are_counted_by_outcome_and_a_success_times_the_delivery_lag(hooks, receiver, clock, enqueued):
    def counted(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    failed, succeeded = counted("frontdoor_webhook_attempts_total", outcome="failed"), counted("frontdoor_webhook_attempts_total", outcome="succeeded")
    lags, lag_sum = counted("frontdoor_webhook_delivery_lag_seconds_count"), counted("frontdoor_webhook_delivery_lag_seconds_sum")
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    (delivery_id,) = hooks.publish(consumer)
    receiver.reply(500, 200)

    assert hooks.deliver(delivery_id) == "failed"
    assert retry(hooks, clock, enqueued, delivery_id) == "succeeded"

    assert counted("frontdoor_webhook_attempts_total", outcome="failed") == failed + 1
    assert counted("frontdoor_webhook_attempts_total", outcome="succeeded") == succeeded + 1
    assert counted("frontdoor_webhook_delivery_lag_seconds_count") == lags + 1
    # Delivered after the first retry's wait (5 s on the schedule, with jitter).
    assert SCHEDULE[0] * 0.9 <= counted("frontdoor_webhook_delivery_lag_seconds_sum") - lag_sum <= SCHEDULE[0] * 1.1 + 1
