"""The edge of the gateway's own API: how large and how deep a JSON body may be, and what an id,
a query parameter or a stored string may hold, checked before anything reaches the database."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated

from flask import Flask, current_app, request
from pydantic import AfterValidator, Field
from werkzeug.exceptions import NotFound, RequestEntityTooLarge
from werkzeug.routing import BaseConverter

from app.errors import BadRequest
from app.gateway.fields import MAX_DEPTH, parse
from app.gateway.types import PayloadTooLarge
from app.models import (
    ApiKey,
    Consumer,
    Job,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookMessage,
)

# The parser refuses nesting deeper than fields.MAX_DEPTH by itself: API_MAX_JSON_DEPTH may not
# exceed it.
PARSER_DEPTH = MAX_DEPTH
_PARSER_REFUSAL = "recursion limit exceeded"
# A \uD800-\uDBFF escape not followed by a \uDC00-\uDFFF one, or a \uDC00-\uDFFF one alone.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # C0 controls and DEL: no id, path or query holds one


@dataclass(frozen=True)
class Limits:
    """The API_* settings, read once per app: bytes of a JSON request body, levels of nesting."""

    max_body_size: int
    max_json_depth: int

    @classmethod
    def from_config(cls, config: dict) -> Limits:
        """Raises ValueError for a size below 1 byte or a depth outside 1-PARSER_DEPTH."""
        limits = cls(max_body_size=int(config["API_MAX_BODY_SIZE"]), max_json_depth=int(config["API_MAX_JSON_DEPTH"]))
        if limits.max_body_size < 1:
            raise ValueError(f"API_MAX_BODY_SIZE must be at least 1 byte, not {limits.max_body_size}")
        if not 1 <= limits.max_json_depth <= PARSER_DEPTH:
            raise ValueError(f"API_MAX_JSON_DEPTH must be from 1 to {PARSER_DEPTH}, not {limits.max_json_depth}")
        return limits


def limits() -> Limits:
    return current_app.extensions["api_limits"]


# -- request bodies -----------------------------------------------------------------------------


def read_body(limit: int | None, setting: str) -> bytes:
    """The request body, at most ``limit`` bytes (None: no limit), named ``setting`` in the 413.

    A body whose Content-Length is over the limit is refused before a byte of it is read; a
    chunked one is read until it passes the limit, then refused: PayloadTooLarge (413, RFC 9110
    section 15.5.14).
    """
    length = request.content_length
    if limit is not None and length is not None and length > limit:
        raise PayloadTooLarge(f"The request body ({length} bytes) exceeds the limit of {limit} bytes ({setting})")
    if limit is None:
        return request.get_data(cache=True)
    # werkzeug stops reading a chunked body at max_content_length without a word: one byte more
    # tells a body over the limit from one just at it.
    request.max_content_length = limit + 1
    try:
        data = request.get_data(cache=True)
    except RequestEntityTooLarge:
        data = None
    if data is None or len(data) > limit:
        raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes ({setting})")
    return data


def parse_json(data: bytes, max_depth: int) -> object:
    """``data`` parsed as JSON text (RFC 8259), nested at most ``max_depth`` arrays and objects
    deep; raises BadRequest naming what is wrong and where.

    Refused besides malformed text: nesting deeper than ``max_depth`` (checked by the parser up
    to PARSER_DEPTH, then on the parsed value, never by recursion), a string with a lone
    surrogate escape such as ``\\ud800`` (not Unicode: RFC 8259 section 8.2, RFC 7493 section
    2.1), ``NaN``/``Infinity`` and numbers too large for a double (RFC 8259 section 6).
    """
    try:
        value = parse(data, allow_inf_nan=False)
    except ValueError as exc:
        reason = str(exc)
        if reason.startswith(_PARSER_REFUSAL):
            raise BadRequest(f"The request body nests arrays and objects deeper than {max_depth} levels (API_MAX_JSON_DEPTH)") from None
        lone = _LONE_SURROGATE.search(data) if "surrogate" in reason or "hex escape" in reason else None
        if lone is not None:
            escape = lone.group().decode()
            raise BadRequest(f"The request body is not valid JSON: a string holds the lone surrogate {escape}, which is not Unicode") from None
        raise BadRequest(f"The request body is not valid JSON: {reason}") from None
    _check_value(value, max_depth)
    return value


def _check_value(value: object, max_depth: int) -> None:
    """Walk ``value`` without recursion: no deeper than ``max_depth``, every number finite."""
    pending: list[tuple[object, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth + 1 > max_depth:
                raise BadRequest(f"The request body nests arrays and objects deeper than {max_depth} levels (API_MAX_JSON_DEPTH)")
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list | float))
        elif isinstance(item, float) and not math.isfinite(item):
            raise BadRequest("The request body holds a number too large for a double (IEEE 754 binary64), the most JSON may portably carry")


# -- strings that are stored --------------------------------------------------------------------


def storable(value: str) -> str:
    """``value`` when a database can store it as text; raises ValueError for NUL (U+0000),
    which PostgreSQL text cannot hold (SQLite can, and the two must behave alike)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL (U+0000)")
    return value


def column_length(attribute) -> int:
    """The length of a model's ``String(n)`` column: ``column_length(Consumer.plan)`` is 64."""
    return attribute.type.length


def one_line(value: str) -> str:
    """``value`` when it holds no control character (U+0000-U+001F, U+007F); raises ValueError.
    A name, plan or scope travels in header fields to upstreams (X-Consumer-*), where a line
    break cannot go (RFC 9110 section 5.5)."""
    if CONTROL.search(value):
        raise ValueError("must not contain control characters (U+0000-U+001F, U+007F)")
    return value


def stored_text(*attributes, min_length: int = 0, lines: bool = False) -> type[str]:
    """The request field that fills (or is compared with) the columns ``attributes``: a string
    of ``min_length`` up to the longest column's length, which the database can store, and
    one line of text unless ``lines`` (free text, such as a description)."""
    longest = max(column_length(attribute) for attribute in attributes)
    check = storable if lines else one_line
    return Annotated[str, Field(min_length=min_length, max_length=longest), AfterValidator(check)]  # type: ignore[return-value]


# A consumer named in a body: its id or its name.
ConsumerReference = stored_text(Consumer.id, Consumer.name, min_length=1)
# A scope a key is given: one line (it is sent in X-Consumer-Scopes), stored in a JSON column.
Scope = Annotated[str, AfterValidator(one_line)]


# -- path ids and query parameters ---------------------------------------------------------------

ID_LENGTH = max(column_length(model.id) for model in (Consumer, ApiKey, Job, WebhookEndpoint, WebhookDelivery, WebhookMessage))


class ResourceId(BaseConverter):
    """``<id:name>`` in a rule: one path segment that can be the id of a stored resource (at most
    ID_LENGTH characters, no control characters); anything else is a 404 that says why, and
    never reaches the database."""

    def to_python(self, value: str) -> str:
        if len(value) > ID_LENGTH or CONTROL.search(value):
            raise NotFound(f"No resource has the id {value!r}: ids are at most {ID_LENGTH} characters, without control characters")
        return value


def refuse_control_characters() -> None:
    """before_request on the API: a query parameter (name or value) with a control character
    (U+0000-U+001F, U+007F) is a 400 naming it; no id, cursor, status or path holds one."""
    for name, value in request.args.items(multi=True):
        if CONTROL.search(name) or CONTROL.search(value):
            raise BadRequest(f"The query parameter {name!r} holds a control character (U+0000-U+001F or U+007F)")


def init_app(app: Flask, blueprints: frozenset[str]) -> None:
    """Read the API_* limits, add the ``id`` converter (before any rule uses it), and check the
    query of every request to ``blueprints``."""
    app.extensions["api_limits"] = Limits.from_config(app.config)
    app.url_map.converters["id"] = ResourceId

    def check_query() -> None:
        if request.blueprint in blueprints:
            refuse_control_characters()

    app.before_request(check_query)
