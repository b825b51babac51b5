"""The conventions of the gateway's own API, walked over every operation of its OpenAPI
document: what OPTIONS/Allow list is what each path takes, every 201/202 gives Location, every
DELETE answers 200 with the resource, every problem type is a page."""
from __future__ import annotations

import pytest

from app.api.problems import catalog
from app.extensions import db
from app.webhooks import messages as webhook_messages
from tests.factories import Identity

VERBS = ("get", "put", "post", "delete", "patch")


def concrete(path: str) -> str:
    """A path of the document with each ``{param}`` filled in."""
    for name, value in (("{consumer_id}", "con_x"), ("{key_id}", "key_x"), ("{job_id}", "job_x"), ("{endpoint_id}", "ep_x"),
                        ("{message_id}", "msg_x"), ("{delivery_id}", "dlv_x"), ("{name}", "x"), ("{target}", "0"), ("{slug}", "rate-limited")):
        path = path.replace(name, value)
    assert "{" not in path, path
    return path


def test_options_lists_exactly_the_methods_each_path_takes(app, client):
    identity = Identity(app)
    admin = {"X-API-Key": identity.key(identity.consumer("root"), scopes=("admin",))}
    document = client.get("/_gateway/openapi.json").json
    for path, item in document["paths"].items():
        documented = {method.upper() for method in item if method in VERBS}
        answer = client.options(concrete(path), headers=admin)
        assert answer.status_code in (200, 204), (path, answer.status_code)
        allowed = {method.strip() for method in answer.headers["Allow"].split(",")}
        expected = documented | {"OPTIONS"} | ({"HEAD"} if "GET" in documented else set())
        assert allowed == expected, path
        # Without credentials too: Allow tells nothing about anyone's data.
        assert client.options(concrete(path)).headers.get("Allow") == answer.headers["Allow"], path


def test_every_create_gives_location_and_takes_an_idempotency_key_and_every_delete_the_resource(client):
    document = client.get("/_gateway/openapi.json").json
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method not in VERBS:
                continue
            for status in ("201", "202"):
                if status in op["responses"]:
                    assert "Location" in op["responses"][status].get("headers", {}), (method, path, status)
            if method == "post" and set(op["responses"]) & {"201", "202"}:
                headers = {param["name"] for param in op.get("parameters", []) if param["in"] == "header"}
                assert "Idempotency-Key" in headers, path
            if method == "delete":
                assert set(op["responses"]) & {"200", "204"} == {"200"}, path
                assert "application/json" in op["responses"]["200"]["content"], path


def test_every_problem_type_an_operation_may_answer_with_is_a_page(client):
    for slug in catalog():
        assert client.get(f"/_gateway/problems/{slug}").status_code == 200, slug


ROUTES = """
upstreams:
  bin:
    targets: ["{upstream}"]
routes:
  - path: /async
    upstream: bin
    strip_prefix: true
    mode: async
"""


@pytest.fixture
def resources(make_app, upstream, monkeypatch):
    """An app with one of each resource a DELETE removes, made through the API: (client, admin headers, {delete path: created})."""
    monkeypatch.setattr(webhook_messages, "fan_out_later", lambda ids: None)
    app = make_app(routes=ROUTES.format(upstream=upstream.url), WEBHOOK_SECRET_KEYS="frontdoor-test-webhook-secret-key-0123456",
                   WEBHOOK_ALLOW_HTTP=True, WEBHOOK_ALLOWED_NETWORKS=["127.0.0.0/8"])
    with app.app_context():
        db.create_all()
    identity = Identity(app)
    admin = {"X-API-Key": identity.key(identity.consumer("root"), scopes=("admin",))}
    client = app.test_client()
    made = {
        "/_gateway/keys/{key_id}": client.post("/_gateway/keys", json={"scopes": []}, headers=admin),
        "/_gateway/jobs/{job_id}": client.post("/_gateway/jobs", json={"request": {"path": "/async/get"}}, headers=admin),
        "/_gateway/webhooks/endpoints/{endpoint_id}": client.post("/_gateway/webhooks/endpoints", json={"url": f"{upstream.url}/hook"}, headers=admin),
    }
    return client, admin, made


def test_every_create_answers_an_absolute_location_and_every_delete_200_with_the_resource(resources):
    client, admin, made = resources
    document = client.get("/_gateway/openapi.json").json
    deletes = {path for path, item in document["paths"].items() if "delete" in item}
    assert deletes == {*made, "/_gateway/admin/cache"}  # a DELETE added to the API is added here
    for path, created in made.items():
        assert created.status_code in (201, 202), created.json
        assert created.headers["Location"].startswith("http://localhost/_gateway/"), created.headers["Location"]
        removed = client.delete(created.headers["Location"], headers=admin)
        assert removed.status_code == 200 and removed.is_json, path
        assert removed.json["id"] == created.json["id"], path
    purged = client.delete("/_gateway/admin/cache?prefix=/async", headers=admin)
    assert purged.status_code == 200 and purged.json == {"deleted": 0}
