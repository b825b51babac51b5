"""The beat schedule, as data: task name to interval (seconds) and options."""
from __future__ import annotations


def beat_schedule(config: dict) -> dict[str, dict]:
    """Every periodic task, keyed by entry name; intervals (seconds) come from ``config``.

    An entry expires after one interval: a beat that ran while no worker listened does not
    leave a backlog of identical sweeps behind.
    """
    # Imported here: `celery -A tasks` imports this package before the app (see tasks/__init__.py).
    from app import queue

    entries = {
        "sweep-jobs": (queue.SWEEP_JOBS, float(config["JOB_SWEEP_INTERVAL"])),
        "dispatch-webhooks": (queue.DISPATCH, float(config["WEBHOOK_DISPATCH_INTERVAL"])),
        "sweep-webhooks": (queue.SWEEP_WEBHOOKS, float(config["WEBHOOK_SWEEP_INTERVAL"])),
    }
    return {name: {"task": task, "schedule": every, "options": {"expires": every}} for name, (task, every) in entries.items()}
