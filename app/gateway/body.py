"""Request body stage: the size limit (413) and how the body travels to the upstream."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from app.errors import ProblemError
from app.gateway.types import (
    GatewayRequest,
    GatewayResponse,
    Handler,
    Middleware,
    PayloadTooLarge,
)

if TYPE_CHECKING:
    from app.gateway.pipeline import Context

CHUNK = 64 * 1024  # bytes per read from the client and write to the upstream


class IncompleteBody(ProblemError):
    """The client sent fewer body bytes than its Content-Length promised (400)."""

    status, title, slug = 400, "Bad Request", "incomplete-body"


@dataclass(slots=True)
class ClientBody:
    """The client's body as it arrives: a readable stream and its Content-Length (None if chunked)."""

    stream: BinaryIO
    length: int | None


class RequestBody:
    """A body streamed to the upstream in ``CHUNK``-sized pieces; ``len()`` is its Content-Length.

    ``started`` tells whether any byte was read, i.e. whether it can still be sent again.
    """

    def __init__(self, stream: BinaryIO, length: int):
        self.stream = stream
        self.length = length
        self.started = False

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        self.started = True
        remaining = self.length
        while remaining > 0:
            chunk = self.stream.read(min(CHUNK, remaining))
            if not chunk:
                raise IncompleteBody(f"The client sent {self.length - remaining} of {self.length} body bytes")
            remaining -= len(chunk)
            yield chunk


def replayable(body: object) -> bool:
    """True when ``body`` can be sent again for a retry (no body, buffered, or not yet started)."""
    return not isinstance(body, RequestBody) or not body.started


def request_body(max_size: int, buffer_size: int) -> Middleware:
    """Build the body stage: 413 above ``max_size`` bytes (0: no limit); bodies up to
    ``buffer_size`` bytes are read into memory so that retries can resend them.

    Bodies with a Content-Length are checked before a byte is read and larger ones stream
    straight through. Chunked bodies (no length) are spooled, to disk past ``buffer_size``,
    until ``max_size`` is passed, since HTTP/1.1 upstreams are sent a Content-Length.
    Raises PayloadTooLarge (413, RFC 9110 section 15.5.14).
    """

    def too_large(size: str) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body ({size}) exceeds the limit of {max_size} bytes")

    def middleware(next_handler: Handler) -> Handler:
        def handle(req: GatewayRequest) -> GatewayResponse:
            body = req.body
            if not isinstance(body, ClientBody):
                return next_handler(req)
            if body.length is not None:
                if max_size and body.length > max_size:
                    raise too_large(f"{body.length} bytes")
                if body.length == 0:
                    req.body = None
                elif body.length <= buffer_size:
                    req.body = _read_exactly(body.stream, body.length)
                else:
                    req.body = RequestBody(body.stream, body.length)
                return next_handler(req)
            spool = tempfile.SpooledTemporaryFile(max_size=buffer_size)  # noqa: SIM115 - closed with the response
            try:
                limit = max_size + 1 if max_size else None
                copied = _copy(body.stream, spool, limit)
                if max_size and copied > max_size:
                    raise too_large("more bytes")
                spool.seek(0)
                req.body = spool.read() if copied <= buffer_size else RequestBody(spool, copied)
                response = next_handler(req)
            except BaseException:
                spool.close()
                raise
            response.on_close.append(spool.close)
            return response

        return handle

    return middleware


def _read_exactly(stream: BinaryIO, length: int) -> bytes:
    data = stream.read(length)
    if len(data) != length:
        raise IncompleteBody(f"The client sent {len(data)} of {length} body bytes")
    return data


def _copy(source: BinaryIO, sink: BinaryIO, limit: int | None) -> int:
    """Copy up to ``limit`` bytes (None: all); return how many were copied."""
    if limit is None:
        shutil.copyfileobj(source, sink, CHUNK)
        return sink.tell()
    copied = 0
    while copied < limit:
        chunk = source.read(min(CHUNK, limit - copied))
        if not chunk:
            break
        sink.write(chunk)
        copied += len(chunk)
    return copied


def build(ctx: Context) -> Middleware:
    """The route's body stage: its ``max_body_size`` (else MAX_BODY_SIZE). A route whose
    requests become jobs, or that keeps answers by request (``idempotency:``), holds the whole
    body: the job stores it, and a repeat is compared with it."""
    route, settings = ctx.route, ctx.settings
    max_body = settings.max_body_size if route.max_body_size is None else route.max_body_size
    if route.mode == "async" and not ctx.for_job:
        return request_body(max_body, max_body or settings.max_body_size)
    if route.idempotency is not None:
        return request_body(max_body, max_body or settings.max_body_size or 10 * 1024 * 1024)
    return request_body(max_body, settings.buffer_body_size)
