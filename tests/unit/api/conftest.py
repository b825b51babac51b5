"""Fixtures for the /_gateway API: headers carrying an admin's key."""
from __future__ import annotations

import pytest

from tests.unit.api.support import auth


@pytest.fixture
def admin(identity) -> dict[str, str]:
    """Headers carrying the key of the consumer ``root``, which has the ``admin`` scope."""
    return auth(identity.key(identity.consumer("root"), scopes=("admin",)))


@pytest.fixture
def alice(identity) -> dict[str, str]:
    """Headers carrying the key of the consumer ``alice`` (no scopes)."""
    return auth(identity.key(identity.consumer("alice")))


@pytest.fixture
def bob(identity) -> dict[str, str]:
    """Headers carrying the key of the consumer ``bob``: another consumer than ``alice``."""
    return auth(identity.key(identity.consumer("bob")))
