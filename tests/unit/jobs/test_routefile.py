"""The route file's job settings: ``mode: async`` and an upstream's ``job_timeout``."""
from __future__ import annotations

import textwrap

import pytest
from flask import Flask

from app.config import defaults
from app.gateway.routefile import RouteFileError, Timeout, load
from tests.services import logged

ROUTES = """\
upstreams:
  reports:
    targets: ["http://127.0.0.1:5001"]
    timeout: {{connect: 0.5, read: 2}}
    {job_timeout}
routes:
  - path: /reports
    upstream: reports
    mode: {mode}
    {extra}
"""


def write(tmp_path, job_timeout: str = "", extra: str = "", mode: str = "async"):
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent(ROUTES.format(job_timeout=job_timeout, extra=extra, mode=mode)))
    return path


def test_an_async_route_that_forwards_credentials_is_refused_with_a_clear_message(tmp_path):
    path = write(tmp_path, extra="forward_credentials: true")

    with pytest.raises(RouteFileError) as caught:
        load(path)

    message = str(caught.value)
    assert str(path) in message
    assert "routes[0]" in message
    assert "forward_credentials cannot be used with mode: async" in message


def test_job_timeout_is_read_and_timeout_left_as_it_is(tmp_path):
    route_file = load(write(tmp_path, job_timeout="job_timeout: {connect: 2, read: 600}"))

    upstream = route_file.upstreams["reports"]
    assert (upstream.job_timeout.connect, upstream.job_timeout.read) == (2.0, 600.0)
    assert (upstream.timeout.connect, upstream.timeout.read) == (0.5, 2.0)
    assert route_file.routes[0].mode == "async"


def test_job_timeout_defaults_to_a_longer_read_that_fits_the_soft_time_limit(tmp_path):
    upstream = load(write(tmp_path)).upstreams["reports"]

    assert upstream.job_timeout.read > Timeout().read
    assert upstream.job_timeout.connect + upstream.job_timeout.read <= defaults(Flask(__name__))["JOB_SOFT_TIME_LIMIT"]
    assert upstream.timeout.read == 2.0  # the client-facing timeout is not borrowed


def test_a_job_timeout_that_could_outlast_the_soft_time_limit_is_warned_about(make_app):
    routes = ROUTES.format(job_timeout="job_timeout: {connect: 1, read: 100}", mode="async", extra="")
    retried = routes.replace("timeout: {connect: 0.5, read: 2}", "timeout: {connect: 0.5, read: 2}\n    retries: {attempts: 2}")

    with logged("frontdoor.jobs") as records:
        make_app(routes=routes, JOB_SOFT_TIME_LIMIT=150)
    assert records.messages("upstream reports") == []
    with logged("frontdoor.jobs") as records:
        make_app(routes=retried, JOB_SOFT_TIME_LIMIT=150)

    (warning,) = records.messages("upstream reports")
    assert warning.levelname == "WARNING"
    assert "202" in warning.getMessage() and "JOB_SOFT_TIME_LIMIT" in warning.getMessage()


@pytest.mark.parametrize("bad", ["job_timeout: {read: 0}", "job_timeout: {read: 5, write: 1}"])
def test_an_invalid_job_timeout_is_refused_naming_the_key(tmp_path, bad):
    with pytest.raises(RouteFileError, match=r"upstreams\.reports\.job_timeout"):
        load(write(tmp_path, job_timeout=bad))


def test_an_unknown_mode_is_refused_naming_the_key(tmp_path):
    with pytest.raises(RouteFileError, match=r"routes\[0\]\.mode \(line 9\)"):
        load(write(tmp_path, mode="later"))
