"""Fan-out: a message becomes one delivery per matching enabled endpoint of its consumer; job events become messages."""
from __future__ import annotations

import threading
import time

import pytest

from app.extensions import db
from app.jobs.service import record_event
from app.models import Job, JobEvent
from app.models.base import utcnow
from app.webhooks import messages
from tasks.webhooks import fan_out_task
from tests.unit.webhooks.conftest import BOTH

FAN_OUT_LATER = messages.fan_out_later  # the real one: the enqueued fixture stands in for it

FILTERS = {
    "exact": ["job.succeeded"],
    "wildcard": ["job.*"],
    "star": ["*"],
    "all": [],
    "other": ["order.created", "jobs.*"],
}


@pytest.mark.parametrize(
    ("event_type", "wanted"),
    [
        ("job.succeeded", {"exact", "wildcard", "star", "all"}),
        ("job.a.b", {"wildcard", "star", "all"}),
        ("job", {"star", "all"}),
        ("jobs.x", {"star", "all", "other"}),
        ("order.created", {"star", "all", "other"}),
        ("job.succeeded.late", {"wildcard", "star", "all"}),
    ],
)
def test_a_message_is_delivered_to_the_endpoints_whose_filters_match_its_type(hooks, receiver, event_type, wanted):
    consumer = hooks.consumer()
    endpoints = {name: hooks.endpoint(consumer, receiver.url, filters) for name, filters in FILTERS.items()}

    created = hooks.publish(consumer, event_type)

    rows = hooks.deliveries()
    assert sorted(row.id for row in rows) == sorted(created)
    assert {row.endpoint_id for row in rows} == {endpoints[name] for name in wanted}
    assert len(rows) == len(wanted)  # one delivery per endpoint
    assert {row.status for row in rows} == {"pending"}


@pytest.mark.parametrize(
    ("filters", "event_type", "expected"),
    [
        (["job.*"], "job.succeeded", True),
        (["job.*"], "job.a.b", True),
        (["job.*"], "job", False),
        (["job.*"], "jobs.x", False),
        (["job.*"], "xjob.y", False),
        (["job.succeeded"], "job.succeeded", True),
        (["job.succeeded"], "job.succeeded.x", False),
        (["job.succeeded"], "job.failed", False),
        (["*"], "anything.at.all", True),
        ([], "anything", True),
        (["a.b", "c.*"], "c.d", True),
        (["a.b", "c.*"], "a.c", False),
    ],
)
def test_matches(filters, event_type, expected):
    assert messages.matches(filters, event_type) is expected


def test_disabled_endpoints_and_other_consumers_endpoints_get_no_delivery(hooks, receiver):
    consumer, other = hooks.consumer(), hooks.consumer()
    enabled = hooks.endpoint(consumer, receiver.url)
    hooks.endpoint(consumer, receiver.url, disabled=True)
    hooks.endpoint(other, receiver.url)

    created = hooks.publish(consumer)

    assert [row.endpoint_id for row in hooks.deliveries()] == [enabled]
    assert len(created) == 1
    assert {row.consumer_id for row in hooks.deliveries()} == {consumer}


def test_a_second_fan_out_of_the_same_message_creates_nothing(hooks, receiver):
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    message = hooks.message(consumer)

    first = hooks.fan_out(message)
    hooks.endpoint(consumer, receiver.url)  # even an endpoint added since gets nothing from a repeat
    second = hooks.fan_out(message)

    assert len(first) == 1
    assert second == []
    assert [row.id for row in hooks.deliveries()] == first
    assert hooks.messages()[0]["fanned_out"] is True


def test_the_fan_out_task_makes_the_deliveries_and_sends_them_itself(hooks, receiver, enqueued):
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    hooks.endpoint(consumer, receiver.url, ["order.*"])
    message = hooks.message(consumer)

    # The task runs in an app context of its own, as in a worker.
    assert fan_out_task(message) == 2
    assert fan_out_task(message) == 0  # redelivered by the broker: safe to run twice

    assert [row.status for row in hooks.deliveries()] == ["succeeded", "succeeded"]
    assert sorted(request.headers["webhook-id"] for request in receiver.received) == [message, message]
    assert (enqueued.deliveries, enqueued.wakes) == ([], 0)  # no second task per delivery


def test_a_message_whose_fan_out_was_lost_is_fanned_out_by_dispatch(hooks, receiver, enqueued, clock):
    consumer = hooks.consumer()
    endpoint = hooks.endpoint(consumer, receiver.url)
    message = hooks.message(consumer)  # its fan-out message never reached a worker

    assert hooks.dispatch()["fanned_out"] == 0  # not before WEBHOOK_REQUEUE_AFTER (5 s)
    assert hooks.deliveries() == []
    clock.advance(6)
    counts = hooks.dispatch()

    (row,) = hooks.deliveries()
    assert (row.message_id, row.endpoint_id) == (message, endpoint)
    assert (counts["fanned_out"], counts["due"], counts["woken"]) == (1, 1, 1)
    assert enqueued.wakes == 1
    assert hooks.dispatch()["fanned_out"] == 0


# -- job events --------------------------------------------------------------------------------


def _finished_job(hooks, consumer_id: str | None, status: str = "succeeded") -> str:
    """A job row that has ended, with its outbox row, as the jobs worker writes them."""

    def write() -> str:
        now = utcnow()
        job = Job(consumer_id=consumer_id, status=status, method="GET", path="/reports", query="", request_id="req-1", started_at=now, finished_at=now)
        db.session.add(job)
        db.session.flush()
        record_event(job)
        db.session.commit()
        return job.id

    return hooks.call(write)


def _events(hooks) -> list[tuple[str, bool]]:
    """Every job event as ``(job_id, published)``."""
    return hooks.call(lambda: [(row.job_id, row.published_at is not None) for row in db.session.query(JobEvent).all()])


def test_job_events_become_messages_fanned_out_to_endpoints_subscribed_to_job_events(hooks, receiver, enqueued):
    consumer = hooks.consumer()
    jobs_endpoint = hooks.endpoint(consumer, receiver.url, ["job.*"])
    hooks.endpoint(consumer, receiver.url, ["order.*"])
    succeeded = _finished_job(hooks, consumer, "succeeded")
    failed = _finished_job(hooks, consumer, "failed")

    assert hooks.call(messages.publish_job_events) == 2

    rows = hooks.messages()
    assert sorted((row["type"], row["data"]["id"], row["data"]["status"]) for row in rows) == [
        ("job.failed", failed, "failed"),
        ("job.succeeded", succeeded, "succeeded"),
    ]
    assert {row["consumer_id"] for row in rows} == {consumer}
    assert all(row["data"]["request"] == {"method": "GET", "path": "/reports", "query": ""} for row in rows)
    assert sorted(enqueued.messages) == sorted(row["id"] for row in rows)
    assert _events(hooks) and all(published for _, published in _events(hooks))

    for message_id in enqueued.messages:
        hooks.fan_out(message_id)
    rows = hooks.deliveries()
    assert len(rows) == 2
    assert {row.endpoint_id for row in rows} == {jobs_endpoint}


def test_job_events_published_twice_make_one_message(hooks, receiver, enqueued):
    consumer = hooks.consumer()
    job = _finished_job(hooks, consumer)

    assert hooks.call(messages.publish_job_events) == 1
    assert hooks.call(messages.publish_job_events) == 0  # nothing left unpublished
    # A publisher that stopped after writing the message but before marking the event (or a
    # second beat) sees the event again: the message is keyed by the event id.
    hooks.call(lambda: (db.session.query(JobEvent).update({"published_at": None}), db.session.commit()))
    assert hooks.call(messages.publish_job_events) == 0

    (message,) = hooks.messages()
    assert message["data"]["id"] == job
    assert enqueued.messages == [message["id"]]


def test_an_anonymous_jobs_event_is_marked_published_without_a_message(hooks, enqueued):
    job = _finished_job(hooks, None)

    assert hooks.call(messages.publish_job_events) == 0

    assert _events(hooks) == [(job, True)]
    assert hooks.messages() == []
    assert enqueued.messages == []


def test_dispatch_publishes_job_events(hooks, receiver, enqueued):
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url, ["job.succeeded"])
    _finished_job(hooks, consumer)

    assert hooks.dispatch()["published"] == 1
    (message,) = hooks.messages("job.succeeded")
    assert enqueued.messages == [message["id"]]


@BOTH
def test_a_fan_out_takes_other_messages_waiting_for_theirs_into_the_same_batch(hooks, receiver, enqueued):
    consumer, other = hooks.consumer(), hooks.consumer()
    mine = hooks.endpoint(consumer, receiver.url)
    theirs = hooks.endpoint(other, receiver.url)
    first, second, third = hooks.message(consumer), hooks.message(other), hooks.message(consumer)

    created = hooks.call(messages.fan_out, first, 1)  # one more: the oldest other one waiting

    rows = {row.id: row for row in hooks.deliveries()}
    assert sorted(created) == sorted(rows)
    assert sorted((row.message_id, row.endpoint_id) for row in rows.values()) == sorted([(first, mine), (second, theirs)])
    assert hooks.fan_out(second) == []  # its own fan-out task, run later, finds it done
    assert [(row["id"], row["fanned_out"]) for row in hooks.messages()] == [(first, True), (second, True), (third, False)]
    assert len(hooks.fan_out(third)) == 1


@pytest.mark.redis
def test_with_redis_one_queued_fan_out_serves_every_event_published_before_it_starts(make_hooks, redis_url, key_prefix, receiver, monkeypatch):
    from app import queue

    hooks = make_hooks(REDIS_URL=redis_url, KEY_PREFIX=key_prefix)
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    sent: list[tuple] = []
    monkeypatch.setattr(queue, "send", lambda task, args=(), retry_policy=None: sent.append((task, tuple(args))))
    monkeypatch.setattr(messages, "fan_out_later", FAN_OUT_LATER)

    published = [hooks.message(consumer) for _ in range(3)]
    for message_id in published:
        hooks.call(messages.fan_out_later, [message_id])
    assert sent == [(queue.FAN_OUT, (published[0],))]  # the others wait for the queued one

    assert hooks.call(fan_out_task, published[0]) == 3  # it takes all three
    assert [row["fanned_out"] for row in hooks.messages()] == [True] * 3
    later = hooks.message(consumer)
    hooks.call(messages.fan_out_later, [later])  # the mark was cleared as that fan-out started
    assert sent[-1] == (queue.FAN_OUT, (later,))


@BOTH
def test_a_fan_out_whose_own_message_was_taken_still_asks_for_another_when_it_took_a_full_share(hooks, receiver, enqueued):
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)
    first, second, third = hooks.message(consumer), hooks.message(consumer), hooks.message(consumer)
    hooks.fan_out(first)  # its own fan-out message comes later, and finds it done
    enqueued.clear()

    created = hooks.call(messages.fan_out, first, 1)  # takes one other: as many as it may

    assert len(created) == 1
    assert enqueued.messages == [first]  # more may be waiting: another fan-out is asked for
    assert [row["fanned_out"] for row in hooks.messages()] == [True, True, False]
    assert (second, third) == (hooks.messages()[1]["id"], hooks.messages()[2]["id"])


@BOTH
def test_a_fan_out_lingers_for_more_events_only_while_they_arrive_faster_than_fan_outs_start(make_hooks, receiver, enqueued):
    hooks = make_hooks(WEBHOOK_FAN_OUT_LINGER=0.6, WEBHOOK_BATCH_SIZE=4)
    consumer = hooks.consumer()
    hooks.endpoint(consumer, receiver.url)

    def fan_out(message_id: str) -> tuple[int, float]:
        started = time.monotonic()
        made = hooks.call(fan_out_task, message_id)
        return made, time.monotonic() - started

    first = [hooks.message(consumer) for _ in range(2)]
    made, took = fan_out(first[0])  # nothing before it: at once
    assert made == 2 and took < 0.5

    # The last one took several, not a batch: the next waits, and what is published meanwhile joins it.
    late = threading.Timer(0.1, hooks.message, (consumer,))
    late.start()
    made, took = fan_out(hooks.message(consumer))
    late.join()
    assert made == 2 and took >= 0.6

    made, took = fan_out(hooks.message(consumer))  # still after a take of two: it waits, alone
    assert made == 1 and took >= 0.6
    made, took = fan_out(hooks.message(consumer))  # one at a time again: no wait
    assert made == 1 and took < 0.5

    backlog = [hooks.message(consumer) for _ in range(6)]
    made, took = fan_out(backlog[0])  # after a take of one: at once, a full batch
    assert made == 4 and took < 0.5
    made, took = fan_out(backlog[4])  # after a full batch (a backlog): at once
    assert made == 2 and took < 0.5
    assert {row.status for row in hooks.deliveries()} == {"succeeded"}
