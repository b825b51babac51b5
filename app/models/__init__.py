"""SQLAlchemy 2.0 models, one module per domain; importing this package registers them all."""
from __future__ import annotations

from app.models.identity import ApiKey, Consumer

__all__ = ["ApiKey", "Consumer"]
