"""``/_gateway/openapi.json`` (OpenAPI 3.1) and ``/_gateway/docs``, built from the views'
``@operation`` declarations and the pydantic models that validate their bodies and answers."""
from __future__ import annotations

import importlib.resources
import re
from html import escape
from importlib import metadata

from flask import Blueprint, Flask, current_app, jsonify, request, send_file, url_for
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from werkzeug.exceptions import NotFound
from werkzeug.routing import Rule
from werkzeug.wrappers import Response

from app.api import schemas
from app.api.common import Operation, Reply, operation
from app.api.inputs import ID_LENGTH
from app.auth.views import policy
from app.errors import PROBLEM_JSON
from app.identity import AUTHENTICATED, Policy

bp = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
AUTOMATIC_METHODS = frozenset({"HEAD", "OPTIONS"})  # werkzeug adds them to every GET / every rule

HEADERS = {
    "Location": "The URL of the resource",
    "Operation-Location": "The job's status URL, as ``Location``",
    "Retry-After": "Seconds to wait before asking again",
    "Idempotent-Replayed": "``true``: the answer of an earlier request with the same key or id",
}

# Problems every operation may answer, by status: (component name, description, model, headers).
PROBLEMS: dict[int, tuple[str, str, type[BaseModel], tuple[str, ...]]] = {
    400: ("BadRequest", "The body is not JSON, or a parameter is invalid (one with a control character, on any operation)", schemas.Problem, ()),
    401: ("Unauthorized", "Credentials are missing or not valid (RFC 6750)", schemas.Problem, ("WWW-Authenticate",)),
    403: ("Forbidden", "The credential lacks a scope, or may not act for that consumer", schemas.Problem, ()),
    404: ("NotFound", "No such resource, or another consumer's", schemas.Problem, ()),
    409: ("Conflict", "The resource's state does not allow it now", schemas.Problem, ("Retry-After?",)),
    410: ("Gone", "The job's result has expired", schemas.Problem, ()),
    413: ("ContentTooLarge", "The body exceeds API_MAX_BODY_SIZE (POST /jobs: MAX_BODY_SIZE); it was not read", schemas.Problem, ()),
    422: ("UnprocessableContent", "A field is wrong: ``errors`` names each", schemas.ValidationProblem, ()),
    429: ("TooManyRequests", "The caller's rate limit is spent", schemas.Problem, ("Retry-After",)),
    503: (
        "ServiceUnavailable",
        "Credentials or limits cannot be checked right now (database, JWKS or Redis unreachable)",
        schemas.Problem,
        ("Retry-After?",),
    ),
}
PROBLEM_HEADERS = {**HEADERS, "WWW-Authenticate": "The challenge (RFC 6750 section 3)"}


def openapi_path(rule: Rule) -> str:
    """``/jobs/<job_id>`` as OpenAPI writes it: ``/jobs/{job_id}``."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)


def documented_rules(app: Flask) -> list[tuple[Rule, str]]:
    """Every (rule, method) the app serves under API_PREFIX, without the automatic HEAD and
    OPTIONS and without the portal's pages (HTML for people, linked from the docs page): what
    the document must describe."""
    prefix = app.config["API_PREFIX"].rstrip("/") + "/"
    return [
        (rule, method)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith(prefix) and not rule.endpoint.startswith("portal.")
        for method in sorted((rule.methods or set()) - AUTOMATIC_METHODS)
    ]


def _headers(names: tuple[str, ...], known: dict[str, str]) -> dict:
    found = {}
    for name in names:
        bare = name.rstrip("?")
        found[bare] = {"description": known[bare], "required": not name.endswith("?"), "schema": {"type": "string"}}
    return found


def _security(view_policy: Policy) -> list[dict]:
    if view_policy.mode == "none":
        return []
    scopes = sorted(view_policy.scopes)
    options = [{"apiKey": scopes}, {"bearer": scopes}]
    return [*options, {}] if view_policy.mode == "optional" else options


def _problems(rule: Rule, op: Operation, view_policy: Policy) -> set[int]:
    """The problem statuses of ``op``: its own, and those of its policy, body and parameters.
    Every operation may answer 400 (a query parameter with a control character, ``inputs``);
    one with a body 413 and 422, one with an ``<id:...>`` in its path 404."""
    statuses = {*op.errors, 400, 429, 503}
    if view_policy.mode != "none":
        statuses.add(401)
    if view_policy.scopes:
        statuses.add(403)
    if op.body is not None:
        statuses.update((413, 422))
    if "<id:" in rule.rule:
        statuses.add(404)
    return statuses


def _content(reply: Reply, refs: dict) -> dict | None:
    if reply.model is None:
        return {reply.media: {"schema": reply.schema}} if reply.schema is not None else None
    ref = refs[(reply.model, "serialization")]
    if reply.media == "*/*":
        # Bytes the handler passes on (an upstream's answer); the model describes the JSON
        # the gateway writes itself there.
        return {reply.media: {"schema": {"anyOf": [ref, {}]}}}
    return {reply.media: {"schema": ref}}


def _links(reply: Reply, rules: list[tuple[Rule, str]]) -> dict:
    """OpenAPI links from a created resource to every operation on its URL and below it, by the
    body's ``id``: how a client (and schemathesis's stateful phase) goes from one to the next."""
    if reply.location is None:
        return {}
    target = next(rule for rule, _ in rules if rule.endpoint == reply.location)
    (argument,) = target.arguments
    base = openapi_path(target)
    return {
        f"{method.lower()}_{rule.endpoint.replace('.', '_')}": {
            "operationId": rule.endpoint,
            "parameters": {argument: "$response.body#/id"},
        }
        for rule, method in rules
        if (openapi_path(rule) == base or openapi_path(rule).startswith(base + "/")) and rule.arguments == {argument}
    }


def _path_schema(rule: Rule, name: str) -> dict:
    """A path parameter's schema: an ``<id:...>`` (``inputs.ResourceId``) is at most as long as
    an id column."""
    if f"<id:{name}>" in rule.rule:
        return {"type": "string", "minLength": 1, "maxLength": ID_LENGTH}
    return {"type": "string"}


def _operation(rule: Rule, method: str, op: Operation, view_policy: Policy, refs: dict, rules: list) -> dict:
    parameters = [{"name": name, "in": "path", "required": True, "schema": _path_schema(rule, name)} for name in sorted(rule.arguments)]
    for param in op.params:
        entry = {"name": param.name, "in": param.where, "required": False, "description": param.description, "schema": param.schema}
        if not param.explode:
            entry.update(style="form", explode=False)
        parameters.append(entry)
    responses: dict[str, dict] = {}
    for status, reply in op.replies.items():
        response: dict = {"description": reply.description}
        content = _content(reply, refs)
        if content is not None:
            response["content"] = content
        if reply.headers:
            response["headers"] = _headers(reply.headers, HEADERS)
        links = _links(reply, rules)
        if links:
            response["links"] = links
        responses[str(status)] = response
    for status in sorted(_problems(rule, op, view_policy)):
        responses[str(status)] = {"$ref": f"#/components/responses/{PROBLEMS[status][0]}"}
    found = {
        "operationId": rule.endpoint,
        "tags": [rule.endpoint.partition(".")[0]],
        "summary": op.summary,
        "parameters": parameters,
        "responses": dict(sorted(responses.items())),
        "security": _security(view_policy),
    }
    if op.description:
        found["description"] = op.description
    if op.body is not None:
        found["requestBody"] = {
            "required": False,  # no body is taken as {} (common.body)
            "content": {"application/json": {"schema": refs[(op.body, "validation")]}},
        }
    if not parameters:
        del found["parameters"]
    return found


def document(app: Flask) -> dict:
    """The OpenAPI 3.1 document of every documented view under API_PREFIX; a view without an
    ``@operation`` is left out (the tests compare the document with the app's URL map)."""
    entries = []
    for rule, method in documented_rules(app):
        view = app.view_functions[rule.endpoint]
        op = getattr(view, "operation", None)
        if op is not None:
            entries.append((rule, method, op, getattr(view, "auth_policy", AUTHENTICATED)))
    models: list[tuple[type[BaseModel], str]] = [(model, "serialization") for _, _, model, _ in PROBLEMS.values()]
    for _, _, op, _ in entries:
        if op.body is not None:
            models.append((op.body, "validation"))
        models.extend((reply.model, "serialization") for reply in op.replies.values() if reply.model is not None)
    refs, definitions = models_json_schema(list(dict.fromkeys(models)), ref_template=REF)
    paths: dict[str, dict] = {}
    rules = [(rule, method) for rule, method, _, _ in entries]
    for rule, method, op, view_policy in sorted(entries, key=lambda entry: (entry[0].rule, entry[1])):
        paths.setdefault(openapi_path(rule), {})[method.lower()] = _operation(rule, method, op, view_policy, refs, rules)
    responses = {
        name: {
            "description": description,
            "content": {PROBLEM_JSON: {"schema": refs[(model, "serialization")]}},
            **({"headers": _headers(headers, PROBLEM_HEADERS)} if headers else {}),
        }
        for name, description, model, headers in PROBLEMS.values()
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Frontdoor gateway API",
            "version": _version(),
            "description": "The gateway's own resources: consumers, API keys, jobs, webhooks, events and the cache. "
            "Every error is application/problem+json (RFC 9457).",
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "responses": responses,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "An API key"},
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API key, or a JWT when JWT_* is configured"},
            },
        },
    }


def _version() -> str:
    try:
        return metadata.version("frontdoor")
    except metadata.PackageNotFoundError:
        return "0.0.0"


@bp.get("/openapi.json")
@policy("none")
@operation("This document", {200: Reply(None, "The OpenAPI 3.1 document", schema={"type": "object"})})
def spec() -> Response:
    """Built once per app, on first request."""
    found = current_app.extensions.get("openapi")
    if found is None:
        found = current_app.extensions["openapi"] = document(current_app)
    return jsonify(found)


# Swagger UI 5 (renders OpenAPI 3.1), as the swagger-ui-py package ships it (Apache-2.0; the
# version is in setup.cfg and the README). Only these files are served, from the installed package.
SWAGGER_UI = importlib.resources.files("swagger_ui") / "static"
DOCS_ASSETS = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png"})
ASSET_MAX_AGE = 86400  # seconds a browser may reuse an asset before revalidating it (ETag)

# The page's only script of its own, served as a file so the page needs no inline script.
DOCS_SCRIPT = """window.addEventListener("load", function () {
  var docs = document.getElementById("docs");
  SwaggerUIBundle({url: docs.dataset.spec, dom_id: "#docs", deepLinking: true});
});
"""

DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Frontdoor gateway API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="{assets}/favicon-32x32.png">
<link rel="stylesheet" href="{assets}/swagger-ui.css">
</head>
<body>
<nav id="portal" aria-label="Portal"><p>The portal's pages, for people rather than programs:
<a href="{portal}/sign-in">sign in</a>, <a href="{portal}/">overview and limits</a>, <a href="{portal}/keys">API keys</a>,
<a href="{portal}/endpoints">webhook endpoints and deliveries</a>, <a href="{portal}/jobs">jobs</a>; for operators,
<a href="{portal}/operator/routes">routes</a>, <a href="{portal}/operator/upstreams">upstreams and breakers</a>,
<a href="{portal}/operator/cache">cache</a>, <a href="{portal}/operator/consumers">consumers</a>.</p></nav>
<noscript>The OpenAPI document is at <a href="{spec}">{spec}</a>.</noscript>
<div id="docs" data-spec="{spec}"><p>Loading the viewer for <a href="{spec}">{spec}</a>&hellip;</p></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="{assets}/docs.js"></script>
</body>
</html>
"""


@bp.get("/docs")
@policy("none")
@operation("The API reference", {200: Reply(None, "An HTML page that shows this document", media="text/html", schema={"type": "string"})})
def docs() -> Response:
    """Swagger UI over ``openapi.json``, every file of it served by the gateway itself (no CDN,
    nothing from another origin); without JavaScript the page links to the document. Above it,
    links to each of the portal's pages."""
    assets = url_for("openapi.docs_asset", name="docs.js").rsplit("/", 1)[0]
    portal = url_for("portal.overview").rstrip("/")
    page = DOCS_PAGE.format(spec=escape(url_for("openapi.spec")), assets=escape(assets), portal=escape(portal))
    response = Response(page, content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
    return response


@bp.get("/docs/assets/<name>")
@policy("none")
@operation(
    "A file of the API reference page",
    {200: Reply(None, "The file (JavaScript, CSS or an icon), cacheable for a day and revalidated by ETag", media="*/*", schema={"type": "string"})},
    errors=(404,),
)
def docs_asset(name: str) -> Response:
    """One of ``DOCS_ASSETS`` from the installed Swagger UI, or the page's ``docs.js``.

    Raises ``NotFound`` (404 problem) for any other name."""
    if name == "docs.js":
        response = Response(DOCS_SCRIPT, content_type="text/javascript; charset=utf-8")
        response.cache_control.public = True
        response.cache_control.max_age = ASSET_MAX_AGE
        response.add_etag()
        return response.make_conditional(request)
    if name not in DOCS_ASSETS:
        raise NotFound(f"no docs asset named {name!r}")
    return send_file(SWAGGER_UI / name, max_age=ASSET_MAX_AGE, conditional=True, etag=True)
