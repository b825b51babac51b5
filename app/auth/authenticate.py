"""Authentication: an API key or a JWT bearer token turned into the caller's Principal."""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial

from werkzeug.datastructures import Headers

from app.auth import keys
from app.auth.jwt import (
    InvalidToken,
    JWTSettings,
    JWTVerifier,
    KeysUnavailable,
    scopes_of,
)
from app.errors import ProblemError, database_errors
from app.extensions import db
from app.identity import Policy, Principal


class Unauthenticated(ProblemError):
    """401: credentials missing or not valid (RFC 9110 section 15.5.2, RFC 6750 section 3)."""

    status, title, slug = 401, "Unauthorized", "unauthenticated"


class InsufficientScope(ProblemError):
    """403: the credential is valid but lacks a scope the route requires (RFC 6750 section 3.1)."""

    status, title, slug = 403, "Forbidden", "insufficient-scope"


class IdentityUnavailable(ProblemError):
    """503: a token cannot be checked now (its JWKS URL unreachable). An unreachable database
    is ``app.errors.DatabaseUnavailable`` (503 ``database-unavailable``)."""

    status, title, slug = 503, "Service Unavailable", "identity-unavailable"


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Authenticator:
    """Turns a request's credential into a Principal, using the key cache and the JWT verifier."""

    def __init__(
        self,
        realm: str,
        lookups: keys.CachedLookup,
        verifier: JWTVerifier | None,
        database: Callable[[], AbstractContextManager] | None = None,
    ):
        self.realm = realm
        self.lookups = lookups
        self.verifier = verifier
        # Entered around a lookup the cache does not hold (the app's context, for db.session):
        # the proxy calls this outside any Flask context.
        self.database = database

    def _read(self, load: Callable[..., object]) -> object:
        """``load(db.session)``; raises DatabaseUnavailable when the database cannot be reached,
        which the lookups answer from what they verified before (``CachedLookup``)."""
        with database_errors(), self.database() if self.database is not None else nullcontext():
            return load(db.session)

    def challenge(self, error: str | None = None, description: str | None = None, scope: str | None = None) -> dict[str, str]:
        """The ``WWW-Authenticate`` header for a 401/403 (RFC 6750 section 3)."""
        params = [f"realm={_quoted(self.realm)}"]
        if error:
            params.append(f"error={_quoted(error)}")
        if description:
            params.append(f"error_description={_quoted(description)}")
        if scope:
            params.append(f"scope={_quoted(scope)}")
        return {"WWW-Authenticate": "Bearer " + ", ".join(params)}

    def authenticate(self, headers: Headers, policy: Policy) -> Principal | None:
        """Return the caller's Principal, or None for an anonymous caller where ``policy`` allows one.

        The credential is ``X-API-Key: <key>``, else ``Authorization: Bearer <key or JWT>``.
        Raises Unauthenticated (missing where required, or invalid anywhere), InsufficientScope,
        IdentityUnavailable (JWKS), or DatabaseUnavailable (a credential not verified within
        AUTH_CACHE_STALE seconds while the database cannot be reached). A bad key gets the same
        answer whether it is unknown, revoked or expired, so the response never tells whether a
        key exists.
        """
        if policy.mode == "none":
            return None
        token = credential_of(headers)
        if token is None:
            if policy.mode == "optional":
                return None
            raise Unauthenticated(
                "Credentials are required: send 'Authorization: Bearer <key or token>' or 'X-API-Key: <key>'",
                headers=self.challenge(),
            )
        principal = self.identify(token)
        missing = policy.scopes - principal.scopes
        if missing:
            needed = " ".join(sorted(policy.scopes))
            raise InsufficientScope(
                f"The credential lacks the scope(s) {', '.join(sorted(missing))} that this resource requires",
                headers=self.challenge("insufficient_scope", scope=needed),
            )
        return principal

    def identify(self, token: str) -> Principal:
        """The Principal behind ``token`` (an API key or a JWT); raises as ``authenticate`` does."""
        if keys.looks_like_key(token):
            return self._from_key(token)
        if token.count(".") == 2 and self.verifier is not None:
            return self._from_jwt(token)
        raise self._invalid("The credentials are not valid")

    def _invalid(self, description: str) -> Unauthenticated:
        return Unauthenticated(description, headers=self.challenge("invalid_token", description))

    def _from_key(self, token: str) -> Principal:
        digest = keys.hash_key(token)
        record = self.lookups.get("key:" + digest, lambda: self._read(partial(keys.read_key, digest)))
        if record is None or not record.valid_at(time.time()):
            raise self._invalid("The credentials are not valid")
        return Principal(
            record.consumer_id, record.consumer_name, record.plan, record.scopes, record.key_id, record.expires_at
        )

    def _from_jwt(self, token: str) -> Principal:
        try:
            claims = self.verifier.verify(token)
        except InvalidToken as exc:
            raise self._invalid(str(exc)) from exc
        except KeysUnavailable as exc:
            raise IdentityUnavailable(
                "The token's signing keys cannot be fetched right now; retry shortly",
                headers={"Retry-After": "5"},
            ) from exc
        subject = str(claims["sub"])
        problem = _unstorable(subject)
        if problem:
            raise self._invalid(f"The token's subject (sub) {problem}")
        consumer = self.lookups.get("sub:" + subject, lambda: self._read(partial(keys.read_consumer, subject)))
        if consumer is None or not consumer.usable:
            raise self._invalid("The token's subject is not an enabled consumer")
        expires_at = float(claims["exp"])
        return Principal(consumer.consumer_id, consumer.consumer_name, consumer.plan, scopes_of(claims), "jwt", expires_at)


def _unstorable(text: str) -> str | None:
    """Why ``text`` cannot name a consumer in any database the gateway runs on, or None.

    PostgreSQL text holds no NUL; UTF-8 (RFC 3629) encodes no lone surrogate, which JSON's
    ``\\ud800`` escapes can still put in a claim.
    """
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode()
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    return None


def credential_of(headers: Headers) -> str | None:
    """The credential a request carries: ``X-API-Key``, else a ``Bearer`` token; None when neither."""
    api_key = headers.get("X-API-Key")
    if api_key:
        return api_key.strip()
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def jwt_settings(config: dict) -> JWTSettings:
    """JWT settings from the app config; raises ValueError for an HS256 secret under 32 bytes
    (RFC 7518 section 3.2: a key at least as long as the hash output)."""
    secret = config["JWT_SECRET"]
    if secret and len(secret.encode()) < 32:
        raise ValueError("JWT_SECRET must be at least 32 bytes for HS256 (RFC 7518 section 3.2)")
    return JWTSettings(
        secret=config["JWT_SECRET"] or None,
        jwks_url=config["JWT_JWKS_URL"] or None,
        audience=config["JWT_AUDIENCE"] or None,
        issuer=config["JWT_ISSUER"] or None,
        leeway=float(config["JWT_LEEWAY"]),
        jwks_lifespan=float(config["JWKS_CACHE_SECONDS"]),
        jwks_cooldown=float(config["JWKS_REFRESH_COOLDOWN"]),
    )


