"""Webhook tasks: ``fan_out`` makes a message's deliveries and sends them, ``deliver`` sends
batches of due deliveries, beat's ``dispatch`` (lost work, due retries) and ``sweep`` (retention)
keep them moving."""
from __future__ import annotations

from celery import shared_task

from app import queue
from app.webhooks import attempts, dispatch, messages
from app.webhooks.settings import settings


# Each task is safe to run twice: fan-out claims its message with a conditional write, and a
# batch claims its deliveries with one (each attempt number fences every later write).
@shared_task(name=queue.FAN_OUT, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def fan_out_task(message_id: str) -> int:
    """Create the deliveries of message ``message_id`` (and of other messages waiting for their
    fan-out, up to a batch) and send them, then what else is due; return how many were made."""
    messages.taking_fan_outs()
    created = messages.fan_out(message_id, more=settings().batch_size - 1)
    if created:
        attempts.deliver(created)
    return len(created)


@shared_task(name=queue.PUBLISH_JOB_EVENTS, acks_late=True, ignore_result=True)
def publish_job_events_task() -> int:
    """Publish the jobs' outbox as messages and send their fan-outs; return how many."""
    return messages.publish_job_events()


@shared_task(name=queue.DELIVER, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver_task(delivery_ids: list[str] | None = None) -> dict[str, int]:
    """Send batches of due deliveries (``delivery_ids`` first) while any are due; return counts by new status."""
    return attempts.deliver(delivery_ids)


@shared_task(name=queue.DISPATCH, acks_late=True, ignore_result=True)
def dispatch_task() -> dict[str, int]:
    """Publish job events, redo lost fan-outs and attempts, wake workers for due deliveries."""
    return dispatch.dispatch()


@shared_task(name=queue.SWEEP_WEBHOOKS, acks_late=True, ignore_result=True)
def sweep_task() -> dict[str, int]:
    """Delete deliveries, attempts and messages past WEBHOOK_RETENTION."""
    return dispatch.sweep()
