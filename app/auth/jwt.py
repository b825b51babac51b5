"""JWT bearer tokens (RFC 7519, RFC 8725): HS256 with a shared secret, RS256/ES256 from a JWKS URL."""
from __future__ import annotations

from dataclasses import dataclass

import jwt
from jwt import PyJWKClient
from jwt.exceptions import PyJWKClientConnectionError, PyJWKClientError, PyJWKSetError

# RFC 8725 section 3.1: the algorithm comes from configuration, never from the token alone.
# A token's "alg" only selects among these, each tied to one kind of key, so an RS256 public
# key can never be used as an HS256 secret, and "none" is never accepted.
SECRET_ALGORITHMS = frozenset({"HS256"})
JWKS_ALGORITHMS = frozenset({"RS256", "ES256"})


class InvalidToken(Exception):
    """The token is malformed, badly signed, expired, not yet valid or for someone else."""


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
    jwks_lifespan: float = 300.0  # how long a fetched key set is kept
    jwks_cooldown: float = 5.0  # least time between refetches forced by an unknown "kid"
    jwks_timeout: float = 2.0

    @property
    def enabled(self) -> bool:
        return bool(self.secret or self.jwks_url)


class JWTVerifier:
    """Check a compact JWS and return its claims.

    ``exp`` and ``sub`` are required; ``nbf`` and ``iat`` are checked when present; ``aud``
    and ``iss`` when configured. With a JWKS URL the key set is cached for
    ``jwks_lifespan`` seconds and fetched again when a token names an unknown ``kid``
    (a key rotation), at most once per ``jwks_cooldown`` seconds so that tokens with made-up
    ``kid`` values cannot make the gateway hammer the identity provider.
    """

    def __init__(self, settings: JWTSettings):
        self.settings = settings
        self._jwks = (
            PyJWKClient(
                settings.jwks_url,
                lifespan=settings.jwks_lifespan,
                timeout=settings.jwks_timeout,
                cooldown_duration=settings.jwks_cooldown,
            )
            if settings.jwks_url
            else None
        )

    def verify(self, token: str) -> dict:
        """Return the verified claims of ``token``.

        Raises InvalidToken (with a reason fit for ``error_description``), or KeysUnavailable
        when the JWKS URL cannot be fetched.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("The token is not a well-formed JWT") from exc
        algorithm = header.get("alg")
        if algorithm in SECRET_ALGORITHMS and self.settings.secret:
            key: object = self.settings.secret
        elif algorithm in JWKS_ALGORITHMS and self._jwks is not None:
            key = self._signing_key(header.get("kid"))
        else:
            raise InvalidToken(f"Tokens signed with {algorithm!r} are not accepted")
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
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("The token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidToken("The token is not valid yet") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"The token is invalid: {exc}") from exc

    def _signing_key(self, kid: object) -> object:
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("The token names no key ('kid')")
        try:
            return self._jwks.get_signing_key(kid).key
        except (PyJWKClientConnectionError, PyJWKSetError, ValueError) as exc:
            # unreachable, or an answer that is no key set (an HTML error page, no usable keys)
            raise KeysUnavailable(str(exc)) from exc
        except PyJWKClientError as exc:
            raise InvalidToken("The token is signed with an unknown key") from exc


def scopes_of(claims: dict) -> frozenset[str]:
    """Scopes from ``scope`` (space-separated, RFC 8693 section 4.2) or ``scp`` (a list or string)."""
    value = claims.get("scope", claims.get("scp", ""))
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(item for item in value if isinstance(item, str))
    return frozenset()
