"""The worker: the full cycle, claims and leases (safe to run twice), limits, upstream failures, cancel."""
from __future__ import annotations

import time

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from prometheus_client import REGISTRY

from app.jobs import worker
from app.models.jobs import FAILED
from tests.unit.jobs.support import (
    PREFIX,
    Background,
    ago,
    events,
    job_row,
    later,
    routes,
    run,
    set_job,
    submit_batch,
    sweep,
)


def test_a_job_run_to_completion_succeeds_with_an_absolute_result_url(app, client, upstream):
    job_id = client.post("/async/anything", data=b"x").json["id"]

    assert run(app, job_id) == "succeeded"

    polled = client.get(f"{PREFIX}/{job_id}")
    assert polled.status_code == 200
    job = polled.json
    assert job["status"] == "succeeded"
    assert job["progress"] == {"percent": 100, "message": "succeeded"}
    assert job["attempts"] == 1
    assert job["resourceLocation"] == f"http://localhost{PREFIX}/{job_id}/result"
    assert job["result"]["status"] == 200
    assert job["started_at"] is not None and job["finished_at"] is not None and job["expires_at"] is not None
    assert job["error"] is None
    assert "Retry-After" not in polled.headers
    assert upstream.seen == [("POST", "/anything")]


def test_the_result_is_the_upstreams_status_headers_and_body_byte_for_byte(app, client, upstream):
    job_id = client.get("/async/bytes/512?seed=7").json["id"]
    direct = client.get("/sync/bytes/512?seed=7")

    run(app, job_id)
    result = client.get(f"{PREFIX}/{job_id}/result")

    assert result.status_code == 200
    assert result.data == direct.data
    assert len(result.data) == 512
    assert result.headers["Content-Type"] == "application/octet-stream"
    assert result.headers["Content-Length"] == "512"


def test_the_result_keeps_the_upstreams_own_status_and_fields(app, client, upstream):
    teapot = client.get("/async/status/418").json["id"]
    fields = client.get("/async/response-headers?X-Report-Id=r-77&Cache-Control=no-store").json["id"]

    assert run(app, teapot) == "succeeded"  # the upstream answered: the job did its work
    assert run(app, fields) == "succeeded"

    assert client.get(f"{PREFIX}/{teapot}/result").status_code == 418
    result = client.get(f"{PREFIX}/{fields}/result")
    assert result.status_code == 200
    assert result.headers["X-Report-Id"] == "r-77"
    assert result.headers["Cache-Control"] == "no-store"
    assert result.json["X-Report-Id"] == "r-77"


def test_the_result_before_success_is_a_409_with_retry_after_while_not_final(app, client, upstream):
    job_id = client.post("/async/anything").json["id"]

    early = client.get(f"{PREFIX}/{job_id}/result")

    assert early.status_code == 409
    assert early.headers["Content-Type"] == "application/problem+json"
    assert early.json["type"].endswith("/job-not-succeeded")
    assert early.json["job_status"] == "notStarted"
    assert early.headers["Retry-After"] == "1"
    status = client.get(f"{PREFIX}/{job_id}")
    assert status.headers["Retry-After"] == "1"


def test_a_job_whose_upstream_is_unreachable_fails_with_the_502_problem(app, client, upstream):
    job_id = client.post("/dead/anything").json["id"]

    assert run(app, job_id) == "failed"

    job = client.get(f"{PREFIX}/{job_id}")
    assert job.status_code == 200
    assert "Retry-After" not in job.headers
    assert job.json["status"] == "failed"
    error = job.json["error"]
    assert error["status"] == 502
    assert error["type"].endswith("/upstream-unreachable")
    assert error["title"] == "Bad Gateway"
    assert "resourceLocation" not in job.json
    result = client.get(f"{PREFIX}/{job_id}/result")
    assert result.status_code == 409
    assert result.json["job_status"] == "failed"
    assert "Retry-After" not in result.headers


def test_a_result_over_job_max_result_size_fails_the_job_and_keeps_nothing(jobs_app, upstream):
    app = jobs_app(JOB_MAX_RESULT_SIZE=100)
    client = app.test_client()
    job_id = client.get("/async/bytes/1000").json["id"]

    assert run(app, job_id) == "failed"

    job = client.get(f"{PREFIX}/{job_id}").json
    assert job["error"]["type"].endswith("/result-too-large")
    assert "100 bytes" in job["error"]["detail"]
    assert job["result"] is None
    row = job_row(app, job_id)
    assert (row.result_status, row.result_headers, row.result_body) == (None, None, None)


def test_a_result_at_job_max_result_size_is_kept(jobs_app, upstream):
    app = jobs_app(JOB_MAX_RESULT_SIZE=100)
    job_id = app.test_client().get("/async/bytes/100").json["id"]

    assert run(app, job_id) == "succeeded"
    assert len(job_row(app, job_id).result_body) == 100


def test_a_job_waits_for_its_upstream_by_job_timeout_not_timeout(app, client, upstream):
    # The "slow" upstream: timeout.read 1 s for clients, job_timeout.read 5 s for jobs.
    job_id = client.get("/slow/delay/2").json["id"]

    assert run(app, job_id) == "succeeded"

    assert client.get(f"{PREFIX}/{job_id}/result").status_code == 200


def test_a_job_whose_route_is_gone_when_it_runs_fails_with_route_gone(jobs_app, make_app, upstream):
    app = jobs_app()
    job_id = app.test_client().post("/async/anything").json["id"]
    # A deploy changes the route file (same database) before a worker gets to the job.
    redeployed = make_app(routes=routes(upstream.url).replace("path: /async", "path: /asynchronous"))

    assert run(redeployed, job_id) == "failed"

    error = job_row(app, job_id).error
    assert error["type"].endswith("/route-gone")
    assert error["status"] == 502
    assert "POST /async/anything" in error["detail"]
    assert upstream.seen == []


def test_a_stored_path_with_dot_segments_is_never_replayed(app, client, upstream):
    job_id = client.post("/async/anything").json["id"]
    set_job(app, job_id, path="/async/../sync/anything", raw_path="/async/../sync/anything")

    assert run(app, job_id) == "failed"

    assert job_row(app, job_id).error["type"].endswith("/route-gone")
    assert upstream.seen == []


@pytest.mark.parametrize("kind", ["request", "batch"])
def test_a_job_stopped_by_the_soft_time_limit_fails_with_job_timeout(app, client, monkeypatch, upstream, kind):
    def out_of_time(*args: object, **kwargs: object):
        raise SoftTimeLimitExceeded()

    if kind == "request":
        job_id = client.post("/async/anything").json["id"]
    else:
        job_id = submit_batch(client, [{"path": "/sync/anything"}] * 2).json["id"]
    monkeypatch.setattr(worker, "make_call", out_of_time)

    assert run(app, job_id) == "failed"

    job = client.get(f"{PREFIX}/{job_id}").json
    assert job["error"]["type"].endswith("/job-timeout")
    assert job["error"]["status"] == 504
    assert "JOB_SOFT_TIME_LIMIT" in job["error"]["detail"]
    assert [event.type for event in events(app, job_id)] == ["job.failed"]
    if kind == "batch":
        assert job["items"] == {"total": 2, "canceled": 2}  # none was sent


# --- claims, leases and fencing ---------------------------------------------------------


def test_running_a_finished_job_again_does_nothing(app, client, upstream):
    job_id = client.post("/async/anything").json["id"]
    assert run(app, job_id) == "succeeded"
    before = job_row(app, job_id)

    assert run(app, job_id) is None

    after = job_row(app, job_id)
    assert upstream.hits("/anything") == 1
    assert (after.status, after.attempts, after.finished_at, after.result_body) == (
        "succeeded",
        1,
        before.finished_at,
        before.result_body,
    )
    assert len(events(app, job_id)) == 1


def test_a_job_held_by_a_live_lease_is_not_claimed(app, client, upstream):
    job_id = client.post("/async/anything").json["id"]
    set_job(app, job_id, status="running", attempts=1, started_at=ago(5), lease_expires_at=later(20))

    assert run(app, job_id) is None

    row = job_row(app, job_id)
    assert (row.status, row.attempts) == ("running", 1)
    assert upstream.seen == []


def test_a_lapsed_lease_is_taken_over_and_the_old_attempts_writes_are_ignored(app, client, upstream):
    job_id = client.post("/async/anything").json["id"]
    set_job(app, job_id, status="running", attempts=1, started_at=ago(60), lease_expires_at=ago(1))

    assert run(app, job_id) == "succeeded"

    taken = job_row(app, job_id)
    assert taken.attempts == 2
    with app.app_context():
        late = worker._finish(job_id, 1, FAILED, error={"type": "late", "status": 500})
    assert late is None
    row = job_row(app, job_id)
    assert (row.status, row.error, row.result_body, row.finished_at) == (
        "succeeded",
        None,
        taken.result_body,
        taken.finished_at,
    )
    assert [event.type for event in events(app, job_id)] == ["job.succeeded"]


def test_a_worker_whose_claim_was_taken_over_cannot_finish_the_job(app, client, upstream):
    job_id = client.get("/async/gate/slow").json["id"]
    old = Background(app, job_id)
    upstream.wait_entered()
    # Meanwhile its lease lapsed (a long pause) and a second worker claimed the job: attempt 2.
    set_job(app, job_id, attempts=2, lease_expires_at=later(30))

    upstream.gate.set()

    assert old.join() is None
    row = job_row(app, job_id)
    assert (row.status, row.attempts, row.result_body, row.finished_at) == ("running", 2, None, None)
    assert events(app, job_id) == []


def test_a_running_workers_lease_is_renewed_so_a_duplicate_message_does_nothing(jobs_app, upstream):
    app = jobs_app(JOB_LEASE=0.6)  # renewed every 0.2 s
    job_id = app.test_client().get("/async/gate/lease").json["id"]
    first = Background(app, job_id)
    upstream.wait_entered()
    time.sleep(1.0)  # longer than the lease: only the heartbeat keeps the claim

    duplicate = run(app, job_id)
    upstream.gate.set()

    assert duplicate is None
    assert first.join() == "succeeded"
    assert job_row(app, job_id).attempts == 1
    assert upstream.hits("/gate/lease") == 1


def test_a_job_hung_past_job_time_limit_stops_renewing_its_lease_and_is_failed_by_the_sweep(jobs_app, upstream):
    app = jobs_app(JOB_LEASE=0.45, JOB_TIME_LIMIT=1.0)
    job_id = app.test_client().get("/async/gate/hung").json["id"]
    hung = Background(app, job_id)
    upstream.wait_entered()
    time.sleep(2.0)  # past the time limit, and the last lease it renewed

    counts = sweep(app)
    upstream.gate.set()

    assert counts["failed"] == 1
    assert hung.join() is None  # its late answer is not written over the failure
    row = job_row(app, job_id)
    assert row.status == "failed"
    assert row.error["type"].endswith("/job-timeout")
    assert row.result_body is None


def test_a_job_claimed_more_than_job_max_attempts_times_fails_as_abandoned(jobs_app, upstream):
    app = jobs_app(JOB_MAX_ATTEMPTS=2)
    client = app.test_client()
    job_id = client.post("/async/anything").json["id"]
    set_job(app, job_id, status="running", attempts=2, started_at=ago(120), lease_expires_at=ago(1))

    assert run(app, job_id) == "failed"

    job = client.get(f"{PREFIX}/{job_id}").json
    assert job["error"]["type"].endswith("/job-abandoned")
    assert job["error"]["status"] == 500
    assert job["attempts"] == 3
    assert upstream.seen == []


# --- cancel ------------------------------------------------------------------------------


def test_a_job_canceled_before_it_started_is_never_sent(app, client, upstream):
    job_id = client.post("/async/anything").json["id"]

    canceled = client.delete(f"{PREFIX}/{job_id}")

    assert canceled.status_code == 200
    assert canceled.json["status"] == "canceled"
    assert canceled.json["finished_at"] is not None
    assert run(app, job_id) is None
    assert upstream.seen == []
    polled = client.get(f"{PREFIX}/{job_id}")
    assert polled.json["status"] == "canceled"
    assert "Retry-After" not in polled.headers
    assert [event.type for event in events(app, job_id)] == ["job.canceled"]


def test_a_request_canceled_while_running_discards_the_upstreams_answer(app, client, upstream):
    job_id = client.get("/async/gate/one").json["id"]
    background = Background(app, job_id)
    upstream.wait_entered()

    canceled = client.delete(f"{PREFIX}/{job_id}")
    upstream.gate.set()

    assert canceled.status_code == 200
    assert background.join() is None
    row = job_row(app, job_id)
    assert (row.status, row.result_status, row.result_body) == ("canceled", None, None)
    assert [event.type for event in events(app, job_id)] == ["job.canceled"]


@pytest.mark.parametrize("run_first", ["succeeded", "failed"])
def test_canceling_a_final_job_is_a_409(app, client, upstream, run_first):
    job_id = client.post("/async/anything" if run_first == "succeeded" else "/dead/x").json["id"]
    assert run(app, job_id) == run_first

    response = client.delete(f"{PREFIX}/{job_id}")

    assert response.status_code == 409
    assert response.json["type"].endswith("/job-final")
    assert run_first in response.json["detail"]
    assert job_row(app, job_id).status == run_first
    assert [event.type for event in events(app, job_id)] == [f"job.{run_first}"]


def test_final_statuses_and_queue_waits_are_counted(app, client, upstream):
    def counted(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    succeeded, canceled = counted("frontdoor_jobs_total", status="succeeded"), counted("frontdoor_jobs_total", status="canceled")
    waits = counted("frontdoor_job_queue_wait_seconds_count")
    done = client.post("/async/anything", data=b"x").json["id"]
    dropped = client.post("/async/anything", data=b"y").json["id"]

    assert run(app, done) == "succeeded"
    assert client.delete(f"{PREFIX}/{dropped}").status_code in (200, 202)
    assert run(app, dropped) is None  # a canceled job never starts

    assert counted("frontdoor_jobs_total", status="succeeded") == succeeded + 1
    assert counted("frontdoor_jobs_total", status="canceled") == canceled + 1
    assert counted("frontdoor_job_queue_wait_seconds_count") == waits + 1  # only the job that started


@pytest.mark.postgres
def test_a_job_whose_database_connection_is_cut_during_its_call_still_ends_once(jobs_app, postgres_database, upstream):
    # PostgreSQL ends the worker's sessions (a restart, an idle timeout) while the upstream call runs.
    import psycopg

    app = jobs_app(SQLALCHEMY_DATABASE_URI=postgres_database)
    client = app.test_client()
    job_id = client.post("/async/gate/cut").json["id"]
    worker_thread = Background(app, job_id)
    upstream.wait_entered()
    with psycopg.connect(postgres_database, autocommit=True) as admin:
        cut = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    assert cut >= 1
    upstream.gate.set()

    assert worker_thread.join() == "succeeded"
    assert job_row(app, job_id).result_body == b"released"
    assert [event.type for event in events(app, job_id)] == ["job.succeeded"]
