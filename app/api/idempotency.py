"""``Idempotency-Key`` on the gateway's own creating POSTs (draft-ietf-httpapi-idempotency-key-header):
the first answer to a caller's key is kept a day and replayed to a repeat.

``@idempotent`` under a view's ``@operation``: a request with the header is fingerprinted
(SHA-256 of method, path, query and body) and claimed for its caller (consumer, or client IP
when anonymous) before the view runs. A repeat with the same request gets the first 2xx answer
again with ``Idempotent-Replayed: true`` and creates nothing; the same key with another request
is 422 ``idempotency-key-reused``; a repeat while the first is unanswered is 409
``idempotency-key-in-flight`` with ``Retry-After: 1``. An answer other than 2xx is not kept, so
the caller may fix the request and send it again with the same key. Jobs keep their own (the
key is a column of the job); events keep their body ``id`` as their identity, the header beside it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import timedelta
from functools import wraps

from flask import Response, make_response, request
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from app.api.common import Param
from app.auth.views import current_principal
from app.extensions import db
from app.gateway.idempotency import (
    IdempotencyKeyReused,
    IdempotentRequestInFlight,
    valid_key,
)
from app.models import IdempotentRequest
from app.models.base import utcnow

KEPT = timedelta(hours=24)  # how long a key's answer is replayed
REPLAYED = ("Location", "Operation-Location", "Content-Type")  # the answer's fields kept with its body
HEADER = Param(
    "Idempotency-Key",
    "header",
    {"type": "string", "minLength": 1, "maxLength": 255},
    "A key of the caller's choosing: a repeat of this request with it gets the first answer again (Idempotent-Replayed: true) and creates nothing",
)


def fingerprint() -> str:
    """SHA-256 of what makes two requests the same: method, path, query and body."""
    head = f"{request.method}\n{request.path}\n{request.query_string.decode('latin-1')}\n".encode()
    return hashlib.sha256(head + hashlib.sha256(request.get_data(cache=True)).digest()).hexdigest()


def _scope() -> str:
    principal = current_principal()
    return principal.consumer_id if principal is not None else "ip:" + (request.remote_addr or "unknown")


def _replay(found: IdempotentRequest) -> Response:
    response = Response(found.body or "", status=found.status)
    for name, value in (found.headers or {}).items():
        response.headers[name] = value
    response.headers["Idempotent-Replayed"] = "true"
    return response


def _earlier(scope: str, key: str, digest: str) -> Response | None:
    """The kept answer for ``key``, None when there is none (or it is older than KEPT); raises
    IdempotencyKeyReused (422) or IdempotentRequestInFlight (409)."""
    found = db.session.get(IdempotentRequest, (scope, key))
    if found is None:
        return None
    if found.created_at < utcnow() - KEPT:
        db.session.delete(found)
        db.session.commit()
        return None
    if found.fingerprint != digest:
        raise IdempotencyKeyReused("This Idempotency-Key was used with a different request")
    if found.status is None:
        raise IdempotentRequestInFlight("A request with this Idempotency-Key is still being processed; retry later", headers={"Retry-After": "1"})
    return _replay(found)


def idempotent(view: Callable) -> Callable:
    """Make a creating POST view idempotent per ``Idempotency-Key`` (the module's rules).
    Raises BadIdempotencyKey (400) for a key that is not 1-255 visible ASCII characters."""

    @wraps(view)
    def answer(*args: object, **kwargs: object) -> Response:
        raw = request.headers.get("Idempotency-Key")
        if raw is None:
            return view(*args, **kwargs)
        key, scope, digest = valid_key(raw), _scope(), fingerprint()
        replayed = _earlier(scope, key, digest)
        if replayed is not None:
            return replayed
        try:
            # Keys older than KEPT go as new ones come (created_at is indexed): the table holds a day's.
            db.session.execute(delete(IdempotentRequest).where(IdempotentRequest.created_at < utcnow() - KEPT))
            db.session.add(IdempotentRequest(scope=scope, key=key, fingerprint=digest, status=None))
            db.session.commit()
        except IntegrityError:  # the same key, claimed a moment ago
            db.session.rollback()
            return _earlier(scope, key, digest) or view(*args, **kwargs)
        claimed = (IdempotentRequest.scope == scope) & (IdempotentRequest.key == key)
        try:
            response = make_response(view(*args, **kwargs))
        except BaseException:
            db.session.rollback()
            db.session.execute(delete(IdempotentRequest).where(claimed))
            db.session.commit()
            raise
        if 200 <= response.status_code < 300 and not response.is_streamed:
            kept = {name: response.headers[name] for name in REPLAYED if name in response.headers}
            db.session.execute(update(IdempotentRequest).where(claimed).values(status=response.status_code, body=response.get_data(as_text=True), headers=kept))
        else:
            db.session.execute(delete(IdempotentRequest).where(claimed))
        db.session.commit()
        return response

    answer.idempotent = True
    return answer


