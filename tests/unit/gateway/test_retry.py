"""Retry stage: what is retried (and what must not be), how often, and the backoff between tries."""
from __future__ import annotations

import io

import pytest

from app.gateway import retry as retry_module
from app.gateway.body import RequestBody
from app.gateway.retry import backoff_delay, retry
from app.gateway.routefile import Retries
from app.gateway.types import (
    BreakerOpen,
    BulkheadFull,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tests.unit.gateway.stand_ins import Answers, make_request


def refused() -> UpstreamUnreachable:
    return UpstreamUnreachable("Could not connect to the upstream", sent=False)


def dropped() -> UpstreamUnreachable:
    return UpstreamUnreachable("The upstream closed the connection", sent=True)


def read_timeout() -> UpstreamTimeout:
    return UpstreamTimeout("The upstream did not answer within 1 s")


class Sleeps(list):
    """Records the backoff delays instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def retrying(upstream: Answers, attempts: int = 3, **config) -> tuple:
    sleeps = Sleeps()
    return retry(Retries(attempts=attempts, **config), sleep=sleeps)(upstream), sleeps


def test_one_attempt_leaves_the_stage_out():
    upstream = Answers(503)

    assert retry(Retries(attempts=1))(upstream) is upstream


@pytest.mark.parametrize("method", ["POST", "PATCH", "GET"])
def test_a_failed_connect_is_retried_for_any_method(method):
    upstream = Answers(refused(), 200)
    handle, sleeps = retrying(upstream)

    response = handle(make_request(method, body=b"{}"))

    assert response.status == 200
    assert len(upstream.calls) == 2
    assert upstream.calls[1].body == b"{}"  # the buffered body is sent again
    assert len(sleeps) == 1


@pytest.mark.parametrize("failure", [read_timeout, dropped])
def test_a_failure_after_sending_is_not_retried_for_post(failure):
    upstream = Answers(failure(), 200)
    handle, sleeps = retrying(upstream)

    with pytest.raises(UpstreamUnreachable) as caught:
        handle(make_request("POST", body=b"{}"))

    assert caught.value.status == (504 if failure is read_timeout else 502)
    assert len(upstream.calls) == 1
    assert sleeps == []


@pytest.mark.parametrize("failure", [read_timeout, dropped])
def test_a_failure_after_sending_is_retried_with_an_idempotency_key(failure):
    upstream = Answers(failure(), 200)
    handle, _ = retrying(upstream)

    response = handle(make_request("POST", headers={"idempotency-key": "order-17"}, body=b"{}"))

    assert response.status == 200
    assert len(upstream.calls) == 2


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
def test_a_read_timeout_is_retried_for_idempotent_methods(method):
    upstream = Answers(read_timeout(), 200)
    handle, _ = retrying(upstream)

    assert handle(make_request(method)).status == 200
    assert len(upstream.calls) == 2


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_retry_status_is_retried_for_idempotent_requests(status):
    upstream = Answers(status, 200)
    handle, _ = retrying(upstream)

    response = handle(make_request("GET"))

    assert response.status == 200
    assert len(upstream.calls) == 2
    assert upstream.closed == [upstream.answered[0]]  # the discarded answer gave back its connection


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_retry_status_is_returned_as_is_for_post(status):
    upstream = Answers(status, 200)
    handle, _ = retrying(upstream)

    response = handle(make_request("POST", body=b"{}"))

    assert response.status == status
    assert len(upstream.calls) == 1
    assert upstream.closed == []


@pytest.mark.parametrize("status", [200, 404, 500])
def test_other_statuses_are_returned_at_once(status):
    upstream = Answers(status, 200)
    handle, sleeps = retrying(upstream)

    assert handle(make_request("GET")).status == status
    assert len(upstream.calls) == 1
    assert sleeps == []


def test_the_retry_statuses_are_configurable():
    upstream = Answers(500, 503, 200)
    handle, _ = retrying(upstream, statuses=(500,))

    assert handle(make_request("GET")).status == 503
    assert len(upstream.calls) == 2


def test_the_last_attempts_answer_is_returned_open():
    upstream = Answers(503)
    handle, sleeps = retrying(upstream, attempts=3)

    response = handle(make_request("GET"))

    assert response.status == 503
    assert len(upstream.calls) == 3
    assert response is upstream.answered[-1] and response not in upstream.closed
    assert len(sleeps) == 2  # no wait after the last attempt


def test_the_last_attempts_failure_is_raised():
    upstream = Answers(refused(), refused(), read_timeout())
    handle, _ = retrying(upstream, attempts=3)

    with pytest.raises(UpstreamTimeout):
        handle(make_request("GET"))
    assert len(upstream.calls) == 3


def streamed_body() -> RequestBody:
    return RequestBody(io.BytesIO(b"x" * 10), 10)


def reads_body_then(outcome):
    def handle(req):
        b"".join(req.body)
        return outcome

    return handle


@pytest.mark.parametrize("outcome", [dropped(), read_timeout(), 503])
def test_a_streamed_body_that_started_is_not_retried(outcome):
    upstream = Answers(reads_body_then(outcome), 200)
    handle, _ = retrying(upstream)
    request = make_request("PUT", body=streamed_body())

    if isinstance(outcome, int):
        assert handle(request).status == outcome
    else:
        with pytest.raises(UpstreamUnreachable):
            handle(request)
    assert len(upstream.calls) == 1


def test_a_streamed_body_not_yet_sent_is_retried_after_a_failed_connect():
    upstream = Answers(refused(), reads_body_then(200))
    handle, _ = retrying(upstream)

    assert handle(make_request("POST", body=streamed_body())).status == 200
    assert len(upstream.calls) == 2


@pytest.mark.parametrize(
    "refusal",
    [BreakerOpen("every breaker open", headers={"Retry-After": "7"}), BulkheadFull("full", headers={"Retry-After": "1"})],
)
def test_the_gateways_own_503s_are_not_retried(refusal):
    upstream = Answers(refusal, 200)
    handle, sleeps = retrying(upstream)

    with pytest.raises(type(refusal)) as caught:
        handle(make_request("GET"))

    assert caught.value.headers == refusal.headers
    assert len(upstream.calls) == 1
    assert sleeps == []


def test_other_errors_are_not_retried():
    upstream = Answers(ValueError("a bug"), 200)
    handle, _ = retrying(upstream)

    with pytest.raises(ValueError):
        handle(make_request("GET"))
    assert len(upstream.calls) == 1


def test_the_backoff_doubles_up_to_the_cap(monkeypatch):
    monkeypatch.setattr(retry_module.random, "uniform", lambda low, high: high)  # the jitter's upper bound
    upstream = Answers(503)
    handle, sleeps = retrying(upstream, attempts=6, backoff=0.1, max_backoff=0.5)

    handle(make_request("GET"))

    assert sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_the_backoff_is_full_jitter_from_zero(monkeypatch):
    monkeypatch.setattr(retry_module.random, "uniform", lambda low, high: low)
    upstream = Answers(503)
    handle, sleeps = retrying(upstream, attempts=3, backoff=0.1)

    handle(make_request("GET"))

    assert sleeps == [0, 0]


@pytest.mark.parametrize(("retry_number", "ceiling"), [(1, 0.05), (2, 0.1), (3, 0.2), (4, 0.25), (10, 0.25)])
def test_backoff_delay_stays_within_its_bounds(retry_number, ceiling):
    delays = [backoff_delay(retry_number, 0.05, 0.25) for _ in range(200)]

    assert all(0 <= delay <= ceiling for delay in delays)
    assert max(delays) > ceiling / 2  # jittered over the range, not pinned at the bottom


def test_no_backoff_means_no_wait():
    assert backoff_delay(3, 0, 1.0) == 0
