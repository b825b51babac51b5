"""Operators' changes to a running gateway (a reload of the route file, a breaker held open or
closed) made in one process and applied in every process: gunicorn's workers and other dynos.

The change is written as an entry of a small shared record, in Redis when ``REDIS_URL`` is set
(a hash, ``{KEY_PREFIX}:gateway:control``), else in the database (the ``gateway_control``
table: SQLite under ``instance/`` on the embedded default, which every process of the machine
shares). Each process reads the whole record at most every ``CONTROL_SYNC_INTERVAL`` seconds,
on the request path, from one request while the others go on (one Redis HGETALL or one
SELECT), and applies the entries it has not applied yet. Between reads a request pays one
``time.monotonic()`` and a comparison.

Each entry carries a random ``id``: a process applies an entry whose id it has not applied.
The ``config`` entry names the digest (SHA-256) of the route file that was validated: a
process reloads when its own file has that digest, so every process serves the very file the
operator's reload checked, or keeps its config and says so in its log (a machine whose copy of
the file is not updated yet: it tries again at each read). A process that starts reads its
file as it is then.
"""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import redis
from flask import Flask
from sqlalchemy import Column, String, Table, Text, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from app.extensions import db
from app.gateway import routefile
from app.models.base import UTCDateTime, utcnow

if TYPE_CHECKING:
    from app.gateway import Gateway

log = logging.getLogger("frontdoor.control")

CONFIG = "config"  # the record's entry for the route file
OPEN, CLOSED = "open", "closed"

control_table = Table(
    "gateway_control",
    db.metadata,
    Column("name", String(255), primary_key=True),  # "config", or "breaker:" and a digest of its name
    Column("value", Text, nullable=False),  # the entry, as JSON
    Column("updated_at", UTCDateTime(), nullable=False),
)


class StoreUnavailable(Exception):
    """The shared record cannot be read or written (Redis or the database does not answer)."""


class ControlStore(Protocol):
    """Where the shared record lives: entries by name, each a JSON object with an ``id``."""

    def read(self) -> dict[str, dict]:
        """Every entry, by name; raises StoreUnavailable."""
        ...

    def write(self, name: str, entry: dict) -> None:
        """Replace (or add) the entry ``name``; raises StoreUnavailable."""
        ...


class RedisControl:
    """The record as one Redis hash: every gateway process on that Redis shares it."""

    def __init__(self, client: redis.Redis, key_prefix: str):
        self.client = client
        self.key = f"{key_prefix}:gateway:control"

    def read(self) -> dict[str, dict]:
        try:
            fields = self.client.hgetall(self.key)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"Redis: {exc}") from exc
        return {name.decode(): json.loads(value) for name, value in fields.items()}

    def write(self, name: str, entry: dict) -> None:
        try:
            self.client.hset(self.key, name, json.dumps(entry))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"Redis: {exc}") from exc


class SqlControl:
    """The record as rows of ``gateway_control``: every process on that database shares it."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def read(self) -> dict[str, dict]:
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(select(control_table.c.name, control_table.c.value)).all()
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"database: {type(exc).__name__}") from exc
        return {name: json.loads(value) for name, value in rows}

    def write(self, name: str, entry: dict) -> None:
        values = {"value": json.dumps(entry), "updated_at": utcnow()}
        try:
            for _ in range(2):  # a concurrent first write of the same name: update it instead
                try:
                    with self.engine.begin() as connection:
                        changed = connection.execute(update(control_table).where(control_table.c.name == name).values(**values)).rowcount
                        if not changed:
                            connection.execute(control_table.insert().values(name=name, **values))
                    return
                except IntegrityError:
                    continue
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"database: {type(exc).__name__}") from exc
        raise StoreUnavailable("database: the entry could not be written")


def breaker_entry(breaker: str) -> str:
    """The record's entry name for the breaker ``upstream:target`` (short enough for a key column)."""
    return "breaker:" + hashlib.sha256(breaker.encode()).hexdigest()[:32]


def file_digest(path: str | Path) -> str | None:
    """SHA-256 of the file's bytes (hex), or None when it cannot be read."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def read_route_file(path: str | Path, api_prefix: str) -> tuple[routefile.RouteFile, str]:
    """Load and validate the route file; return it with the digest of the bytes validated.

    Raises RouteFileError (naming the file, key and line) when it is invalid, or when it kept
    changing while it was read (an editor writing it).
    """
    for _ in range(3):
        before = file_digest(path)
        loaded = routefile.load(path, api_prefix=api_prefix)  # raises for an unreadable file too
        if before is not None and before == file_digest(path):
            return loaded, before
    raise routefile.RouteFileError(f"{path}: the file changed while it was read; try again")


class Control:
    """One process's side of the shared record: the running Gateway, swapped whole.

    ``app.extensions["gateway"]`` always holds the running Gateway; a request takes it once
    (``current()``) and finishes on it, whatever is swapped in meanwhile.
    """

    def __init__(self, app: Flask, store: ControlStore, interval: float, build: Callable[[routefile.RouteFile, str, Gateway | None], Gateway]):
        self.app = app
        self.store = store
        self.interval = interval
        self.build = build  # (route file, digest, running gateway) -> the new Gateway
        self.next_check = 0.0  # time.monotonic() from which the next request reads the record
        self.applied: dict[str, str] = {}  # entry name -> the id applied in this process
        self.synced = False  # the record has been read once since the process started
        self._check_lock = threading.Lock()
        self._change_lock = threading.Lock()  # one reload or breaker change at a time here
        self._store_down = False
        self._reported: str | None = None  # the config id whose failure was logged already

    @property
    def gateway(self) -> Gateway:
        return self.app.extensions["gateway"]

    def current(self) -> Gateway:
        """The running Gateway, after applying what other processes changed when the record
        is due to be read (at most every ``interval`` seconds)."""
        if time.monotonic() >= self.next_check:
            self.check()
        return self.app.extensions["gateway"]

    def check(self) -> None:
        """Read the record and apply what is new. One thread reads; the others do not wait."""
        if not self._check_lock.acquire(blocking=False):
            return
        try:
            self.next_check = time.monotonic() + self.interval
            try:
                entries = self.store.read()
            except StoreUnavailable as exc:
                if not self._store_down:
                    log.warning("gateway control record unreachable; changes made elsewhere wait", extra={"error": str(exc)})
                self._store_down = True
                return
            self._store_down = False
            with self._change_lock:
                self._apply(entries)
            self.synced = True
        finally:
            self._check_lock.release()

    def _apply(self, entries: dict[str, dict]) -> None:
        config = entries.get(CONFIG)
        if config is not None and config.get("id") != self.applied.get(CONFIG):
            self._apply_config(config)
        for name, entry in entries.items():
            if name.startswith("breaker:") and entry.get("id") != self.applied.get(name):
                self._apply_breaker(entry, initial=not self.synced)
                self.applied[name] = entry["id"]

    def _apply_config(self, entry: dict) -> None:
        gateway = self.gateway
        if entry["digest"] == gateway.digest:
            self.applied[CONFIG] = entry["id"]
            return
        path = self.app.config["CONFIG"]
        try:
            route_file, digest = read_route_file(path, self.app.config["API_PREFIX"])
        except routefile.RouteFileError as exc:
            self._report(entry, "route file reloaded elsewhere is not valid here; keeping the running config", error=str(exc))
            return
        if digest != entry["digest"]:
            if not self.synced:  # started on a file other than the one reloaded (a deploy): serve it
                self.applied[CONFIG] = entry["id"]
                return
            self._report(entry, "route file here differs from the one reloaded elsewhere; keeping the running config", digest=digest)
            return
        try:
            built = self.build(route_file, digest, gateway)
        except Exception:  # a request that happened to look must not fail for it: keep the running config
            log.exception("route file reloaded elsewhere could not be built here; keeping the running config")
            return
        self._swap(built)
        self.applied[CONFIG] = entry["id"]
        log.warning("route file reloaded", extra={"digest": digest, "routes": len(route_file.routes)})

    def _report(self, entry: dict, message: str, **fields: object) -> None:
        if self._reported != entry["id"]:
            self._reported = entry["id"]
            log.error(message, extra={"wanted_digest": entry["digest"], **fields})

    def _apply_breaker(self, entry: dict, initial: bool) -> None:
        name, state = entry["breaker"], entry["state"]
        held = self.gateway.settings.held_open
        if state == OPEN:
            held.add(name)
        else:
            held.discard(name)
        found = self._find_breaker(name)
        # With Redis the state itself is shared and the process that took the request moved it;
        # without, each process moves its own breaker (a close on start-up would change nothing).
        if found is not None and not found[0].shared and not (initial and state == CLOSED):
            found[0].set_state(found[1], state)

    def _find_breaker(self, name: str):
        for upstream in self.gateway.upstreams.values():
            for target in upstream.config.targets:
                if upstream.breakers.name(target) == name:
                    return upstream.breakers, target
        return None

    def _swap(self, gateway: Gateway) -> None:
        self.app.extensions["gateway"] = gateway  # one assignment: a request sees the old or the new

    def reload(self) -> tuple[Gateway, bool]:
        """Validate the route file, build it, publish it to every process and swap it in here.

        Returns the running Gateway and whether it changed (False: the file is the one running).
        Raises RouteFileError (nothing changes anywhere) or StoreUnavailable (nothing changes
        either: a config other processes could not learn of is not started here).
        """
        with self._change_lock:
            route_file, digest = read_route_file(self.app.config["CONFIG"], self.app.config["API_PREFIX"])
            running = self.gateway
            changed = digest != running.digest
            gateway = self.build(route_file, digest, running) if changed else running
            entry = {"id": secrets.token_hex(8), "digest": digest, "at": time.time()}
            self.store.write(CONFIG, entry)
            self._swap(gateway)
            self.applied[CONFIG] = entry["id"]
        if changed:
            log.warning("route file reloaded", extra={"digest": digest, "routes": len(route_file.routes)})
        return gateway, changed

    def set_breaker(self, upstream: str, target: str, state: str) -> None:
        """Hold ``target``'s breaker open (until closed again) or close it, in every process.

        Raises StoreUnavailable: then nothing changes.
        """
        with self._change_lock:
            breakers = self.gateway.upstreams[upstream].breakers
            name = breakers.name(target)
            entry = {"id": secrets.token_hex(8), "breaker": name, "state": state, "at": time.time()}
            self.store.write(breaker_entry(name), entry)
            held = self.gateway.settings.held_open
            if state == OPEN:
                held.add(name)
            else:
                held.discard(name)
            try:
                breakers.set_state(target, state)
            except redis.RedisError as exc:  # the hold applies anyway; the shared state catches up
                log.warning("breaker state store unreachable", extra={"breaker": name, "error": type(exc).__name__})
            self.applied[breaker_entry(name)] = entry["id"]
        log.warning("breaker set by an operator", extra={"breaker": name, "to_state": state})


def store_for(app: Flask, client: redis.Redis | None) -> ControlStore:
    """Redis when configured, else the database."""
    if client is not None:
        return RedisControl(client, app.config["KEY_PREFIX"])
    with app.app_context():  # Flask-SQLAlchemy hands out an app's engine in its context
        return SqlControl(db.engine)
