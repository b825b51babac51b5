"""Fixtures: ``app``, ``client``, ``runner``, and real Redis/PostgreSQL servers."""
from __future__ import annotations

import contextlib
import os
import textwrap
import uuid
from pathlib import Path

import pytest
import redis

from app import create_app
from tests import services

DEMO_ROUTES = """
upstreams:
  demo:
    targets: ["http://127.0.0.1:9"]
    timeout: {connect: 0.5, read: 1.0}
routes:
  - path: /demo
    upstream: demo
    strip_prefix: true
"""


# Seconds each end-to-end module takes (setup, call and teardown of its tests, ``--durations=0``)
# under ``make test`` on this 2-core machine, to share the modules out between serial groups of
# about equal length; a module not listed counts as NEW_MODULE_SECONDS until it is measured and
# added here.
END_TO_END_SECONDS = {
    "test_jobs.py": 113,
    "test_webhooks.py": 99,
    "test_openapi.py": 58,
    "test_deploy.py": 50,
    "test_limits.py": 28,
    "test_processes.py": 27,
    "test_metrics.py": 26,
    "test_migrations.py": 18,
    "test_proxy.py": 16,
    "test_admin_gateway.py": 15,
    "test_heroku.py": 12,
    "test_cache.py": 5,
    "test_tracing.py": 5,
    "test_database_outage.py": 50,
    "test_broker_restart.py": 30,
    "test_slow_clients.py": 16,
    "test_api_limits.py": 5,
    "test_job_wait.py": 27,
    "test_cli.py": 8,
    "test_browser.py": 10,
    "test_portal.py": 30,
}
NEW_MODULE_SECONDS = 30


def end_to_end_groups(modules: list[str], count: int) -> dict[str, int]:
    """Share ``modules`` (file names) out into ``count`` groups, longest first, each to the group
    that is shortest so far: ``{module: group}``."""
    totals = [0] * max(count, 1)
    groups: dict[str, int] = {}
    for module in sorted(modules, key=lambda name: (-END_TO_END_SECONDS.get(name, NEW_MODULE_SECONDS), name)):
        group = totals.index(min(totals))
        groups[module] = group
        totals[group] += END_TO_END_SECONDS.get(module, NEW_MODULE_SECONDS)
    return groups


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under pytest-xdist's ``--dist load`` (``make test`` runs ``-n 3``) the integration tests
    run one after another in serial groups, each group on a worker of its own, as they would
    alone: each starts gunicorn and Celery processes, and some time a shutdown or a retry. The
    unit tests' modules share out the rest. With 2 workers the integration tests are one group
    on one worker and the unit tests have the other; with n >= 3, n - 1 groups (modules shared
    out by END_TO_END_SECONDS) and one worker for the unit tests, which then help the groups
    that are left. A group waits on its processes most of the time, so two groups fit beside
    the unit tests on 2 cores.

    A scheduler of our own rather than ``xdist_group`` marks: ``--dist loadgroup`` reads them
    from a node id that pytest 9.2 no longer lets a plugin change (pytest-xdist issue #1386).
    """
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    prefix = "tests/integration/"

    class EndToEndApart(LoadScopeScheduling):
        groups: dict[str, int] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if not nodeid.startswith(prefix):
                return super()._split_scope(nodeid)
            if self.groups is None:
                modules = {node.split("::", 1)[0].removeprefix(prefix) for node in self.collection or () if node.startswith(prefix)}
                self.groups = end_to_end_groups(sorted(modules), max(len(self.nodes) - 1, 1))
            return f"tests/integration (group {self.groups[nodeid.split('::', 1)[0].removeprefix(prefix)] + 1})"

        def _assign_work_unit(self, node) -> None:
            # The end-to-end groups go out first, one to each worker: they take longest.
            for scope in [scope for scope in self.workqueue if scope.startswith("tests/integration")][::-1]:
                self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return EndToEndApart(config, log)


@pytest.fixture
def route_file(tmp_path: Path):
    """Write a route file and return its path: ``route_file(yaml_text)``."""

    def write(text: str = DEMO_ROUTES) -> Path:
        path = tmp_path / f"routes-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


def delete_keys(url: str, prefix: str) -> None:
    """Delete every Redis key under ``prefix``: tests share the machine's Redis."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def make_app(tmp_path: Path, route_file):
    """Build an app from a dict: ``make_app(routes=yaml_text, **config)``; its Redis keys go
    afterwards, and its database connections are closed (a pooled connection left to the
    garbage collector is a ResourceWarning in whichever later test collects it)."""
    built: list[dict] = []
    apps: list = []

    def build(routes: str = DEMO_ROUTES, **config):
        settings = {
            "TESTING": True,
            "CONFIG": str(route_file(routes)),
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'test.sqlite'}",
            "CELERY_BROKER_URL": "memory://",
            "KEY_PREFIX": services.unique("test"),
        }
        settings.update(config)
        built.append(settings)
        apps.append(create_app(settings))
        return apps[-1]

    yield build
    from app.extensions import db

    for app in apps:
        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()
    for settings in built:
        if settings.get("REDIS_URL"):
            with contextlib.suppress(redis.RedisError):
                delete_keys(settings["REDIS_URL"], settings["KEY_PREFIX"])


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture(scope="session")
def redis_url():
    """A Redis URL: ``REDIS_URL`` when set, else a throwaway redis-server on a free port."""
    url = os.environ.get("REDIS_URL")
    if url:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        except redis.RedisError as exc:
            services.unavailable(f"REDIS_URL={url} does not answer: {exc}")
        yield url
        return
    with services.throwaway_redis() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL URL: ``TEST_DATABASE_URL`` when set, else a throwaway initdb cluster."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    with services.throwaway_postgres() as url:
        yield url


@pytest.fixture
def postgres_database(postgres_url):
    """A database of this test's own, created on the server of ``postgres_url`` and dropped
    afterwards (with any connection still open to it): yields its ``postgresql://`` URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1).replace("postgres://", "postgresql://", 1)
    name = f"frontdoor_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def key_prefix(redis_url):
    """A Redis key prefix unique to one test; its keys are deleted afterwards."""
    prefix = services.unique("test")
    yield prefix
    delete_keys(redis_url, prefix)


@pytest.fixture
def identity(app):
    """Consumers and API keys in ``app``'s database (tables created): ``identity.key(scopes=("admin",))``."""
    from tests.factories import Identity

    return Identity(app)


@pytest.fixture
def own_redis():
    """A running redis-server that only this test uses, so that the test may stop and restart it."""
    server = services.RedisServer()
    server.start()
    yield server
    server.stop()
