"""Batch jobs: every sub-result kept, progress, bounded concurrency, cancel between sub-requests."""
from __future__ import annotations

import base64
import time

from tests.unit.jobs.support import (
    PREFIX,
    Background,
    ago,
    events,
    item_rows,
    run,
    set_item,
    set_job,
    submit_batch,
)


def test_each_sub_result_is_kept_text_binary_or_the_problem(app, client, upstream):
    png = client.get("/sync/image/png").data
    submitted = submit_batch(
        client,
        [
            {"method": "POST", "path": "/sync/anything", "json": {"n": 1}},
            {"path": "/sync/image/png"},
            {"path": "/dead/anything"},
            {"path": "/sync/status/404"},
        ],
    )
    assert submitted.status_code == 202
    job_id = submitted.json["id"]
    assert submitted.json["kind"] == "batch"
    assert submitted.json["items"] == {"total": 4, "notStarted": 4}
    assert submitted.json["progress"] == {"percent": 0, "message": "0 of 4 requests done"}

    assert run(app, job_id) == "succeeded"

    job = client.get(f"{PREFIX}/{job_id}").json
    assert job["status"] == "succeeded"
    assert job["progress"]["percent"] == 100
    assert job["items"] == {"total": 4, "succeeded": 3, "failed": 1}
    result = client.get(f"{PREFIX}/{job_id}/result")
    assert result.status_code == 200
    items = result.json["items"]
    assert [item["index"] for item in items] == [0, 1, 2, 3]
    assert [item["status"] for item in items] == ["succeeded", "succeeded", "failed", "succeeded"]

    echoed = items[0]["response"]
    assert echoed["status"] == 200
    assert '"n": 1' in echoed["body"]
    assert ["Content-Type", "application/json"] in echoed["headers"]
    assert items[0]["request"] == {"method": "POST", "path": "/sync/anything", "query": "", "route": "sync"}

    image = items[1]["response"]
    assert "body" not in image
    assert base64.b64decode(image["body_base64"]) == png
    assert png.startswith(b"\x89PNG")

    assert items[2]["response"] is None
    assert items[2]["error"]["status"] == 502
    assert items[2]["error"]["type"].endswith("/upstream-unreachable")

    assert items[3]["response"]["status"] == 404
    assert items[3]["error"] is None


def test_progress_counts_the_sub_requests_done(jobs_app, upstream):
    app = jobs_app(JOB_BATCH_CONCURRENCY=1)
    client = app.test_client()
    job_id = submit_batch(client, [{"path": "/sync/anything"}, {"path": "/sync/gate/p"}, {"path": "/sync/anything"}]).json["id"]
    background = Background(app, job_id)
    upstream.wait_entered()

    midway = client.get(f"{PREFIX}/{job_id}")
    upstream.gate.set()

    assert midway.json["status"] == "running"
    assert midway.json["progress"] == {"percent": 33, "message": "1 of 3 requests done"}
    assert midway.json["items"] == {"total": 3, "succeeded": 1, "notStarted": 2}
    assert midway.headers["Retry-After"] == "1"
    assert background.join() == "succeeded"
    assert client.get(f"{PREFIX}/{job_id}").json["progress"]["percent"] == 100


def test_job_batch_concurrency_bounds_the_sub_requests_in_flight(jobs_app, upstream):
    app = jobs_app(JOB_BATCH_CONCURRENCY=2)
    client = app.test_client()
    job_id = submit_batch(client, [{"path": f"/sync/gate/{n}"} for n in range(4)]).json["id"]
    background = Background(app, job_id)

    # The upstream holds every sub-request until the gate opens: two arrive together (the batch
    # runs them in parallel), and no third while those two are held (the bound). The bound is
    # read at the upstream, not from the elapsed time, which a loaded machine stretches.
    upstream.wait_entered()
    upstream.wait_entered()
    time.sleep(0.3)  # room for a third, were the bound not kept
    held = upstream.in_flight
    upstream.gate.set()

    assert background.join() == "succeeded"
    assert held == 2
    assert sorted(path for _, path in upstream.seen) == [f"/gate/{n}" for n in range(4)]
    assert upstream.peak == 2


def test_a_batch_canceled_while_running_stops_before_its_next_sub_request(jobs_app, upstream):
    app = jobs_app(JOB_BATCH_CONCURRENCY=1)
    client = app.test_client()
    job_id = submit_batch(client, [{"path": "/sync/gate/first"}, {"path": "/sync/anything"}, {"path": "/sync/anything"}]).json["id"]
    background = Background(app, job_id)
    upstream.wait_entered()

    canceled = client.delete(f"{PREFIX}/{job_id}")
    upstream.gate.set()

    assert canceled.status_code == 200
    assert canceled.json["status"] == "canceled"
    assert background.join() is None
    assert upstream.seen == [("GET", "/gate/first")]
    # The answer that arrived after the cancel is not kept either (item writes are fenced).
    rows = item_rows(app, job_id)
    assert [row.status for row in rows] == ["canceled"] * 3
    assert rows[0].result_body is None
    job = client.get(f"{PREFIX}/{job_id}").json
    assert job["status"] == "canceled"
    assert job["items"] == {"total": 3, "canceled": 3}
    assert [event.type for event in events(app, job_id)] == ["job.canceled"]
    assert client.get(f"{PREFIX}/{job_id}/result").status_code == 409


def test_a_batch_canceled_before_it_started_sends_nothing(app, client, upstream):
    job_id = submit_batch(client, [{"path": "/sync/anything"}] * 2).json["id"]

    assert client.delete(f"{PREFIX}/{job_id}").json["items"] == {"total": 2, "canceled": 2}

    assert run(app, job_id) is None
    assert upstream.seen == []


def test_a_batch_taken_over_from_a_lost_worker_resumes_where_it_stopped(app, client, upstream):
    job_id = submit_batch(client, [{"path": "/sync/anything/0"}, {"path": "/sync/anything/1"}, {"path": "/sync/anything/2"}]).json["id"]
    # The first worker stored item 0, then died.
    set_item(app, job_id, 0, status="succeeded", result_status=200, result_headers=[], result_body=b"kept", finished_at=ago(30))
    set_job(app, job_id, status="running", attempts=1, started_at=ago(60), lease_expires_at=ago(1))

    assert run(app, job_id) == "succeeded"

    assert sorted(upstream.seen) == [("GET", "/anything/1"), ("GET", "/anything/2")]
    items = client.get(f"{PREFIX}/{job_id}/result").json["items"]
    assert items[0]["response"]["body"] == "kept"
    assert [item["status"] for item in items] == ["succeeded"] * 3
