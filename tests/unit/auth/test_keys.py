"""API keys: their shape, how they are stored, and the in-process cache of verified keys."""
from __future__ import annotations

import re
import types

import pytest

from app.auth import keys
from app.auth.keys import CachedLookup, hash_key
from app.models import Consumer


class Clock:
    """A monotonic clock that moves only when told (``advance``), or by ``step`` on every reading."""

    def __init__(self, step: float = 0.0):
        self.now = 1000.0
        self.step = step

    def __call__(self) -> float:
        reading = self.now
        self.now += self.step
        return reading

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(keys, "time", types.SimpleNamespace(monotonic=clock, time=clock))
    return clock


class Loader:
    """A ``load`` callable that counts its calls and returns the next of ``values``."""

    def __init__(self, *values: object):
        self.values = list(values)
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        return self.values.pop(0)


def test_a_cached_value_is_served_without_loading_again(clock):
    lookup = CachedLookup(ttl=5, maxsize=10)
    load = Loader("first", "second")

    assert lookup.get("key:a", load) == "first"
    clock.advance(4.9)
    assert lookup.get("key:a", load) == "first"
    assert load.calls == 1


def test_a_miss_is_cached_too(clock):
    lookup = CachedLookup(ttl=5, maxsize=10)
    load = Loader(None, "found")

    assert lookup.get("key:unknown", load) is None
    assert lookup.get("key:unknown", load) is None
    assert load.calls == 1


def test_an_entry_is_loaded_again_once_the_ttl_has_passed(clock):
    lookup = CachedLookup(ttl=5, maxsize=10)
    load = Loader(None, "found")
    lookup.get("key:a", load)

    clock.advance(5)

    assert lookup.get("key:a", load) == "found"
    assert load.calls == 2


def test_forget_drops_one_entry_or_all(clock):
    lookup = CachedLookup(ttl=5, maxsize=10)
    load = Loader("a1", "b1", "a2", "b2", "a3")
    lookup.get("a", load)
    lookup.get("b", load)

    lookup.forget("a")
    assert (lookup.get("a", load), lookup.get("b", load)) == ("a2", "b1")
    lookup.forget()
    assert (lookup.get("b", load), lookup.get("a", load)) == ("b2", "a3")


def test_nothing_is_cached_when_loading_fails(clock):
    lookup = CachedLookup(ttl=5, maxsize=10)

    def failing() -> object:
        raise keys.StoreUnavailable("database down")

    with pytest.raises(keys.StoreUnavailable, match="database down"):
        lookup.get("key:a", failing)
    assert lookup.get("key:a", Loader("found")) == "found"


def test_an_entry_expiring_between_check_and_read_is_loaded_again(monkeypatch):
    clock = Clock(step=0.5)  # every reading of the clock is half a second after the last
    monkeypatch.setattr(keys, "time", types.SimpleNamespace(monotonic=clock, time=clock))
    lookup = CachedLookup(ttl=1, maxsize=10)
    load = Loader("first", "second")
    lookup.get("key:a", load)  # stored at t, expires at t+1

    # The membership test reads t+0.5 (fresh); the read that follows reads t+1 (expired).
    assert lookup.get("key:a", load) in {"first", "second"}


def test_a_minted_key_has_the_prefix_and_190_bits_and_is_stored_only_as_a_hash():
    minted = keys.mint(Consumer(name="acme"), ["b", "a", "b"])

    assert re.fullmatch(r"fd_live_[A-Za-z0-9]{40}", minted.key)
    assert minted.row.prefix == minted.key[:16]
    assert minted.row.secret_hash == hash_key(minted.key)
    assert minted.key not in (minted.row.secret_hash, minted.row.prefix)
    assert minted.row.scopes == ["a", "b"]


def test_hash_key_is_the_sha256_hex_digest():
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_flood_of_unknown_keys_does_not_evict_a_known_one(clock):
    lookup = CachedLookup(ttl=5, maxsize=3)
    known = Loader("record")
    lookup.get("key:real", known)

    for index in range(10):
        assert lookup.get(f"key:made-up-{index}", Loader(None)) is None

    assert lookup.get("key:real", known) == "record"
    assert known.calls == 1


def test_a_forget_during_a_load_is_not_undone_by_it(clock):
    lookup = CachedLookup(ttl=5, maxsize=10)

    def load_while_revoked() -> str:
        lookup.forget("key:a")  # a revocation lands while the row is being read
        return "stale record"

    assert lookup.get("key:a", load_while_revoked) == "stale record"
    fresh = Loader("fresh record")
    assert lookup.get("key:a", fresh) == "fresh record"
    assert fresh.calls == 1
