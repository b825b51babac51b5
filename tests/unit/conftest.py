"""Fixtures for the unit tests: a Redis server for the few tests that need one."""
from __future__ import annotations

import os

import pytest
import redis


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of a running Redis: ``REDIS_URL``, else ``redis://127.0.0.1:6379/0``.

    Skips the test when nothing answers there, or fails it when ``FRONTDOOR_REQUIRE_SERVICES=1``
    (CI, where a skipped Redis test would hide a broken service).
    """
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError as exc:
        reason = f"Redis at {url} does not answer: {exc}"
        if os.environ.get("FRONTDOOR_REQUIRE_SERVICES") == "1":
            pytest.fail(f"required service unavailable: {reason}")
        pytest.skip(reason)
    finally:
        client.close()
    return url
