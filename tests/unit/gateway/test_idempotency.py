"""Idempotent replays: one upstream call for a repeated POST, 422 for another body, 409 while in flight."""
from __future__ import annotations

import threading
import time

import pytest

from app.gateway.cachestore import MemoryStore
from app.gateway.idempotency import Idempotency, idempotency
from app.gateway.types import GatewayResponse, UpstreamUnreachable
from app.identity import Principal
from tests.factories import Identity
from tests.unit.gateway.stand_ins import Answers, make_request


@pytest.fixture
def app(make_app, upstream):
    return make_app(
        routes=f"""
upstreams:
  bin:
    targets: ["{upstream.url}"]
routes:
  - path: /pay
    upstream: bin
    strip_prefix: true
    idempotency: {{ttl: 60}}
  - path: /plain
    upstream: bin
    strip_prefix: true
"""
    )


@pytest.fixture
def key(app) -> str:
    return Identity(app).key()


def post(client, path: str, key: str, body: dict, idempotency_key: str = "order-1"):
    return client.post(path, json=body, headers={"X-API-Key": key, "Idempotency-Key": idempotency_key})


def test_two_identical_posts_make_one_upstream_call_and_the_second_is_a_replay(app, key, upstream):
    client = app.test_client()

    first = post(client, "/pay/anything/charge", key, {"amount": 5})
    second = post(client, "/pay/anything/charge", key, {"amount": 5})

    assert first.status_code == second.status_code == 200
    assert upstream.hits("/anything/charge") == 1
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert second.data == first.data


def test_the_same_key_with_another_body_is_a_422(app, key, upstream):
    client = app.test_client()
    post(client, "/pay/anything/charge", key, {"amount": 5})

    other = post(client, "/pay/anything/charge", key, {"amount": 6})

    assert other.status_code == 422
    assert other.json["type"].endswith("/idempotency-key-reused")
    assert upstream.hits("/anything/charge") == 1


def test_a_repeat_while_the_first_is_in_flight_is_a_409(app, key, upstream):
    upstream.gate.clear()
    answered = {}
    first = threading.Thread(target=lambda: answered.setdefault("first", post(app.test_client(), "/pay/gate/x", key, {"n": 1})))
    first.start()
    upstream.wait_entered()

    repeat = post(app.test_client(), "/pay/gate/x", key, {"n": 1})
    upstream.gate.set()
    first.join(10)

    assert repeat.status_code == 409
    assert repeat.headers["Retry-After"] == "1"
    assert answered["first"].status_code == 200
    assert upstream.hits("/gate/x") == 1


def test_keys_are_per_consumer_and_routes_without_the_setting_are_untouched(app, key, upstream):
    client = app.test_client()
    other = Identity(app).key()

    post(client, "/pay/anything/a", key, {"n": 1})
    post(client, "/pay/anything/a", other, {"n": 1})
    post(client, "/plain/anything/b", key, {"n": 1})
    post(client, "/plain/anything/b", key, {"n": 1})

    assert upstream.hits("/anything/a") == 2
    assert upstream.hits("/anything/b") == 2


def test_a_bad_key_is_a_400(app, key):
    response = post(app.test_client(), "/pay/anything", key, {}, idempotency_key="x" * 256)

    assert response.status_code == 400
    assert response.json["type"].endswith("/bad-idempotency-key")


def test_a_gateway_error_is_not_kept_so_the_client_may_retry():
    upstream = Answers(UpstreamUnreachable("refused", sent=False), 201)
    handler = idempotency("r", Idempotency(ttl=60, max_size=1024, in_flight=5), MemoryStore(10_000), "t", clock=time.time)(upstream)
    who = Principal("con_1", "c", None, frozenset(), "key_1")

    def request():
        return make_request("POST", "/x", headers={"Idempotency-Key": "k"}, body=b"{}", principal=who)

    with pytest.raises(UpstreamUnreachable):
        handler(request())
    again = handler(request())

    assert again.status == 201
    assert len(upstream.calls) == 2
    assert isinstance(again, GatewayResponse)
