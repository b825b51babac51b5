"""Endpoint secrets: their format, encryption at rest with key rotation, signing, the instance key."""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import stat
import threading
from datetime import UTC, datetime, timedelta

import pytest
import standardwebhooks
import svix.webhooks
from cryptography.fernet import Fernet

from app.webhooks import secrets
from app.webhooks.secrets import InvalidSecret, SecretBox, SecretUnreadable

PASSPHRASE = "correct horse battery staple, thirty-two+ chars"


def whsec(size: int, pattern: bytes = b"k") -> str:
    """``whsec_`` + standard base64 of ``size`` bytes repeating ``pattern``."""
    return "whsec_" + base64.b64encode((pattern * size)[:size]).decode()


# -- generate and validate -----------------------------------------------------------------------


def test_generate_makes_whsec_and_base64_of_32_random_bytes():
    made = {secrets.generate() for _ in range(20)}
    assert len(made) == 20
    for secret in made:
        assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{43}=", secret)
        assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
        assert secrets.validate(secret) == secret


@pytest.mark.parametrize("size", [24, 25, 32, 48, 64])
def test_validate_accepts_24_to_64_bytes(size):
    secret = whsec(size, b"\xfb\xff")  # bytes that encode to + and /
    assert "+" in secret and "/" in secret
    assert secrets.validate(secret) == secret


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (base64.b64encode(b"k" * 32).decode(), "must start with 'whsec_'"),
        ("WHSEC_" + base64.b64encode(b"k" * 32).decode(), "must start with 'whsec_'"),
        ("sk_" + base64.b64encode(b"k" * 32).decode(), "must start with 'whsec_'"),
        ("whsec_" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(), "followed by standard base64"),
        ("whsec_" + base64.b64encode(b"k" * 32).decode().rstrip("="), "followed by standard base64"),
        ("whsec_" + base64.b64encode(b"k" * 32).decode() + "\n", "followed by standard base64"),
        ("whsec_not base64 at all!", "followed by standard base64"),
        ("whsec_", "not 0"),
        (whsec(23), "must encode 24 to 64 bytes, not 23"),
        (whsec(16), "must encode 24 to 64 bytes, not 16"),
        (whsec(65), "must encode 24 to 64 bytes, not 65"),
        (whsec(128), "must encode 24 to 64 bytes, not 128"),
    ],
)
def test_validate_rejects_with_a_message(secret, message):
    with pytest.raises(InvalidSecret, match=re.escape(message)):
        secrets.validate(secret)


# -- SecretBox -----------------------------------------------------------------------------------


def test_a_fernet_key_round_trips_and_is_used_as_it_is():
    key = Fernet.generate_key().decode()
    secret = secrets.generate()
    token = SecretBox([key]).encrypt(secret)
    assert secret.encode() not in token
    assert SecretBox([key]).decrypt(token) == secret
    assert Fernet(key.encode()).decrypt(token) == secret.encode()  # no stretching of a Fernet key


def test_a_passphrase_key_is_stretched_the_same_way_every_time():
    secret = secrets.generate()
    token = SecretBox([PASSPHRASE]).encrypt(secret)
    assert SecretBox([PASSPHRASE]).decrypt(token) == secret  # another process, the same key
    with pytest.raises(SecretUnreadable):
        SecretBox([PASSPHRASE + "!"]).decrypt(token)
    with pytest.raises(SecretUnreadable):
        SecretBox([Fernet.generate_key().decode()]).decrypt(token)


def test_each_encryption_gives_a_new_token():
    box = SecretBox([PASSPHRASE])
    first, second = box.encrypt("whsec_x"), box.encrypt("whsec_x")
    assert first != second
    assert box.decrypt(first) == box.decrypt(second) == "whsec_x"


@pytest.mark.parametrize("key", ["short", "x" * 31, "not-a-fernet-key"])
def test_a_short_passphrase_is_refused(key):
    with pytest.raises(ValueError, match="must be a Fernet key or at least 32 characters"):
        SecretBox([Fernet.generate_key().decode(), key])


def test_a_32_character_passphrase_is_accepted():
    assert SecretBox(["x" * 32]).decrypt(SecretBox(["x" * 32]).encrypt("whsec_y")) == "whsec_y"


def test_no_key_is_refused():
    with pytest.raises(ValueError, match="no key"):
        SecretBox([])


def test_a_token_that_is_not_a_token_is_unreadable():
    with pytest.raises(SecretUnreadable, match="removed too early"):
        SecretBox([PASSPHRASE]).decrypt(b"gAAAAAB-not-a-token")


def test_key_rotation():
    """README "Rotating the secret key": add the new key first, rotate the stored tokens, then
    drop the old key."""
    old, new = Fernet.generate_key().decode(), PASSPHRASE
    secret = secrets.generate()
    stored = SecretBox([old]).encrypt(secret)

    during = SecretBox([new, old])
    assert during.decrypt(stored) == secret  # old tokens still open
    assert SecretBox([new]).decrypt(during.encrypt(secret)) == secret  # new ones use the first key

    rotated = during.rotate(stored)
    assert rotated != stored
    assert SecretBox([new]).decrypt(rotated) == secret
    with pytest.raises(SecretUnreadable):
        SecretBox([old]).decrypt(rotated)


def test_removing_the_old_key_too_early_makes_secrets_unreadable():
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    stored = SecretBox([old]).encrypt(secrets.generate())
    with pytest.raises(SecretUnreadable, match="was a key removed too early"):
        SecretBox([new]).decrypt(stored)
    with pytest.raises(SecretUnreadable, match="cannot be decrypted"):
        SecretBox([new]).rotate(stored)


@pytest.mark.parametrize(
    ("value", "keys"),
    [
        (None, []),
        ("", []),
        ("a", ["a"]),
        (" new , old ,, ", ["new", "old"]),
        (["new", " old ", ""], ["new", "old"]),
    ],
)
def test_key_list(value, keys):
    assert secrets.key_list(value) == keys


# -- sign ----------------------------------------------------------------------------------------


def headers(message_id: str, timestamp: datetime, signature: str) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
    }


VERIFIERS = {
    "standardwebhooks": lambda secret: standardwebhooks.Webhook(secret),
    "svix": lambda secret: svix.webhooks.Webhook(secret),
}
REJECTED = (standardwebhooks.WebhookVerificationError, svix.webhooks.WebhookVerificationError)


def test_the_signature_is_v1_base64_hmac_sha256_of_id_timestamp_body():
    """Standard Webhooks, "Signature scheme", computed here without the library."""
    secret = secrets.generate()
    timestamp = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    body = '{"type":"job.succeeded","data":{"x":"é"}}'
    signature = secrets.sign([secret], "msg_1", timestamp, body)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"msg_1.{int(timestamp.timestamp())}.{body}".encode(), hashlib.sha256).digest()
    assert signature == "v1," + base64.b64encode(digest).decode()


@pytest.mark.parametrize("verifier", VERIFIERS.values(), ids=list(VERIFIERS))
def test_a_signature_verifies(verifier):
    secret = secrets.generate()
    now = datetime.now(UTC)
    body = '{"type":"job.succeeded","timestamp":"2025-01-01T00:00:00Z","data":{"id":"job_1"}}'
    signature = secrets.sign([secret], "msg_abc", now, body)
    assert verifier(secret).verify(body.encode(), headers("msg_abc", now, signature))["data"] == {"id": "job_1"}


def test_svix_verifies_with_its_own_header_names():
    secret = secrets.generate()
    now = datetime.now(UTC)
    signature = secrets.sign([secret], "msg_abc", now, "{}")
    svix_headers = {f"svix-{name.removeprefix('webhook-')}": value for name, value in headers("msg_abc", now, signature).items()}
    assert svix.webhooks.Webhook(secret).verify(b"{}", svix_headers) == {}


@pytest.mark.parametrize("verifier", VERIFIERS.values(), ids=list(VERIFIERS))
def test_two_secrets_give_two_signatures_and_either_verifies(verifier):
    new, old = secrets.generate(), secrets.generate()
    now = datetime.now(UTC)
    body = '{"n":1}'
    signature = secrets.sign([new, old], "msg_rot", now, body)
    parts = signature.split(" ")
    assert len(parts) == 2
    assert all(part.startswith("v1,") for part in parts)
    assert parts[0] == secrets.sign([new], "msg_rot", now, body)  # the newest first
    assert parts[1] == secrets.sign([old], "msg_rot", now, body)
    for secret in (new, old):
        assert verifier(secret).verify(body.encode(), headers("msg_rot", now, signature)) == {"n": 1}
    with pytest.raises(REJECTED):
        verifier(secrets.generate()).verify(body.encode(), headers("msg_rot", now, signature))


@pytest.mark.parametrize("verifier", VERIFIERS.values(), ids=list(VERIFIERS))
def test_a_tampered_body_id_or_timestamp_is_rejected(verifier):
    secret = secrets.generate()
    now = datetime.now(UTC)
    signature = secrets.sign([secret], "msg_t", now, '{"amount":1}')
    check = verifier(secret)
    assert check.verify(b'{"amount":1}', headers("msg_t", now, signature)) == {"amount": 1}
    with pytest.raises(REJECTED, match="No matching signature"):
        check.verify(b'{"amount":100}', headers("msg_t", now, signature))
    with pytest.raises(REJECTED, match="No matching signature"):
        check.verify(b'{"amount":1}', headers("msg_u", now, signature))
    with pytest.raises(REJECTED, match="No matching signature"):
        check.verify(b'{"amount":1}', headers("msg_t", now - timedelta(seconds=1), signature))


@pytest.mark.parametrize("verifier", VERIFIERS.values(), ids=list(VERIFIERS))
def test_an_old_timestamp_is_rejected(verifier):
    secret = secrets.generate()
    then = datetime.now(UTC) - timedelta(minutes=5, seconds=30)
    signature = secrets.sign([secret], "msg_old", then, "{}")
    with pytest.raises(REJECTED, match="too old"):
        verifier(secret).verify(b"{}", headers("msg_old", then, signature))
    recent = datetime.now(UTC) - timedelta(minutes=4)
    assert verifier(secret).verify(b"{}", headers("msg_old", recent, secrets.sign([secret], "msg_old", recent, "{}"))) == {}


# -- instance_key --------------------------------------------------------------------------------


def test_instance_key_is_made_once_readable_by_its_owner_only(tmp_path):
    instance = tmp_path / "instance" / "nested"
    key = secrets.instance_key(str(instance))
    path = instance / "webhook-secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == key
    Fernet(key.encode())  # a Fernet key
    assert secrets.instance_key(str(instance)) == key
    assert sorted(p.name for p in instance.iterdir()) == ["webhook-secret.key"]  # no draft left


def test_instance_key_keeps_an_existing_key(tmp_path):
    key = Fernet.generate_key().decode()
    (tmp_path / "webhook-secret.key").write_text(key + "\n")
    assert secrets.instance_key(str(tmp_path)) == key


def test_instance_key_is_0600_whatever_the_umask(tmp_path):
    previous = os.umask(0)
    try:
        secrets.instance_key(str(tmp_path))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "webhook-secret.key").stat().st_mode) == 0o600


def test_concurrent_first_calls_all_get_the_same_key(tmp_path, monkeypatch):
    """Every caller finds no file and makes a key (held at a barrier until all have), then one
    key wins and every caller returns it."""
    callers = 12
    barrier = threading.Barrier(callers, timeout=10)
    real_generate_key = Fernet.generate_key  # called as it is: cryptography's own business how

    class FernetAtTheBarrier:
        """The ``Fernet`` that instance_key calls: each real key is made once every caller is
        making one. Patched on app.webhooks.secrets, not on cryptography's class."""

        @staticmethod
        def generate_key() -> bytes:
            barrier.wait()
            return real_generate_key()

    monkeypatch.setattr(secrets, "Fernet", FernetAtTheBarrier)
    keys: list[str] = []
    errors: list[BaseException] = []

    def call():
        try:
            keys.append(secrets.instance_key(str(tmp_path)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert len(keys) == callers
    assert len(set(keys)) == 1
    Fernet(keys[0].encode())  # a real Fernet key
    assert (tmp_path / "webhook-secret.key").read_text() == keys[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webhook-secret.key"]
