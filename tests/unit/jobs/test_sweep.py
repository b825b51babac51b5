"""Beat's sweep: lost messages enqueued again with backoff, dead workers' jobs failed, results expired."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from app import queue
from app.jobs import worker
from tests.unit.jobs.support import (
    PREFIX,
    ago,
    events,
    item_rows,
    job_count,
    job_row,
    later,
    run,
    set_job,
    submit_batch,
    sweep,
)


class Broker:
    """Stands in for the broker behind ``app.queue.send``: records the job ids sent in run
    messages, or raises while ``down``."""

    def __init__(self, down: bool = False):
        self.down = down
        self.sent: list[str] = []

    def __call__(self, task: str, args: tuple = (), **options: object) -> None:
        if self.down:
            raise ConnectionError("broker unreachable")
        if task == queue.RUN_JOB:
            self.sent.append(args[0])


@pytest.fixture
def broker(monkeypatch):
    stand_in = Broker()
    monkeypatch.setattr(queue, "send", stand_in)
    return stand_in


def test_a_submission_sends_one_message_naming_the_job(app, client, broker, upstream):
    job_id = client.post("/async/anything").json["id"]

    assert broker.sent == [job_id]
    row = job_row(app, job_id)
    assert row.enqueued_at is not None and row.enqueues == 1


def test_a_job_whose_enqueue_failed_is_still_accepted_and_sent_by_the_sweep(app, client, broker, upstream):
    broker.down = True
    response = client.post("/async/anything")
    job_id = response.json["id"]
    assert response.status_code == 202
    assert job_row(app, job_id).enqueued_at is None
    broker.down = False

    assert sweep(app)["requeued"] == 0  # not before a sweep interval has passed
    assert broker.sent == []
    set_job(app, job_id, created_at=ago(11))  # JOB_SWEEP_INTERVAL is 10 s
    assert sweep(app)["requeued"] == 1

    assert broker.sent == [job_id]
    row = job_row(app, job_id)
    assert row.enqueued_at is not None and row.enqueues == 2
    assert run(app, job_id) == "succeeded"


def test_a_job_still_waiting_is_sent_again_with_doubling_backoff(app, client, broker, upstream):
    job_id = client.post("/async/anything").json["id"]  # sent once
    broker.sent.clear()

    set_job(app, job_id, enqueued_at=ago(59))
    assert sweep(app)["requeued"] == 0  # JOB_REQUEUE_AFTER is 60 s
    set_job(app, job_id, enqueued_at=ago(61))
    assert sweep(app)["requeued"] == 1
    assert broker.sent == [job_id]

    set_job(app, job_id, enqueued_at=ago(61))
    assert sweep(app)["requeued"] == 0  # second copy: waits 120 s
    set_job(app, job_id, enqueued_at=ago(121))
    assert sweep(app)["requeued"] == 1
    assert broker.sent == [job_id, job_id]
    assert job_row(app, job_id).enqueues == 3


def test_the_sweep_leaves_a_job_with_a_live_lease_alone(app, client, broker, upstream):
    job_id = client.post("/async/anything").json["id"]
    set_job(app, job_id, status="running", attempts=1, started_at=ago(1000), enqueued_at=ago(1000), lease_expires_at=later(20))

    assert sweep(app) == {"requeued": 0, "failed": 0, "expired": 0, "deleted": 0}

    assert job_row(app, job_id).status == "running"


def test_a_job_whose_worker_died_is_sent_again(app, client, broker, upstream):
    job_id = client.post("/async/anything").json["id"]
    broker.sent.clear()
    set_job(app, job_id, status="running", attempts=1, started_at=ago(100), enqueued_at=ago(100), lease_expires_at=ago(1))

    assert sweep(app)["requeued"] == 1

    assert broker.sent == [job_id]
    assert run(app, job_id) == "succeeded"
    assert job_row(app, job_id).attempts == 2


def test_a_job_whose_worker_died_past_job_time_limit_fails_with_job_timeout(app, client, broker, upstream):
    job_id = client.post("/async/anything").json["id"]
    broker.sent.clear()
    set_job(app, job_id, status="running", attempts=1, started_at=ago(661), enqueued_at=ago(661), lease_expires_at=ago(1))

    assert sweep(app)["failed"] == 1

    job = client.get(f"{PREFIX}/{job_id}").json
    assert job["status"] == "failed"
    assert job["error"]["type"].endswith("/job-timeout")
    assert job["error"]["status"] == 504
    assert "JOB_TIME_LIMIT" in job["error"]["detail"]
    assert broker.sent == []
    assert [event.type for event in events(app, job_id)] == ["job.failed"]


def test_a_job_whose_worker_died_on_its_last_attempt_fails_as_abandoned(app, client, broker, upstream):
    job_id = client.post("/async/anything").json["id"]
    set_job(app, job_id, status="running", attempts=3, started_at=ago(100), enqueued_at=ago(100), lease_expires_at=ago(1))

    assert sweep(app)["failed"] == 1

    job = client.get(f"{PREFIX}/{job_id}").json
    assert job["error"]["type"].endswith("/job-abandoned")
    assert run(app, job_id) is None
    assert upstream.seen == []


def test_jobs_waiting_normally_do_not_hide_a_lost_one_from_the_sweep(app, client, broker, upstream):
    waiting = [client.post("/async/anything", data=str(n).encode()).json["id"] for n in range(2)]
    for age, job_id in zip((30, 29), waiting, strict=True):
        set_job(app, job_id, created_at=ago(age))  # enqueued just now: not due for 60 s
    broker.down = True
    lost = client.post("/async/anything", data=b"lost").json["id"]
    broker.down = False
    set_job(app, lost, created_at=ago(20))  # its enqueue failed, a sweep interval ago
    broker.sent.clear()

    with app.app_context():
        counts = worker.sweep(limit=2)

    assert counts["requeued"] == 1
    assert broker.sent == [lost]


# --- expiry and retention ----------------------------------------------------------------


def test_a_final_job_expires_job_result_ttl_seconds_after_it_ended(jobs_app, upstream):
    app = jobs_app(JOB_RESULT_TTL=3600)
    client = app.test_client()
    job_id = client.post("/async/anything").json["id"]
    run(app, job_id)

    job = client.get(f"{PREFIX}/{job_id}").json

    ended, expires = (datetime.fromisoformat(job[name]) for name in ("finished_at", "expires_at"))
    assert expires - ended == timedelta(seconds=3600)


def test_a_job_past_its_expiry_answers_410_and_its_payload_is_purged_by_the_sweep(app, client, upstream):
    submitted = client.post("/async/anything", data=b"secret body", headers={"Idempotency-Key": "k1"})
    job_id = submitted.json["id"]
    run(app, job_id)
    set_job(app, job_id, expires_at=ago(1))

    for url in (f"{PREFIX}/{job_id}", f"{PREFIX}/{job_id}/result"):
        gone = client.get(url)
        assert gone.status_code == 410, url
        assert gone.json["type"].endswith("/job-expired")
    assert client.delete(f"{PREFIX}/{job_id}").status_code == 410

    assert sweep(app)["expired"] == 1

    row = job_row(app, job_id)
    assert row.purged_at is not None
    assert (row.request_headers, row.request_body, row.result_headers, row.result_body) == (None, None, None, None)
    assert client.get(f"{PREFIX}/{job_id}").status_code == 410
    again = client.post("/async/anything", data=b"secret body", headers={"Idempotency-Key": "k1"})
    assert again.status_code == 202
    assert again.json["id"] != job_id
    assert "Idempotent-Replayed" not in again.headers


def test_an_expired_batch_loses_its_items(app, client, upstream):
    job_id = submit_batch(client, [{"path": "/sync/anything"}]).json["id"]
    run(app, job_id)
    set_job(app, job_id, expires_at=ago(1))

    sweep(app)

    assert item_rows(app, job_id) == []
    assert client.get(f"{PREFIX}/{job_id}/result").status_code == 410


def test_a_job_not_yet_expired_is_kept(app, client, upstream):
    job_id = client.post("/async/anything").json["id"]
    run(app, job_id)

    assert sweep(app)["expired"] == 0

    assert client.get(f"{PREFIX}/{job_id}/result").status_code == 200


def test_a_job_retention_seconds_past_expiry_is_deleted_and_answers_404(app, client, upstream):
    job_id = client.post("/async/anything").json["id"]
    run(app, job_id)
    set_job(app, job_id, expires_at=ago(1))
    sweep(app)
    set_job(app, job_id, purged_at=ago(7 * 24 * 3600 - 60))
    assert sweep(app)["deleted"] == 0  # JOB_RETENTION is 7 days
    set_job(app, job_id, purged_at=ago(7 * 24 * 3600 + 1))

    assert sweep(app)["deleted"] == 1

    assert job_row(app, job_id) is None
    assert job_count(app) == 0
    assert events(app, job_id) == []
    assert client.get(f"{PREFIX}/{job_id}").status_code == 404
