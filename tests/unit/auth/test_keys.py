"""API keys: their shape, how they are stored, and the in-process cache of verified keys."""
from __future__ import annotations

import re
import types

import pytest

from app.auth import keys
from app.auth.keys import CachedLookup, hash_key
from app.errors import DatabaseUnavailable
from app.models import Consumer
from tests.unit.auth.support import Clock


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
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        lookup.get("key:a", failing)
    assert lookup.get("key:a", Loader("found")) == "found"


def down() -> object:
    raise DatabaseUnavailable("The database cannot be reached right now", headers={"Retry-After": "5"})


def test_while_the_database_is_down_a_value_verified_within_the_stale_window_is_served(clock):
    lookup = CachedLookup(ttl=5, maxsize=10, stale=60)
    lookup.get("key:a", Loader("record"))

    clock.advance(59.9)

    assert lookup.get("key:a", down) == "record"


def test_once_the_stale_window_has_passed_a_down_database_is_a_503(clock):
    lookup = CachedLookup(ttl=5, maxsize=10, stale=60)
    lookup.get("key:a", Loader("record"))

    clock.advance(60)

    with pytest.raises(DatabaseUnavailable) as raised:
        lookup.get("key:a", down)
    assert raised.value.headers == {"Retry-After": "5"}


def test_a_stale_window_of_zero_serves_nothing_past_the_ttl(clock):
    lookup = CachedLookup(ttl=5, maxsize=10, stale=0)
    lookup.get("key:a", Loader("record"))

    clock.advance(5)

    with pytest.raises(DatabaseUnavailable):
        lookup.get("key:a", down)


def test_a_miss_is_never_served_stale(clock):
    # An unknown key while the database is down: 503, not a 401 that may be wrong by now.
    lookup = CachedLookup(ttl=5, maxsize=10, stale=60)
    lookup.get("key:unknown", Loader(None))

    clock.advance(5)

    with pytest.raises(DatabaseUnavailable):
        lookup.get("key:unknown", down)


def test_the_stale_window_counts_from_the_last_read_that_succeeded(clock):
    lookup = CachedLookup(ttl=5, maxsize=10, stale=60, holdoff=0)
    load = Loader("first", "second")
    lookup.get("key:a", load)
    clock.advance(50)
    assert lookup.get("key:a", load) == "second"  # read again: verified now

    clock.advance(50)  # 100 s after the first read, 50 s after the second

    assert lookup.get("key:a", down) == "second"


def test_after_a_failure_the_database_is_not_asked_again_for_the_holdoff(clock):
    lookup = CachedLookup(ttl=5, maxsize=10, stale=60, holdoff=1)
    lookup.get("key:a", Loader("record"))
    clock.advance(5)
    assert lookup.get("key:a", down) == "record"
    unasked = Loader("never")

    clock.advance(0.9)
    stale = lookup.get("key:a", unasked)
    with pytest.raises(DatabaseUnavailable):
        lookup.get("key:b", unasked)  # nothing kept for it: 503 at once
    clock.advance(0.1)
    asked = Loader("fresh")

    assert stale == "record" and unasked.calls == 0
    assert lookup.get("key:a", asked) == "fresh"
    assert asked.calls == 1


def test_a_revocation_while_the_database_answers_bites_within_the_ttl_despite_the_stale_window(clock):
    lookup = CachedLookup(ttl=5, maxsize=10, stale=60)
    load = Loader("active", "revoked")
    lookup.get("key:a", load)

    clock.advance(5)

    assert lookup.get("key:a", load) == "revoked"


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
