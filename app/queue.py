"""The queue seam: domain code hands work to the workers here, by task name, after its commit.

Nothing under ``app/`` imports ``tasks``: a message names its task (the constants below, which
``tasks/`` registers its functions under) and carries ids only. Every row that names a unit of
work is also the outbox: a job or a webhook message whose task message cannot be sent is found
again by beat's pass (``send_each`` marks the rows with the caller's UPDATE where the pass needs
it), and a due delivery needs no message of its own (beat wakes a worker, which claims it).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from flask import current_app
from sqlalchemy.sql import Executable

from app.extensions import db

log = logging.getLogger("frontdoor.tasks")

RUN_JOB = "frontdoor.jobs.run"
SWEEP_JOBS = "frontdoor.jobs.sweep"
FAN_OUT = "frontdoor.webhooks.fan_out"
DELIVER = "frontdoor.webhooks.deliver"
PUBLISH_JOB_EVENTS = "frontdoor.webhooks.publish_job_events"
DISPATCH = "frontdoor.webhooks.dispatch"
SWEEP_WEBHOOKS = "frontdoor.webhooks.sweep"

# A broker that blips gets two more tries, 0.1 then 0.3 s later, before a send counts as failed.
SEND_RETRY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2}


def send(task: str, args: Sequence[str] = (), retry_policy: dict | None = None) -> None:
    """Publish one message for the task named ``task`` with positional ``args`` on the current
    app's Celery broker, retrying a failed publish per ``retry_policy`` (default SEND_RETRY).
    Raises whatever the broker raises once the retries are spent."""
    celery = current_app.extensions["celery"]
    args = tuple(args)
    # argsrepr (shown by monitoring tools) as Celery would make it; its saferepr, built for
    # arguments of any size, costs more than the ids these are.
    celery.send_task(task, args=args, retry_policy=SEND_RETRY if retry_policy is None else retry_policy, argsrepr=repr(args), kwargsrepr="{}")


def send_each(task: str, ids: list[str], what: str, unsent: Callable[[list[str]], Executable] | None = None) -> list[str]:
    """Send one ``task`` message per id (its only argument); return the ids whose message could
    not be sent, each logged as ``{what} enqueue failed``.

    Rows name their own work, so nothing is lost: ``unsent(failed_ids)`` is the UPDATE that
    marks those rows for beat to send again; it is executed and committed here.
    """
    failed = []
    for ident in ids:
        try:
            send(task, (ident,))
        except Exception:
            log.warning("%s enqueue failed; beat will send it again", what, extra={"id": ident}, exc_info=True)
            failed.append(ident)
    if failed and unsent is not None:
        db.session.execute(unsent(failed))
        db.session.commit()
    return failed
