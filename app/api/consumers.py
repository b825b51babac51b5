"""``/_gateway/consumers``: create, list, read and change consumers (``admin`` scope)."""
from __future__ import annotations

from flask import Blueprint, url_for
from sqlalchemy import select

from app.api import schemas
from app.api.common import (
    PAGE,
    ConflictProblem,
    Reply,
    Schema,
    body,
    found,
    invalid,
    operation,
    page,
    reply,
)
from app.api.idempotency import HEADER as IDEMPOTENCY_KEY
from app.api.idempotency import idempotent
from app.api.inputs import stored_text
from app.auth import manage
from app.auth.views import policy
from app.extensions import db
from app.identity import ADMIN_SCOPE
from app.models import Consumer

bp = Blueprint("consumers", __name__)
admin = policy("required", (ADMIN_SCOPE,))


# Lengths are the columns' (app.models.identity): the model is the one source of them.
Name = stored_text(Consumer.name, min_length=1)
Plan = stored_text(Consumer.plan)


class ConsumerCreate(Schema):
    name: Name  # type: ignore[valid-type]
    plan: Plan | None = None  # type: ignore[valid-type]


class ConsumerUpdate(Schema):
    plan: Plan | None = None  # type: ignore[valid-type]
    disabled: bool | None = None


@bp.post("/consumers")
@admin
@operation(
    "Create a consumer",
    {201: Reply(schemas.Consumer, "The consumer", ("Location", "Idempotent-Replayed?"), location="consumers.read")},
    body=ConsumerCreate,
    errors=(409,),
    params=(IDEMPOTENCY_KEY,),
)
@idempotent
def create() -> tuple:
    """Create a consumer: ``{"name": "acme", "plan": "pro"}`` → 201 with the consumer; 409
    when the name is taken."""
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
    location = url_for("consumers.read", consumer_id=consumer.id, _external=True)
    return reply(schemas.Consumer, manage.consumer_json(consumer), 201, {"Location": location})


@bp.get("/consumers")
@admin
@operation("List consumers", {200: Reply(schemas.Page[schemas.Consumer], "One page of consumers")}, params=PAGE)
def index() -> tuple:
    """``{"data": [consumer, ...], "next_cursor": str | null}``, newest first."""
    rows, next_cursor = page(select(Consumer), Consumer, db.session)
    return reply(schemas.Page[schemas.Consumer], {"data": [manage.consumer_json(row) for row in rows], "next_cursor": next_cursor})


@bp.get("/consumers/<id:consumer_id>")
@admin
@operation("Read a consumer", {200: Reply(schemas.Consumer, "The consumer")}, errors=(404,))
def read(consumer_id: str) -> tuple:
    return reply(schemas.Consumer, manage.consumer_json(found(db.session.get(Consumer, consumer_id), "consumer", consumer_id)))


@bp.patch("/consumers/<id:consumer_id>")
@admin
@operation("Change a consumer", {200: Reply(schemas.Consumer, "The consumer")}, body=ConsumerUpdate, errors=(404,))
def update(consumer_id: str) -> tuple:
    """Change ``plan`` and/or ``disabled``; a disabled consumer's credentials stop working
    everywhere within AUTH_CACHE_TTL seconds."""
    consumer = found(db.session.get(Consumer, consumer_id), "consumer", consumer_id)
    data = body(ConsumerUpdate)
    try:
        manage.update_consumer(consumer, data.plan, data.disabled, set_plan="plan" in data.model_fields_set)
    except manage.Invalid as exc:
        raise invalid("plan", str(exc)) from exc
    return reply(schemas.Consumer, manage.consumer_json(consumer))
