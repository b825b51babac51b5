"""Bulkhead stage: at most max_concurrency requests in flight per upstream, failing fast beyond."""
from __future__ import annotations

import threading

import pytest

from app.gateway.bulkhead import bulkhead, new_slots
from app.gateway.types import BulkheadFull
from tests.unit.gateway.stand_ins import Answers, Blocking, make_request


def test_without_max_concurrency_the_stage_is_absent():
    upstream = Answers(200)

    assert new_slots(None) is None
    assert bulkhead("svc", None)(upstream) is upstream


def test_requests_beyond_max_concurrency_get_503_with_retry_after():
    upstream = Answers(200)
    handle = bulkhead("svc", new_slots(2))(upstream)
    first, second = handle(make_request()), handle(make_request())  # bodies still being read

    with pytest.raises(BulkheadFull) as caught:
        handle(make_request())

    assert caught.value.status == 503
    assert caught.value.headers == {"Retry-After": "1"}
    assert "'svc'" in caught.value.detail
    assert len(upstream.calls) == 2  # the third never reached the upstream
    first.close()
    second.close()


def test_concurrent_requests_in_threads_are_bounded():
    upstream = Blocking()
    handle = bulkhead("svc", new_slots(2))(upstream)
    results = []
    threads = [threading.Thread(target=lambda: results.append(handle(make_request()))) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in threads:
            assert upstream.entered.acquire(timeout=5)

        with pytest.raises(BulkheadFull):
            handle(make_request())
    finally:
        upstream.release.set()
        for thread in threads:
            thread.join(5)
    assert [response.status for response in results] == [200, 200]
    for response in results:
        response.close()
    assert handle(make_request()).status == 200


def test_the_slot_is_held_until_the_response_is_closed():
    handle = bulkhead("svc", new_slots(1))(Answers(200))
    response = handle(make_request())
    with pytest.raises(BulkheadFull):
        handle(make_request())

    response.close()

    assert handle(make_request()).status == 200


def test_the_slot_is_released_when_the_next_stage_raises():
    upstream = Answers(RuntimeError("boom"), RuntimeError("boom"), 200)
    handle = bulkhead("svc", new_slots(1))(upstream)

    for _ in range(2):
        with pytest.raises(RuntimeError):
            handle(make_request())

    assert handle(make_request()).status == 200
    assert len(upstream.calls) == 3


def test_closing_a_response_twice_frees_only_its_own_slot():
    handle = bulkhead("svc", new_slots(2))(Answers(200))
    response = handle(make_request())

    response.close()
    response.close()

    held = [handle(make_request()), handle(make_request())]
    with pytest.raises(BulkheadFull):
        handle(make_request())
    for other in held:
        other.close()


def test_the_routes_of_one_upstream_share_its_slots():
    slots = new_slots(1)
    users = bulkhead("svc", slots)(Answers(200))
    orders = bulkhead("svc", slots)(Answers(200))
    response = users(make_request())

    with pytest.raises(BulkheadFull):
        orders(make_request())
    response.close()
    assert orders(make_request()).status == 200
