"""Waiting on a job (``GET /_gateway/jobs/{id}?wait=N``): the answer comes once the job is final,
or when the wait is over; with Redis (pub/sub) and on the embedded default (polling)."""
from __future__ import annotations

import threading
import time

import pytest

from app.extensions import new_redis
from app.jobs.waiting import RedisJobEnds
from tests.services import free_port
from tests.unit.jobs.support import PREFIX, Background, job_row, submit

BACKENDS = [
    pytest.param("embedded", id="embedded"),
    pytest.param("redis", marks=pytest.mark.redis, id="redis"),
]


@pytest.fixture
def waiting_app(request, jobs_app):
    """``waiting_app(**config)``: the job app on the backend the test is parametrized with."""

    def build(**config):
        if request.param == "redis":
            config.setdefault("REDIS_URL", request.getfixturevalue("redis_url"))
        return jobs_app(**config)

    return build


class Waiting:
    """A ``GET ...?wait=`` sent from a thread of its own, as a second client would."""

    def __init__(self, app, url: str):
        self.response = None
        self.started = threading.Event()

        def target() -> None:
            client = app.test_client()
            self.started.set()
            self.response = client.get(url)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        self.started.wait(5)

    def result(self, timeout: float = 10.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the wait did not answer"
        return self.response


def started_job(app, upstream) -> tuple[str, Background]:
    """A job whose worker is in its upstream call (held by the upstream's gate)."""
    response = submit(app.test_client(), {"path": "/async/gate/1"})
    assert response.status_code == 202, response.json
    job_id = response.json["id"]
    worker = Background(app, job_id)
    upstream.wait_entered()
    return job_id, worker


@pytest.mark.parametrize("waiting_app", BACKENDS, indirect=True)
def test_a_wait_answers_with_the_job_once_its_worker_has_finished_it(waiting_app, upstream):
    app = waiting_app()
    job_id, worker = started_job(app, upstream)
    waiting = Waiting(app, f"{PREFIX}/{job_id}?wait=20")
    time.sleep(0.2)  # the wait is under way before the job ends
    assert waiting.thread.is_alive()
    upstream.gate.set()
    assert worker.join() == "succeeded"
    response = waiting.result()
    assert response.status_code == 200
    assert response.json["status"] == "succeeded"
    assert response.json["resourceLocation"].endswith(f"{PREFIX}/{job_id}/result")
    assert "Retry-After" not in response.headers


@pytest.mark.parametrize("waiting_app", BACKENDS, indirect=True)
def test_a_cancel_ends_a_wait(waiting_app, upstream):
    app = waiting_app()
    response = submit(app.test_client(), {"path": "/async/get"})  # no worker runs it
    job_id = response.json["id"]
    waiting = Waiting(app, f"{PREFIX}/{job_id}?wait=20")
    time.sleep(0.2)
    assert app.test_client().delete(f"{PREFIX}/{job_id}").status_code == 200
    answer = waiting.result()
    assert answer.status_code == 200
    assert answer.json["status"] == "canceled"


@pytest.mark.parametrize("waiting_app", BACKENDS, indirect=True)
def test_a_wait_on_a_final_job_answers_it_at_once(waiting_app, upstream):
    app = waiting_app()
    client = app.test_client()
    job_id = submit(client, {"path": "/async/get"}).json["id"]
    assert Background(app, job_id).join() == "succeeded"
    response = client.get(f"{PREFIX}/{job_id}?wait=20")
    assert response.status_code == 200
    assert response.json["status"] == "succeeded"


@pytest.mark.parametrize("waiting_app", BACKENDS, indirect=True)
def test_a_wait_longer_than_job_wait_max_is_cut_to_it(waiting_app, upstream):
    # AIP-151: the server may end a wait before the time asked for; the job is answered as it is.
    app = waiting_app(JOB_WAIT_MAX=0.3)
    client = app.test_client()
    job_id = submit(client, {"path": "/async/get"}).json["id"]  # no worker runs it
    asked = time.monotonic()
    response = client.get(f"{PREFIX}/{job_id}?wait=360000000000000000000.5")
    assert time.monotonic() - asked < 30  # not the ages asked for
    assert response.status_code == 200
    assert response.json["status"] == "notStarted"
    assert response.headers["Retry-After"] == "1"


@pytest.mark.parametrize("value", ["abc", "-1", "", "1e3", "nan", "inf", "1,5", "0x10", " 5"])
def test_a_wait_that_is_not_a_number_of_seconds_is_a_400_naming_it(app, client, upstream, value):
    job_id = submit(client, {"path": "/async/get"}).json["id"]
    response = client.get(f"{PREFIX}/{job_id}", query_string={"wait": value})
    assert response.status_code == 400
    assert response.content_type == "application/problem+json"
    problem = response.json
    assert problem["type"].endswith("/bad-request")
    assert problem["detail"].startswith("wait must be a number of seconds")
    assert problem["errors"] == [{"field": "wait", "message": "must be a number of seconds, at least 0"}]


def test_a_wait_of_zero_answers_at_once(app, client, upstream):
    job_id = submit(client, {"path": "/async/get"}).json["id"]
    response = client.get(f"{PREFIX}/{job_id}?wait=0")
    assert response.status_code == 200
    assert response.json["status"] == "notStarted"


def test_a_wait_on_an_unknown_or_someone_elses_job_is_a_404(app, client, identity, upstream):
    alice = {"X-API-Key": identity.key(identity.consumer("alice"))}
    job_id = submit(client, {"path": "/async/get"}, headers=alice).json["id"]
    assert client.get(f"{PREFIX}/job_unknown?wait=5").status_code == 404
    assert client.get(f"{PREFIX}/{job_id}?wait=5").status_code == 404  # anonymous: not alice's job


@pytest.mark.parametrize("waiting_app", BACKENDS, indirect=True)
def test_a_waiting_request_leaves_the_database_connection_to_others(waiting_app, upstream):
    # One connection in the pool: had the wait kept it, the read beside it would time out (503).
    app = waiting_app(
        JOB_WAIT_MAX=3,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0, "pool_timeout": 1, "hide_parameters": True},
    )
    client = app.test_client()
    job_id = submit(client, {"path": "/async/get"}).json["id"]
    waiting = Waiting(app, f"{PREFIX}/{job_id}?wait=3")
    time.sleep(0.3)
    assert waiting.thread.is_alive()
    beside = client.get(f"{PREFIX}/{job_id}")
    assert beside.status_code == 200, beside.json
    assert waiting.result().json["status"] == "notStarted"


def dead_redis() -> RedisJobEnds:
    """Announcements and waits on a Redis that nothing listens on."""
    return RedisJobEnds(new_redis(f"redis://127.0.0.1:{free_port()}/0"), "test")


def test_a_wait_still_answers_when_redis_cannot_be_reached(app, upstream):
    app.extensions["job_ends"] = dead_redis()
    job_id, worker = started_job(app, upstream)
    waiting = Waiting(app, f"{PREFIX}/{job_id}?wait=20")
    time.sleep(0.2)
    upstream.gate.set()
    assert worker.join() == "succeeded"  # the announcement failed; the job's end is stored all the same
    response = waiting.result()
    assert response.status_code == 200
    assert response.json["status"] == "succeeded"
    assert job_row(app, job_id).status == "succeeded"


@pytest.mark.redis
def test_a_threads_waits_one_after_another_wake_only_on_their_own_jobs_end(redis_url, key_prefix):
    # One subscription connection serves a thread's waits in turn: what an earlier wait leaves
    # behind (its job's end announced late) does not end a later wait on another job.
    ends = RedisJobEnds(new_redis(redis_url), key_prefix)
    with ends.listen("job_a") as first:
        ends.announce("job_a", "succeeded")
        assert first.wait(5) is True
    ends.announce("job_a", "succeeded")  # again, after that wait is over
    with ends.listen("job_b") as second:
        assert second.wait(0.3) is False
        ends.announce("job_b", "failed")
        assert second.wait(5) is True
    ends.close()


@pytest.mark.parametrize("waiting_app", BACKENDS, indirect=True)
def test_a_job_that_ends_between_the_first_read_and_the_subscription_is_answered_final(waiting_app, upstream):
    # Its end is announced before the wait listens: the read after subscribing must see it.
    from app.extensions import db
    from app.jobs import waiting
    from app.jobs.resource import owned
    from tests.unit.jobs.support import set_job

    app = waiting_app()
    job_id = submit(app.test_client(), {"path": "/async/get"}).json["id"]
    reads = []

    def read():
        job = owned(job_id, None)
        if not reads:  # the worker ends the job right after the first read
            set_job(app, job_id, status="succeeded")
            waiting.announce(job_id, "succeeded")
        reads.append(job.status)
        return job

    with app.test_request_context():
        job = waiting.wait_for_end(job_id, 3, read)
        db.session.close()
    assert job.status == "succeeded"
    assert reads == ["notStarted", "succeeded"]
