"""``/_gateway/jobs``: submit a request (or a batch) as a job, poll it, cancel it, fetch its result.

A consumer sees only its own jobs; another consumer's job id answers 404, as an unknown one
does. Jobs submitted without a credential belong to nobody and are reached by their id alone.
"""
from __future__ import annotations

import base64
import json
import re
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote, urlencode

from flask import Blueprint, current_app, g, request
from pydantic import Field, field_validator, model_validator
from werkzeug.datastructures import Headers
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.wrappers import Response

from app import ratelimit
from app.api import schemas
from app.api.common import (
    PAGE,
    Param,
    Reply,
    Schema,
    as_stored,
    body,
    found,
    invalid,
    operation,
    page,
    reply,
    status_filter,
    with_status,
)
from app.api.inputs import CONTROL, column_length
from app.auth.views import current_principal, policy
from app.errors import BadRequest
from app.extensions import db
from app.gateway.router import AmbiguousPath, has_dot_segment, refuse_ambiguous
from app.gateway.runtime import Gateway
from app.jobs import resource as job_resource
from app.jobs import service as job_service
from app.jobs.calls import Call, kept_headers
from app.jobs.settings import settings as job_settings
from app.jobs.waiting import wait_for_end
from app.models import Job
from app.models.jobs import BATCH, REQUEST, STATUSES

bp = Blueprint("jobs", __name__)

NOT_STORED = frozenset({"authorization", "x-api-key", "cookie", "proxy-authorization"})
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[ \t\x21-\x7e]*")


class CallSpec(Schema):
    """One request to make through the route its path matches, as a client would send it.

    The body is given as ``body`` (text, sent as UTF-8), ``body_base64`` (bytes), or ``json``
    (any JSON value, sent with ``Content-Type: application/json`` unless one is given).
    """

    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] = "GET"
    path: Annotated[str, Field(min_length=1, max_length=2048)]
    route: str | None = None  # when given, the route the path must match (its name or path)
    query: str | dict[str, str | list[str]] = ""
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None
    body_base64: str | None = None
    json_body: Any = Field(default=None, alias="json")

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or "#" in value:
            raise ValueError("must be a path starting with '/', without a query or fragment (use 'query')")
        if CONTROL.search(value):
            raise ValueError("must not contain control characters (U+0000-U+001F, U+007F); percent-encode them")
        return value

    @field_validator("query")
    @classmethod
    def _query_text(cls, value: str | dict) -> str | dict:
        # Given as text it is sent as it is, so it must be what a request line can carry (RFC 9112
        # section 3): a control character would be a 5xx at the worker, or NUL a 5xx here.
        if isinstance(value, str) and CONTROL.search(value):
            raise ValueError("must not contain control characters (U+0000-U+001F, U+007F); percent-encode them")
        return value

    @field_validator("headers")
    @classmethod
    def _fields(cls, headers: dict[str, str]) -> dict[str, str]:
        # What an HTTP/1.1 client can send (RFC 9110 sections 5.1 and 5.5): checked here, so a
        # bad field is a 422 now rather than a failed job later.
        for name, value in headers.items():
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid header field name")
            if name.lower() in NOT_STORED:
                raise ValueError(f"{name} cannot be sent through a job: credentials are never stored")
            if not _FIELD_VALUE.fullmatch(value):
                raise ValueError(f"the value of {name} has characters a header field cannot carry")
        return headers

    @model_validator(mode="after")
    def _one_body(self) -> CallSpec:
        given = [name for name in ("body", "body_base64", "json") if self._field(name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of body, body_base64 and json, not {' and '.join(given)}")
        return self

    def _field(self, name: str) -> object:
        return self.json_body if name == "json" else getattr(self, name)


class JobCreate(Schema):
    """``{"kind": "request", "request": {...}}`` or ``{"kind": "batch", "requests": [{...}, ...]}``."""

    kind: Literal["request", "batch"] = REQUEST
    request: CallSpec | None = None
    requests: list[CallSpec] | None = None

    @model_validator(mode="after")
    def _shape(self) -> JobCreate:
        if self.kind == REQUEST and (self.request is None or self.requests is not None):
            raise ValueError("a request job takes 'request' (one request), not 'requests'")
        if self.kind == BATCH and (self.requests is None or self.request is not None):
            raise ValueError("a batch job takes 'requests' (a list), not 'request'")
        return self


def _call(spec: CallSpec, where: str, gateway: Gateway, routes: dict[int, list]) -> Call:
    """Resolve ``spec`` to its route, check the caller may use it, and snapshot it as a Call.

    Raises Unprocessable naming ``where`` for an unroutable request or a body over the route's
    limit, and 401/403 when the route's policy refuses the caller's credential.
    """
    raw_path = quote(spec.path, safe="/:@!$&'()*+,;=-._~%")
    path = unquote(raw_path)
    if gateway.is_reserved(path):
        raise invalid(f"{where}.path", f"{path} is one of the gateway's own paths; jobs go through routes")
    if has_dot_segment(path):
        raise invalid(f"{where}.path", "must not contain '.' or '..' segments")
    if "\x00" in path:  # even on a route that allows ambiguous paths: the job row stores it decoded
        raise invalid(f"{where}.path", "must not contain NUL (%00), which the database cannot store")
    try:
        match = gateway.router.match(spec.method, path, raw_path, Headers(list(spec.headers.items())))
    except NotFound:
        raise invalid(f"{where}.path", f"no route matches {path}") from None
    except MethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.valid_methods or ()))
        raise invalid(f"{where}.method", f"{spec.method} is not allowed on {path}; allowed: {allowed}") from None
    route = match.route
    try:
        refuse_ambiguous(route, raw_path)
    except AmbiguousPath as exc:
        raise invalid(f"{where}.path", exc.detail) from None
    if spec.route is not None and spec.route not in (route.label, route.path):
        raise invalid(f"{where}.route", f"{path} is served by route {route.label!r}, not {spec.route!r}")
    # The route's own policy, as if the caller had sent the request to it directly.
    current_app.extensions["auth"].authenticate(request.headers, route.policy)
    routes.setdefault(id(route), [route, 0])[1] += 1
    headers = Headers(list(spec.headers.items()))
    if spec.body_base64 is not None:
        try:
            content = base64.b64decode(spec.body_base64, validate=True)
        except ValueError:  # binascii.Error, or a character outside ASCII
            raise invalid(f"{where}.body_base64", "is not valid base64 (RFC 4648 section 4: A-Z, a-z, 0-9, '+', '/' and '=' padding)") from None
    elif spec.json_body is not None:
        content = json.dumps(spec.json_body).encode()
        headers.setdefault("Content-Type", "application/json")
    else:
        content = (spec.body or "").encode()
    limit = current_app.config["MAX_BODY_SIZE"] if route.max_body_size is None else route.max_body_size
    if limit and len(content) > limit:
        raise invalid(f"{where}.body", f"{len(content)} bytes exceeds the route's limit of {limit} bytes")
    query = spec.query if isinstance(spec.query, str) else urlencode(spec.query, doseq=True)
    return Call(
        method=spec.method,
        raw_path=raw_path,
        query=query.lstrip("?"),
        headers=kept_headers(list(headers.items())),
        body=content,
        route=route.label,
    )


def _client() -> dict:
    # No X-Forwarded-For chain is stored with an explicit request: the client is the caller.
    return {"addr": request.remote_addr or "", "scheme": request.scheme, "host": request.host}


IDEMPOTENCY_KEY = Param(
    "Idempotency-Key", "header", {"type": "string", "minLength": 1, "maxLength": column_length(Job.idempotency_key)},
    "The same key with the same body answers the same job; with another body, 422",
)
JOB = Reply(schemas.Job, "The job", ("Retry-After?",))


@bp.post("/jobs")
@policy("optional")
@operation(
    "Submit a job",
    {202: Reply(schemas.Job, "The job, accepted", ("Location", "Operation-Location", "Retry-After?", "Idempotent-Replayed?"), location="jobs.read")},
    body=JobCreate,
    errors=(400, 403, 413),
    params=(IDEMPOTENCY_KEY,),
)
def create() -> tuple:
    """Submit a job: 202 with the job resource, ``Location``/``Operation-Location`` (its status
    URL) and ``Retry-After``. Honours ``Idempotency-Key`` (same key and body: the same job;
    same key, other body: 422). A batch takes up to JOB_BATCH_MAX requests."""
    # The body carries the requests' own bodies, each up to a route's limit: MAX_BODY_SIZE, not
    # API_MAX_BODY_SIZE (0: none, as for the routes).
    data = body(JobCreate, current_app.config["MAX_BODY_SIZE"] or None, "MAX_BODY_SIZE")
    settings = job_settings()
    gateway: Gateway = current_app.extensions["gateway"]
    routes: dict[int, list] = {}  # [route, calls] by route object: labels need not be unique
    if data.kind == BATCH:
        specs = data.requests or []
        if not 1 <= len(specs) <= settings.batch_max:
            raise invalid("requests", f"a batch holds 1 to {settings.batch_max} requests (JOB_BATCH_MAX); got {len(specs)}")
        calls = [_call(spec, f"requests.{index}", gateway, routes) for index, spec in enumerate(specs)]
    else:
        assert data.request is not None
        calls = [_call(data.request, "request", gateway, routes)]
    key = job_service.idempotency_key(request.headers.get("Idempotency-Key"))
    if not (key and job_service.replay_of(key, current_principal())):
        ratelimit.charge([(route, calls) for route, calls in routes.values()])
    job, created = job_service.create(data.kind, calls, current_principal(), _client(), g.get("request_id", ""), key)
    if created:
        job_service.enqueue([job.id])
    resource, headers = job_service.accepted(job, created)
    return reply(schemas.Job, resource, 202, headers)


def _own(job_id: str, payload: bool = False) -> Job:
    """The caller's job ``job_id`` (with its stored response when ``payload``): 404 when it is
    unknown or someone else's, 410 once expired."""
    return found(job_resource.reachable(job_id, current_principal(), payload), "job", job_id)


def _retry_after(job: Job) -> dict[str, str]:
    return {} if job.final else {"Retry-After": str(job_settings().retry_after)}


@bp.get("/jobs")
@policy("required")
@operation(
    "List jobs", {200: Reply(schemas.Page[schemas.Job], "One page of the caller's jobs")}, params=(*PAGE, status_filter(STATUSES))
)
def index() -> tuple:
    """``{"data": [job, ...], "next_cursor": ...}``: the caller's jobs, newest first;
    ``?status=running,notStarted`` filters by status."""
    principal = current_principal()
    assert principal is not None
    query = with_status(job_resource.of_consumer(principal.consumer_id), Job.status, STATUSES)
    rows, next_cursor = page(query, Job, db.session)
    return reply(schemas.Page[schemas.Job], {"data": [job_resource.job_json(row) for row in rows], "next_cursor": next_cursor})


WAIT = Param(
    "wait",
    "query",
    {"type": "number", "minimum": 0},
    "Seconds to wait for the job to end before answering (AIP-151's WaitOperation): the answer comes as soon as "
    "the job is final, or when the wait is over with the job as it is then. Waits longer than GATEWAY_JOB_WAIT_MAX "
    "(20 s by default) are cut to it; 0 or absent answers at once. Not a number of seconds (``abc``, ``-1``): 400",
)
_SECONDS = re.compile(r"[0-9]{1,30}(\.[0-9]{1,30})?")  # plain decimal: no sign, exponent, inf or nan


def _wait_seconds() -> float:
    """``?wait=``: seconds (a decimal number, at least 0), cut to JOB_WAIT_MAX; 0 when absent.
    Raises BadRequest (400) naming the parameter for anything else."""
    value = request.args.get("wait")
    if value is None:
        return 0.0
    if not _SECONDS.fullmatch(value):
        raise BadRequest(
            f"wait must be a number of seconds from 0 (e.g. wait=10 or wait=2.5), not {value[:40]!r}",
            errors=[{"field": "wait", "message": "must be a number of seconds, at least 0"}],
        )
    return min(float(value), job_settings().wait_max)


@bp.get("/jobs/<id:job_id>")
@policy("optional")
@operation("Read a job", {200: JOB}, errors=(400, 404, 410), params=(WAIT,))
def read(job_id: str) -> tuple:
    """The job resource; ``Retry-After`` (seconds) while it is not final. 410 once its result
    has expired. With ``?wait=N`` the answer waits up to N seconds (at most
    GATEWAY_JOB_WAIT_MAX) for the job to end; it is not final when the wait ran out first."""
    job = wait_for_end(job_id, _wait_seconds(), lambda: _own(job_id))
    return reply(schemas.Job, job_resource.job_json(job, items=job_resource.item_counts(job)), 200, _retry_after(job))


@bp.delete("/jobs/<id:job_id>")
@policy("optional")
@operation("Cancel a job", {200: Reply(schemas.Job, "The job, canceled")}, errors=(404, 409, 410))
def cancel(job_id: str) -> tuple:
    """Cancel a job not yet final (200 with the job); 409 when it has already ended."""
    job = job_service.cancel(_own(job_id))
    return reply(schemas.Job, job_resource.job_json(job, items=job_resource.item_counts(job)))


UPSTREAM_ANSWER = "A request job: the upstream's response as it was, with its status, headers and body"


@bp.get("/jobs/<id:job_id>/result")
@policy("optional")
@operation(
    "Read a job's result",
    {
        200: Reply(schemas.BatchResult, f"A batch job: a BatchResult. {UPSTREAM_ANSWER}", media="*/*"),
        "default": Reply(None, f"{UPSTREAM_ANSWER}, when the upstream answered another status than 200", media="*/*"),
    },
    errors=(404, 409, 410),
)
@as_stored
def result(job_id: str) -> Response:
    """The upstream's response as it was (status, headers, body) once the job succeeded; for a
    batch, ``{"items": [...]}`` with each sub-request's response. 409 before that."""
    job = _own(job_id, payload=True)  # one SELECT: a purge cannot land between check and read
    return job_resource.result_response(job, batch_item)


def batch_item(data: dict) -> dict:
    """A batch result's item as the document's BatchItem model says it (the portal's download too)."""
    return schemas.BatchItem.model_validate(data).model_dump(mode="json", exclude_unset=True)
