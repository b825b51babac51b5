"""What every resource handler shares: its OpenAPI declaration, body validation, replies
validated by their models, cursor pagination, scoped lookups."""
from __future__ import annotations

import base64
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import pydantic_core
from flask import current_app, jsonify, request
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import Select, and_, or_
from werkzeug.exceptions import NotFound

from app.api.inputs import (
    ID_LENGTH,
    limits,
    parse_json,
    read_body,
    storable,
)
from app.errors import BadRequest, ProblemError

M = TypeVar("M", bound=BaseModel)
F = TypeVar("F", bound=Callable)

DEFAULT_PAGE = 20
MAX_PAGE = 100


class Schema(BaseModel):
    """A request body: unknown fields are errors, not silently ignored, and a value must have
    its field's JSON type (strict mode: ``0`` or ``"yes"`` is not a boolean, ``"60"`` not a
    number), as the OpenAPI document says."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Unprocessable(ProblemError):
    """422: the body is JSON but a field is wrong; ``errors`` lists each one."""

    status, title, slug = 422, "Unprocessable Content", "invalid-request"


class ConflictProblem(ProblemError):
    """409: the request conflicts with the resource as it is (a name already taken, a state that does not allow the change); the detail says which."""

    status, title, slug = 409, "Conflict", "conflict"


class Undocumented(RuntimeError):
    """A view validated or answered with a model its ``@operation`` does not declare: a
    programming error, found by the tests (the OpenAPI document would otherwise lie)."""


@dataclass(frozen=True)
class Reply:
    """A documented answer: its body's model (None: no body), what it means, and the response
    headers it carries (names from ``openapi.HEADERS``; a trailing ``?``: not always sent).
    ``media`` other than application/json marks a body the handler builds itself."""

    model: type[BaseModel] | None
    description: str
    headers: tuple[str, ...] = ()
    media: str = "application/json"
    schema: dict[str, Any] | None = None  # the body's JSON Schema when no model describes it
    location: str | None = None  # the endpoint its Location names: linked by the body's ``id``


@dataclass(frozen=True)
class Param:
    """A query or header parameter: its JSON Schema, and form style without explode for a
    comma-separated list (``?status=a,b``)."""

    name: str
    where: Literal["query", "header"]
    schema: dict[str, Any]
    description: str
    explode: bool = True


@dataclass(frozen=True)
class Operation:
    """What a view accepts and answers, for the OpenAPI document and for ``body`` and ``reply``.

    ``errors`` are the problem statuses the handler itself raises; those that follow from the
    view's auth policy (401, 403), its body (400, 422) and the rate limiter (429, 503) are
    added by the document builder.
    """

    summary: str
    description: str
    replies: dict[int | str, Reply]
    body: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    params: tuple[Param, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def operation(
    summary: str,
    replies: dict[int | str, Reply],
    body: type[BaseModel] | None = None,
    errors: tuple[int, ...] = (),
    params: tuple[Param, ...] = (),
) -> Callable[[F], F]:
    """Declare a view's request body, answers, errors and parameters; its docstring becomes
    the operation's description."""

    def mark(view: F) -> F:
        view.operation = Operation(summary, inspect.cleandoc(view.__doc__ or ""), replies, body, errors, params)
        return view

    return mark


def declared() -> Operation:
    """The current view's Operation; raises Undocumented for a view without one."""
    view = current_app.view_functions.get(request.endpoint or "")
    declaration = getattr(view, "operation", None)
    if declaration is None:
        raise Undocumented(f"view {request.endpoint} has no @operation")
    return declaration


def reply(model: type[BaseModel], data: object, status: int = 200, headers: object = None) -> tuple:
    """``data`` validated as ``model`` and sent as JSON with ``status`` and ``headers``.

    Raises Undocumented unless the view declares ``model`` for ``status``, and
    pydantic.ValidationError when ``data`` does not fit it (a key it lacks or one it does
    not name): a 500, found by the tests, rather than a response the document does not describe.
    """
    documented = declared().replies.get(status)
    if documented is None or documented.model is not model:
        raise Undocumented(f"view {request.endpoint} answers {status} with {model.__name__}, which its @operation does not declare")
    content = model.model_validate(data).model_dump(mode="json", exclude_unset=True)
    return jsonify(content), status, headers or {}


def body(schema: type[M], max_size: int | None = None, setting: str = "API_MAX_BODY_SIZE") -> M:
    """The JSON request body validated as ``schema``; no body is taken as ``{}``.

    The body is at most ``max_size`` bytes (default API_MAX_BODY_SIZE; ``setting`` names the
    limit in the 413) and nests at most API_MAX_JSON_DEPTH levels (``inputs.parse_json``).
    Raises PayloadTooLarge (413) before reading a body that is too large, BadRequest (400)
    for one that is not JSON, Unprocessable (422) naming each field that is wrong, and
    Undocumented unless ``schema`` is the body the view's ``@operation`` declares.
    """
    if declared().body is not schema:
        raise Undocumented(f"view {request.endpoint} validates its body with {schema.__name__}, which its @operation does not declare")
    edge = limits()
    raw = read_body(max_size if max_size is not None else edge.max_body_size, setting)
    if not raw:
        data: object = {}
    elif not request.is_json:
        raise BadRequest(f"The request body is not valid JSON: its Content-Type is {request.mimetype or 'missing'}, not application/json")
    else:
        data = parse_json(raw, edge.max_json_depth)
    if not isinstance(data, dict):
        raise Unprocessable("The request body must be a JSON object", errors=[])
    return validated(schema, data)


def validated(schema: type[M], data: dict) -> M:
    """``data`` as ``schema``; raises Unprocessable (422) naming each field that is wrong
    (``errors``: ``[{"field", "message"}]``), as the API and the portal's forms report them."""
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


PAGE = (
    Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE}, "Items per page"),
    Param("cursor", "query", {"type": "string"}, "The ``next_cursor`` of the previous page (opaque)"),
)


def status_filter(statuses: tuple[str, ...]) -> Param:
    """``?status=a,b``: items in any of these statuses (``with_status``)."""
    schema = {"type": "array", "items": {"type": "string", "enum": list(statuses)}}
    return Param("status", "query", schema, "Only items in one of these statuses, comma-separated", explode=False)


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


# A cursor this API writes is about 100 characters; a longer one is not worth decoding.
MAX_CURSOR = 256


def _decode(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a cursor of ``_encode`` carries; raises BadRequest for anything else:
    text that is not base64 or JSON (parsed with a bounded depth), a timestamp without a zone or
    at the ends of the calendar (OverflowError in UTC), an id no row can have."""
    try:
        if len(cursor) > MAX_CURSOR:
            raise ValueError(f"longer than {MAX_CURSOR} characters")
        created_at, ident = pydantic_core.from_json(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(created_at, str) or not isinstance(ident, str) or len(ident) > ID_LENGTH:
            raise TypeError("not a timestamp and an id")
        when = datetime.fromisoformat(created_at)
        if when.tzinfo is None:
            raise ValueError("no time zone")
        return when.astimezone(UTC), storable(ident)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"cursor {cursor[:MAX_CURSOR]!r} is not one this API returned") from exc


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


def as_stored(view: F) -> F:
    """Mark a view whose answer is sent exactly as it was stored (a job's result: the upstream's
    status, headers and body): never compressed on the way out."""
    view.as_stored = True
    return view
