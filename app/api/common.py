"""What every resource handler shares: body validation, cursor pagination, scoped lookups."""
from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import TypeVar

from flask import request
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import Select, and_, or_
from werkzeug.exceptions import NotFound

from app.errors import ProblemError

M = TypeVar("M", bound=BaseModel)

DEFAULT_PAGE = 20
MAX_PAGE = 100


class Schema(BaseModel):
    """A request body: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class BadRequest(ProblemError):
    status, title, slug = 400, "Bad Request", "bad-request"


class Unprocessable(ProblemError):
    """422: the body is JSON but a field is wrong; ``errors`` lists each one."""

    status, title, slug = 422, "Unprocessable Content", "invalid-request"


class ConflictProblem(ProblemError):
    status, title, slug = 409, "Conflict", "conflict"


def body(schema: type[M]) -> M:
    """The JSON request body validated as ``schema``; raises BadRequest or Unprocessable."""
    data = request.get_json(silent=True)
    if data is None:
        if request.content_length or request.data:
            raise BadRequest("The request body is not valid JSON")
        data = {}
    if not isinstance(data, dict):
        raise Unprocessable("The request body must be a JSON object", errors=[])
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(part) for part in error["loc"]) or "body", "message": error["msg"].removeprefix("Value error, ")}
            for error in exc.errors(include_url=False)
        ]
        first = errors[0]
        raise Unprocessable(f"{first['field']}: {first['message']}", errors=errors) from exc


def invalid(field: str, message: str) -> Unprocessable:
    return Unprocessable(f"{field}: {message}", errors=[{"field": field, "message": message}])


def found(row: object | None, what: str, ident: str) -> object:
    """``row``, or a 404 that names the id: also what another consumer's id answers."""
    if row is None:
        raise NotFound(f"No {what} {ident!r}")
    return row


def with_status(query: Select, column, statuses: tuple[str, ...]) -> Select:
    """``query`` filtered by ``?status=a,b`` (any of them) when given; raises BadRequest
    naming a status that is not one of ``statuses``."""
    wanted = [status for status in request.args.get("status", "").split(",") if status]
    unknown = sorted(set(wanted) - set(statuses))
    if unknown:
        raise BadRequest(f"status {', '.join(unknown)} is not one of {', '.join(statuses)}")
    return query.where(column.in_(wanted)) if wanted else query


def _encode(created_at: datetime, ident: str) -> str:
    raw = json.dumps([created_at.isoformat(), ident]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str) -> tuple[datetime, str]:
    try:
        created_at, ident = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        when = datetime.fromisoformat(created_at)
        if when.tzinfo is None:
            raise ValueError("no time zone")
        return when, str(ident)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise BadRequest(f"cursor {cursor!r} is not one this API returned") from exc


def page(query: Select, model: type, session) -> tuple[list, str | None]:
    """One page of ``query``, newest first, and the cursor of the next page (None at the end).

    Reads ``?limit=`` (1-100, default 20) and ``?cursor=`` (opaque, from ``next_cursor``).
    Keyset pagination on (created_at, id): rows created meanwhile neither shift nor repeat.
    """
    try:
        limit = int(request.args.get("limit", DEFAULT_PAGE))
    except ValueError:
        raise BadRequest("limit must be an integer from 1 to 100") from None
    if not 1 <= limit <= MAX_PAGE:
        raise BadRequest("limit must be an integer from 1 to 100")
    cursor = request.args.get("cursor")
    if cursor:
        created_at, ident = _decode(cursor)
        query = query.where(
            or_(model.created_at < created_at, and_(model.created_at == created_at, model.id < ident))
        )
    rows = list(session.execute(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)).scalars())
    next_cursor = _encode(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor
