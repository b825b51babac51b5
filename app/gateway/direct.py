"""Redis commands on the hot path, sent on a connection of the calling thread's own."""
from __future__ import annotations

import threading

from redis.exceptions import ConnectionError as RedisConnectionError


class ThreadConnections:
    """Runs a command on a ``redis.connection.Connection`` the calling thread keeps.

    redis-py's client goes through its retry wrapper, the pool's lock and a liveness poll per
    command: measured in one process, 85 us of CPU for a call that costs 40 us sent and read on
    a connection directly (bench/README.md). Each thread's connection is made from the client
    pool's settings (host, TLS, timeouts) on first use. After an error it is closed, and the
    next command connects again; a connection Redis closed while it sat idle (a restart, an
    idle timeout) is tried once more on a new one, as redis-py's own retry would. Answers are
    Redis's replies as parsed, without the client's per-command conversions (a SET's ``b"OK"``
    stays bytes), so this suits reads and scripts.
    """

    def __init__(self, client):
        pool = client.connection_pool
        self.connect = lambda: pool.connection_class(**pool.connection_kwargs)
        self.local = threading.local()

    def execute(self, *command):
        """The reply to ``command``. Raises redis.RedisError (the connection is then closed)."""
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = self.connect()
        try:
            return self._send(connection, command)
        except RedisConnectionError:
            connection.disconnect()
            try:
                return self._send(connection, command)
            except BaseException:
                connection.disconnect()
                raise
        except BaseException:
            connection.disconnect()  # a reply may be half read: never reuse the connection
            raise

    @staticmethod
    def _send(connection, command: tuple):
        connection.send_command(*command)
        return connection.read_response()
