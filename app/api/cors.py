"""CORS for the gateway's own API (``GATEWAY_API_CORS_ORIGINS``, ``_CREDENTIALS``, ``_MAX_AGE``),
with the proxy's rules (app.gateway.cors): a preflight is answered before authentication with
the methods the path takes; every other answer to an allowed origin, problems included,
carries ``Access-Control-Allow-Origin`` and the exposed fields."""
from __future__ import annotations

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from app.gateway import cors

# What the API's answers carry besides the proxy's exposed fields.
EXPOSED = (*cors.EXPOSED, "Operation-Location", "Idempotent-Replayed", "Allow")


def init_app(app: Flask) -> None:
    """Register the preflight answer as a before_request hook (create_app calls this before
    auth.init_app, so it comes before authentication), and the fields on every answer. Raises pydantic's ValidationError (a
    start-up error naming the setting) for an origin that is not one."""
    origins = app.config["API_CORS_ORIGINS"]
    if isinstance(origins, str):  # "https://a.example,https://b.example" from the environment
        origins = [part.strip() for part in origins.split(",") if part.strip()]
    origins = tuple(origins)
    if not origins:
        return
    policy = cors.Cors(
        origins=origins,
        credentials=bool(app.config["API_CORS_CREDENTIALS"]),
        max_age=int(app.config["API_CORS_MAX_AGE"]),
        expose_headers=EXPOSED,
    )
    app.extensions["api_cors"] = policy
    app.before_request(_preflight)
    app.after_request(_fields)


def _ours() -> bool:
    """Whether the request is to the gateway's API (not /metrics, /healthz, /readyz, and not the
    portal's pages, which no other origin may read or post to)."""
    prefix = current_app.config["API_PREFIX"].rstrip("/") + "/"
    return request.path.startswith(prefix) and not request.path.startswith(prefix + "portal/")


def _preflight() -> Response | None:
    asked = cors.requested_method(request.method, request.headers)
    if asked is None or not _ours():
        return None
    try:
        methods = current_app.url_map.bind_to_environ(request.environ).allowed_methods()
    except (NotFound, MethodNotAllowed):
        methods = []
    policy: cors.Cors = current_app.extensions["api_cors"]
    fields = policy.preflight(request.headers["Origin"], request.headers.get("Access-Control-Request-Headers"), [m for m in methods if m != "OPTIONS"] or None)
    return Response(status=204, headers=fields)


def _fields(response: Response) -> Response:
    if _ours() and cors.requested_method(request.method, request.headers) is None:
        current_app.extensions["api_cors"].apply(response.headers, request.headers.get("Origin"))
    return response
