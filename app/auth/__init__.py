"""Who is calling: API keys and JWT bearer tokens, checked once per request before rate limiting."""
from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    """Authenticate every request of the gateway's own API (the proxy asks the same
    ``app.extensions["auth"]`` for its routes); add the CLI commands."""
    from app.auth import cli, keys
    from app.auth.authenticate import Authenticator, jwt_settings
    from app.auth.jwt import JWTVerifier
    from app.auth.views import authenticate_request

    settings = jwt_settings(app.config)
    app.extensions["auth"] = Authenticator(
        realm=app.config["AUTH_REALM"],
        lookups=keys.CachedLookup(
            ttl=float(app.config["AUTH_CACHE_TTL"]),
            maxsize=int(app.config["AUTH_CACHE_SIZE"]),
            stale=float(app.config["AUTH_CACHE_STALE"]),
        ),
        verifier=JWTVerifier(settings) if settings.enabled else None,
        database=app.app_context,
    )
    app.before_request(authenticate_request)
    cli.init_app(app)
