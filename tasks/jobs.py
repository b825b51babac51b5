"""Job tasks: ``run_job`` makes a job's upstream calls; ``sweep_jobs`` (beat) re-enqueues stuck jobs and expires old ones."""
from __future__ import annotations

from celery import shared_task

from app import queue
from app.jobs import worker


# acks_late + reject_on_worker_lost: a message is acknowledged only once the task returns, so a
# worker that dies mid-job leaves it to be delivered again; the claim in the jobs table makes
# that second run a no-op for a job that finished, or a takeover for one whose worker is gone.
@shared_task(name=queue.RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str | None:
    """Run the job ``job_id`` (an id, never an object); return its final status or None."""
    return worker.run(job_id)


@shared_task(name=queue.SWEEP_JOBS, acks_late=True, ignore_result=True)
def sweep_jobs() -> dict[str, int]:
    """Re-enqueue jobs whose message or worker was lost, fail those past their limits, expire results."""
    return worker.sweep()
