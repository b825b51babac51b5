"""The admin API against gunicorn with two workers: a reload and a breaker held open, asked of
one worker, are applied by both; a bad file changes nothing in either. On the embedded default
(SQLite, no Redis) and with Redis."""
from __future__ import annotations

import hashlib
import time

import pytest
import requests

from app import create_app
from app.extensions import db
from tests import services
from tests.factories import Identity

ROUTES = """\
upstreams:
  httpbin:
    targets: ["{httpbin}"]
    timeout: {{connect: 1.0, read: 5.0}}
routes:
  - path: /{prefix}
    upstream: httpbin
    strip_prefix: true
"""
INTERVAL = "0.2"  # GATEWAY_CONTROL_SYNC_INTERVAL: seconds before a worker reads the shared record again


def fresh(method: str, url: str, **kwargs) -> requests.Response:
    """One request on a connection of its own, so that either worker may accept it."""
    headers = {"Connection": "close", **kwargs.pop("headers", {})}
    return requests.request(method, url, headers=headers, timeout=10, **kwargs)


def per_worker(gateway, key: str, workers: int = 2) -> dict[int, dict]:
    """``GET /_gateway/admin/routes`` answered by every worker: its answer by pid."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + 20
    while len(seen) < workers and time.monotonic() < deadline:
        upstreams = fresh("GET", f"{gateway.url}/_gateway/admin/upstreams", headers={"X-API-Key": key})
        assert upstreams.status_code == 200, upstreams.text
        seen[upstreams.json()["process"]["pid"]] = upstreams.json()
    assert len(seen) == workers, f"only workers {sorted(seen)} answered"
    return seen


def routes_by_worker(gateway, key: str) -> dict[int, list[str]]:
    """The routes each worker sends to httpbin (their labels: the paths), by pid."""
    return {pid: answer["data"][0]["routes"] for pid, answer in per_worker(gateway, key).items()}


@pytest.fixture(scope="module", params=["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def started(request, tmp_path_factory, start_gateway, httpbin_url):
    """gunicorn with 2 workers on a route file in a directory of its own; an admin's key. One
    per backend for the module's tests (``stack`` puts it back as it was after each)."""
    tmp_path = tmp_path_factory.mktemp(f"admin-{request.param}")
    database = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    path = tmp_path / "gateway.yaml"
    path.write_text(ROUTES.format(httpbin=httpbin_url, prefix="old"))
    app = create_app({"CONFIG": str(path), "SQLALCHEMY_DATABASE_URI": database, "CELERY_BROKER_URL": "memory://"})
    identity = Identity(app)  # the tables (gateway_control among them), then an admin's key
    key = identity.key(identity.consumer("root"), scopes=("admin",))
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    env = {"REDIS_URL": redis_url, "GATEWAY_KEY_PREFIX": f"adm{time.monotonic_ns()}"}
    gateway = start_gateway(
        path.read_text(),
        workers=2,
        GATEWAY_CONFIG=str(path),
        DATABASE_URL=database,
        GATEWAY_CONTROL_SYNC_INTERVAL=INTERVAL,
        GATEWAY_CELERY_BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        **env,
    )
    # /healthz answers as soon as one worker has booted; a worker still booting when a test
    # rewrites the file would read the new file (a bad one stops gunicorn).
    per_worker(gateway, key)
    yield gateway, path, key, httpbin_url
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def stack(started):
    """``started`` as a gateway of the test's own would be: after the test, the original route
    file is loaded again and the breaker closed, and both workers are seen to serve that
    (booting a gateway for each test took 2-5 s)."""
    yield started
    gateway, path, key, httpbin = started
    headers = {"X-API-Key": key}
    path.write_text(ROUTES.format(httpbin=httpbin, prefix="old"))
    assert fresh("POST", f"{gateway.url}/_gateway/admin/reload", headers=headers).status_code == 200
    closed = fresh("POST", f"{gateway.url}/_gateway/admin/upstreams/httpbin/targets/0/breaker/close", headers=headers)
    assert closed.status_code == 200, closed.text

    def as_started() -> bool:
        workers = per_worker(gateway, key).values()
        return all(w["data"][0]["routes"] == ["/old"] and not w["data"][0]["targets"][0]["breaker"]["held_open"] for w in workers)

    services.wait_until(as_started, 10, "both workers back on the original routes, the breaker closed", interval=float(INTERVAL))


def statuses(url: str, count: int = 12) -> set[int]:
    return {fresh("GET", url).status_code for _ in range(count)}


def test_a_reload_on_one_worker_is_served_by_both(stack):
    gateway, path, key, httpbin = stack
    assert set(map(tuple, routes_by_worker(gateway, key).values())) == {("/old",)}
    path.write_text(ROUTES.format(httpbin=httpbin, prefix="new"))
    assert statuses(f"{gateway.url}/new/get") == {404}  # an edited file waits for the reload

    reloaded = fresh("POST", f"{gateway.url}/_gateway/admin/reload", headers={"X-API-Key": key})

    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["changed"] is True
    assert reloaded.json()["digest"] == hashlib.sha256(path.read_bytes()).hexdigest()
    time.sleep(float(INTERVAL) * 2)
    assert set(map(tuple, routes_by_worker(gateway, key).values())) == {("/new",)}
    assert statuses(f"{gateway.url}/new/get") == {200}
    assert statuses(f"{gateway.url}/old/get") == {404}


def test_a_bad_file_is_a_422_and_both_workers_keep_their_routes(stack):
    gateway, path, key, _ = stack
    good = path.read_text()
    path.write_text(good.replace("strip_prefix: true", "strip_prefix: maybe"))

    response = fresh("POST", f"{gateway.url}/_gateway/admin/reload", headers={"X-API-Key": key})

    assert response.status_code == 422
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "/_gateway/problems/invalid-route-file"
    assert f"{path}: routes[0].strip_prefix (line 8)" in problem["detail"]
    time.sleep(float(INTERVAL) * 2)
    assert set(map(tuple, routes_by_worker(gateway, key).values())) == {("/old",)}
    assert statuses(f"{gateway.url}/old/get") == {200}


def test_a_breaker_held_open_on_one_worker_holds_in_both_until_closed(stack):
    gateway, _, key, _ = stack
    headers = {"X-API-Key": key}
    assert statuses(f"{gateway.url}/old/get") == {200}

    held = fresh("POST", f"{gateway.url}/_gateway/admin/upstreams/httpbin/targets/0/breaker/open", headers=headers)

    assert held.status_code == 200, held.text
    assert held.json()["breaker"]["held_open"] is True
    time.sleep(float(INTERVAL) * 2)
    answers = [fresh("GET", f"{gateway.url}/old/get") for _ in range(12)]
    assert {answer.status_code for answer in answers} == {503}
    assert {answer.json()["type"] for answer in answers} == {"/_gateway/problems/breaker-open"}
    assert all(worker["data"][0]["targets"][0]["breaker"]["held_open"] for worker in per_worker(gateway, key).values())

    closed = fresh("POST", f"{gateway.url}/_gateway/admin/upstreams/httpbin/targets/0/breaker/close", headers=headers)

    assert closed.status_code == 200
    time.sleep(float(INTERVAL) * 2)
    assert statuses(f"{gateway.url}/old/get") == {200}


def test_no_credential_is_a_401_and_a_consumer_without_the_admin_scope_a_403(stack):
    gateway, path, _, _ = stack
    app = create_app({"CONFIG": str(path), "SQLALCHEMY_DATABASE_URI": f"sqlite:///{path.parent / 'gateway.sqlite'}", "CELERY_BROKER_URL": "memory://"})
    identity = Identity(app)
    plain = identity.key(identity.consumer("alice"))

    assert fresh("POST", f"{gateway.url}/_gateway/admin/reload").status_code == 401
    assert fresh("POST", f"{gateway.url}/_gateway/admin/reload", headers={"X-API-Key": plain}).status_code == 403
    assert fresh("GET", f"{gateway.url}/_gateway/admin/upstreams", headers={"X-API-Key": plain}).status_code == 403
