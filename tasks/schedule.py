"""The beat schedule, as data: task name to interval (seconds) and options."""
from __future__ import annotations


def beat_schedule(config: dict) -> dict[str, dict]:
    """Every periodic task, keyed by entry name; intervals (seconds) come from ``config``.

    An entry expires after one interval: a beat that ran while no worker listened does not
    leave a backlog of identical sweeps behind.
    """
    sweep = float(config["JOB_SWEEP_INTERVAL"])
    return {
        "sweep-jobs": {"task": "frontdoor.jobs.sweep", "schedule": sweep, "options": {"expires": sweep}},
    }
