"""The conventions of the gateway's own API, walked over every operation of its OpenAPI
document: what OPTIONS/Allow list is what each path takes, every 201/202 gives Location, every
DELETE answers 200 with the resource, every problem type is a page."""
from __future__ import annotations

from app.api.problems import catalog
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
