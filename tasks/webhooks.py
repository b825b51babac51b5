"""Webhook tasks: ``fan_out`` makes a message's deliveries, ``deliver`` makes one attempt, and
beat's ``dispatch`` (due retries, lost work) and ``sweep`` (retention) keep them moving."""
from __future__ import annotations

from celery import shared_task

from app import queue
from app.webhooks import delivery, messages


# Each task is safe to run twice: fan-out claims its message with a conditional write, and an
# attempt claims its delivery with one (its attempt number fences every later write).
@shared_task(name=queue.FAN_OUT, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def fan_out_task(message_id: str) -> int:
    """Create the deliveries of message ``message_id`` and enqueue them; return how many."""
    created = messages.fan_out(message_id)
    delivery.enqueue(created)
    return len(created)


@shared_task(name=queue.PUBLISH_JOB_EVENTS, acks_late=True, ignore_result=True)
def publish_job_events_task() -> int:
    """Publish the jobs' outbox as messages and send their fan-outs; return how many."""
    return messages.publish_job_events()


@shared_task(name=queue.DELIVER, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver_task(delivery_id: str) -> str | None:
    """Make one attempt of delivery ``delivery_id`` if it is due; return the attempt's outcome."""
    return delivery.deliver(delivery_id)


@shared_task(name=queue.DISPATCH, acks_late=True, ignore_result=True)
def dispatch_task() -> dict[str, int]:
    """Publish job events, redo lost fan-outs and attempts, enqueue due deliveries."""
    return delivery.dispatch()


@shared_task(name=queue.SWEEP_WEBHOOKS, acks_late=True, ignore_result=True)
def sweep_task() -> dict[str, int]:
    """Delete deliveries, attempts and messages past WEBHOOK_RETENTION."""
    return delivery.sweep()
