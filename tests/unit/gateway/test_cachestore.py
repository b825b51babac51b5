"""Cache stores: the in-process LRU bounded by bytes and the Redis store, side by side."""
from __future__ import annotations

import fnmatch
import sys
import threading
import time

import pytest
import redis

from app.gateway import cachestore
from app.gateway.cache import glob_escape
from app.gateway.cachestore import Entry, MemoryStore, RedisStore


class FakeTime:
    """Stands in for the ``time`` module inside cachestore: ``time()`` and ``monotonic()`` move together."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(cachestore, "time", fake)
    return fake


@pytest.fixture
def redis_store(redis_url, key_prefix):
    client = redis.Redis.from_url(redis_url)
    yield RedisStore(client), key_prefix, client
    client.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def any_store(request):
    """Each store with a key prefix of its own: ``(store, prefix)``."""
    if request.param == "memory":
        return MemoryStore(1 << 20), "test"
    store, prefix, _ = request.getfixturevalue("redis_store")
    return store, prefix


def test_an_entry_survives_encoding_with_any_body():
    body = b"line one\nline two\n\x00\xff{not json}"
    entry = Entry(203, [("Content-Type", "text/plain"), ("Vary", "Accept"), ("X-Dup", "1"), ("X-Dup", "2")], body, 1_700_000_000.5, 42.0)

    assert Entry.decode(entry.encode()) == entry


# --- both stores ------------------------------------------------------------------------


def test_a_value_is_kept_under_its_key(any_store):
    store, prefix = any_store

    store.set(f"{prefix}:a", b"value a", 60)

    assert store.get(f"{prefix}:a") == b"value a"
    assert store.get(f"{prefix}:b") is None
    store.set(f"{prefix}:a", b"replaced", 60)
    assert store.get(f"{prefix}:a") == b"replaced"


def test_get_many_answers_in_the_order_asked_with_none_for_missing_keys(any_store):
    store, prefix = any_store
    store.set(f"{prefix}:x", b"X", 60)
    store.set(f"{prefix}:z", b"Z", 60)

    assert store.get_many([f"{prefix}:z", f"{prefix}:y", f"{prefix}:x"]) == [b"Z", None, b"X"]


def test_a_lock_is_held_until_unlocked(any_store):
    store, prefix = any_store

    assert store.lock(f"{prefix}:k", 5) is True
    assert store.lock(f"{prefix}:k", 5) is False
    assert store.lock(f"{prefix}:other", 5) is True
    store.unlock(f"{prefix}:k")
    assert store.lock(f"{prefix}:k", 5) is True


def test_a_lock_does_not_hide_or_replace_the_value_of_its_key(any_store):
    store, prefix = any_store
    store.set(f"{prefix}:k", b"value", 60)

    store.lock(f"{prefix}:k", 5)
    store.unlock(f"{prefix}:k")

    assert store.get(f"{prefix}:k") == b"value"


def test_delete_removes_the_keys_a_glob_matches_and_counts_them(any_store):
    store, prefix = any_store
    for key in ("cache:users:GET:/users/1?:anonymous|", "cache:users:GET:/users/1?:anonymous|vary", "cache:users:GET:/users/2?:con_a|", "cache:orders:GET:/orders?:anonymous|"):
        store.set(f"{prefix}:{key}", b"x", 60)

    assert store.delete(f"{prefix}:cache:users:GET:/users/1?:*") == 2
    assert store.get(f"{prefix}:cache:users:GET:/users/1?:anonymous|") is None
    assert store.get(f"{prefix}:cache:users:GET:/users/2?:con_a|") == b"x"
    assert store.delete(f"{prefix}:cache:users:*") == 1
    assert store.get(f"{prefix}:cache:orders:GET:/orders?:anonymous|") == b"x"
    assert store.delete(f"{prefix}:cache:nothing:*") == 0


def test_an_escaped_glob_matches_only_its_own_text(any_store):
    store, prefix = any_store
    odd = f"{prefix}:cache:/files/[id]/a*b?c"
    store.set(odd, b"odd", 60)
    for near in (f"{prefix}:cache:/files/i/aXXbYc", f"{prefix}:cache:/files/d/a*b?c"):
        store.set(near, b"near", 60)

    assert store.delete(glob_escape(odd)) == 1
    assert store.get(odd) is None
    assert store.get(f"{prefix}:cache:/files/i/aXXbYc") == store.get(f"{prefix}:cache:/files/d/a*b?c") == b"near"


@pytest.mark.parametrize(
    ("text", "lookalike"),
    [("/plain/path?a=1", "/plain/pathXa=1"), ("/a*b", "/aXXb"), ("/q?x", "/qZx"), ("/[x]", "/x"), ("/[!x]", "/y"), ("/a-z/[a-z]", "/a-z/q")],
)
def test_glob_escape_is_read_literally_by_fnmatch(text, lookalike):
    pattern = glob_escape(text)

    assert fnmatch.fnmatchcase(text, pattern)
    assert not fnmatch.fnmatchcase(lookalike, pattern)
    assert not fnmatch.fnmatchcase(text + "x", pattern)


# --- MemoryStore ------------------------------------------------------------------------


def test_memory_values_expire_after_their_ttl(clock):
    store = MemoryStore(1024)
    store.set("k", b"value", 10)

    clock.advance(9.9)
    assert store.get("k") == b"value"
    clock.advance(0.1)
    assert store.get("k") is None


def test_memory_evicts_the_least_recently_used_values_to_stay_within_max_bytes():
    store = MemoryStore(30)
    store.set("a", b"a" * 10, 60)
    store.set("b", b"b" * 10, 60)
    store.set("c", b"c" * 10, 60)
    store.get("a")  # now b is the least recently used

    store.set("d", b"d" * 10, 60)

    assert store.get("b") is None
    assert (store.get("a"), store.get("c"), store.get("d")) == (b"a" * 10, b"c" * 10, b"d" * 10)


def test_memory_evicts_as_many_values_as_a_large_one_needs():
    store = MemoryStore(30)
    for key in "abc":
        store.set(key, key.encode() * 10, 60)

    store.set("big", b"x" * 25, 60)

    assert [store.get(key) for key in "abc"] == [None, None, None]
    assert store.get("big") == b"x" * 25


def test_memory_replacing_a_value_counts_only_its_new_size():
    store = MemoryStore(30)
    store.set("a", b"a" * 20, 60)
    store.set("a", b"a" * 10, 60)

    store.set("b", b"b" * 20, 60)

    assert store.get("a") == b"a" * 10 and store.get("b") == b"b" * 20


def test_memory_a_value_larger_than_max_bytes_is_not_kept_and_evicts_nothing():
    store = MemoryStore(30)
    store.set("a", b"a" * 10, 60)

    store.set("huge", b"x" * 31, 60)

    assert store.get("huge") is None
    assert store.get("a") == b"a" * 10


def test_memory_deleted_and_expired_values_free_their_bytes(clock):
    store = MemoryStore(30)
    store.set("gone", b"g" * 15, 60)
    store.set("old", b"o" * 15, 5)
    store.delete("gone")
    clock.advance(5)
    store.get("old")  # found expired

    store.set("new", b"n" * 30, 60)

    assert store.get("new") == b"n" * 30


def test_memory_a_lock_lapses_after_its_ttl(clock):
    store = MemoryStore(1024)
    store.lock("k", 2)

    clock.advance(1.9)
    assert store.lock("k", 2) is False
    clock.advance(0.1)
    assert store.lock("k", 2) is True


def test_memory_delete_by_glob_is_case_sensitive():
    store = MemoryStore(1024)
    store.set("p:cache:Users:x", b"1", 60)

    assert store.delete("p:cache:users:*") == 0
    assert store.get("p:cache:Users:x") == b"1"


# --- RedisStore ---------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_values_expire_after_their_ttl(redis_store):
    store, prefix, client = redis_store

    store.set(f"{prefix}:k", b"value", 30)
    store.set(f"{prefix}:short", b"value", 0.05)

    assert 29_000 < client.pttl(f"{prefix}:k") <= 30_000
    time.sleep(0.1)
    assert store.get(f"{prefix}:short") is None
    assert store.get(f"{prefix}:k") == b"value"


@pytest.mark.redis
def test_redis_a_lock_lapses_after_its_ttl(redis_store):
    store, prefix, _ = redis_store

    assert store.lock(f"{prefix}:k", 0.05) is True
    assert store.lock(f"{prefix}:k", 0.05) is False
    time.sleep(0.1)
    assert store.lock(f"{prefix}:k", 0.05) is True


@pytest.mark.redis
def test_redis_stores_share_values_and_locks(redis_store, redis_url):
    store, prefix, _ = redis_store
    other = RedisStore(redis.Redis.from_url(redis_url))  # another gateway process
    try:
        store.set(f"{prefix}:k", b"value", 60)
        assert other.get(f"{prefix}:k") == b"value"
        assert store.lock(f"{prefix}:k", 5) is True
        assert other.lock(f"{prefix}:k", 5) is False
    finally:
        other.client.close()


@pytest.mark.redis
def test_redis_delete_counts_every_key_across_scan_batches(redis_store):
    store, prefix, client = redis_store
    with client.pipeline(transaction=False) as pipe:
        for number in range(1_234):
            pipe.set(f"{prefix}:cache:r:GET:/items/{number}?:anonymous|", b"x", px=60_000)
        pipe.set(f"{prefix}:cache:other:GET:/keep?:anonymous|", b"x", px=60_000)
        pipe.execute()

    assert store.delete(f"{prefix}:cache:r:*") == 1_234
    assert list(client.scan_iter(f"{prefix}:cache:r:*")) == []
    assert store.get(f"{prefix}:cache:other:GET:/keep?:anonymous|") == b"x"


@pytest.fixture
def near_stores(redis_url, key_prefix):
    """Two gateway processes' stores on one Redis, the first with a near cache of 0.3 s:
    ``(near, other, prefix)``."""
    near = RedisStore(redis.Redis.from_url(redis_url), MemoryStore(1 << 20), near_ttl=0.3)
    other = RedisStore(redis.Redis.from_url(redis_url))
    yield near, other, key_prefix
    near.client.close()
    other.client.close()


@pytest.mark.redis
def test_near_a_value_read_is_served_from_the_process_until_its_near_ttl_passes(near_stores):
    near, other, prefix = near_stores
    other.set(f"{prefix}:k", b"one", 60)
    assert near.get_many([f"{prefix}:k"]) == [b"one"]

    other.delete(f"{prefix}:k")  # another process purges it
    other.set(f"{prefix}:j", b"two", 60)

    assert near.get(f"{prefix}:k") == b"one"  # no round trip: what this process read last
    time.sleep(0.35)
    assert near.get(f"{prefix}:k") is None
    assert near.get_many([f"{prefix}:j", f"{prefix}:k"]) == [b"two", None]


@pytest.mark.redis
def test_near_a_value_not_found_is_not_kept_so_another_processs_write_is_seen_at_once(near_stores):
    near, other, prefix = near_stores
    assert near.get(f"{prefix}:k") is None

    other.set(f"{prefix}:k", b"stored elsewhere", 60)

    assert near.get(f"{prefix}:k") == b"stored elsewhere"


@pytest.mark.redis
def test_near_this_processs_own_write_and_purge_are_seen_here_at_once(near_stores):
    near, other, prefix = near_stores
    other.set(f"{prefix}:k", b"old", 60)
    assert near.get(f"{prefix}:k") == b"old"

    near.set(f"{prefix}:k", b"new", 60)
    assert (near.get(f"{prefix}:k"), other.get(f"{prefix}:k")) == (b"new", b"new")

    assert near.delete(f"{prefix}:*") == 1
    assert near.get(f"{prefix}:k") is None


@pytest.mark.redis
def test_near_a_read_of_the_shared_store_replaces_or_drops_the_near_copy(near_stores):
    near, other, prefix = near_stores
    other.set(f"{prefix}:k", b"old", 60)
    other.set(f"{prefix}:j", b"old", 60)
    assert near.get_many([f"{prefix}:k", f"{prefix}:j"]) == [b"old", b"old"]
    other.set(f"{prefix}:k", b"new", 60)
    other.delete(f"{prefix}:j")

    assert near.get_many([f"{prefix}:k", f"{prefix}:j"], shared=True) == [b"new", None]
    assert near.get_many([f"{prefix}:k", f"{prefix}:j"]) == [b"new", None]  # no old copy left


@pytest.mark.redis
def test_near_a_value_is_kept_no_longer_than_its_own_ttl(near_stores):
    near, _, prefix = near_stores

    near.set(f"{prefix}:k", b"short", 0.05)
    time.sleep(0.1)

    assert near.get(f"{prefix}:k") is None


def test_memory_stays_consistent_under_many_threads_reading_writing_and_deleting():
    # Reads take no lock: threads switched every few microseconds interleave them with the
    # writers' eviction and the purge's scan. None may raise, the bytes counted must be the
    # bytes kept, and every value read must be one that was written under its key.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    store = MemoryStore(4096)
    keys = [f"k{i}" for i in range(40)]
    failures: list[BaseException] = []
    wrong: list[tuple[str, bytes]] = []
    stop = time.monotonic() + 1.0

    def reader() -> None:
        while time.monotonic() < stop:
            for key in keys:
                value = store.get(key)
                if value is not None and not value.startswith(key.encode() + b"="):
                    wrong.append((key, value))

    def writer(seed: int) -> None:
        n = seed
        while time.monotonic() < stop:
            n += 1
            key = keys[n % len(keys)]
            store.set(key, f"{key}=".encode() + b"x" * (n % 300), ttl=0.001 if n % 7 == 0 else 60)

    def purger() -> None:
        while time.monotonic() < stop:
            store.delete("k1*")
            time.sleep(0.001)

    def guarded(work, *args):
        def run():
            try:
                work(*args)
            except BaseException as exc:  # noqa: BLE001 (collected for the assertion below)
                failures.append(exc)
        return threading.Thread(target=run)

    threads = [guarded(reader) for _ in range(4)] + [guarded(writer, s) for s in range(3)] + [guarded(purger)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(previous)

    assert failures == [] and wrong == []
    assert store.size <= store.max_bytes
    store.delete("*")
    assert store.size == 0  # what was counted was exactly what was kept
    assert store.set("whole", b"x" * store.max_bytes, ttl=60) and store.get("whole") == b"x" * store.max_bytes
