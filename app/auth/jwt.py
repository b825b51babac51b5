"""JWT bearer tokens (RFC 7519, RFC 8725): HS256 with a shared secret, RS256/ES256 from a JWKS URL."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import jwt
from jwt import PyJWK, PyJWKClient
from jwt.exceptions import PyJWKClientError, PyJWKError, PyJWKSetError

# RFC 8725 section 3.1: the algorithm comes from configuration, never from the token alone.
# A token's "alg" only selects among these, each tied to one kind of key, so an RS256 public
# key can never be used as an HS256 secret, and "none" is never accepted.
SECRET_ALGORITHMS = frozenset({"HS256"})
JWKS_ALGORITHMS = frozenset({"RS256", "ES256"})


class InvalidToken(Exception):
    """The token is malformed, badly signed, expired, not yet valid or for someone else.

    The message is a fixed sentence (never text from the token), fit for ``error_description``.
    """


class KeysUnavailable(Exception):
    """The JWKS URL could not be read, so a token signed with an unknown key cannot be checked."""


@dataclass(frozen=True)
class JWTSettings:
    """How tokens are checked; times are seconds."""

    secret: str | None = None  # HS256 shared secret
    jwks_url: str | None = None  # RS256/ES256 public keys
    audience: str | None = None  # required "aud" when set
    issuer: str | None = None  # required "iss" when set
    leeway: float = 0.0  # clock skew allowed on exp/nbf/iat
    jwks_lifespan: float = 300.0  # how long a fetched key set is used before it is fetched again
    jwks_cooldown: float = 5.0  # least time between fetches forced by an unknown kid or a failure
    jwks_timeout: float = 2.0

    @property
    def enabled(self) -> bool:
        return bool(self.secret or self.jwks_url)


class KeySet:
    """The signing keys at a JWKS URL, fetched with PyJWKClient and kept between fetches.

    PyJWKClient alone holds one lock across its network fetch and keeps nothing when a fetch
    fails, so a slow or down identity provider would hold up or refuse every token. Here a
    known ``kid`` is answered from memory without a lock; one thread at a time fetches (when
    the set is older than ``lifespan``, or a token names an unknown ``kid``), at most once per
    ``cooldown`` seconds, failures included; a failed fetch keeps the last good set.
    """

    def __init__(self, url: str, lifespan: float, cooldown: float, timeout: float, clock=time.monotonic):
        self._client = PyJWKClient(url, cache_jwk_set=False, timeout=timeout)
        self.lifespan = lifespan
        self.cooldown = cooldown
        self.clock = clock
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at: float | None = None  # last good fetch
        self._tried_at: float | None = None  # last attempt, good or not
        self._fetching = threading.Lock()

    def key(self, kid: str) -> PyJWK:
        """The key named ``kid``. Raises InvalidToken when the set has no such key, or
        KeysUnavailable when it has never been fetched and cannot be now."""
        now = self.clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self.lifespan
        if (stale or kid not in self._keys) and self._may_try(now):
            self._fetch(now)
        found = self._keys.get(kid)
        if found is not None:
            return found
        if self._fetched_at is None:
            raise KeysUnavailable("the JWKS URL has not answered with a key set yet")
        raise InvalidToken("The token is signed with an unknown key")

    def _may_try(self, now: float) -> bool:
        return self._tried_at is None or now - self._tried_at >= self.cooldown

    def _fetch(self, now: float) -> None:
        # Before the first good fetch there is nothing to answer from: wait for the one fetch.
        # After it, a thread that finds another fetching answers from the set as it is.
        first = self._fetched_at is None
        if not self._fetching.acquire(blocking=first, timeout=self._client.timeout + 1 if first else -1):
            return
        try:
            if not self._may_try(now):
                return
            self._tried_at = now
            try:
                fetched = self._client.get_signing_keys(refresh=True)
            except (PyJWKClientError, PyJWKSetError, PyJWKError, ValueError):
                return  # unreachable, or not a key set: keep the last good one
            self._keys = {key.key_id: key for key in fetched}
            self._fetched_at = now
        finally:
            self._fetching.release()


_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "The token has expired"),
    (jwt.ImmatureSignatureError, "The token is not valid yet"),
    (jwt.InvalidAudienceError, "The token is meant for another audience"),
    (jwt.InvalidIssuerError, "The token comes from another issuer"),
    (jwt.MissingRequiredClaimError, "The token lacks a required claim (exp and sub are required)"),
    (jwt.InvalidSignatureError, "The token's signature does not verify"),
    (jwt.DecodeError, "The token is not a well-formed JWT"),
)


class JWTVerifier:
    """Check a compact JWS and return its claims.

    ``exp`` and ``sub`` are required; ``nbf`` and ``iat`` are checked when present; ``aud``
    and ``iss`` when configured. With a JWKS URL the key set is kept for ``jwks_lifespan``
    seconds and fetched again when a token names an unknown ``kid`` (a key rotation), at most
    once per ``jwks_cooldown`` seconds, so that tokens with made-up ``kid`` values cannot make
    the gateway hammer the identity provider (KeySet).
    """

    def __init__(self, settings: JWTSettings):
        self.settings = settings
        self._keys = (
            KeySet(settings.jwks_url, settings.jwks_lifespan, settings.jwks_cooldown, settings.jwks_timeout)
            if settings.jwks_url
            else None
        )

    def verify(self, token: str) -> dict:
        """Return the verified claims of ``token``.

        Raises InvalidToken (with a fixed reason fit for ``error_description``), or
        KeysUnavailable when the JWKS URL has never answered.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("The token is not a well-formed JWT") from exc
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise InvalidToken("The token's algorithm is not accepted")
        if algorithm in SECRET_ALGORITHMS and self.settings.secret:
            key: object = self.settings.secret
        elif algorithm in JWKS_ALGORITHMS and self._keys is not None:
            key = self._signing_key(header.get("kid"), algorithm)
        else:
            raise InvalidToken("The token's algorithm is not accepted")
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.PyJWTError as exc:
            reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), "The token is not valid")
            raise InvalidToken(reason) from exc
        except (TypeError, ValueError) as exc:  # a key PyJWT cannot use for this algorithm
            raise InvalidToken("The token is not valid") from exc

    def _signing_key(self, kid: object, algorithm: str) -> object:
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("The token names no key ('kid')")
        found = self._keys.key(kid)
        # The key set says which algorithm each key is for (or its type implies one): an
        # RS256 token must not be checked against an EC key, nor ES256 against an RSA one.
        if found.algorithm_name != algorithm:
            raise InvalidToken("The token's algorithm does not match its key")
        return found.key


def scopes_of(claims: dict) -> frozenset[str]:
    """Scopes from ``scope`` (space-separated, RFC 8693 section 4.2) or ``scp`` (a list or string)."""
    value = claims.get("scope", claims.get("scp", ""))
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(item for item in value if isinstance(item, str))
    return frozenset()
