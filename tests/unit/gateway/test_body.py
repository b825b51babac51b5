"""Request body stage: the 413 limit, buffering small bodies, streaming and spooling large ones."""
from __future__ import annotations

import io

import pytest

from app.gateway.body import (
    CHUNK,
    ClientBody,
    IncompleteBody,
    RequestBody,
    replayable,
    request_body,
)
from app.gateway.types import PayloadTooLarge
from tests.unit.gateway.stand_ins import Answers, make_request


def body_of(data: bytes, length: int | None) -> tuple[io.BytesIO, ClientBody]:
    stream = io.BytesIO(data)
    return stream, ClientBody(stream, length)


_responses = []


@pytest.fixture(autouse=True)
def _close_responses():
    """Close what each test leaves open: a spooled body lives until its response is closed."""
    yield
    while _responses:
        _responses.pop().close()


def send(max_size: int, buffer_size: int, client_body: object, upstream: Answers | None = None):
    upstream = upstream or Answers(200)
    response = request_body(max_size, buffer_size)(upstream)(make_request("POST", body=client_body))
    _responses.append(response)
    return upstream, response


def test_a_content_length_over_the_limit_is_refused_before_reading():
    stream, client_body = body_of(b"x" * 101, 101)
    upstream = Answers(200)

    with pytest.raises(PayloadTooLarge) as caught:
        send(100, 1000, client_body, upstream)

    assert caught.value.status == 413
    assert "101 bytes" in caught.value.detail and "limit of 100 bytes" in caught.value.detail
    assert stream.tell() == 0  # not a byte read
    assert upstream.calls == []


def test_a_body_at_the_limit_is_accepted():
    upstream, response = send(100, 1000, body_of(b"x" * 100, 100)[1])

    assert response.status == 200
    assert upstream.calls[0].body == b"x" * 100


def test_a_small_body_is_buffered_as_bytes():
    upstream, _ = send(1000, 64, body_of(b'{"name": "ada"}', 15)[1])

    assert upstream.calls[0].body == b'{"name": "ada"}'


def test_the_buffer_size_is_the_largest_body_kept_in_memory():
    at_limit, _ = send(1000, 64, body_of(b"b" * 64, 64)[1])
    over, _ = send(1000, 64, body_of(b"b" * 65, 65)[1])

    assert at_limit.calls[0].body == b"b" * 64
    assert isinstance(over.calls[0].body, RequestBody)


def test_only_content_length_bytes_are_read():
    upstream, _ = send(1000, 64, body_of(b"abcdef", 4)[1])

    assert upstream.calls[0].body == b"abcd"


def test_an_empty_body_becomes_no_body():
    upstream, _ = send(1000, 64, body_of(b"", 0)[1])

    assert upstream.calls[0].body is None


def test_a_request_without_a_client_body_passes_unchanged():
    upstream, _ = send(1000, 64, None)

    assert upstream.calls[0].body is None


def test_a_body_over_the_buffer_size_is_streamed_with_its_length():
    data = bytes(range(256)) * (3 * CHUNK // 256 + 1)
    upstream = Answers(lambda req: 200 if b"".join(req.body) == data else 400)

    _, response = send(0, 64, body_of(data, len(data))[1], upstream)

    body = upstream.calls[0].body
    assert isinstance(body, RequestBody)
    assert len(body) == len(data)
    assert response.status == 200  # the stand-in read every byte, in order


def test_a_streamed_body_is_read_in_chunks():
    data = b"z" * (2 * CHUNK + 10)

    chunks = list(RequestBody(io.BytesIO(data), len(data)))

    assert [len(chunk) for chunk in chunks] == [CHUNK, CHUNK, 10]


def test_a_streamed_body_is_replayable_only_until_it_starts():
    body = RequestBody(io.BytesIO(b"abc"), 3)

    assert replayable(body)
    next(iter(body))
    assert not replayable(body)
    assert replayable(b"abc") and replayable(None)


def test_a_short_buffered_body_is_a_400():
    with pytest.raises(IncompleteBody) as caught:
        send(1000, 64, body_of(b"only 12 byte", 20)[1])

    assert caught.value.status == 400
    assert caught.value.detail == "The client sent 12 of 20 body bytes"


def test_a_short_streamed_body_fails_while_being_sent():
    def reads_the_body(req):
        b"".join(req.body)
        return 200

    upstream = Answers(reads_the_body)

    with pytest.raises(IncompleteBody, match="sent 100 of 200 body bytes"):
        send(1000, 64, body_of(b"x" * 100, 200)[1], upstream)


def test_a_small_chunked_body_is_buffered():
    upstream, _ = send(1000, 64, body_of(b"chunked body", None)[1])

    assert upstream.calls[0].body == b"chunked body"


def test_a_large_chunked_body_is_spooled_and_sent_with_its_length():
    data = b"0123456789" * 1000
    upstream = Answers(lambda req: 200 if b"".join(req.body) == data else 400)

    _, response = send(20_000, 64, body_of(data, None)[1], upstream)

    assert isinstance(upstream.calls[0].body, RequestBody)
    assert len(upstream.calls[0].body) == 10_000
    assert response.status == 200


def test_a_chunked_body_over_the_limit_is_refused():
    upstream = Answers(200)

    with pytest.raises(PayloadTooLarge) as caught:
        send(100, 64, body_of(b"x" * 101, None)[1], upstream)

    assert caught.value.status == 413
    assert upstream.calls == []


def test_a_chunked_body_at_the_limit_is_accepted():
    upstream, _ = send(100, 1000, body_of(b"x" * 100, None)[1])

    assert upstream.calls[0].body == b"x" * 100


def test_the_spool_is_removed_when_the_response_closes():
    upstream, response = send(0, 64, body_of(b"y" * 1000, None)[1])
    spool = upstream.calls[0].body.stream

    response.close()

    assert spool.closed


def test_the_spool_is_removed_when_the_upstream_fails():
    upstream = Answers(RuntimeError("upstream stand-in failed"))

    with pytest.raises(RuntimeError):
        send(0, 64, body_of(b"y" * 1000, None)[1], upstream)

    assert upstream.calls[0].body.stream.closed


def test_a_limit_of_zero_means_no_limit():
    huge = 10**12  # announced, never read: larger bodies stream through
    upstream, _ = send(0, 64, ClientBody(io.BytesIO(b""), huge))
    assert len(upstream.calls[0].body) == huge

    upstream, _ = send(0, 64, body_of(b"x" * 200_000, None)[1])
    assert len(upstream.calls[0].body) == 200_000
