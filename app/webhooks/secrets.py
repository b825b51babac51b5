"""Endpoint secrets: made and checked (``whsec_`` + base64), encrypted at rest, and used to sign.

Signatures follow the Standard Webhooks specification (v1: base64 HMAC-SHA256 of
``{id}.{timestamp}.{body}``) through the ``standardwebhooks`` library, so any Standard Webhooks
or Svix verifier accepts them. Secrets are stored as Fernet tokens (cryptography's MultiFernet):
the first key of WEBHOOK_SECRET_KEYS encrypts, every key decrypts, so the key can be rotated
without downtime (README: "Rotating the secret key").
"""
from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from standardwebhooks import Webhook

log = logging.getLogger("frontdoor.webhooks")

PREFIX = "whsec_"
SECRET_BYTES = 32  # generated secrets; Standard Webhooks asks for 24 to 64
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64
MIN_KEY_CHARS = 32  # a WEBHOOK_SECRET_KEYS entry that is not a Fernet key is a passphrase this long


class InvalidSecret(ValueError):
    """A supplied endpoint secret is not ``whsec_`` + base64 of 24 to 64 bytes."""


class SecretKeyMissing(RuntimeError):
    """WEBHOOK_SECRET_KEYS is not set on a deployment that needs it (not the embedded default)."""


class SecretUnreadable(RuntimeError):
    """A stored secret was encrypted with a key that is no longer in WEBHOOK_SECRET_KEYS."""


def generate() -> str:
    """A new endpoint secret: ``whsec_`` + base64 of 32 random bytes."""
    return PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def validate(secret: str) -> str:
    """``secret`` when it is ``whsec_`` + standard base64 of 24 to 64 bytes; raises InvalidSecret."""
    if not secret.startswith(PREFIX):
        raise InvalidSecret(f"must start with {PREFIX!r}")
    try:
        raw = base64.b64decode(secret[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecret(f"must be {PREFIX!r} followed by standard base64") from None
    if not MIN_SECRET_BYTES <= len(raw) <= MAX_SECRET_BYTES:
        raise InvalidSecret(f"must encode {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, not {len(raw)}")
    return secret


def sign(secrets_: Iterable[str], message_id: str, timestamp: datetime, body: str) -> str:
    """The ``webhook-signature`` value: one ``v1,<base64>`` per secret, space-separated
    (Standard Webhooks, "Signature scheme"), the newest secret first."""
    return " ".join(Webhook(secret).sign(message_id, timestamp, body) for secret in secrets_)


def _fernet(key: str) -> Fernet:
    """A Fernet for one WEBHOOK_SECRET_KEYS entry: a Fernet key (urlsafe base64 of 32 bytes) as
    it is, or a passphrase of at least 32 characters stretched with HKDF-SHA256 (what a
    platform's generated secret, such as Heroku's, looks like)."""
    try:
        return Fernet(key.encode())
    except (ValueError, binascii.Error):
        pass
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"each WEBHOOK_SECRET_KEYS entry must be a Fernet key or at least {MIN_KEY_CHARS} characters")
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"frontdoor webhook secrets").derive(key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


class SecretBox:
    """Encrypts and decrypts endpoint secrets with the keys of WEBHOOK_SECRET_KEYS.

    ``keys`` is a list of entries, newest first. Raises ValueError for a malformed entry.
    """

    def __init__(self, keys: list[str]):
        if not keys:
            raise ValueError("no key")
        self._fernet = MultiFernet([_fernet(key) for key in keys])

    def encrypt(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode())

    def decrypt(self, token: bytes) -> str:
        """The secret in ``token``; raises SecretUnreadable when no configured key opens it."""
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken:
            raise SecretUnreadable(
                "a webhook secret cannot be decrypted with any key in WEBHOOK_SECRET_KEYS; was a key removed too early?"
            ) from None

    def rotate(self, token: bytes) -> bytes:
        """``token`` re-encrypted with the first key (MultiFernet.rotate)."""
        try:
            return self._fernet.rotate(token)
        except InvalidToken:
            raise SecretUnreadable("a webhook secret cannot be decrypted with any key in WEBHOOK_SECRET_KEYS") from None


def key_list(value: str | list | None) -> list[str]:
    """WEBHOOK_SECRET_KEYS as a list: a comma-separated string or a list, blanks dropped."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(item) for item in value]
    return [item.strip() for item in items if item.strip()]


def instance_key(instance_path: str) -> str:
    """The embedded default's key: a Fernet key kept in ``instance/webhook-secret.key`` (made,
    readable by its owner only, on first use). Shared by every process on this machine only."""
    path = Path(instance_path) / "webhook-secret.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under another name, then linked into place: a process starting at the
        # same moment either finds no file or a complete one, and exactly one key wins.
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(Fernet.generate_key().decode())
        try:
            os.link(draft, path)
            log.debug("webhook secret key created", extra={"path": str(path)})
        except FileExistsError:
            pass  # another process made it first: use that one
        except OSError:  # a filesystem without hard links: a rename, which cannot tell who won
            if not path.exists():
                os.replace(draft, path)
        finally:
            draft.unlink(missing_ok=True)
    return path.read_text().strip()
