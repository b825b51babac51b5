"""Problem details (RFC 9457) for every error the gateway answers, its own or an upstream's."""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app, g, request
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.wrappers import Response

log = logging.getLogger("frontdoor.errors")

PROBLEM_JSON = "application/problem+json"


class ProblemError(Exception):
    """500: the gateway failed to handle the request; the detail carries no internals, and the
    request_id finds the error in the gateway's log.

    Every error the gateway answers as ``application/problem+json`` is one of these. Subclasses
    set ``status``, ``title`` and ``slug`` (the last part of the ``type`` URI, whose page,
    ``/_gateway/problems/<slug>``, is the first paragraph of their docstring); ``headers`` are
    added to the response (``Retry-After``, ``Allow``).
    """

    status = 500
    title = "Internal Server Error"
    slug = "internal-error"

    def __init__(self, detail: str, headers: dict[str, str] | None = None, **extra: object):
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


class BadRequest(ProblemError):
    """400: the body is not JSON, nests too deep, or a query or path parameter or a form field is not valid; the detail names it."""

    status, title, slug = 400, "Bad Request", "bad-request"


class DatabaseUnavailable(ProblemError):
    """503: the database cannot be reached now (refused, timed out, connection lost, pool
    exhausted); ``Retry-After`` (RFC 9110 section 10.2.3) says when to try again, in seconds."""

    status, title, slug = 503, "Service Unavailable", "database-unavailable"


# Seconds a client is told to wait (Retry-After) when the database cannot be reached: a
# restart or a failover of PostgreSQL takes seconds to a minute.
DATABASE_RETRY_AFTER = 5


def database_unavailable(error: BaseException) -> DatabaseUnavailable | None:
    """The 503 ``database-unavailable`` problem when ``error`` says the database cannot be
    reached, else None. The one place the driver's errors become a problem.

    Unreachable means: SQLAlchemy's OperationalError (the server refused, the connect timed
    out, the connection dropped, too many connections, a statement canceled), InterfaceError,
    DisconnectionError, or any DBAPIError that invalidated its connection; its pool's
    TimeoutError (no connection free in ``pool_timeout`` seconds); psycopg's own
    OperationalError when psycopg is used directly. Other errors (a constraint, bad SQL, a
    bad value) are not: they stay 4xx or 500.
    """
    from sqlalchemy import exc as sa

    if isinstance(error, sa.DBAPIError):
        unreachable = isinstance(error, sa.OperationalError | sa.InterfaceError) or error.connection_invalidated
    elif isinstance(error, sa.DisconnectionError | sa.TimeoutError):
        unreachable = True
    else:
        unreachable = _is_psycopg_operational(error)
    if not unreachable:
        return None
    return DatabaseUnavailable(
        f"The database cannot be reached right now; retry in {DATABASE_RETRY_AFTER} s",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER)},
    )


def _is_psycopg_operational(error: BaseException) -> bool:
    psycopg = sys.modules.get("psycopg")  # never loaded here: on SQLite it need not be at all
    return psycopg is not None and isinstance(error, psycopg.OperationalError)


@contextmanager
def database_errors() -> Iterator[None]:
    """Raise DatabaseUnavailable (from the original) when the block fails because the database
    cannot be reached; for code that runs outside the Flask app's error handlers (the proxy's
    authentication and job submissions). Other errors propagate unchanged."""
    try:
        yield
    except Exception as error:
        problem = database_unavailable(error)
        if problem is None:
            raise
        log.warning("database unavailable: %s", type(error).__name__)
        raise problem from error


def problem_response(
    status: int,
    title: str,
    detail: str,
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
    **extra: object,
) -> Response:
    """Build a problem+json response (RFC 9457 section 3) carrying the request id.

    ``status`` is the HTTP status; ``type_`` a URI reference naming the problem type
    (``about:blank`` when the status says it all); ``extra`` become extension members.
    """
    body = problem_document(status, title, detail, type_, g.get("request_id"), **extra)
    response = Response(body, status=status, content_type=PROBLEM_JSON)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def problem_document(status: int, title: str, detail: str, type_: str, request_id: str | None, **extra: object) -> bytes:
    """The problem+json body (RFC 9457 section 3): ``type``, ``title``, ``status``, ``detail``,
    ``request_id`` when there is one, then the extension members ``extra``. The Flask app's
    answers and the proxy's are both made here."""
    body = {"type": type_, "title": title, "status": status, "detail": detail}
    if request_id:
        body["request_id"] = request_id
    body.update(extra)
    return json.dumps(body).encode()


def problem_type(slug: str) -> str:
    """Return the ``type`` URI reference for a gateway problem, under the reserved prefix."""
    return f"{current_app.config['API_PREFIX']}/problems/{slug}"


def handle_problem(error: ProblemError) -> Response:
    return problem_response(
        error.status, error.title, error.detail, problem_type(error.slug), error.headers, **error.extra
    )


def handle_http_exception(error: HTTPException) -> Response:
    # The exception's own fields (Allow, Retry-After, WWW-Authenticate), not its content type.
    headers = {name: value for name, value in error.get_headers() if name.lower() != "content-type"}
    detail = error.description or error.name
    if error.code == 405 and error.valid_methods:
        headers["Allow"] = allowed = ", ".join(sorted(error.valid_methods))
        detail = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    elif error.code == 404 and error.description == NotFound.description:
        detail = f"No route matches {request.path}"  # the router's 404; a view's own says what is missing
    return problem_response(error.code or 500, error.name, detail, headers=headers)


def handle_unexpected(error: Exception) -> Response:
    problem = database_unavailable(error)
    if problem is not None:
        log.warning("database unavailable: %s", type(error).__name__, extra={"request_id": g.get("request_id")})
        return handle_problem(problem)
    log.exception("unhandled error", extra={"request_id": g.get("request_id")})
    return problem_response(500, "Internal Server Error", "The gateway failed to handle the request")


def init_app(app: Flask) -> None:
    """Answer every error as problem+json: gateway problems, HTTP errors, an unreachable
    database (503 ``database-unavailable``) and crashes."""
    app.register_error_handler(ProblemError, handle_problem)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
