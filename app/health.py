"""Liveness (/healthz) and readiness (/readyz: the database and, when configured, Redis)."""
from __future__ import annotations

import redis
import sqlalchemy
from flask import Blueprint, Flask, current_app, jsonify
from werkzeug.wrappers import Response

from app.auth.views import policy
from app.errors import problem_response
from app.extensions import db, redis_client

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@policy("none")
def healthz() -> Response:
    """200 while the process can answer at all; it checks nothing else."""
    return jsonify(status="ok")


@bp.get("/readyz")
@policy("none")
def readyz() -> Response:
    """200 when every backing service answers; 503 problem+json naming each one that does not."""
    checks: dict[str, str] = {}
    try:
        with db.engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
        checks["database"] = "ok"
    except sqlalchemy.exc.SQLAlchemyError as exc:
        checks["database"] = f"unreachable: {type(getattr(exc, 'orig', None) or exc).__name__}"
    client = redis_client(current_app)
    if client is not None:
        try:
            client.ping()
            checks["redis"] = "ok"
        except redis.RedisError as exc:
            checks["redis"] = f"unreachable: {type(exc).__name__}"
    failed = sorted(name for name, state in checks.items() if state != "ok")
    if failed:
        return problem_response(
            503,
            "Service Unavailable",
            f"Not ready: {', '.join(failed)} unreachable",
            headers={"Retry-After": "5"},
            checks=checks,
        )
    return jsonify(status="ok", checks=checks)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
