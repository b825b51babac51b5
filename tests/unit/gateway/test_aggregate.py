"""Aggregate routes: parallel calls, dependent calls, partial answers, required failures, field rules."""
from __future__ import annotations

import time

import pytest

from app.gateway.aggregate import fill
from app.gateway.routefile import RouteFileError, load
from tests.services import free_port


@pytest.fixture
def client(make_app, upstream):
    dead = free_port()
    app = make_app(
        routes=f"""
upstreams:
  bin:
    targets: ["{upstream.url}"]
    timeout: {{connect: 1.0, read: 5.0}}
  dead:
    targets: ["http://127.0.0.1:{dead}"]
routes:
  - path: /screen
    aggregate:
      a: {{upstream: bin, path: /delay/1}}
      b: {{upstream: bin, path: "/delay/1?n={{query.n}}"}}
      c: {{upstream: bin, path: "/anything/c/{{query.n}}?show_env=1", allow: [url, headers.X-Request-Id], rename: {{url: link}}}}
  - path: /user/{{user_id}}
    aggregate:
      profile: {{upstream: bin, path: "/anything/users/{{user_id}}?tags=x&tags=y", required: true, allow: [args]}}
      orders: {{upstream: bin, path: "/anything/orders?tags={{profile.body.args.tags}}", depends_on: [profile], allow: [args]}}
      each: {{upstream: bin, path: "/anything/each?tag={{profile.body.args.tags}}", depends_on: [profile], list_format: repeat, allow: [args]}}
  - path: /partial
    aggregate:
      fast: {{upstream: bin, path: /get, deny: [headers, origin]}}
      slow: {{upstream: bin, path: /delay/3, timeout: 0.5}}
      after_slow: {{upstream: bin, path: /get, depends_on: [slow]}}
  - path: /strict
    aggregate_mode: all
    aggregate:
      fast: {{upstream: bin, path: /get}}
      missing: {{upstream: bin, path: /status/404}}
  - path: /broken
    aggregate:
      fine: {{upstream: bin, path: /get}}
      payments: {{upstream: dead, path: /x, required: true}}
""",
    )
    return app.test_client()


def test_three_one_second_calls_answer_in_about_one_second(client, upstream):
    started = time.monotonic()
    response = client.get("/screen?n=7", headers={"X-Request-ID": "agg-1"})
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    # In parallel: both one-second calls were with the upstream at once (read where it shows,
    # not from the elapsed time, which a loaded machine stretches); and not sooner than a second.
    assert upstream.hits("/delay/1") == 2
    assert upstream.peak >= 2
    assert elapsed >= 0.9
    assert response.headers["X-Gateway-Completed"] == "true"
    body = response.json
    assert set(body) == {"a", "b", "c"}
    assert body["b"]["args"] == {"n": "7"}
    assert body["c"] == {"link": body["c"]["link"], "headers": {"X-Request-Id": "agg-1"}}  # allow, rename
    assert body["c"]["link"].endswith("/anything/c/7?show_env=1")


def test_a_dependent_call_uses_a_field_of_the_first(client, upstream):
    body = client.get("/user/42").json

    assert body["profile"] == {"args": {"tags": ["x", "y"]}}
    assert body["orders"] == {"args": {"tags": "x,y"}}  # a list as a comma-separated value
    assert body["each"] == {"args": {"tag": ["x", "y"]}}  # or as a repeated parameter
    assert upstream.hits("/anything/users/42") == 1


def test_an_optional_call_timing_out_gives_a_partial_answer(client):
    started = time.monotonic()
    response = client.get("/partial")

    assert time.monotonic() - started < 2.5  # the 0.5 s timeout, not the 3 s the slow call takes
    assert response.status_code == 200
    assert response.headers["X-Gateway-Completed"] == "false"
    body = response.json
    assert "headers" not in body["fast"] and "origin" not in body["fast"] and "url" in body["fast"]
    assert body["slow"] is None and body["after_slow"] is None
    assert body["errors"]["slow"]["status"] == 504
    assert "not called" in body["errors"]["after_slow"]["detail"]


def test_a_required_call_failing_fails_the_answer_naming_it(client):
    response = client.get("/broken")

    assert response.status_code == 502
    assert response.content_type == "application/problem+json"
    assert response.json["part"] == "payments"
    assert "'payments'" in response.json["detail"]


def test_all_or_nothing_fails_on_any_call(client):
    response = client.get("/strict")

    assert response.status_code == 502
    assert response.json["part"] == "missing"
    assert "404" in response.json["detail"]


def test_fill_encodes_values_and_formats_lists():
    results = {"a": {"ids": [1, "b c"], "nested": {"k": "v/w"}}}

    assert fill("/x/{id}?q={query.q}", {"id": "a b"}, {"q": ["1&2"]}, results, "csv") == "/x/a%20b?q=1%262"
    assert fill("/y?ids={a.body.ids}", {}, {}, results, "csv") == "/y?ids=1,b%20c"
    assert fill("/y?ids={a.body.ids}", {}, {}, results, "repeat") == "/y?ids=1&ids=b%20c"
    assert fill("/z/{a.body.nested.k}", {}, {}, results, "csv") == "/z/v%2Fw"


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("  - path: /x\n", "needs either 'upstream' or 'aggregate'"),
        ("  - path: /x\n    upstream: svc\n    aggregate: {a: {upstream: svc, path: /a}}\n", "needs either 'upstream' or 'aggregate'"),
        ("  - path: /x\n    aggregate: {a: {upstream: svc, path: /a, depends_on: [b]}}\n", "depends on ['b']"),
        (
            "  - path: /x\n    aggregate: {a: {upstream: svc, path: /a, depends_on: [b]}, b: {upstream: svc, path: /b, depends_on: [a]}}\n",
            "in a cycle",
        ),
        ("  - path: /x\n    aggregate: {a: {upstream: nowhere, path: /a}}\n", "names upstream 'nowhere'"),
        ("  - path: /x\n    mode: async\n    aggregate: {a: {upstream: svc, path: /a}}\n", "cannot be 'mode: async'"),
    ],
)
def test_the_route_file_refuses_a_broken_aggregate(tmp_path, route, message):
    path = tmp_path / "routes.yaml"
    path.write_text('upstreams:\n  svc:\n    targets: ["http://127.0.0.1:1"]\nroutes:\n' + route)

    with pytest.raises(RouteFileError) as error:
        load(path, env={})

    assert message in str(error.value)


@pytest.mark.parametrize("value", ["..", ".", ""])
def test_a_value_that_would_change_the_resource_is_refused(value):
    from app.gateway.aggregate import UnsafeValue

    with pytest.raises(UnsafeValue):
        fill("/users/{id}/orders", {"id": value}, {}, {}, "csv")


def test_a_missing_value_leaves_no_hole_in_the_path():
    with pytest.raises(KeyError):
        fill("/users/{query.uid}/orders", {}, {}, {}, "csv")
    with pytest.raises(KeyError):
        fill("/users/{a.body.id}", {}, {}, {"a": {"id": None}}, "csv")


def test_an_incomplete_answer_tells_caches_not_to_keep_it(client):
    response = client.get("/partial")

    assert response.headers["X-Gateway-Completed"] == "false"
    assert response.headers["Cache-Control"] == "no-store"


def test_a_call_using_an_answer_must_depend_on_it(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(
        'upstreams:\n  svc:\n    targets: ["http://127.0.0.1:1"]\nroutes:\n'
        '  - path: /x\n    aggregate: {a: {upstream: svc, path: /a}, b: {upstream: svc, path: "/b/{a.body.id}"}}\n'
    )

    with pytest.raises(RouteFileError) as error:
        load(path, env={})

    assert "uses the answer of 'a', which must be in its depends_on" in str(error.value)
