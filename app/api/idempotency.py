"""``Idempotency-Key`` on the gateway's own creating POSTs (draft-ietf-httpapi-idempotency-key-header):
the first answer to a caller's key is kept a day and replayed to a repeat.

``@idempotent`` under a view's ``@operation``: a request with the header is fingerprinted
(SHA-256 of method, path, query and body) and claimed for its caller (consumer, or client IP
when anonymous) before the view runs. A repeat with the same request gets the first 2xx answer
again with ``Idempotent-Replayed: true`` and creates nothing; the same key with another request
is 422 ``idempotency-key-reused``; a repeat while the first is unanswered is 409
``idempotency-key-in-flight`` with ``Retry-After: 1`` (a claim left by a process that died lapses
after CLAIM_LEASE). An answer other than 2xx is not kept, so the caller may fix the request and
send it again with the same key. Keys belong to the credential that sent them. An answer that
shows a secret once (``reveals_secret``) is not kept: a repeat is a 409 with its ``Location``. Jobs keep their own (the
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

from app.api.common import ConflictProblem, Param
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
# How long a claim holds its key with no answer recorded: longer than any request may take
# (gunicorn recycles a worker after GUNICORN_TIMEOUT, 35 s); a claim left by a process that
# died is then taken over by the next repeat.
CLAIM_LEASE = timedelta(seconds=60)
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
    """The caller a key belongs to: its credential (an API key, or the consumer's JWTs), so a
    repeat is answered only to the credential that made the first request; else its address."""
    principal = current_principal()
    if principal is None:
        return "ip:" + (request.remote_addr or "unknown")
    return f"{principal.consumer_id}/{principal.credential_id}"


def _replay(found: IdempotentRequest) -> Response:
    if found.body is None:  # an answer that revealed a secret: not kept, not shown again
        location = (found.headers or {}).get("Location")
        raise ConflictProblem(
            "The first request with this Idempotency-Key created the resource; its secret was shown in that answer only",
            headers={"Location": location} if location else None,
        )
    response = Response(found.body, status=found.status)
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
        return None  # the claim that follows deletes it with every other expired key
    if found.fingerprint != digest:
        raise IdempotencyKeyReused("This Idempotency-Key was used with a different request")
    if found.status is None and found.created_at < utcnow() - CLAIM_LEASE:
        db.session.delete(found)  # left by a process that died: the repeat goes ahead
        db.session.commit()
        return None
    if found.status is None:
        raise IdempotentRequestInFlight("A request with this Idempotency-Key is still being processed; retry later", headers={"Retry-After": "1"})
    return _replay(found)


def idempotent(view: Callable | None = None, *, reveals_secret: bool = False) -> Callable:
    """Make a creating POST view idempotent per ``Idempotency-Key`` (the module's rules).
    Raises BadIdempotencyKey (400) for a key that is not 1-255 visible ASCII characters.

    ``reveals_secret``: the answer shows a secret once (a new API key, an endpoint's signing
    secret); its body is not kept, and a repeat gets a 409 ``conflict`` with the resource's
    ``Location`` instead of the secret again."""
    if view is None:
        return lambda found: idempotent(found, reveals_secret=reveals_secret)

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
            replayed = _earlier(scope, key, digest)
            if replayed is None:  # that claim is gone again: let the caller retry
                raise IdempotentRequestInFlight("A request with this Idempotency-Key was being processed; retry", headers={"Retry-After": "1"}) from None
            return replayed
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
            body = None if reveals_secret else response.get_data(as_text=True)
            db.session.execute(update(IdempotentRequest).where(claimed).values(status=response.status_code, body=body, headers=kept))
        else:
            db.session.execute(delete(IdempotentRequest).where(claimed))
        db.session.commit()
        return response

    answer.idempotent = True
    return answer


