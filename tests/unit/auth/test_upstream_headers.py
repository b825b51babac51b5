"""What an upstream learns about the caller: X-Consumer-* set by the gateway only, credentials kept back."""
from __future__ import annotations

import pytest


def test_an_authenticated_request_tells_the_upstream_who_is_calling(client, identity, upstream):
    consumer = identity.consumer("acme")
    key = identity.key(consumer, scopes=("orders:write", "orders:read"))

    response = client.get("/orders", headers={"X-API-Key": key})

    assert response.status_code == 200
    seen = upstream.calls[-1].request.headers
    assert seen["X-Consumer-ID"] == consumer
    assert seen["X-Consumer-Username"] == "acme"
    assert seen["X-Consumer-Scopes"] == "orders:read orders:write"


@pytest.mark.parametrize(("path", "authenticated"), [("/private", True), ("/maybe", True), ("/maybe", False), ("/open", False)])
def test_client_sent_consumer_headers_never_reach_the_upstream(client, identity, upstream, path, authenticated):
    consumer = identity.consumer("acme")
    headers = {"X-Consumer-ID": "spoofed", "X-Consumer-Anything": "x", "x-consumer-username": "root"}
    if authenticated:
        headers["X-API-Key"] = identity.key(consumer)

    response = client.get(path, headers=headers)

    assert response.status_code == 200
    seen = upstream.calls[-1].request.headers
    assert "X-Consumer-Anything" not in seen
    if authenticated:
        assert (seen["X-Consumer-ID"], seen["X-Consumer-Username"]) == (consumer, "acme")
    else:
        assert "X-Consumer-ID" not in seen
        assert "X-Consumer-Username" not in seen


@pytest.mark.parametrize("path", ["/private", "/maybe"])
@pytest.mark.parametrize("send", ["X-API-Key", "Authorization"])
def test_credentials_are_not_forwarded_by_default(client, identity, upstream, path, send):
    key = identity.key()
    headers = {"X-API-Key": key} if send == "X-API-Key" else {"Authorization": f"Bearer {key}"}

    response = client.get(path, headers=headers)

    assert response.status_code == 200
    seen = upstream.calls[-1].request.headers
    assert "X-API-Key" not in seen
    assert "Authorization" not in seen
    assert "X-Consumer-ID" in seen


def test_a_route_with_forward_credentials_passes_them_on(client, identity, upstream):
    key = identity.key()

    response = client.get("/passthrough", headers={"X-API-Key": key, "Authorization": "Bearer other"})

    assert response.status_code == 200
    seen = upstream.calls[-1].request.headers
    assert seen["X-API-Key"] == key
    assert seen["Authorization"] == "Bearer other"


def test_a_non_bearer_authorization_on_an_optional_route_is_not_forwarded(client, upstream):
    response = client.get("/maybe", headers={"Authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"})

    assert response.status_code == 200
    assert "Authorization" not in upstream.calls[-1].request.headers
