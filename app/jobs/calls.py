"""A job's upstream call: the snapshot taken when it is submitted, and its replay in the worker."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from urllib.parse import unquote

from celery.exceptions import SoftTimeLimitExceeded
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException, NotFound

from app.errors import ProblemError
from app.gateway.body import RequestBody
from app.gateway.headers import CREDENTIALS, HOP_BY_HOP, end_to_end
from app.gateway.router import has_dot_segment
from app.gateway.types import GatewayRequest
from app.identity import Principal

log = logging.getLogger("frontdoor.jobs")

# Never stored with a job: hop-by-hop fields mean nothing later, the gateway's own
# bookkeeping fields are set again when the call is made, and credentials are not kept at
# rest (an upstream of an async route learns the caller from X-Consumer-*).
NOT_KEPT = HOP_BY_HOP | CREDENTIALS | frozenset({"host", "content-length", "x-request-id", "cookie"})


class ResultTooLarge(ProblemError):
    """The upstream's body is larger than JOB_MAX_RESULT_SIZE bytes: the job fails, nothing is kept."""

    status, title, slug = 502, "Result Too Large", "result-too-large"


class BrokenBody(ProblemError):
    """The upstream broke off while sending its body (502)."""

    status, title, slug = 502, "Bad Gateway", "upstream-unreachable"

    def __init__(self) -> None:
        super().__init__("The upstream closed the connection before its body was complete")


class CallFailed(ProblemError):
    """The job's request could not be made at all (502)."""

    status, title, slug = 502, "Bad Gateway", "upstream-unreachable"


class RouteGone(ProblemError):
    """The route the job was submitted to no longer matches its path (the route file changed)."""

    status, title, slug = 502, "Bad Gateway", "route-gone"


@dataclass
class Call:
    """One upstream request as a job keeps it: enough to make it again in a worker.

    ``raw_path`` is the gateway path as the client sent it (percent-encoded); ``headers`` are
    ``(name, value)`` pairs; ``body`` is bytes (empty: no body); ``client`` holds the
    ``addr``, ``scheme`` and ``host`` the X-Forwarded-* fields are built from.
    """

    method: str
    raw_path: str
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    route: str | None = None  # the route's name (or path), for display

    @property
    def path(self) -> str:
        return unquote(self.raw_path)

    def digest(self) -> str:
        """SHA-256 (hex) of what makes two submissions the same: method, path, query, body type, body."""
        content_type = next((v for k, v in self.headers if k.lower() == "content-type"), "")
        head = json.dumps([self.method, self.raw_path, self.query, content_type]).encode()
        return hashlib.sha256(head + b"\0" + hashlib.sha256(self.body).digest()).hexdigest()


def kept_headers(headers: Headers | list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The request fields a job stores: all but hop-by-hop fields and those ``Connection``
    names (RFC 9110 section 7.6.1), recomputed fields, and the credentials ``Authorization``,
    ``X-API-Key`` and ``Cookie``."""
    fields = headers if isinstance(headers, Headers) else Headers(headers)
    return list(end_to_end(fields, NOT_KEPT).items())


def read_body(body: object) -> bytes:
    """The whole body of a GatewayRequest (None, bytes or a RequestBody stream) as bytes."""
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, RequestBody):
        return b"".join(body)
    raise TypeError(f"unexpected body type {type(body).__name__}")


def call_from_request(req: GatewayRequest) -> Call:
    """Snapshot a client request that reached an async route (its body already size-checked)."""
    route = req.route
    assert route is not None
    return Call(
        method=req.method,
        raw_path=req.raw_path or req.upstream_path,
        query=req.query,
        headers=kept_headers(req.headers),
        body=read_body(req.body),
        route=route.label,
    )


def principal_json(principal: Principal | None) -> dict | None:
    if principal is None:
        return None
    return {
        "consumer_id": principal.consumer_id,
        "consumer_name": principal.consumer_name,
        "scopes": sorted(principal.scopes),
    }


def principal_from(data: dict | None) -> Principal | None:
    if not data:
        return None
    return Principal(
        consumer_id=data["consumer_id"],
        consumer_name=data["consumer_name"],
        plan=None,
        scopes=frozenset(data.get("scopes") or ()),
        credential_id="job",
    )


@dataclass
class Outcome:
    """What one call came to: the upstream's response, or the problem that prevented one."""

    status: int | None = None
    headers: list[tuple[str, str]] | None = None
    body: bytes | None = None
    error: dict | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def make_call(gateway, call: Call, client: dict, principal: Principal | None, request_id: str, max_size: int, problem) -> Outcome:
    """Send ``call`` through its route's job pipeline (the upstream's ``job_timeout``, breaker,
    retries and bulkhead) and read the answer, at most ``max_size`` bytes of body.

    ``gateway`` is the app's Gateway; ``problem(error) -> dict`` turns a ProblemError into a
    problem object. Never raises for upstream failures: they come back as ``Outcome.error``.
    """
    path = call.path
    try:
        if gateway.is_reserved(path) or has_dot_segment(path):
            raise NotFound()  # checked at submission; a stored path is never trusted blindly
        match = gateway.router.match(call.method, path, call.raw_path, Headers(call.headers))
    except HTTPException:  # NotFound/MethodNotAllowed: the route file changed since
        return Outcome(error=problem(RouteGone(f"No route takes {call.method} {path} any more")))
    route = match.route
    greq = GatewayRequest(
        method=call.method,
        path=call.path,
        query=call.query,
        headers=Headers(call.headers),
        body=call.body or None,
        client_addr=client.get("addr", ""),
        scheme=client.get("scheme", "http"),
        host=client.get("host", ""),
        route=route,
        params=match.params,
        upstream_path=match.upstream_path,
        request_id=request_id,
        principal=principal if route.auth != "none" else None,  # as a direct call would
    )
    try:
        response = gateway.job_handler(route)(greq)
    except ProblemError as exc:
        return Outcome(error=problem(exc))
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        log.warning("job call failed", extra={"request_id": request_id}, exc_info=True)
        return Outcome(error=problem(CallFailed(f"The request could not be sent: {type(exc).__name__}")))
    try:
        chunks, size = [], 0
        for chunk in response.body:
            size += len(chunk)
            if size > max_size:
                raise ResultTooLarge(
                    f"The upstream's body is larger than the limit of {max_size} bytes (JOB_MAX_RESULT_SIZE); nothing was kept"
                )
            chunks.append(chunk)
        body = b"".join(chunks)
    except ProblemError as exc:
        return Outcome(error=problem(exc))
    except SoftTimeLimitExceeded:
        raise
    except Exception:  # noqa: BLE001 - the upstream broke off mid-body (logged by the forward stage)
        return Outcome(error=problem(BrokenBody()))
    finally:
        response.close()
    return Outcome(status=response.status, headers=list(response.headers.items()), body=body)


