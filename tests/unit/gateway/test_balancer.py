"""Balancer stage: round robin over the targets, skipping those whose breaker is open."""
from __future__ import annotations

import time

import pytest

from app.gateway.balancer import balance
from app.gateway.body import IncompleteBody
from app.gateway.breaker import TargetBreakers
from app.gateway.routefile import Breaker
from app.gateway.types import BreakerOpen, UpstreamTimeout, UpstreamUnreachable
from tests.unit.gateway.stand_ins import Answers, make_request

A, B, C = "http://a.internal", "http://b.internal", "http://c.internal"


def balanced(upstream: Answers, targets=(A, B), **breaker) -> tuple:
    breakers = TargetBreakers("svc", targets, Breaker(**breaker))  # in memory: no Redis
    return balance("svc", targets, breakers)(upstream), breakers


def by_target(**statuses):
    """An upstream whose answer depends on the target: ``by_target(a=500)``; others answer 200."""

    def answer(req):
        return statuses.get(req.target.removeprefix("http://").split(".")[0], 200)

    return Answers(answer)


def call(handle, times: int = 1):
    for _ in range(times):
        handle(make_request()).close()


def test_round_robin_alternates_between_targets():
    upstream = Answers(200)
    handle, _ = balanced(upstream, (A, B, C))

    call(handle, 6)

    assert upstream.targets == [A, B, C, A, B, C]


def test_a_target_whose_breaker_opened_is_skipped():
    upstream = by_target(a=503)
    handle, breakers = balanced(upstream, fail_max=2)

    call(handle, 3)  # a fails, b, a fails again: a's breaker opens
    call(handle, 4)

    assert upstream.targets == [A, B, A, B, B, B, B]
    assert breakers.state(A) == "open"


def test_with_every_breaker_open_the_answer_is_503_with_retry_after():
    upstream = Answers(502)
    handle, _ = balanced(upstream, fail_max=1, reset_timeout=30)
    call(handle, 2)

    with pytest.raises(BreakerOpen) as caught:
        handle(make_request())

    assert caught.value.status == 503
    assert caught.value.headers == {"Retry-After": "30"}
    assert "'svc'" in caught.value.detail
    assert len(upstream.calls) == 2  # the refused request never left


def test_retry_after_is_the_wait_for_the_first_breaker_to_half_open():
    upstream = Answers(UpstreamTimeout("slow"))
    handle, _ = balanced(upstream, fail_max=1, reset_timeout=1.2)
    with pytest.raises(UpstreamTimeout):
        handle(make_request())
    time.sleep(0.3)
    with pytest.raises(UpstreamTimeout):
        handle(make_request())

    with pytest.raises(BreakerOpen) as caught:
        handle(make_request())

    assert caught.value.headers["Retry-After"] == "1"  # a half-opens in about 0.9 s, b in 1.2 s


def test_after_reset_timeout_a_successful_probe_brings_the_target_back():
    healthy = {"a": False}
    upstream = Answers(lambda req: 200 if healthy["a"] or req.target == B else 500)
    handle, breakers = balanced(upstream, fail_max=1, reset_timeout=0.2)
    call(handle, 1)  # a fails and opens
    call(handle, 2)
    assert upstream.targets == [A, B, B]

    healthy["a"] = True
    time.sleep(0.25)
    call(handle, 4)

    assert A in upstream.targets[3:]
    assert breakers.state(A) == "closed"
    assert upstream.targets[-2:] in ([A, B], [B, A])  # back in the rotation


def test_a_failed_probe_keeps_the_target_out():
    upstream = Answers(lambda req: 500 if req.target == A else 200)
    handle, breakers = balanced(upstream, fail_max=1, reset_timeout=0.2)
    call(handle, 1)
    time.sleep(0.25)

    call(handle, 5)

    assert upstream.targets[1:].count(A) == 1  # one probe, which failed
    assert breakers.state(A) == "open"


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_failure_statuses_count_as_failures(status):
    upstream = Answers(status)
    handle, breakers = balanced(upstream, (A,), fail_max=2)

    call(handle, 2)

    assert breakers.state(A) == "open"
    with pytest.raises(BreakerOpen):
        handle(make_request())


@pytest.mark.parametrize("status", [200, 404, 429, 501])
def test_other_statuses_do_not_count(status):
    upstream = Answers(status)
    handle, breakers = balanced(upstream, (A,), fail_max=2)

    call(handle, 5)

    assert breakers.state(A) == "closed"
    assert len(upstream.calls) == 5


def test_the_failure_statuses_are_configurable():
    upstream = Answers(503, 503, 500, 500)
    handle, breakers = balanced(upstream, (A,), fail_max=2, failure_statuses=(500,))

    call(handle, 2)
    assert breakers.state(A) == "closed"
    call(handle, 2)
    assert breakers.state(A) == "open"


def test_an_answer_resets_the_count_of_failures():
    upstream = Answers(500, 404, 500, 200, 500)
    handle, breakers = balanced(upstream, (A,), fail_max=2)

    call(handle, 5)

    assert breakers.state(A) == "closed"


@pytest.mark.parametrize(
    "failure",
    [UpstreamUnreachable("refused", sent=False), UpstreamUnreachable("dropped"), UpstreamTimeout("slow")],
)
def test_connection_failures_count_and_are_raised_unchanged(failure):
    upstream = Answers(failure)
    handle, breakers = balanced(upstream, (A,), fail_max=2)

    for _ in range(2):
        with pytest.raises(UpstreamUnreachable) as caught:
            handle(make_request())
        assert caught.value is failure

    assert breakers.state(A) == "open"


def test_a_clients_own_failure_does_not_count_against_the_target():
    upstream = Answers(IncompleteBody("The client sent 1 of 2 body bytes"))
    handle, breakers = balanced(upstream, (A,), fail_max=1)

    for _ in range(3):
        with pytest.raises(IncompleteBody):
            handle(make_request())

    assert breakers.state(A) == "closed"


def test_the_chosen_target_is_left_on_the_request():
    handle, _ = balanced(Answers(200), (B,))
    req = make_request()

    handle(req).close()

    assert req.target == B


def test_after_the_reset_timeout_one_request_at_a_time_is_the_probe():
    outcomes = []

    def probe(req):
        # While the probe is out, every other request is refused, not sent to the sick target.
        try:
            handle(make_request()).close()
            outcomes.append("second request sent")
        except BreakerOpen as exc:
            outcomes.append(exc.headers["Retry-After"])
        return 200

    upstream = Answers(500, probe, 200)
    handle, breakers = balanced(upstream, (A,), fail_max=1, reset_timeout=0.1)
    call(handle)  # 500 opens the breaker
    time.sleep(0.15)

    call(handle)  # the probe; it succeeds and closes the breaker

    assert outcomes == ["1"]
    assert breakers.state(A) == "closed"
    call(handle)
    assert len(upstream.calls) == 3


def test_a_failed_probe_reopens_and_frees_the_probe_for_the_next_window():
    upstream = Answers(500)
    handle, breakers = balanced(upstream, (A,), fail_max=1, reset_timeout=0.1)
    call(handle)
    time.sleep(0.15)
    call(handle)  # probe fails: open again for another reset_timeout
    assert breakers.state(A) == "open"
    with pytest.raises(BreakerOpen):
        call(handle)
    time.sleep(0.15)
    call(handle)  # the next window has its own probe
    assert len(upstream.calls) == 3


def test_a_retry_goes_to_a_target_this_request_has_not_tried():
    upstream = Answers(200)
    handle, _ = balanced(upstream, (A, B, C), fail_max=100)
    for _ in range(6):
        req = make_request()
        req.tried_targets.update({A, B})
        handle(req).close()
    assert upstream.targets == [C] * 6
