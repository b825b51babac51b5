"""The beat schedule: the job sweep runs every JOB_SWEEP_INTERVAL seconds as a registered task."""
from __future__ import annotations

from tasks.schedule import beat_schedule
from tests.unit.jobs.support import ago, set_job


def test_the_sweep_runs_every_job_sweep_interval(app):
    schedule = beat_schedule({**app.config, "JOB_SWEEP_INTERVAL": 7.5})

    entry = schedule["sweep-jobs"]
    assert entry["task"] == "frontdoor.jobs.sweep"
    assert entry["schedule"] == 7.5
    assert entry["options"]["expires"] == 7.5


def test_every_scheduled_task_is_registered_with_the_apps_celery(jobs_app):
    app = jobs_app(JOB_SWEEP_INTERVAL=3)
    celery = app.extensions["celery"]

    assert celery.conf.beat_schedule["sweep-jobs"]["schedule"] == 3.0
    for entry in celery.conf.beat_schedule.values():
        assert entry["task"] in celery.tasks
    assert "frontdoor.jobs.run" in celery.tasks


def test_the_job_tasks_run_the_worker_in_the_apps_context(app, client, upstream):
    celery = app.extensions["celery"]
    job_id = client.post("/async/anything").json["id"]

    assert celery.tasks["frontdoor.jobs.run"].apply(args=(job_id,)).get() == "succeeded"
    assert celery.tasks["frontdoor.jobs.run"].apply(args=(job_id,)).get() is None
    set_job(app, job_id, expires_at=ago(1))
    counts = celery.tasks["frontdoor.jobs.sweep"].apply().get()

    assert counts == {"requeued": 0, "failed": 0, "expired": 1, "deleted": 0}
    assert upstream.hits("/anything") == 1
    assert client.get(f"/_gateway/jobs/{job_id}").status_code == 410


def test_jobs_run_on_their_own_queue_with_the_job_time_limits_and_the_sweep_does_not_wait_behind_them(jobs_app):
    celery = jobs_app(JOB_SOFT_TIME_LIMIT=42, JOB_TIME_LIMIT=50).extensions["celery"]
    run_job = celery.tasks["frontdoor.jobs.run"]

    assert celery.amqp.router.route({}, "frontdoor.jobs.run", (), {})["queue"].name == "jobs"
    assert celery.amqp.router.route({}, "frontdoor.jobs.sweep", (), {})["queue"].name == "celery"
    assert (run_job.soft_time_limit, run_job.time_limit) == (42.0, 50.0)
    assert run_job.acks_late and run_job.reject_on_worker_lost  # a lost worker's job is delivered again
