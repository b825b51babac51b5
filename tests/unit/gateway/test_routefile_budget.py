"""The route file's time budget: a synchronous route that may keep its client waiting past
Heroku's 30 s is named in a warning at load, which still succeeds; async routes are exempt."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.gateway.routefile import (
    SYNC_TIME_LIMIT,
    RouteFileError,
    load,
    over_budget,
    sync_budget,
)
from tests.services import logged

ROOT = Path(__file__).resolve().parents[3]

ROUTES = """\
upstreams:
  quick:
    targets: ["http://127.0.0.1:5001"]
    timeout: {connect: 1.0, read: 5.0}
    retries: {attempts: 2, backoff: 0.05}
  slow:
    targets: ["http://127.0.0.1:5002"]
    timeout: {connect: 2.0, read: 10.0}
    retries: {attempts: 3, backoff: 0.5, max_backoff: 0.75}
  patient:
    targets: ["http://127.0.0.1:5003"]
    timeout: {connect: 1.0, read: 29.5}
routes:
  - path: /quick
    upstream: quick
  - path: /slow
    name: slow-reports
    upstream: slow
  - path: /reports
    upstream: slow
    mode: async
  - path: /patient
    upstream: patient
  - path: /screen
    timeout: 45
    aggregate:
      a: {upstream: quick, path: /a}
  - path: /brief
    timeout: 3
    aggregate:
      b: {upstream: slow, path: /b}
"""


@pytest.fixture
def routes(tmp_path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(ROUTES)
    return path


def test_a_route_waits_its_timeouts_on_every_attempt_plus_the_backoff_between(routes):
    route_file = load(routes)
    budgets = {route.label: sync_budget(route, route_file.upstreams) for route in route_file.routes}

    assert budgets == {
        "/quick": 2 * (1.0 + 5.0) + 0.05,
        "slow-reports": 3 * (2.0 + 10.0) + 0.5 + 0.75,  # the second backoff (1.0) is capped at max_backoff
        "/reports": None,  # async: the client has its 202 at once
        "/patient": 30.5,  # one attempt: the default
        "/screen": 45.0,  # an aggregate answers by its own deadline, whatever its calls' timeouts
        "/brief": 3.0,
    }


def test_routes_over_the_limit_are_logged_with_their_budget_and_the_way_out(routes):
    with logged("frontdoor.routefile") as records:
        route_file = load(routes)

    assert len(route_file.routes) == 6  # loaded all the same
    assert [(r.levelname, r.route, r.budget) for r in records.records] == [
        ("WARNING", "slow-reports", 37.25),
        ("WARNING", "/patient", 30.5),
        ("WARNING", "/screen", 45.0),
    ]
    message = records.records[0].getMessage()
    assert str(routes) in message and "'slow-reports'" in message and "37.25 s" in message
    assert "30 s" in message and "use mode: async" in message


def test_the_limit_is_a_module_constant_and_a_parameter(routes):
    route_file = load(routes)

    assert SYNC_TIME_LIMIT == 30.0
    assert [route.label for route, _ in over_budget(route_file, limit=40)] == ["/screen"]
    with logged("frontdoor.routefile") as records:
        load(routes, sync_limit=60)
    assert records.records == []


def test_routes_within_the_limit_log_nothing(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(ROUTES.split("  - path: /slow\n")[0])

    with logged("frontdoor.routefile") as records:
        load(path)

    assert records.records == []


def test_the_demo_route_file_is_within_the_limit():
    with logged("frontdoor.routefile") as records:
        load(ROOT / "gateway.yaml", env={})

    assert records.records == []


def test_an_invalid_file_still_fails_and_warns_of_nothing(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(ROUTES.replace("attempts: 3", "attempts: 0"))

    with logged("frontdoor.routefile") as records, pytest.raises(RouteFileError, match=r"upstreams\.slow\.retries\.attempts \(line 9\)"):
        load(path)
    assert records.records == []


def test_the_checker_shows_the_warning_and_still_passes_the_file(routes):
    result = subprocess.run(
        [sys.executable, "-m", "app.gateway.check", str(routes)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {routes}: 3 upstreams, 6 routes")
    assert "'slow-reports' may take 37.25 s" in result.stderr and "use mode: async" in result.stderr
