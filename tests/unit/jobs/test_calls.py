"""What a job keeps of the client's request, and what the upstream receives when the worker sends it."""
from __future__ import annotations

import json

import pytest

from tests.unit.jobs.support import PREFIX, job_row, run


def echoed(app, client, job_id: str, headers: dict[str, str] | None = None) -> dict:
    """Run the job and return what httpbin's /anything echoed of the request it received."""
    assert run(app, job_id) == "succeeded"
    result = client.get(f"{PREFIX}/{job_id}/result", headers=headers or {})
    assert result.status_code == 200, result.data
    return json.loads(result.data)


def test_the_body_query_and_headers_reach_the_upstream_when_the_worker_runs(app, client, upstream):
    body = b'{"report": "monthly", "n": 3}'

    response = client.post(
        "/async/anything/reports?month=2024-05&x=1&x=2",
        data=body,
        headers={"Content-Type": "application/json", "X-Thing": "kept", "Accept-Language": "fr"},
    )
    assert upstream.seen == []
    seen = echoed(app, client, response.json["id"])

    assert upstream.seen == [("POST", "/anything/reports")]
    assert seen["method"] == "POST"
    assert seen["url"].endswith("/anything/reports?month=2024-05&x=1&x=2")
    assert seen["args"] == {"month": "2024-05", "x": ["1", "2"]}
    assert seen["data"] == body.decode()
    assert seen["json"] == {"report": "monthly", "n": 3}
    assert seen["headers"]["Content-Type"] == "application/json"
    assert seen["headers"]["Content-Length"] == str(len(body))
    assert seen["headers"]["X-Thing"] == "kept"
    assert seen["headers"]["Accept-Language"] == "fr"


def test_the_path_and_query_reach_the_upstream_percent_encoded_as_the_client_sent_them(app, client, upstream):
    target = "/async/anything/a%2Fb%20c?q=%C3%A9&r=%26"

    response = client.post(target, environ_overrides={"RAW_URI": target})
    echoed(app, client, response.json["id"])

    assert upstream.targets == ["/anything/a%2Fb%20c?q=%C3%A9&r=%26"]


def test_the_request_id_and_forwarding_fields_of_the_submission_reach_the_upstream(app, client, upstream):
    response = client.post("/async/anything?show_env=1", headers={"X-Request-ID": "req-abc-123"})

    seen = echoed(app, client, response.json["id"])

    assert response.json["request_id"] == "req-abc-123"
    assert seen["headers"]["X-Request-Id"] == "req-abc-123"
    assert seen["headers"]["X-Forwarded-Host"] == "localhost"
    assert seen["headers"]["X-Forwarded-Proto"] == "http"
    assert seen["headers"]["Via"] == "1.1 frontdoor"


def test_the_clients_idempotency_key_reaches_the_upstream(app, client, upstream):
    response = client.post("/async/anything", data=b"x", headers={"Idempotency-Key": "pay-7"})

    seen = echoed(app, client, response.json["id"])

    assert seen["headers"]["Idempotency-Key"] == "pay-7"


@pytest.mark.parametrize("scheme", ["X-API-Key", "Authorization"])
def test_credentials_are_not_stored_with_a_job_on_a_route_with_auth_required(app, client, identity, upstream, scheme):
    key = identity.key(scopes=("reports",))
    sent = {"X-API-Key": key} if scheme == "X-API-Key" else {"Authorization": f"Bearer {key}"}

    response = client.post("/reports/anything?show_env=1", data=b"payload", headers={**sent, "X-Thing": "kept"})

    assert response.status_code == 202
    row = job_row(app, response.json["id"])
    names = {name.lower() for name, _ in row.request_headers}
    assert "x-thing" in names
    assert not names & {"x-api-key", "authorization"}
    assert key not in json.dumps([row.request_headers, row.client, row.principal, row.query])
    seen = echoed(app, client, response.json["id"], headers={"X-API-Key": key})
    assert "X-Api-Key" not in seen["headers"] and "Authorization" not in seen["headers"]


def test_credentials_and_cookies_are_never_stored_even_on_a_route_with_auth_none(app, client, upstream):
    sent = {"X-API-Key": "fd_client_key", "Authorization": "Bearer upstream-token", "Cookie": "session=s3cr3t"}

    response = client.post("/public/anything", headers={**sent, "X-Thing": "kept"})

    assert response.status_code == 202
    row = job_row(app, response.json["id"])
    assert {name.lower() for name, _ in row.request_headers} & {"x-api-key", "authorization", "cookie"} == set()
    assert not any(value in json.dumps(row.request_headers) for value in ("fd_client_key", "upstream-token", "s3cr3t"))
    seen = echoed(app, client, response.json["id"])
    assert seen["headers"]["X-Thing"] == "kept"
    assert not {"X-Api-Key", "Authorization", "Cookie"} & set(seen["headers"])


def test_the_submitters_identity_reaches_the_upstream_and_a_forged_one_does_not(app, client, identity, upstream):
    consumer = identity.consumer("acme")
    key = identity.key(consumer, scopes=("reports",))

    response = client.post(
        "/reports/anything", headers={"X-API-Key": key, "X-Consumer-ID": "con_forged", "X-Consumer-Scopes": "admin"}
    )
    seen = echoed(app, client, response.json["id"], headers={"X-API-Key": key})

    assert seen["headers"]["X-Consumer-Id"] == consumer
    assert seen["headers"]["X-Consumer-Username"] == "acme"
    assert seen["headers"]["X-Consumer-Scopes"] == "reports"


def test_an_anonymous_job_sends_no_consumer_identity(app, client, upstream):
    response = client.post("/async/anything", headers={"X-Consumer-ID": "con_forged"})

    seen = echoed(app, client, response.json["id"])

    assert not [name for name in seen["headers"] if name.lower().startswith("x-consumer-")]


def test_a_binary_body_reaches_the_upstream_unchanged(app, client, upstream):
    body = bytes(range(256))

    response = client.post("/async/anything", data=body, headers={"Content-Type": "application/octet-stream"})
    seen = echoed(app, client, response.json["id"])

    assert job_row(app, response.json["id"]).request_body == body
    assert seen["headers"]["Content-Length"] == "256"
    assert seen["data"].startswith("data:application/octet-stream;base64,")


def test_fields_named_by_connection_do_not_reach_the_upstream(app, client, upstream):
    response = client.post("/async/anything", data=b"x", headers={"Connection": "X-Hop-Secret", "X-Hop-Secret": "1"})

    seen = echoed(app, client, response.json["id"])

    assert "X-Hop-Secret" not in seen["headers"]
