"""Transform stage: header rules both ways, JSON field rules on responses, refusals that never leak."""
from __future__ import annotations

import json

import pytest
from werkzeug.datastructures import Headers

from app.gateway.fields import FieldRules
from app.gateway.transform import UnfilterableBody, is_json, transform
from app.gateway.types import GatewayResponse
from tests.unit.gateway.stand_ins import Answers, make_request

SECRET = {"id": 1, "password_hash": "x"}


def json_response(value: object, headers: list[tuple[str, str]] | None = None, status: int = 200) -> GatewayResponse:
    body = json.dumps(value).encode()
    fields = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body))), *(headers or [])])
    return GatewayResponse(status=status, headers=fields, body=[body[:5], body[5:]])


def test_a_route_without_rules_has_no_stage():
    upstream = Answers(200)

    assert transform(None, None, FieldRules(), 0)(upstream) is upstream


def test_request_header_rules_remove_then_rename_then_add():
    upstream = Answers(200)
    rules = (("X-Debug",), (("X-Old", "X-New"),), (("X-Added", "1"),))
    handler = transform(rules, None, FieldRules(), 0)(upstream)

    handler(make_request(headers=[("X-Debug", "yes"), ("x-old", "v"), ("X-Added", "client"), ("X-Keep", "k")]))

    sent = upstream.calls[0].headers
    assert "X-Debug" not in sent
    assert sent.get("X-New") == "v" and "X-Old" not in sent
    assert sent.getlist("X-Added") == ["1"]  # add replaces what the client sent
    assert sent.get("X-Keep") == "k"


def test_response_header_rules_apply_to_what_the_client_gets():
    upstream = Answers(lambda req: GatewayResponse(200, Headers([("Server-Timing", "db;dur=3"), ("X-Internal", "1")])))
    handler = transform(None, (("X-Internal",), (("Server-Timing", "X-Timing"),), (("X-Frame-Options", "DENY"),)), FieldRules(), 0)(upstream)

    response = handler(make_request())

    assert dict(response.headers) == {"X-Timing": "db;dur=3", "X-Frame-Options": "DENY"}


def test_json_fields_are_filtered_and_the_length_follows():
    upstream = Answers(lambda req: json_response(SECRET))
    handler = transform(None, None, FieldRules(deny=("password_hash",)), 1000)(upstream)

    response = handler(make_request(headers=[("Accept-Encoding", "gzip")]))

    body = b"".join(response.body)
    assert json.loads(body) == {"id": 1}
    assert response.headers["Content-Length"] == str(len(body))
    assert upstream.calls[0].headers["Accept-Encoding"] == "identity"  # only a plain body can be filtered


def test_non_json_bodies_pass_through_untouched():
    raw = b'{"password_hash": "x"}'
    upstream = Answers(lambda req: GatewayResponse(200, Headers([("Content-Type", "text/plain")]), [raw]))
    handler = transform(None, None, FieldRules(deny=("password_hash",)), 1000)(upstream)

    assert b"".join(handler(make_request()).body) == raw


@pytest.mark.parametrize(
    "response",
    [
        lambda: json_response(SECRET, [("Content-Encoding", "gzip")]),
        lambda: GatewayResponse(200, Headers([("Content-Type", "application/json")]), [b"{not json"]),
        lambda: json_response({"blob": "x" * 200, **SECRET}),
    ],
    ids=["encoded", "invalid", "too-large"],
)
def test_a_json_body_that_cannot_be_filtered_is_refused_not_leaked(response):
    upstream = Answers(lambda req: response())
    handler = transform(None, None, FieldRules(deny=("password_hash",)), 100)(upstream)

    with pytest.raises(UnfilterableBody) as raised:
        handler(make_request())

    assert raised.value.status == 502
    assert len(upstream.closed) == 1  # the upstream's connection is released


def test_a_head_answer_loses_its_content_length_since_the_filtered_length_is_unknown():
    upstream = Answers(lambda req: json_response(SECRET))
    handler = transform(None, None, FieldRules(deny=("password_hash",)), 1000)(upstream)

    response = handler(make_request("HEAD"))

    assert "Content-Length" not in response.headers


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [("application/json", True), ("application/problem+json; charset=utf-8", True), ("text/json", False), (None, False), ("application/jsonx", False)],
)
def test_is_json(content_type, expected):
    assert is_json(content_type) is expected


def test_ranges_are_not_asked_for_and_a_partial_answer_is_refused():
    upstream = Answers(lambda req: json_response(SECRET, status=206))
    handler = transform(None, None, FieldRules(deny=("password_hash",)), 1000)(upstream)

    with pytest.raises(UnfilterableBody):
        handler(make_request(headers=[("Range", "bytes=0-10"), ("If-Range", '"x"')]))

    sent = upstream.calls[0].headers
    assert "Range" not in sent and "If-Range" not in sent


@pytest.mark.parametrize("content_type", [None, "text/json", "application/x-json"])
def test_bodies_that_may_be_json_are_filtered_too(content_type):
    raw = b'{"id": 1, "password_hash": "x"}'
    fields = Headers([("Content-Type", content_type)] if content_type else [])
    upstream = Answers(lambda req: GatewayResponse(200, fields, [raw]))
    handler = transform(None, None, FieldRules(deny=("password_hash",)), 1000)(upstream)

    assert json.loads(b"".join(handler(make_request()).body)) == {"id": 1}
