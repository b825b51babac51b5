"""Stand-in requests and next handlers for testing one pipeline stage at a time."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from werkzeug.datastructures import Headers

from app.gateway.types import GatewayRequest, GatewayResponse


def make_request(
    method: str = "GET",
    path: str = "/",
    *,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    body: object = None,
    query: str = "",
    **fields: object,
) -> GatewayRequest:
    """A GatewayRequest as the router hands it on (``upstream_path`` defaults to ``path``)."""
    fields.setdefault("upstream_path", path)
    return GatewayRequest(method=method, path=path, query=query, headers=Headers(headers or []), body=body, **fields)


@dataclass
class Call:
    """What a stand-in saw of one attempt (the request object itself is mutated between attempts)."""

    method: str
    target: str | None
    headers: Headers
    body: object


class Answers:
    """A next handler that plays a script of outcomes, one per call; the last one repeats.

    An outcome is a status (answered with that status and body ``b"status <n>"``), a
    GatewayResponse (returned as it is), an exception (raised), or a callable taking the
    request and returning one of those.
    ``calls`` records each attempt; ``closed`` lists the responses whose ``close`` ran.
    """

    def __init__(self, *outcomes: int | GatewayResponse | BaseException | Callable[[GatewayRequest], object]):
        self.outcomes = list(outcomes) or [200]
        self.calls: list[Call] = []
        self.answered: list[GatewayResponse] = []
        self.closed: list[GatewayResponse] = []

    @property
    def targets(self) -> list[str | None]:
        return [call.target for call in self.calls]

    def __call__(self, req: GatewayRequest) -> GatewayResponse:
        self.calls.append(Call(req.method, req.target, Headers(req.headers), req.body))
        outcome = self.outcomes[min(len(self.calls), len(self.outcomes)) - 1]
        if callable(outcome) and not isinstance(outcome, BaseException):
            outcome = outcome(req)
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, GatewayResponse):
            response = outcome
        else:
            response = GatewayResponse(
                status=outcome, headers=Headers([("Content-Type", "text/plain")]), body=[f"status {outcome}".encode()]
            )
        response.on_close.append(lambda: self.closed.append(response))
        self.answered.append(response)
        return response


class Blocking:
    """A next handler that holds each request until ``release`` is set, like a slow upstream."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def __call__(self, req: GatewayRequest) -> GatewayResponse:
        self.entered.release()
        if not self.release.wait(timeout=5):
            raise AssertionError("the test never released the blocked request")
        return GatewayResponse(status=200, headers=Headers(), body=[b"slow"])
