"""``/_gateway/consumers``: create, list, read and change consumers (``admin`` scope)."""
from __future__ import annotations

from typing import Annotated

from flask import Blueprint, jsonify, url_for
from pydantic import Field
from sqlalchemy import select
from werkzeug.wrappers import Response

from app.api.common import ConflictProblem, Schema, body, found, invalid, page
from app.auth import ADMIN_SCOPE, manage, policy
from app.extensions import db
from app.models import Consumer

bp = Blueprint("consumers", __name__)
admin = policy("required", (ADMIN_SCOPE,))


class ConsumerCreate(Schema):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    plan: str | None = None


class ConsumerUpdate(Schema):
    plan: str | None = None
    disabled: bool | None = None


@bp.post("/consumers")
@admin
def create() -> tuple[Response, int, dict]:
    """Create a consumer: ``{"name": "acme", "plan": "pro"}`` → 201 with the consumer."""
    data = body(ConsumerCreate)
    for field, check, value in (("name", manage.check_name, data.name), ("plan", manage.check_plan, data.plan)):
        try:
            check(value)
        except manage.Invalid as exc:
            raise invalid(field, str(exc)) from exc
    try:
        consumer = manage.create_consumer(data.name, data.plan)
    except manage.Conflict as exc:
        raise ConflictProblem(str(exc)) from exc
    location = url_for("consumers.read", consumer_id=consumer.id)
    return jsonify(manage.consumer_json(consumer)), 201, {"Location": location}


@bp.get("/consumers")
@admin
def index() -> Response:
    """``{"data": [consumer, ...], "next_cursor": str | null}``, newest first."""
    rows, next_cursor = page(select(Consumer), Consumer, db.session)
    return jsonify(data=[manage.consumer_json(row) for row in rows], next_cursor=next_cursor)


@bp.get("/consumers/<consumer_id>")
@admin
def read(consumer_id: str) -> Response:
    return jsonify(manage.consumer_json(found(db.session.get(Consumer, consumer_id), "consumer", consumer_id)))


@bp.patch("/consumers/<consumer_id>")
@admin
def update(consumer_id: str) -> Response:
    """Change ``plan`` and/or ``disabled``; a disabled consumer's credentials stop working
    everywhere within AUTH_CACHE_TTL seconds."""
    consumer = found(db.session.get(Consumer, consumer_id), "consumer", consumer_id)
    data = body(ConsumerUpdate)
    try:
        manage.update_consumer(consumer, data.plan, data.disabled, set_plan="plan" in data.model_fields_set)
    except manage.Invalid as exc:
        raise invalid("plan", str(exc)) from exc
    return jsonify(manage.consumer_json(consumer))
