"""Problem details (RFC 9457) for every error the gateway answers, its own or an upstream's."""
from __future__ import annotations

import json
import logging

from flask import Flask, current_app, g, request
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.wrappers import Response

log = logging.getLogger("frontdoor.errors")

PROBLEM_JSON = "application/problem+json"


class ProblemError(Exception):
    """An error the gateway answers as ``application/problem+json``.

    Subclasses set ``status``, ``title`` and ``slug`` (the last part of the ``type`` URI);
    ``headers`` are added to the response (``Retry-After``, ``Allow``).
    """

    status = 500
    title = "Internal Server Error"
    slug = "internal-error"

    def __init__(self, detail: str, headers: dict[str, str] | None = None, **extra: object):
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


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
    log.exception("unhandled error", extra={"request_id": g.get("request_id")})
    return problem_response(500, "Internal Server Error", "The gateway failed to handle the request")


def init_app(app: Flask) -> None:
    """Answer every error as problem+json: gateway problems, HTTP errors and crashes."""
    app.register_error_handler(ProblemError, handle_problem)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
