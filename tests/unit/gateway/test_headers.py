"""Header stage: hop-by-hop fields dropped both ways, X-Forwarded-*, Via and X-Request-ID."""
from __future__ import annotations

from werkzeug.datastructures import EnvironHeaders, Headers

from app.gateway.headers import forwarding_headers
from app.gateway.types import GatewayResponse
from tests.unit.gateway.stand_ins import Answers, make_request

HOP_BY_HOP = [
    ("Connection", "keep-alive"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authenticate", "Basic"),
    ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "Expires"),
    ("Transfer-Encoding", "chunked"),
    ("Upgrade", "websocket"),
]


def upstream_answering(*headers: tuple[str, str]) -> Answers:
    return Answers(GatewayResponse(status=200, headers=Headers(list(headers)), body=[b"ok"]))


def through_stage(request_headers=(), response_headers=(), **request_fields):
    """Send a request with ``request_headers`` through the stage to an upstream answering
    ``response_headers``; return (headers the upstream got, headers the client gets)."""
    upstream = upstream_answering(*response_headers)
    fields = {"client_addr": "203.0.113.7", "scheme": "https", "host": "api.example.com", "request_id": "req-1"}
    fields.update(request_fields)
    req = make_request("GET", "/a", headers=list(request_headers), **fields)
    response = forwarding_headers("frontdoor")(upstream)(req)
    return upstream.calls[0].headers, response.headers


def test_hop_by_hop_fields_are_not_forwarded_to_the_upstream():
    sent, _ = through_stage([*HOP_BY_HOP, ("Authorization", "Bearer t"), ("Accept", "application/json")])

    for name, _ in HOP_BY_HOP:
        assert name not in sent
    assert sent["Authorization"] == "Bearer t"
    assert sent["Accept"] == "application/json"


def test_hop_by_hop_fields_are_not_passed_back_to_the_client():
    _, received = through_stage(response_headers=[*HOP_BY_HOP, ("Content-Type", "application/json")])

    for name, _ in HOP_BY_HOP:
        assert name not in received
    assert received["Content-Type"] == "application/json"


def test_fields_named_by_connection_are_dropped_both_ways():
    sent, received = through_stage(
        [("Connection", "close, X-Client-Hop"), ("X-Client-Hop", "1"), ("X-Kept", "1")],
        [("Connection", "X-Upstream-Hop , keep-alive"), ("X-Upstream-Hop", "1"), ("X-Also-Kept", "1")],
    )

    assert "X-Client-Hop" not in sent and sent["X-Kept"] == "1"
    assert "X-Upstream-Hop" not in received and received["X-Also-Kept"] == "1"


def test_fields_named_by_a_second_connection_line_are_dropped():
    _, received = through_stage(
        response_headers=[("Connection", "keep-alive"), ("Connection", "X-Upstream-Hop"), ("X-Upstream-Hop", "1")]
    )

    assert "X-Upstream-Hop" not in received


def test_host_and_content_length_are_left_to_the_upstream_connection():
    sent, received = through_stage(
        [("Host", "api.example.com"), ("Content-Length", "12")], [("Content-Length", "2")]
    )

    assert "Host" not in sent
    assert "Content-Length" not in sent
    assert received["Content-Length"] == "2"  # the response's length is end to end


def test_the_peer_is_added_to_x_forwarded_for():
    sent, _ = through_stage()
    assert sent["X-Forwarded-For"] == "203.0.113.7"

    sent, _ = through_stage([("X-Forwarded-For", "198.51.100.1, 10.0.0.2")])
    assert sent.getlist("X-Forwarded-For") == ["198.51.100.1, 10.0.0.2, 203.0.113.7"]


def test_proto_and_host_are_the_gateways_view_not_the_clients_claim():
    sent, _ = through_stage([("X-Forwarded-Proto", "gopher"), ("X-Forwarded-Host", "evil.example")])

    assert sent.getlist("X-Forwarded-Proto") == ["https"]
    assert sent.getlist("X-Forwarded-Host") == ["api.example.com"]


def test_via_is_appended_on_the_request_and_the_response():
    sent, received = through_stage([("Via", "1.0 edge")], [("Via", "1.1 backend")])

    assert sent.getlist("Via") == ["1.0 edge, 1.1 frontdoor"]
    assert received.getlist("Via") == ["1.1 backend, 1.1 frontdoor"]


def test_via_is_set_when_nobody_sent_one():
    sent, received = through_stage()

    assert sent["Via"] == "1.1 frontdoor"
    assert received["Via"] == "1.1 frontdoor"


def test_the_request_id_goes_to_the_upstream():
    sent, _ = through_stage([("X-Request-ID", "client-chosen")], request_id="abc123")

    assert sent.getlist("X-Request-ID") == ["abc123"]


def test_repeated_response_fields_stay_separate():
    _, received = through_stage(response_headers=[("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; HttpOnly")])

    assert received.getlist("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]


def test_flasks_read_only_request_headers_are_accepted():
    environ = {"HTTP_CONNECTION": "close", "HTTP_HOST": "api.example.com", "HTTP_X_FORWARDED_FOR": "198.51.100.1"}
    req = make_request("GET", "/a", client_addr="203.0.113.7", request_id="r")
    req.headers = EnvironHeaders(environ)
    upstream = upstream_answering()

    forwarding_headers("frontdoor")(upstream)(req)

    sent = upstream.calls[0].headers
    assert "Connection" not in sent and "Host" not in sent
    assert sent["X-Forwarded-For"] == "198.51.100.1, 203.0.113.7"


def test_the_upstreams_allow_lists_only_the_methods_the_route_takes():
    stage = forwarding_headers("frontdoor", methods=("GET", "POST", "OPTIONS"))
    answered = stage(upstream_answering(("Allow", "GET, OPTIONS, PATCH, DELETE, HEAD, PUT, TRACE, POST")))(make_request(method="OPTIONS"))
    assert answered.headers["Allow"] == "GET, OPTIONS, HEAD, POST"


def test_a_route_taking_every_method_passes_the_upstreams_allow_on():
    answered = forwarding_headers("frontdoor")(upstream_answering(("Allow", "GET, TRACE")))(make_request(method="OPTIONS"))
    assert answered.headers["Allow"] == "GET, TRACE"
