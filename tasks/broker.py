"""The Redis broker transport: kombu's, with an acknowledgement that cannot stall the worker.

kombu 5.7.0's Redis ``QoS.ack`` (and ``reject``) first removes the message from Redis's unacked
set, then from the consumer's prefetch window. When Redis is unreachable the first step raises
(Celery logs ``Couldn't ack`` and goes on), so the message never leaves the window. A worker
whose every prefetched task finished while Redis was restarting then has a full window of
finished tasks: it sends no BRPOP, so it never sees the connection is gone, and it consumes
nothing again until it is restarted (idle in epoll, its sockets in CLOSE_WAIT).

Here the window slot is freed whatever Redis answers; the error still reaches Celery's log.
The next BRPOP then meets the lost connection and the worker reconnects as usual. A message
whose acknowledgement was lost stays in Redis's unacked set and comes back after the
visibility timeout; its job or delivery is done by then and it does nothing.
"""
from __future__ import annotations

from kombu.transport import redis


class QoS(redis.QoS):
    """Redis QoS whose ``ack`` and ``reject`` always free the message's prefetch slot."""

    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)
        except BaseException:
            self._quick_ack(delivery_tag)
            raise

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except BaseException:
            self._quick_ack(delivery_tag)
            raise


class Channel(redis.Channel):
    QoS = QoS


class Transport(redis.Transport):
    """``redis://`` and ``rediss://`` brokers (Celery's ``broker_transport``)."""

    Channel = Channel
