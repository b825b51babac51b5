"""``/_gateway/admin/routes|upstreams|reload``: what an admin sees of the running gateway, breakers
held open and closed by hand, bulkhead occupancy, and reloads of the route file, with the
in-process breakers and the database as the shared record, and with Redis."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from app.gateway.admin import target_id
from tests.services import free_port
from tests.unit.api.support import problem
from tests.unit.jobs.support import upstream_server

ADMIN = "/_gateway/admin"
DEAD = f"http://127.0.0.1:{free_port()}"  # nothing listens: a connect there is refused

ROUTES = """
upstreams:
  bin:
    targets: ["{up}"]
    max_concurrency: 2
  pair:
    targets: ["{dead}", "{up}"]
    breaker: {{fail_max: 100}}
routes:
  - path: /bin
    name: bin
    upstream: bin
    strip_prefix: true
    methods: [GET]
  - path: /pair
    upstream: pair
    strip_prefix: true
"""
NEW_ROUTES = """
upstreams:
  bin:
    targets: ["{up}"]
routes:
  - path: /renamed
    upstream: bin
    strip_prefix: true
"""


def routes_text(text: str = ROUTES) -> str:
    return text.format(up=upstream_server().url, dead=DEAD)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def shared(request) -> dict:
    """The config two processes of one gateway share: the database file, and Redis when used."""
    return {"REDIS_URL": request.getfixturevalue("redis_url")} if request.param == "redis" else {}


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(routes_text())
    return path


@pytest.fixture
def app(make_app, shared, config_path):
    return make_app(CONFIG=str(config_path), **shared)


@pytest.fixture
def other_process(make_app, app, shared, config_path):
    """A second app on the same route file, database and Redis keys: another gunicorn worker.
    It reads the shared record on every request (CONTROL_SYNC_INTERVAL 0)."""
    return make_app(CONFIG=str(config_path), KEY_PREFIX=app.config["KEY_PREFIX"], CONTROL_SYNC_INTERVAL=0, **shared)


def upstream_named(client, headers, name: str) -> dict:
    response = client.get(f"{ADMIN}/upstreams/{name}", headers=headers)
    assert response.status_code == 200, response.json
    return response.json


def transitions(upstream: str, target: str, state: str) -> float:
    labels = {"upstream": upstream, "target": target, "state": state}
    return REGISTRY.get_sample_value("frontdoor_breaker_transitions_total", labels) or 0.0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/routes"),
        ("get", "/upstreams"),
        ("get", "/upstreams/bin"),
        ("post", "/upstreams/bin/targets/0/breaker/open"),
        ("post", "/upstreams/bin/targets/0/breaker/close"),
        ("post", "/reload"),
    ],
)
def test_without_a_credential_401_and_without_the_admin_scope_403(client, alice, method, path):
    anonymous = getattr(client, method)(ADMIN + path)
    assert problem(anonymous, 401)["type"].endswith("/unauthenticated")
    assert anonymous.headers["WWW-Authenticate"] == 'Bearer realm="frontdoor"'

    forbidden = getattr(client, method)(ADMIN + path, headers=alice)
    problem(forbidden, 403)
    assert 'scope="admin"' in forbidden.headers["WWW-Authenticate"]
    assert client.get("/bin/get").status_code == 200  # and the breaker was not opened


def test_the_routes_are_those_of_the_route_file_in_its_order(client, admin, config_path):
    response = client.get(f"{ADMIN}/routes", headers=admin)

    assert response.status_code == 200
    body = response.json
    assert body["route_file"]["path"] == str(config_path)
    assert body["route_file"]["digest"] == hashlib.sha256(config_path.read_bytes()).hexdigest()
    assert (body["route_file"]["routes"], body["route_file"]["upstreams"]) == (2, 2)
    first, second = body["data"]
    assert (first["index"], first["label"], first["path"], first["upstream"], first["methods"]) == (0, "bin", "/bin", "bin", ["GET"])
    assert first["strip_prefix"] is True and first["auth"] == "optional"
    assert (second["index"], second["label"], second["upstream"], second["methods"]) == (1, "/pair", "pair", None)


def test_the_upstreams_show_each_target_its_closed_breaker_and_the_bulkhead(client, admin):
    response = client.get(f"{ADMIN}/upstreams", headers=admin)

    assert response.status_code == 200
    body = response.json
    assert [upstream["name"] for upstream in body["data"]] == ["bin", "pair"]
    bin_, pair = body["data"]
    assert bin_["bulkhead"] == {"in_flight": 0, "max_concurrency": 2}
    assert bin_["routes"] == ["bin"]
    assert pair["bulkhead"] is None
    assert [(t["index"], t["url"], t["id"]) for t in pair["targets"]] == [(0, DEAD, target_id(DEAD)), (1, upstream_server().url, target_id(upstream_server().url))]
    assert pair["targets"][0]["breaker"] == {"state": "closed", "held_open": False, "failures": 0, "opened_at": None, "retry_in": None}
    assert pair["breaker"]["fail_max"] == 100


def test_failures_show_in_the_targets_breaker(client, admin):
    statuses = [client.get("/pair/get").status_code for _ in range(4)]  # round robin: half to the dead target

    assert sorted(statuses) == [200, 200, 502, 502]
    dead = upstream_named(client, admin, "pair")["targets"][0]
    assert dead["breaker"]["failures"] == 2
    assert dead["breaker"]["state"] == "closed"


def test_an_unknown_upstream_or_target_is_a_404(client, admin):
    assert "No upstream 'nope'" in problem(client.get(f"{ADMIN}/upstreams/nope", headers=admin), 404)["detail"]
    assert problem(client.post(f"{ADMIN}/upstreams/nope/targets/0/breaker/open", headers=admin), 404)
    detail = problem(client.post(f"{ADMIN}/upstreams/bin/targets/7/breaker/open", headers=admin), 404)["detail"]
    assert "no target '7'" in detail


def test_a_breaker_held_open_answers_503_until_it_is_closed(client, admin):
    url = upstream_server().url
    opened_before = transitions("bin", url, "open")

    held = client.post(f"{ADMIN}/upstreams/bin/targets/{target_id(url)}/breaker/open", headers=admin)

    assert held.status_code == 200
    assert held.json["breaker"]["state"] == "open"
    assert held.json["breaker"]["held_open"] is True
    assert held.json["breaker"]["opened_at"] is not None
    refused = client.get("/bin/get")
    assert problem(refused, 503)["type"].endswith("/breaker-open")
    assert int(refused.headers["Retry-After"]) >= 1
    assert transitions("bin", url, "open") == opened_before + 1  # the metrics count it
    assert upstream_named(client, admin, "bin")["targets"][0]["breaker"]["held_open"] is True

    closed = client.post(f"{ADMIN}/upstreams/bin/targets/0/breaker/close", headers=admin)  # by index

    assert closed.status_code == 200
    assert closed.json["breaker"] == {"state": "closed", "held_open": False, "failures": 0, "opened_at": None, "retry_in": None}
    assert client.get("/bin/get").status_code == 200


def test_a_held_breaker_stays_open_past_its_reset_timeout(make_app, shared, tmp_path, admin_for):
    path = tmp_path / "short.yaml"
    path.write_text(f'upstreams:\n  bin:\n    targets: ["{upstream_server().url}"]\n    breaker: {{reset_timeout: 0.01}}\nroutes:\n  - path: /bin\n    upstream: bin\n    strip_prefix: true\n')
    app = make_app(CONFIG=str(path), **shared)
    client, headers = app.test_client(), admin_for(app)
    client.post(f"{ADMIN}/upstreams/bin/targets/0/breaker/open", headers=headers)

    threading.Event().wait(0.05)  # past reset_timeout: a tripped breaker would let a probe through

    assert client.get("/bin/get").status_code == 503
    assert upstream_named(client, headers, "bin")["targets"][0]["breaker"]["retry_in"] is None


def test_holding_one_target_open_sends_every_request_to_the_other(client, admin):
    client.post(f"{ADMIN}/upstreams/pair/targets/{target_id(DEAD)}/breaker/open", headers=admin)

    assert [client.get("/pair/get").status_code for _ in range(6)] == [200] * 6  # none to the dead target

    client.post(f"{ADMIN}/upstreams/pair/targets/{target_id(DEAD)}/breaker/close", headers=admin)
    assert sorted(client.get("/pair/get").status_code for _ in range(2)) == [200, 502]


def test_closing_a_tripped_breaker_lets_requests_through_at_once(make_app, shared, tmp_path, admin_for):
    path = tmp_path / "trip.yaml"
    path.write_text(f'upstreams:\n  dead:\n    targets: ["{DEAD}"]\n    breaker: {{fail_max: 1, reset_timeout: 60}}\nroutes:\n  - path: /dead\n    upstream: dead\n')
    app = make_app(CONFIG=str(path), **shared)
    client, headers = app.test_client(), admin_for(app)
    assert client.get("/dead").status_code == 502  # trips it
    assert problem(client.get("/dead"), 503)["type"].endswith("/breaker-open")
    tripped = upstream_named(client, headers, "dead")["targets"][0]["breaker"]
    assert tripped["state"] == "open" and not tripped["held_open"] and 55 < tripped["retry_in"] <= 60

    client.post(f"{ADMIN}/upstreams/dead/targets/0/breaker/close", headers=headers)

    assert client.get("/dead").status_code == 502  # tried again: the upstream is reached for


def status_of(app, path: str) -> int:
    """GET ``path`` and close the response, which gives its bulkhead slot back."""
    response = app.test_client().get(path)
    response.close()
    return response.status_code


def test_the_bulkhead_shows_a_request_in_flight(app, client, admin):
    upstream = upstream_server()
    upstream.reset()
    answers = []
    request = threading.Thread(target=lambda: answers.append(status_of(app, "/bin/gate/held")))
    request.start()
    try:
        upstream.wait_entered()
        assert upstream_named(client, admin, "bin")["bulkhead"] == {"in_flight": 1, "max_concurrency": 2}
    finally:
        upstream.gate.set()
        request.join(10)
    assert answers == [200]
    assert upstream_named(client, admin, "bin")["bulkhead"] == {"in_flight": 0, "max_concurrency": 2}


def test_a_reload_serves_the_changed_file_at_once(client, admin, config_path):
    assert client.get("/renamed/get").status_code == 404
    config_path.write_text(routes_text(NEW_ROUTES))

    response = client.post(f"{ADMIN}/reload", headers=admin)

    assert response.status_code == 200
    assert response.json["changed"] is True
    assert response.json["digest"] == hashlib.sha256(config_path.read_bytes()).hexdigest()
    assert (response.json["routes"], response.json["upstreams"]) == (1, 1)
    assert client.get("/renamed/get").status_code == 200
    assert client.get("/bin/get").status_code == 404
    assert [route["path"] for route in client.get(f"{ADMIN}/routes", headers=admin).json["data"]] == ["/renamed"]
    assert client.post(f"{ADMIN}/reload", headers=admin).json["changed"] is False


def test_a_bad_file_is_a_422_naming_file_key_and_line_and_nothing_changes(client, admin, config_path):
    before = client.get(f"{ADMIN}/routes", headers=admin).json
    config_path.write_text(routes_text(NEW_ROUTES).replace("strip_prefix: true", "strip_prefix: true\n    auth: sometimes"))

    response = client.post(f"{ADMIN}/reload", headers=admin)

    body = problem(response, 422)
    assert body["type"].endswith("/invalid-route-file")
    assert str(config_path) in body["detail"]
    assert "routes[0].auth (line 9)" in body["detail"]
    assert client.get("/bin/get").status_code == 200
    assert client.get("/renamed/get").status_code == 404
    assert client.get(f"{ADMIN}/routes", headers=admin).json == before


def test_a_request_in_flight_finishes_on_the_config_it_started_with(app, client, admin, config_path):
    upstream = upstream_server()
    upstream.reset()
    answers = []
    request = threading.Thread(target=lambda: answers.append(status_of(app, "/bin/gate/old")))
    request.start()
    try:
        upstream.wait_entered()
        config_path.write_text(routes_text(NEW_ROUTES))
        assert client.post(f"{ADMIN}/reload", headers=admin).status_code == 200
        assert client.get("/bin/get").status_code == 404
    finally:
        upstream.gate.set()
        request.join(10)
    assert answers == [200]


def test_a_reload_reaches_another_process(client, admin, other_process, config_path):
    other = other_process.test_client()
    assert other.get("/bin/get").status_code == 200
    config_path.write_text(routes_text(NEW_ROUTES))
    assert other.get("/renamed/get").status_code == 404  # an edited file is not served before a reload

    assert client.post(f"{ADMIN}/reload", headers=admin).status_code == 200

    assert other.get("/renamed/get").status_code == 200
    assert other.get("/bin/get").status_code == 404


def test_a_process_whose_file_differs_keeps_its_config(client, admin, other_process, config_path, tmp_path):
    other = other_process.test_client()
    other.get("/bin/get")  # has read the record once
    elsewhere = tmp_path / "elsewhere.yaml"  # the other machine's copy is not updated yet
    elsewhere.write_text(config_path.read_text())
    other_process.config["CONFIG"] = str(elsewhere)
    config_path.write_text(routes_text(NEW_ROUTES))

    assert client.post(f"{ADMIN}/reload", headers=admin).status_code == 200
    assert other.get("/bin/get").status_code == 200  # keeps the config it has

    elsewhere.write_text(config_path.read_text())  # its copy arrives: applied at the next read
    assert other.get("/renamed/get").status_code == 200


def test_a_breaker_held_open_reaches_another_process_and_so_does_closing_it(client, admin, other_process):
    other = other_process.test_client()
    assert other.get("/bin/get").status_code == 200

    client.post(f"{ADMIN}/upstreams/bin/targets/0/breaker/open", headers=admin)

    assert problem(other.get("/bin/get"), 503)["type"].endswith("/breaker-open")
    client.post(f"{ADMIN}/upstreams/bin/targets/0/breaker/close", headers=admin)
    assert other.get("/bin/get").status_code == 200


def test_a_process_that_starts_while_a_breaker_is_held_open_holds_it_too(client, admin, make_app, app, shared, config_path):
    client.post(f"{ADMIN}/upstreams/bin/targets/0/breaker/open", headers=admin)

    late = make_app(CONFIG=str(config_path), KEY_PREFIX=app.config["KEY_PREFIX"], **shared).test_client()

    assert late.get("/bin/get").status_code == 503


def test_a_celery_worker_applies_a_reload_as_its_next_task_pushes_the_app_context(client, admin, other_process, config_path):
    from celery.signals import worker_init

    worker_init.send(sender=None)  # other_process is now a Celery worker
    config_path.write_text(routes_text(NEW_ROUTES))

    assert client.post(f"{ADMIN}/reload", headers=admin).status_code == 200

    with other_process.app_context():  # as FlaskTask runs a job
        routes = other_process.extensions["gateway"].route_file.routes
    assert [route.path for route in routes] == ["/renamed"]


@pytest.fixture
def admin_for(identity):
    """Headers with an admin's key for another app on the same database."""
    from tests.unit.api.support import auth

    key = identity.key(identity.consumer("ops"), scopes=("admin",))
    return lambda app: auth(key)
