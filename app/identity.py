"""Who a request is from and what a route asks of it: value types the whole gateway shares.

Nothing heavy is imported here, so the route file's models (and ``python -m app.gateway.check``)
can use them without loading Flask's extensions, SQLAlchemy, Redis or Celery.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["required", "optional", "none"]
ADMIN_SCOPE = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated consumer of one request and what its credential allows."""

    consumer_id: str
    consumer_name: str
    plan: str | None
    scopes: frozenset[str]
    credential_id: str  # the API key's id (key_…), or "jwt"
    expires_at: float | None = None  # epoch seconds the credential stops working, None: never

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes


@dataclass(frozen=True, slots=True)
class Policy:
    """What a route or a view asks of its callers: ``mode`` and every scope in ``scopes``."""

    mode: Mode = "required"
    scopes: frozenset[str] = frozenset()


PUBLIC = Policy("none")
AUTHENTICATED = Policy("required")
