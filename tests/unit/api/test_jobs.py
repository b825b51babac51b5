"""``/_gateway/jobs``: submit requests and batches, validation, listing, ownership, result, cancel."""
from __future__ import annotations

import base64
import json

import pytest

from app.extensions import db
from tests.factories import Identity
from tests.unit.api.support import all_pages, auth
from tests.unit.jobs.support import (
    PREFIX,
    job_count,
    job_row,
    routes,
    run,
    submit,
    submit_batch,
)


@pytest.fixture
def jobs_app(make_app, upstream):
    def build(**config):
        app = make_app(routes=routes(upstream.url), **config)
        with app.app_context():
            db.create_all()
        return app

    return build


@pytest.fixture
def app(jobs_app):
    return jobs_app()


@pytest.fixture
def alice(identity) -> dict[str, str]:
    return auth(identity.key(identity.consumer("alice"), scopes=("reports",)))


@pytest.fixture
def bob(identity) -> dict[str, str]:
    return auth(identity.key(identity.consumer("bob"), scopes=("reports",)))


def result_of(app, client, job_id: str, headers: dict[str, str] | None = None):
    assert run(app, job_id) == "succeeded"
    return client.get(f"{PREFIX}/{job_id}/result", headers=headers or {})


# --- submitting --------------------------------------------------------------------------


def test_a_request_job_is_accepted_with_its_status_url_and_runs_through_its_route(app, client, alice, upstream):
    response = submit(
        client,
        {"method": "put", "path": "/sync/anything/7", "query": {"tag": ["a", "b"], "v": "1"}, "json": {"n": 7}, "headers": {"X-Thing": "yes"}},
        headers=alice,
    )

    assert response.status_code == 202
    job = response.json
    assert job["status"] == "notStarted"
    assert job["route"] == "sync"
    assert job["request"] == {"method": "PUT", "path": "/sync/anything/7", "query": "tag=a&tag=b&v=1"}
    assert response.headers["Location"] == response.headers["Operation-Location"] == f"http://localhost{PREFIX}/{job['id']}"
    assert response.headers["Retry-After"] == "1"
    assert upstream.seen == []
    seen = json.loads(result_of(app, client, job["id"], alice).data)
    assert upstream.seen == [("PUT", "/anything/7")]
    assert seen["args"] == {"tag": ["a", "b"], "v": "1"}
    assert seen["json"] == {"n": 7}
    assert seen["headers"]["Content-Type"] == "application/json"
    assert seen["headers"]["X-Thing"] == "yes"
    assert seen["headers"]["X-Consumer-Username"] == "alice"


def test_a_body_given_as_base64_is_sent_as_those_bytes(app, client, upstream):
    raw = bytes(range(200, 256))

    response = submit(client, {"method": "POST", "path": "/sync/anything", "body_base64": base64.b64encode(raw).decode()})

    assert job_row(app, response.json["id"]).request_body == raw
    seen = json.loads(result_of(app, client, response.json["id"]).data)
    assert seen["headers"]["Content-Length"] == str(len(raw))
    assert base64.b64decode(seen["data"].split("base64,", 1)[1]) == raw


def test_a_text_body_is_sent_as_utf8(app, client, upstream):
    response = submit(client, {"method": "POST", "path": "/sync/anything", "body": "café", "headers": {"Content-Type": "text/plain; charset=utf-8"}})

    seen = json.loads(result_of(app, client, response.json["id"]).data)

    assert seen["data"] == "café"
    assert seen["headers"]["Content-Length"] == str(len("café".encode()))


def test_a_percent_encoded_path_is_sent_as_given(app, client, upstream):
    response = submit(client, {"path": "/sync/anything/a%2Fb c", "query": "q=%C3%A9"})

    assert response.json["request"]["path"] == "/sync/anything/a/b c"
    result_of(app, client, response.json["id"])
    assert upstream.targets == ["/anything/a%2Fb%20c?q=%C3%A9"]


@pytest.mark.parametrize("route", ["sync", "/sync"])
def test_a_request_may_name_its_route_by_name_or_path(app, client, upstream, route):
    response = submit(client, {"path": "/sync/anything", "route": route})

    assert response.status_code == 202


def test_a_batch_job_is_accepted_with_its_items_counted(app, client, upstream):
    response = submit_batch(client, [{"path": "/sync/anything"}, {"method": "POST", "path": "/post", "body": "tiny"}])

    assert response.status_code == 202
    assert response.json["kind"] == "batch"
    assert response.json["items"] == {"total": 2, "notStarted": 2}
    assert response.json["route"] == "small, sync"
    assert "request" not in response.json
    assert run(app, response.json["id"]) == "succeeded"
    items = client.get(f"{PREFIX}/{response.json['id']}/result").json["items"]
    assert [(item["request"]["route"], item["response"]["status"]) for item in items] == [("sync", 200), ("small", 200)]


def test_malformed_json_is_a_400(app, client):
    response = client.post(PREFIX, data=b'{"kind": "request", ', content_type="application/json")

    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json["detail"].startswith("The request body is not valid JSON: EOF while parsing")
    assert job_count(app) == 0


def test_a_body_over_max_body_size_is_a_413(jobs_app):
    app = jobs_app(MAX_BODY_SIZE=200)

    response = submit(app.test_client(), {"method": "POST", "path": "/sync/anything", "body": "x" * 300})

    assert response.status_code == 413
    assert job_count(app) == 0


INVALID = [
    ({"kind": "request", "request": {"path": "/sync/x"}, "priority": 1}, "priority", "Extra inputs"),
    ({"kind": "request", "request": {"path": "/sync/x", "colour": "red"}}, "request.colour", "Extra inputs"),
    ({"kind": "stream", "request": {"path": "/sync/x"}}, "kind", "'request' or 'batch'"),
    ({"kind": "batch", "request": {"path": "/sync/x"}}, "body", "a batch job takes 'requests'"),
    ({"kind": "request", "requests": [{"path": "/sync/x"}]}, "body", "a request job takes 'request'"),
    ({"kind": "batch", "requests": {"path": "/sync/x"}}, "requests", "valid list"),
    ({"request": {"method": "TRACE", "path": "/sync/x"}}, "request.method", "GET"),
    ({"request": {"path": "sync/x"}}, "request.path", "starting with '/'"),
    ({"request": {"path": "/sync/x?a=1"}}, "request.path", "use 'query'"),
    ({"request": {"path": "/nowhere/at/all"}}, "request.path", "no route matches /nowhere/at/all"),
    ({"request": {"path": "/_gateway/jobs"}}, "request.path", "the gateway's own paths"),
    ({"request": {"path": "/healthz"}}, "request.path", "the gateway's own paths"),
    ({"request": {"method": "GET", "path": "/post"}}, "request.method", "GET is not allowed on /post; allowed: POST"),
    ({"request": {"path": "/sync/x", "route": "open"}}, "request.route", "served by route 'sync', not 'open'"),
    ({"request": {"method": "POST", "path": "/post", "body": "x" * 11}}, "request.body", "11 bytes exceeds the route's limit of 10 bytes"),
    ({"request": {"method": "POST", "path": "/post", "json": "x" * 20}}, "request.body", "exceeds the route's limit"),
    ({"request": {"method": "POST", "path": "/sync/x", "body_base64": "not base64!"}}, "request.body_base64", "is not valid base64"),
    ({"request": {"method": "POST", "path": "/sync/x", "body": "a", "json": 1}}, "request", "give one of body, body_base64 and json"),
    ({"request": {"path": "/sync/x", "headers": {"Bad Name": "v"}}}, "request.headers", "not a valid header field name"),
    ({"request": {"path": "/sync/x", "headers": {"X-Split": "a\r\nX-Injected: 1"}}}, "request.headers", "characters a header field cannot carry"),
    ({"kind": "batch", "requests": [{"path": "/sync/x"}, {"path": "/nowhere"}]}, "requests.1.path", "no route matches /nowhere"),
    ({"kind": "batch", "requests": []}, "requests", "a batch holds 1 to 100 requests"),
]


@pytest.mark.parametrize(("payload", "field", "message"), INVALID, ids=[case[1] + ":" + case[2][:24] for case in INVALID])
def test_an_invalid_submission_is_a_422_naming_the_field(app, client, upstream, payload, field, message):
    response = client.post(PREFIX, json=payload)

    assert response.status_code == 422, response.json
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json["type"].endswith("/invalid-request")
    fields = {error["field"]: error["message"] for error in response.json["errors"]}
    assert field in fields, fields
    assert message in fields[field]
    assert response.json["detail"].startswith(field)
    assert job_count(app) == 0
    assert upstream.seen == []


def test_a_batch_over_job_batch_max_is_a_422(jobs_app):
    app = jobs_app(JOB_BATCH_MAX=2)

    response = submit_batch(app.test_client(), [{"path": "/sync/anything"}] * 3)

    assert response.status_code == 422
    assert response.json["errors"] == [{"field": "requests", "message": "a batch holds 1 to 2 requests (JOB_BATCH_MAX); got 3"}]
    assert job_count(app) == 0
    assert submit_batch(app.test_client(), [{"path": "/sync/anything"}] * 2).status_code == 202


def test_a_target_routes_auth_and_scopes_apply_to_the_submitter(app, client, identity, alice, upstream):
    request = {"method": "POST", "path": "/reports/anything"}
    unscoped = auth(identity.key(scopes=("other",)))

    missing = submit(client, request)
    lacking = submit(client, request, headers=unscoped)
    batch = submit_batch(client, [{"path": "/sync/anything"}, request], headers=unscoped)
    allowed = submit(client, request, headers=alice)

    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert lacking.status_code == 403
    assert batch.status_code == 403
    assert allowed.status_code == 202
    assert job_count(app) == 1


def test_a_route_with_auth_none_is_sent_no_consumer_identity(app, client, alice, upstream):
    job_id = submit(client, {"path": "/open/anything"}, headers=alice).json["id"]

    seen = json.loads(result_of(app, client, job_id, alice).data)

    assert not [name for name in seen["headers"] if name.lower().startswith("x-consumer-")]


def test_sub_requests_count_against_their_routes_rate_limit(app, client, upstream):
    never = submit_batch(client, [{"path": "/limited/anything"}] * 3)

    assert never.status_code == 422  # more calls than the limit allows in a whole window
    assert never.json["type"].endswith("/over-rate-limit")
    assert "limited" in never.json["detail"]
    assert job_count(app) == 0
    within = submit_batch(client, [{"path": "/limited/anything"}] * 2, headers={"Idempotency-Key": "two"})
    assert within.status_code == 202
    replayed = submit_batch(client, [{"path": "/limited/anything"}] * 2, headers={"Idempotency-Key": "two"})
    assert replayed.status_code == 202  # a repeat is not charged again
    assert replayed.json["id"] == within.json["id"]
    over = submit(client, {"path": "/limited/anything"})
    assert over.status_code == 429
    assert int(over.headers["Retry-After"]) >= 1
    assert job_count(app) == 1
    assert client.get("/limited/anything").status_code == 429  # the job used the caller's budget
    assert submit(client, {"path": "/sync/anything"}).status_code == 202  # other routes are not affected


def test_an_invalid_credential_is_refused_even_for_an_open_route(app, client, upstream):
    response = submit(client, {"path": "/sync/anything"}, headers=auth("fd_not_a_real_key"))

    assert response.status_code == 401
    assert job_count(app) == 0


@pytest.mark.parametrize("path", ["/open/../reports/anything", "/sync/./anything", "/open/%2e%2e/reports/x"])
def test_a_path_with_dot_segments_is_refused_as_the_proxy_refuses_it(app, client, upstream, path):
    # "/open/../reports" would be routed by "/open" (auth none) and mean "/reports" upstream.
    response = submit_batch(client, [{"path": "/sync/anything"}, {"path": path}])

    assert response.status_code == 422
    assert response.json["errors"] == [{"field": "requests.1.path", "message": "must not contain '.' or '..' segments"}]
    assert job_count(app) == 0


@pytest.mark.parametrize(("path", "what"), [("/open/x;y", "a ';' path parameter"), ("/open/x%5cy", "a backslash")])
def test_an_ambiguous_path_is_refused_as_the_proxy_refuses_it(app, client, upstream, path, what):
    response = submit_batch(client, [{"path": "/sync/anything"}, {"path": path}])

    assert response.status_code == 422
    [error] = response.json["errors"]
    assert error["field"] == "requests.1.path" and what in error["message"]
    assert job_count(app) == 0


# --- idempotency -------------------------------------------------------------------------


def test_the_same_key_and_request_answer_the_same_job(app, client, alice, upstream):
    headers = {**alice, "Idempotency-Key": "batch-1"}
    requests = [{"path": "/sync/anything"}, {"method": "POST", "path": "/sync/anything", "json": {"a": 1}}]

    first = submit_batch(client, requests, headers=headers)
    again = submit_batch(client, requests, headers=headers)
    other = submit_batch(client, [*requests, {"path": "/sync/get"}], headers=headers)

    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json["id"] == first.json["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 422
    assert other.json["type"].endswith("/idempotency-key-reused")
    assert job_count(app) == 1


def test_the_same_key_from_two_consumers_makes_two_jobs(app, client, alice, bob, upstream):
    request = {"path": "/sync/anything"}

    mine = submit(client, request, headers={**alice, "Idempotency-Key": "k"})
    theirs = submit(client, request, headers={**bob, "Idempotency-Key": "k"})

    assert mine.json["id"] != theirs.json["id"]
    assert job_count(app) == 2


@pytest.mark.parametrize("key", ["", "k" * 256, "naïve"])
def test_an_invalid_idempotency_key_is_a_400(app, client, upstream, key):
    response = submit(client, {"path": "/sync/anything"}, headers={"Idempotency-Key": key})

    assert response.status_code == 400
    assert response.json["type"].endswith("/bad-idempotency-key")
    assert job_count(app) == 0


# --- reading, result, cancel -------------------------------------------------------------


def test_status_carries_retry_after_only_while_the_job_is_not_final(app, client, upstream):
    job_id = submit(client, {"path": "/sync/anything"}).json["id"]

    waiting = client.get(f"{PREFIX}/{job_id}")
    run(app, job_id)
    done = client.get(f"{PREFIX}/{job_id}")

    assert waiting.status_code == done.status_code == 200
    assert waiting.headers["Retry-After"] == "1"
    assert "Retry-After" not in done.headers
    assert "resourceLocation" not in waiting.json
    assert done.json["resourceLocation"] == f"http://localhost{PREFIX}/{job_id}/result"


def test_the_openapi_document_declares_the_wait_parameter_of_a_job_read(client):
    read = client.get("/_gateway/openapi.json").json["paths"][f"{PREFIX}/{{job_id}}"]["get"]
    (wait,) = [param for param in read["parameters"] if param["name"] == "wait"]
    assert wait["in"] == "query" and wait["required"] is False
    assert wait["schema"] == {"type": "number", "minimum": 0}
    assert "GATEWAY_JOB_WAIT_MAX" in wait["description"]
    assert "400" in read["responses"]


def test_the_result_is_the_upstreams_answer_as_it_was(app, client, upstream):
    direct = client.get("/sync/base64/SGVsbG8sIGpvYnMh")
    job_id = submit(client, {"path": "/sync/base64/SGVsbG8sIGpvYnMh"}).json["id"]

    result = result_of(app, client, job_id)

    assert result.status_code == direct.status_code == 200
    assert result.data == direct.data == b"Hello, jobs!"
    assert result.headers["Content-Type"] == direct.headers["Content-Type"]
    assert result.headers["Content-Length"] == "12"


def test_the_result_of_a_head_job_has_a_content_length_that_matches_its_body(app, client, upstream):
    job_id = submit(client, {"method": "HEAD", "path": "/sync/bytes/100"}).json["id"]

    result = result_of(app, client, job_id)

    assert result.status_code == 200
    assert result.data == b""
    assert result.headers.getlist("Content-Length") == ["0"]  # not the 100 the HEAD answer named
    assert result.headers["Content-Type"] == "application/octet-stream"


def test_deleting_a_job_that_has_ended_is_a_409(app, client, upstream):
    job_id = submit(client, {"path": "/sync/anything"}).json["id"]
    assert client.delete(f"{PREFIX}/{job_id}").status_code == 200

    again = client.delete(f"{PREFIX}/{job_id}")

    assert again.status_code == 409
    assert again.json["type"].endswith("/job-final")
    assert "canceled" in again.json["detail"]


# --- listing -----------------------------------------------------------------------------


def test_listing_needs_a_credential(app, client):
    response = client.get(PREFIX)

    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/problem+json"


def test_a_consumer_lists_only_its_own_jobs_newest_first(app, client, alice, bob, upstream):
    mine = [submit(client, {"path": "/sync/anything", "query": f"n={n}"}, headers=alice).json["id"] for n in range(2)]
    submit(client, {"path": "/sync/anything"}, headers=bob)
    submit(client, {"path": "/sync/anything"})  # anonymous

    response = client.get(PREFIX, headers=alice)

    assert response.status_code == 200
    assert [job["id"] for job in response.json["data"]] == mine[::-1]
    assert response.json["next_cursor"] is None


def test_listing_filters_by_status(app, client, alice, upstream):
    done, canceled, waiting = (submit(client, {"path": "/sync/anything", "query": f"n={n}"}, headers=alice).json["id"] for n in range(3))
    run(app, done)
    client.delete(f"{PREFIX}/{canceled}", headers=alice)

    def listed(status: str) -> set[str]:
        response = client.get(f"{PREFIX}?status={status}", headers=alice)
        assert response.status_code == 200
        return {job["id"] for job in response.json["data"]}

    assert listed("succeeded") == {done}
    assert listed("notStarted,canceled") == {waiting, canceled}
    assert listed("running") == set()
    unknown = client.get(f"{PREFIX}?status=succeeded,done", headers=alice)
    assert unknown.status_code == 400
    assert "done" in unknown.json["detail"]


def test_listing_pages_with_a_cursor(app, client, alice, upstream):
    ids = [submit(client, {"path": "/sync/anything", "query": f"n={n}"}, headers=alice).json["id"] for n in range(5)]

    pages = all_pages(client, PREFIX, alice, limit=2)

    assert [len(page) for page in pages] == [2, 2, 1]
    assert [job["id"] for page in pages for job in page] == ids[::-1]
    assert client.get(f"{PREFIX}?limit=0", headers=alice).status_code == 400
    assert client.get(f"{PREFIX}?cursor=garbage", headers=alice).status_code == 400


# --- ownership ---------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "suffix"), [("get", ""), ("delete", ""), ("get", "/result")])
def test_another_consumers_job_answers_like_an_unknown_one(app, client, alice, bob, upstream, method, suffix):
    theirs = submit(client, {"path": "/sync/anything"}, headers=bob).json["id"]
    call = getattr(client, method)

    response = call(f"{PREFIX}/{theirs}{suffix}", headers=alice)
    missing = call(f"{PREFIX}/job_doesnotexist{suffix}", headers=alice)

    assert (response.status_code, missing.status_code) == (404, 404)
    assert response.json["title"] == missing.json["title"] == "Not Found"
    assert response.json["detail"].replace(theirs, "ID") == missing.json["detail"].replace("job_doesnotexist", "ID")
    assert job_row(app, theirs).status == "notStarted"
    assert client.get(f"{PREFIX}/{theirs}", headers=bob).status_code == 200


@pytest.mark.parametrize("job_id", ["job_doesnotexist", "not-a-job", "job_" + "x" * 500, "%E2%98%83", "..%2F..%2Fetc"])
def test_unknown_or_garbage_ids_are_404(app, client, alice, job_id):
    for response in (
        client.get(f"{PREFIX}/{job_id}", headers=alice),
        client.delete(f"{PREFIX}/{job_id}", headers=alice),
        client.get(f"{PREFIX}/{job_id}/result", headers=alice),
    ):
        assert response.status_code == 404
        assert response.headers["Content-Type"] == "application/problem+json"


def test_an_anonymous_job_is_reached_by_its_id_alone_but_not_by_a_consumer(app, client, alice, upstream):
    job_id = submit(client, {"path": "/sync/anything"}).json["id"]
    run(app, job_id)

    assert client.get(f"{PREFIX}/{job_id}").status_code == 200
    assert client.get(f"{PREFIX}/{job_id}/result").status_code == 200
    assert client.get(f"{PREFIX}/{job_id}", headers=alice).status_code == 404
    assert client.get(f"{PREFIX}/{job_id}/result", headers=alice).status_code == 404
    assert client.delete(f"{PREFIX}/{job_id}", headers=alice).status_code == 404
    assert job_id not in {job["id"] for job in client.get(PREFIX, headers=alice).json["data"]}


def test_a_consumers_job_is_not_reached_without_its_credential(app, client, alice, upstream):
    job_id = submit(client, {"path": "/sync/anything"}, headers=alice).json["id"]

    assert client.get(f"{PREFIX}/{job_id}").status_code == 404
    assert client.delete(f"{PREFIX}/{job_id}").status_code == 404
    assert client.get(f"{PREFIX}/{job_id}", headers=alice).json["status"] == "notStarted"


def _limits_app(make_app, upstream, **config):
    app = make_app(
        routes=f"""
upstreams:
  bin:
    targets: ["{upstream.url}"]
routes:
  - path: /open
    upstream: bin
    strip_prefix: true
    auth: none
  - path: /a
    name: api
    upstream: bin
    strip_prefix: true
    rate_limit: "5/minute"
  - path: /b
    name: api
    upstream: bin
    strip_prefix: true
    rate_limit: "1/minute"
""",
        **config,
    )
    with app.app_context():
        db.create_all()
    return app


def test_calls_to_an_auth_none_route_count_against_the_anonymous_counter_a_direct_call_uses(make_app, upstream):
    app = _limits_app(make_app, upstream, RATELIMIT_PLANS={"anonymous": "2/minute"}, RATELIMIT_DEFAULT="100/minute")
    client = app.test_client()
    key = auth(Identity(app).key())
    assert [client.get("/open/anything").status_code for _ in range(2)] == [200, 200]

    # The key does not buy a second allowance: the upstream sees anonymous calls either way.
    response = submit(client, {"path": "/open/anything"}, headers=key)

    assert response.status_code == 429
    assert job_count(app) == 0


def test_a_refused_job_charges_no_route(make_app, upstream):
    app = _limits_app(make_app, upstream)
    client = app.test_client()
    assert client.get("/b/anything").status_code == 200  # /b's one call a minute is used

    refused = submit_batch(client, [{"path": "/a/anything"}, {"path": "/b/anything"}])
    assert refused.status_code == 429
    assert "'api'" in refused.json["detail"]

    # /a was tested, not charged: all five of its calls are still there.
    assert submit_batch(client, [{"path": "/a/anything"}] * 5).status_code == 202


def test_routes_sharing_a_name_keep_their_own_limits(make_app, upstream):
    app = _limits_app(make_app, upstream)
    client = app.test_client()

    response = submit_batch(client, [{"path": "/a/anything"}, {"path": "/b/anything"}, {"path": "/b/anything"}])

    assert response.status_code == 422  # two calls to /b, whose limit is one a minute
    assert response.json["type"].endswith("/over-rate-limit")


@pytest.mark.parametrize("name", ["Authorization", "x-api-key", "Cookie"])
def test_credentials_cannot_be_sent_through_a_job(app, client, name):
    response = submit(client, {"path": "/sync/anything", "headers": {name: "secret"}})

    assert response.status_code == 422
    assert response.json["errors"][0]["field"] == "request.headers"
    assert "credentials are never stored" in response.json["errors"][0]["message"]
    assert job_count(app) == 0
