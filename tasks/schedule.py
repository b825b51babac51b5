"""The beat schedule, as data: task name to interval (seconds) and options."""
from __future__ import annotations


def beat_schedule(config: dict) -> dict[str, dict]:
    """Every periodic task, keyed by entry name; intervals (seconds) come from ``config``.

    An entry expires after one interval: a beat that ran while no worker listened does not
    leave a backlog of identical sweeps behind.
    """
    entries = {
        "sweep-jobs": ("frontdoor.jobs.sweep", float(config["JOB_SWEEP_INTERVAL"])),
        "dispatch-webhooks": ("frontdoor.webhooks.dispatch", float(config["WEBHOOK_DISPATCH_INTERVAL"])),
        "sweep-webhooks": ("frontdoor.webhooks.sweep", float(config["WEBHOOK_SWEEP_INTERVAL"])),
    }
    return {name: {"task": task, "schedule": every, "options": {"expires": every}} for name, (task, every) in entries.items()}
