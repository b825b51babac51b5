"""``/_gateway/openapi.json`` and ``/_gateway/docs``: a valid OpenAPI 3.1 document that covers
every view under the prefix, built from the models the handlers validate with."""
from __future__ import annotations

import re

import pytest
from flask import Blueprint
from openapi_spec_validator import validate
from pydantic import ValidationError

from app.api import schemas
from app.api.common import Reply, Undocumented, body, operation, reply
from app.api.consumers import ConsumerCreate, ConsumerUpdate
from app.api.openapi import REF
from app.auth.views import policy
from tests.services import logged
from tests.unit.api.support import problem

PREFIX = "/_gateway"
AUTOMATIC = {"HEAD", "OPTIONS"}


def served(client) -> dict:
    response = client.get(f"{PREFIX}/openapi.json")  # no credential: the document is public
    assert response.status_code == 200
    assert response.content_type == "application/json"
    return response.json


def operations(document: dict) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in document["paths"].items() for method in item}


def url_rules(app) -> set[tuple[str, str]]:
    """Every (path, method) the app routes under the prefix, as OpenAPI writes the path; not
    the portal's pages (HTML for people: tests/unit/portal)."""
    return {
        (re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule), method)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith(PREFIX + "/") and not rule.endpoint.startswith("portal.")
        for method in rule.methods - AUTOMATIC
    }


def view_of(app, document: dict, path: str, method: str):
    return app.view_functions[document["paths"][path][method.lower()]["operationId"]]


def test_the_served_document_is_valid_openapi_3_1(client):
    document = served(client)
    assert document["openapi"] == "3.1.0"
    validate(document)  # openapi-spec-validator picks the 3.1 validator from "openapi"


def test_the_document_describes_every_url_rule_under_the_prefix_and_nothing_else(app, client):
    document = served(client)
    assert operations(document) == url_rules(app)
    assert ("/_gateway/webhooks/endpoints/{endpoint_id}", "PATCH") in operations(document)
    assert ("/_gateway/openapi.json", "GET") in operations(document)


def test_a_view_without_an_operation_is_missing_from_the_document_so_the_comparison_fails(make_app):
    app = make_app()
    extra = Blueprint("extra", __name__)

    @extra.get("/extra/<thing_id>")
    def undocumented(thing_id: str):
        return {}

    app.register_blueprint(extra, url_prefix=PREFIX)
    document = served(app.test_client())
    assert url_rules(app) - operations(document) == {("/_gateway/extra/{thing_id}", "GET")}


def test_request_bodies_are_the_models_the_handlers_validate_with(app, client):
    document = served(client)
    components = document["components"]["schemas"]
    bodies = 0
    for path, item in document["paths"].items():
        for method, entry in item.items():
            declared = view_of(app, document, path, method).operation.body
            if "requestBody" not in entry:
                assert declared is None, (path, method)
                continue
            bodies += 1
            ref = entry["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            name = ref.rpartition("/")[2]
            assert name == declared.__name__
            expected = declared.model_json_schema(ref_template=REF)
            expected.pop("$defs", None)
            assert components[name] == expected, (path, method)
    assert bodies == 9  # consumers 2, keys 2, jobs 1, webhooks 3, events 1


def test_a_body_validated_with_another_model_than_the_declared_one_is_a_programming_error(make_app):
    app = make_app()
    bp = Blueprint("drift", __name__)

    @bp.post("/drift")
    @policy("none")
    @operation("Drift", {200: Reply(schemas.Purged, "n")}, body=ConsumerCreate)
    def drift():
        body(ConsumerUpdate)
        return reply(schemas.Purged, {"deleted": 0})

    @bp.get("/extra-key")
    @policy("none")
    @operation("Extra", {200: Reply(schemas.Purged, "n")})
    def extra_key():
        return reply(schemas.Purged, {"deleted": 0, "also": 1})

    @bp.get("/other-model")
    @policy("none")
    @operation("Other", {200: Reply(schemas.Purged, "n")})
    def other_model():
        return reply(schemas.EndpointSecret, {"secret": "x"})

    app.register_blueprint(bp, url_prefix=PREFIX)
    client = app.test_client()
    for method, url, error, names in (
        ("POST", "/drift", Undocumented, "ConsumerUpdate"),
        ("GET", "/extra-key", ValidationError, "also"),
        ("GET", "/other-model", Undocumented, "EndpointSecret"),
    ):
        with logged("frontdoor.errors") as records:
            problem(client.open(PREFIX + url, method=method, json={"name": "x"}), 500)
        (record,) = records.records
        assert isinstance(record.exc_info[1], error)
        assert names in str(record.exc_info[1])


def test_security_follows_each_views_auth_policy(client):
    paths = served(client)["paths"]
    schemes = served(client)["components"]["securitySchemes"]
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "An API key"}
    assert schemes["bearer"]["scheme"] == "bearer"
    assert paths["/_gateway/consumers"]["get"]["security"] == [{"apiKey": ["admin"]}, {"bearer": ["admin"]}]
    assert paths["/_gateway/webhooks/endpoints"]["get"]["security"] == [{"apiKey": []}, {"bearer": []}]
    assert paths["/_gateway/jobs"]["post"]["security"] == [{"apiKey": []}, {"bearer": []}, {}]
    assert paths["/_gateway/openapi.json"]["get"]["security"] == []


def test_error_responses_are_problem_json_with_the_statuses_the_handlers_raise(client):
    document = served(client)
    paths = document["paths"]

    def statuses(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    assert statuses("/_gateway/consumers", "post") == {"201", "400", "401", "403", "409", "413", "422", "429", "503"}
    assert statuses("/_gateway/jobs/{job_id}", "delete") == {"200", "400", "401", "404", "409", "410", "429", "503"}
    assert statuses("/_gateway/keys", "get") == {"200", "400", "401", "429", "503"}
    assert statuses("/_gateway/openapi.json", "get") == {"200", "400", "429", "503"}
    unprocessable = document["components"]["responses"]["UnprocessableContent"]
    assert list(unprocessable["content"]) == ["application/problem+json"]
    assert unprocessable["content"]["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/ValidationProblem"}


def test_the_docs_page_is_served_without_credentials_and_points_at_the_document(client):
    response = client.get(f"{PREFIX}/docs")
    assert response.status_code == 200
    assert response.content_type == "text/html; charset=utf-8"
    page = response.get_data(as_text=True)
    assert 'href="/_gateway/openapi.json"' in page
    assert 'data-spec="/_gateway/openapi.json"' in page
    # Every file the page loads is the gateway's own, and the page runs no inline script.
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and all(source.startswith("/_gateway/") for source in sources), sources
    assert "<script>" not in page and "script-src" not in response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assets = [source for source in sources if source.startswith(f"{PREFIX}/docs/assets/")]
    assert len(assets) == 4, sources  # the icon, the stylesheet, Swagger UI and the page's script
    for source in assets:
        with client.get(source) as asset:
            assert asset.status_code == 200, source
            assert asset.headers["ETag"] and asset.cache_control.max_age == 86400
        with client.get(source, headers={"If-None-Match": asset.headers["ETag"]}) as again:
            assert again.status_code == 304
    with client.get(f"{PREFIX}/docs/assets/swagger-ui-bundle.js") as bundle:
        assert bundle.content_type.startswith(("text/javascript", "application/javascript")) and b"SwaggerUIBundle" in bundle.data


@pytest.mark.parametrize("name", ["index.html", "swagger-editor.js", "..%2F__init__.py", "LICENSE"])
def test_the_docs_serve_only_their_own_assets(client, name):
    response = client.get(f"{PREFIX}/docs/assets/{name}")
    assert response.status_code == 404
    assert response.content_type == "application/problem+json"


def test_a_response_fits_the_schema_the_document_gives_it(client, admin):
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    document = served(client)
    created = client.post(f"{PREFIX}/consumers", json={"name": "acme"}, headers=admin)
    assert created.status_code == 201
    listed = client.get(f"{PREFIX}/consumers", headers=admin)
    registry = Registry().with_resource("urn:doc", Resource.from_contents({**document, "$schema": "https://json-schema.org/draft/2020-12/schema"}))
    for response, path, status in ((created, "/_gateway/consumers", "201"), (listed, "/_gateway/consumers", "200")):
        method = "post" if status == "201" else "get"
        ref = document["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        Draft202012Validator({"$ref": "urn:doc" + ref}, registry=registry).validate(response.json)
    assert [consumer["name"] for consumer in listed.json["data"]] == ["acme", "root"]


@pytest.mark.parametrize(
    ("url", "payload", "field"),
    [
        ("/keys", {"expires_in": 3.8e15}, "expires_in"),
        ("/keys/{key}/rotate", {"expire_old_in": 1.1e307}, "expire_old_in"),
    ],
)
def test_a_lifetime_beyond_a_hundred_years_is_a_422_not_an_overflow(client, admin, url, payload, field):
    # Found by schemathesis: timedelta(seconds=...) overflowed into a 500.
    key = client.post(f"{PREFIX}/keys", json={}, headers=admin).json["id"]
    problem(client.post(PREFIX + url.format(key=key), json=payload, headers=admin), 422, field)


def test_an_id_in_a_path_is_documented_as_long_as_its_column_at_most(client):
    from app.models import Consumer, Job

    paths = served(client)["paths"]

    (consumer,) = paths["/_gateway/consumers/{consumer_id}"]["get"]["parameters"]
    assert consumer["schema"] == {"type": "string", "minLength": 1, "maxLength": Consumer.id.type.length}
    job = paths["/_gateway/jobs/{job_id}/result"]["get"]
    assert job["parameters"][0]["schema"]["maxLength"] == Job.id.type.length
    assert "404" in job["responses"]
    (name,) = paths["/_gateway/admin/upstreams/{name}"]["get"]["parameters"]
    assert name["schema"] == {"type": "string"}  # an upstream's name, not a row's id
