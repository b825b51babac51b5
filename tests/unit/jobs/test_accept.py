"""A ``mode: async`` route: the request becomes a job (202 and its status URL); idempotency keys."""
from __future__ import annotations

import socket
import time
from contextlib import contextmanager

import pytest

from tests.services import free_port
from tests.unit.auth.support import database_down
from tests.unit.jobs.support import PREFIX, job_count, job_row, routes, run


def status_url(job_id: str, base: str = "http://localhost") -> str:
    return f"{base}{PREFIX}/{job_id}"


def test_a_request_to_an_async_route_answers_202_with_the_job_and_its_status_url(app, client, upstream):
    response = client.post("/async/anything?x=1", data=b"hello", headers={"Content-Type": "text/plain"})

    assert response.status_code == 202
    job = response.json
    assert job["id"].startswith("job_")
    assert job["status"] == "notStarted"
    assert job["kind"] == "request"
    assert job["progress"] == {"percent": 0, "message": "queued"}
    assert job["request"] == {"method": "POST", "path": "/async/anything", "query": "x=1"}
    assert job["route"] == "async"
    assert job["result"] is None and job["error"] is None and "resourceLocation" not in job
    assert response.headers["Location"] == response.headers["Operation-Location"] == status_url(job["id"])
    assert response.headers["Retry-After"] == "1"
    assert response.headers["Content-Type"] == "application/json"
    assert upstream.seen == []  # the worker makes the call, not the web process
    assert job_count(app) == 1
    polled = client.get(response.headers["Location"])
    assert polled.status_code == 200
    assert polled.json["id"] == job["id"]
    assert polled.json["status"] == "notStarted"


def test_the_retry_after_of_a_202_is_job_retry_after(jobs_app, upstream):
    client = jobs_app(JOB_RETRY_AFTER=7).test_client()

    response = client.post("/async/anything")

    assert response.status_code == 202
    assert response.headers["Retry-After"] == "7"


def test_a_body_over_the_limit_is_a_413_and_makes_no_job(jobs_app, upstream):
    app = jobs_app(MAX_BODY_SIZE=10)

    response = app.test_client().post("/async/anything", data=b"x" * 11)

    assert response.status_code == 413
    assert response.json["type"].endswith("/payload-too-large")
    assert job_count(app) == 0


FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.com", "X-Forwarded-For": "203.0.113.9"}


def test_status_urls_use_the_public_scheme_and_host_given_by_a_trusted_proxy(jobs_app, upstream):
    app = jobs_app(TRUSTED_PROXY_HOPS=1, TRUSTED_FORWARDED_HOST_HOPS=1)
    client = app.test_client()

    response = client.post("/async/anything", headers=FORWARDED)

    job_id = response.json["id"]
    assert response.headers["Location"] == status_url(job_id, "https://api.example.com")
    assert response.headers["Operation-Location"] == status_url(job_id, "https://api.example.com")
    assert run(app, job_id) == "succeeded"
    polled = client.get(f"{PREFIX}/{job_id}", headers=FORWARDED)
    assert polled.json["resourceLocation"] == f"https://api.example.com{PREFIX}/{job_id}/result"


def test_behind_herokus_router_a_clients_own_forwarded_host_is_not_the_status_urls_host(jobs_app, upstream):
    # Heroku's router (one hop) sets X-Forwarded-For/-Proto/-Port and passes X-Forwarded-Host on
    # as the client sent it: only TRUSTED_FORWARDED_HOST_HOPS makes the gateway believe it.
    client = jobs_app(TRUSTED_PROXY_HOPS=1).test_client()

    response = client.post("/async/anything", headers={**FORWARDED, "X-Forwarded-Host": "evil.example"})

    assert response.status_code == 202
    assert response.headers["Location"] == status_url(response.json["id"], "https://localhost")
    assert response.headers["Operation-Location"] == status_url(response.json["id"], "https://localhost")


def test_a_forwarded_host_is_believed_from_its_own_hop_count_alone(jobs_app, upstream):
    client = jobs_app(TRUSTED_PROXY_HOPS=0, TRUSTED_FORWARDED_HOST_HOPS=1).test_client()

    response = client.post("/async/anything", headers=FORWARDED)

    assert response.headers["Location"] == status_url(response.json["id"], "http://api.example.com")


@pytest.mark.parametrize("hops", [-1, "1", 1.5, True])
def test_a_forwarded_host_hop_count_that_is_not_a_whole_number_stops_the_app(jobs_app, upstream, hops):
    with pytest.raises(ValueError, match="GATEWAY_TRUSTED_FORWARDED_HOST_HOPS must be a whole number"):
        jobs_app(TRUSTED_FORWARDED_HOST_HOPS=hops)


def test_forwarded_scheme_and_host_are_ignored_without_trusted_proxy_hops(jobs_app, upstream):
    client = jobs_app(TRUSTED_PROXY_HOPS=0).test_client()

    response = client.post("/async/anything", headers=FORWARDED)

    assert response.status_code == 202
    assert response.headers["Location"] == status_url(response.json["id"])


def test_an_async_route_with_auth_required_refuses_a_missing_or_unscoped_credential(app, client, identity, upstream):
    unscoped = identity.key(scopes=("other",))

    missing = client.post("/reports/anything", data=b"x")
    lacking = client.post("/reports/anything", data=b"x", headers={"X-API-Key": unscoped})

    assert missing.status_code == 401
    assert lacking.status_code == 403
    assert missing.headers["Content-Type"] == lacking.headers["Content-Type"] == "application/problem+json"
    assert job_count(app) == 0


def test_a_job_submitted_with_a_credential_belongs_to_its_consumer(app, client, identity, upstream):
    consumer = identity.consumer()
    key = identity.key(consumer, scopes=("reports",))

    response = client.post("/reports/anything", headers={"X-API-Key": key})

    assert response.status_code == 202
    assert job_row(app, response.json["id"]).consumer_id == consumer
    assert client.get(response.headers["Location"]).status_code == 404  # not without the key
    assert client.get(response.headers["Location"], headers={"X-API-Key": key}).status_code == 200


# --- Idempotency-Key ---------------------------------------------------------------------


def test_the_same_key_and_body_answer_the_same_job_marked_as_replayed(app, client, upstream):
    headers = {"Idempotency-Key": "order-42", "Content-Type": "application/json"}

    first = client.post("/async/anything", data=b'{"n": 1}', headers=headers)
    again = client.post("/async/anything", data=b'{"n": 1}', headers=headers)

    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json["id"] == first.json["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert job_count(app) == 1


def test_a_replay_of_a_finished_job_answers_its_final_state_without_retry_after(app, client, upstream):
    first = client.post("/async/anything", data=b"x", headers={"Idempotency-Key": "k"})
    run(app, first.json["id"])

    again = client.post("/async/anything", data=b"x", headers={"Idempotency-Key": "k"})

    assert again.status_code == 202
    assert again.json["status"] == "succeeded"
    assert "Retry-After" not in again.headers
    assert upstream.hits("/anything") == 1


def test_the_same_key_with_another_body_is_refused_with_422_naming_the_reuse(app, client, upstream):
    first = client.post("/async/anything", data=b"one", headers={"Idempotency-Key": "k"})

    other = client.post("/async/anything", data=b"two", headers={"Idempotency-Key": "k"})

    assert other.status_code == 422
    assert other.headers["Content-Type"] == "application/problem+json"
    assert other.json["type"].endswith("/idempotency-key-reused")
    assert "Idempotency-Key" in other.json["detail"]
    assert first.json["id"] not in other.get_data(as_text=True)  # the earlier job is not disclosed
    assert job_count(app) == 1
    assert job_row(app, first.json["id"]).request_body == b"one"


def test_a_key_is_scoped_to_the_consumer(app, client, identity, upstream):
    a, b = identity.key(scopes=("reports",)), identity.key(scopes=("reports",))

    mine = client.post("/reports/anything", data=b"x", headers={"X-API-Key": a, "Idempotency-Key": "shared"})
    theirs = client.post("/reports/anything", data=b"x", headers={"X-API-Key": b, "Idempotency-Key": "shared"})

    assert (mine.status_code, theirs.status_code) == (202, 202)
    assert mine.json["id"] != theirs.json["id"]
    assert "Idempotent-Replayed" not in theirs.headers
    assert job_count(app) == 2


@pytest.mark.parametrize("key", ["", "   ", "k" * 256, "clé", "two words"], ids=["empty", "blank", "256-chars", "non-ascii", "space"])
def test_an_invalid_idempotency_key_is_a_400(app, client, upstream, key):
    response = client.post("/async/anything", data=b"x", headers={"Idempotency-Key": key})

    assert response.status_code == 400
    assert response.json["type"].endswith("/bad-idempotency-key")
    assert response.json["detail"] == "Idempotency-Key must be 1 to 255 visible ASCII characters"
    assert job_count(app) == 0


def test_a_key_of_255_visible_characters_is_accepted(app, client, upstream):
    response = client.post("/async/anything", data=b"x", headers={"Idempotency-Key": "k" * 255})

    assert response.status_code == 202
    assert job_row(app, response.json["id"]).idempotency_key == "k" * 255


def test_anonymous_clients_behind_a_trusted_proxy_do_not_share_idempotency_keys(jobs_app, upstream):
    app = jobs_app(TRUSTED_PROXY_HOPS=1)
    client = app.test_client()

    alice = client.post("/async/anything", data=b"x", headers={"Idempotency-Key": "k", "X-Forwarded-For": "203.0.113.1"})
    bob = client.post("/async/anything", data=b"x", headers={"Idempotency-Key": "k", "X-Forwarded-For": "203.0.113.2"})

    assert (alice.status_code, bob.status_code) == (202, 202)
    # Bob must not be handed Alice's job: anonymous jobs are readable by their id alone.
    assert bob.json["id"] != alice.json["id"]
    assert "Idempotent-Replayed" not in bob.headers


def test_an_async_submission_while_the_database_is_down_is_a_503_and_works_once_it_is_back(app, client, upstream):
    with database_down(app):
        refused = client.post("/async/anything", data=b"x", headers={"X-Request-ID": "req-down"})

    accepted = client.post("/async/anything", data=b"x")

    assert refused.status_code == 503
    assert refused.content_type == "application/problem+json"
    assert refused.headers["Retry-After"] == "5"
    assert refused.json == {
        "type": "/_gateway/problems/database-unavailable",
        "title": "Service Unavailable",
        "status": 503,
        "detail": "The database cannot be reached right now; retry in 5 s",
        "request_id": "req-down",
    }
    assert accepted.status_code == 202
    assert job_count(app) == 1
    assert upstream.seen == []


def test_reading_a_job_while_the_database_is_down_is_a_503_and_works_once_it_is_back(app, client, upstream):
    location = client.post("/async/anything", data=b"x").headers["Location"]

    with database_down(app):
        unavailable = client.get(location)

    assert unavailable.status_code == 503
    assert unavailable.json["type"] == "/_gateway/problems/database-unavailable"
    assert unavailable.headers["Retry-After"] == "5"
    assert client.get(location).status_code == 200


@contextmanager
def unanswering_server():
    """A TCP server that accepts connections and never says a word, as a database host behind
    a dead network path would: yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


@pytest.mark.parametrize("database", ["refusing", "not answering"])
@pytest.mark.redis
def test_a_postgres_database_that_refuses_or_never_answers_is_a_503_within_the_connect_timeout(make_app, redis_url, upstream, database):
    with unanswering_server() as silent:
        port = silent if database == "not answering" else free_port()
        url = f"postgresql://postgres@127.0.0.1:{port}/frontdoor"
        # With Redis the gateway's control record is there, so the job read is all that waits.
        app = make_app(routes=routes(upstream.url), SQLALCHEMY_DATABASE_URI=url, DATABASE_CONNECT_TIMEOUT=2, REDIS_URL=redis_url)
        started = time.monotonic()
        response = app.test_client().get(f"{PREFIX}/job_unknown")
        elapsed = time.monotonic() - started

    assert response.status_code == 503
    assert response.json["type"] == "/_gateway/problems/database-unavailable"
    assert elapsed < 2 + 1.5


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_nul_in_the_path_is_a_400_and_makes_no_job_even_where_ambiguous_paths_are_allowed(request, jobs_app, upstream, database):
    # The async route allows ambiguous paths; a job row still cannot store a NUL (PostgreSQL text).
    config = {} if database == "sqlite" else {"SQLALCHEMY_DATABASE_URI": request.getfixturevalue("postgres_database")}
    app = jobs_app(**config)

    response = app.test_client().post("/async/a%00b")

    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json["type"].endswith("/ambiguous-path")
    assert "NUL" in response.json["detail"]
    assert job_count(app) == 0


@pytest.mark.postgres
def test_submissions_racing_with_one_key_make_one_job_and_all_answer_it(jobs_app, postgres_database, upstream):
    # Whichever commits first makes the job; the others hit the unique key and answer with it.
    import threading

    app = jobs_app(SQLALCHEMY_DATABASE_URI=postgres_database)
    start = threading.Barrier(6)
    answers = []

    def submit() -> None:
        client = app.test_client()
        start.wait()
        answers.append(client.post("/async/anything", data=b'{"n": 1}', headers={"Idempotency-Key": "race-1"}))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [answer.status_code for answer in answers] == [202] * 6
    assert len({answer.json["id"] for answer in answers}) == 1
    assert sum("Idempotent-Replayed" not in answer.headers for answer in answers) == 1
    assert job_count(app) == 1


def test_a_job_comes_back_with_its_keys_in_the_same_order_from_its_202_and_from_a_read(client, upstream):
    # One resource, one JSON shape: the proxy's 202 and the API's read write the same keys in
    # the same order (not Flask's sorted order for one of them).
    import json

    accepted = client.post("/async/anything", data=b"{}", headers={"Content-Type": "application/json"})
    read = client.get(accepted.headers["Location"])

    written, served = json.loads(accepted.data), json.loads(read.data)  # dicts keep the text's order
    assert list(served) == list(written)
    assert list(served["progress"]) == list(written["progress"]) == ["percent", "message"]
