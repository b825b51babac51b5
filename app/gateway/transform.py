"""Transform stage: a route's header rules both ways, and its JSON field rules on responses."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, model_validator
from werkzeug.datastructures import Headers

from app.gateway.fields import FieldRules, parse
from app.gateway.schema import Strict
from app.gateway.types import (
    GatewayRequest,
    GatewayResponse,
    Handler,
    Middleware,
    UpstreamUnreachable,
)

if TYPE_CHECKING:
    from app.gateway.pipeline import Context

_BODYLESS = frozenset({204, 304})


_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a token (RFC 9110 section 5.1)
_OWNED = frozenset({"authorization", "x-api-key", "via", "x-request-id", "host", "content-length"})
_FIELD_VALUE = re.compile(r"[ \t\x21-\x7e]*")  # visible ASCII, spaces and tabs (section 5.5)


class HeaderRules(Strict):
    """Header changes, applied in this order: ``remove`` (names), ``rename`` (``{old: new}``),
    ``add`` (``{name: value}``, replacing a field of that name)."""

    remove: tuple[str, ...] = ()
    rename: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fields(self) -> HeaderRules:
        for name in (*self.remove, *self.rename, *self.rename.values(), *self.add):
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header field name")
        for name, value in self.add.items():
            if not _FIELD_VALUE.fullmatch(value):
                raise ValueError(f"the value of {name} has characters a header field cannot carry")
        return self

    def owned(self) -> list[str]:
        """The fields these rules name that belong to the gateway: credentials and the fields
        it sets itself (rules on them would do nothing, or pass on a client's key)."""
        named = [*self.remove, *self.rename, *self.rename.values(), *self.add]
        return [name for name in named if name.lower() in _OWNED or name.lower().startswith(("x-consumer-", "x-forwarded-"))]

    def as_rules(self) -> tuple:
        return (self.remove, tuple(self.rename.items()), tuple(self.add.items()))


class BodyRules(Strict):
    """JSON response fields: ``allow`` (dotted paths kept), ``deny`` (dotted paths removed),
    ``rename`` (top-level ``{old: new}``); ``max_size`` bytes of body are read to apply them."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    rename: dict[str, str] = Field(default_factory=dict)
    max_size: Annotated[int, Field(gt=0)] = 10 * 1024 * 1024


class UnfilterableBody(UpstreamUnreachable):
    """The route filters JSON fields, and the upstream's JSON body cannot be read (502): it is
    never passed on unfiltered, so a denied field cannot leak."""

    slug = "unfilterable-body"


def is_json(content_type: str | None) -> bool:
    """``application/json`` or any ``+json`` type (RFC 6839 section 3.1)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def may_be_json(content_type: str | None) -> bool:
    """What a route with field rules treats as JSON: any JSON type, the non-standard
    ``text/json`` and ``application/x-json``, and a body with no type at all."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return not media or is_json(media) or media in ("text/json", "application/x-json")


def apply_header_rules(headers: Headers, remove: tuple[str, ...], rename: tuple[tuple[str, str], ...], add: tuple[tuple[str, str], ...]) -> Headers:
    """``headers`` with the fields in ``remove`` dropped, then ``rename`` (old, new) applied,
    then ``add`` (name, value) set, replacing any field of that name. A new Headers object."""
    drop = {name.lower() for name in remove}
    renamed = {old.lower(): new for old, new in rename}
    out = Headers()
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop:
            continue
        out.add(renamed.get(lower, name), value)
    for name, value in add:
        out.set(name, value)
    return out


def transform(
    request_rules: tuple | None,
    response_rules: tuple | None,
    fields: FieldRules,
    max_body: int,
) -> Middleware:
    """Build the transform stage. ``request_rules``/``response_rules`` are ``(remove, rename,
    add)`` or None; ``fields`` filter JSON response bodies of at most ``max_body`` bytes.

    With field rules the upstream is asked for ``Accept-Encoding: identity`` (RFC 9110 section
    12.5.3), since only an unencoded body can be filtered; a JSON body that is encoded anyway,
    larger than ``max_body`` or not valid JSON is refused with UnfilterableBody (502) rather
    than passed on. Non-JSON bodies pass through untouched. A route with no rules has no stage.
    """
    if request_rules is None and response_rules is None and not fields:
        return lambda next_handler: next_handler

    def middleware(next_handler: Handler) -> Handler:
        def handle(req: GatewayRequest) -> GatewayResponse:
            if request_rules is not None:
                req.headers = apply_header_rules(req.headers, *request_rules)
            if fields:
                # Only a whole, unencoded body can be filtered: no ranges, no content coding.
                req.headers = Headers([(n, v) for n, v in req.headers.items() if n.lower() not in ("range", "if-range")])
                req.headers.set("Accept-Encoding", "identity")
            response = next_handler(req)
            try:
                if fields and may_be_json(response.headers.get("Content-Type")):
                    _filter(req, response, fields, max_body)
                if response_rules is not None:
                    response.headers = apply_header_rules(response.headers, *response_rules)
            except BaseException:
                response.close()
                raise
            return response

        return handle

    return middleware


def _filter(req: GatewayRequest, response: GatewayResponse, fields: FieldRules, max_body: int) -> None:
    headers = response.headers
    if req.method == "HEAD" or response.status in _BODYLESS:
        headers.pop("Content-Length", None)  # the filtered body's length is not known
        return
    if headers.get("Content-Encoding", "identity").lower() != "identity":
        raise UnfilterableBody("The upstream sent an encoded JSON body that this route's field rules cannot read")
    if response.status == 206:
        raise UnfilterableBody("The upstream sent part of a JSON body; this route's field rules need all of it")
    data = _read(response.body, max_body)
    try:
        value = parse(data)
    except ValueError as exc:
        raise UnfilterableBody(f"The upstream's JSON body cannot be read ({exc}); this route's field rules cannot apply") from None
    body = json.dumps(fields.apply(value), separators=(",", ":")).encode()
    headers["Content-Length"] = str(len(body))
    response.body = [body]


def _read(chunks: Iterable[bytes], limit: int) -> bytes:
    out, size = [], 0
    try:
        for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise UnfilterableBody(f"The upstream's JSON body is larger than the {limit} bytes this route's field rules may read")
            out.append(chunk)
    except UnfilterableBody:
        raise
    except Exception as exc:
        raise UnfilterableBody("The upstream closed the connection before its JSON body was complete") from exc
    return b"".join(out)


def build(ctx: Context) -> Middleware:
    """The route's header and JSON field rules (no stage when it has none)."""
    route = ctx.route
    body = route.response_body
    return transform(
        route.request_headers.as_rules() if route.request_headers else None,
        route.response_headers.as_rules() if route.response_headers else None,
        FieldRules(body.allow, body.deny, tuple(body.rename.items())) if body else FieldRules(),
        body.max_size if body else 0,
    )
