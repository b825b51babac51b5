"""Request id: a sane client X-Request-ID is kept, anything else replaced, and it is echoed back."""
from __future__ import annotations

import os
import re
import uuid

import pytest
from flask import Flask, g

from app import errors
from app.gateway import request_id
from app.gateway.request_id import accept_or_generate

GENERATED = re.compile(r"^[0-9a-f]{32}$")


@pytest.mark.parametrize("value", ["abc", "a" * 128, "req-1.2_3:4@5/6+7=8", "0b6f2c1e-7a4d-4b8e-9d3c-2f1a0e9b8c7d"])
def test_a_sane_client_id_is_kept(value):
    assert accept_or_generate(value) == value


@pytest.mark.parametrize(
    "value", [None, "", "a" * 129, "has space", "tab\there", "caf\u00e9", "x\r\nSet-Cookie: a=1", "semi;colon"]
)
def test_anything_else_is_replaced_by_a_fresh_id(value):
    generated = accept_or_generate(value)

    assert GENERATED.match(generated)
    assert generated != accept_or_generate(value)


@pytest.fixture
def app():
    app = Flask("request-id-test")
    app.config["API_PREFIX"] = "/_gateway"
    seen = []

    @app.before_request
    def registered_earlier():
        seen.append(g.get("request_id"))

    request_id.init_app(app)
    errors.init_app(app)

    @app.get("/echo")
    def echo():
        return {"request_id": g.request_id}

    app.seen_by_before_request = seen
    return app


def test_the_clients_id_is_used_and_echoed(app):
    response = app.test_client().get("/echo", headers={"X-Request-ID": "trace-7"})

    assert response.headers["X-Request-ID"] == "trace-7"
    assert response.json == {"request_id": "trace-7"}


def test_an_id_is_made_when_the_client_sent_none(app):
    response = app.test_client().get("/echo")

    assert GENERATED.match(response.headers["X-Request-ID"])
    assert response.json["request_id"] == response.headers["X-Request-ID"]


def test_an_unsafe_client_id_is_replaced(app):
    response = app.test_client().get("/echo", headers={"X-Request-ID": "a" * 200})

    assert GENERATED.match(response.headers["X-Request-ID"])


def test_the_id_is_set_before_any_other_before_request_hook(app):
    app.test_client().get("/echo", headers={"X-Request-ID": "first"})

    assert app.seen_by_before_request == ["first"]


def test_error_answers_carry_the_id_too(app):
    response = app.test_client().get("/missing", headers={"X-Request-ID": "lost-1"})

    assert response.status_code == 404
    assert response.headers["X-Request-ID"] == "lost-1"
    assert response.json["request_id"] == "lost-1"


def test_each_request_gets_its_own_id(app):
    client = app.test_client()

    ids = {client.get("/echo").headers["X-Request-ID"] for _ in range(3)}

    assert len(ids) == 3


def test_a_generated_id_is_a_version_4_uuid():
    for _ in range(100):
        generated = uuid.UUID(hex=accept_or_generate(None))
        assert generated.version == 4 and generated.variant == uuid.RFC_4122


def test_a_forked_worker_makes_ids_of_its_own():
    # gunicorn forks its workers from one master: their ids must not repeat each other's.
    accept_or_generate(None)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out without running pytest's teardown
        os.write(write_end, " ".join(accept_or_generate(None) for _ in range(5)).encode())
        os._exit(0)
    os.close(write_end)
    ours = [accept_or_generate(None) for _ in range(5)]
    with os.fdopen(read_end) as pipe:
        theirs = pipe.read().split()
    os.waitpid(pid, 0)
    assert len(theirs) == 5 and not set(theirs) & set(ours)
