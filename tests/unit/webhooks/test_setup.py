"""How webhooks are wired: the secret key by database, ``flask webhooks rotate-key``, queues and beat."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select
from sqlalchemy.orm import undefer

from app.extensions import db
from app.models import WebhookEndpoint
from app.webhooks import endpoints
from app.webhooks.secrets import SecretBox
from tasks.schedule import beat_schedule

OLD_KEY = "o" * 40
NEW_KEY = Fernet.generate_key().decode()


def _endpoint(app, consumer_id: str) -> tuple[str, str]:
    with app.app_context():
        endpoint, secret = endpoints.create(consumer_id, "https://93.184.216.34/hook", "", [], None, False)
        return endpoint.id, secret


def _stored(app, endpoint_id: str) -> bytes:
    with app.app_context():
        return db.session.execute(
            select(WebhookEndpoint.secret_encrypted).where(WebhookEndpoint.id == endpoint_id)
        ).scalar_one()


def test_on_the_embedded_default_a_key_is_made_once_under_instance_and_kept(make_app, identity):
    app = make_app(WEBHOOK_SECRET_KEYS=None)
    path = Path(app.instance_path) / "webhook-secret.key"
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    consumer = identity.consumer()
    endpoint_id, secret = _endpoint(app, consumer)

    again = make_app(WEBHOOK_SECRET_KEYS=None)  # another process on the same machine and database

    with again.app_context():
        endpoint = db.session.get(WebhookEndpoint, endpoint_id, options=[undefer(WebhookEndpoint.secret_encrypted)])
        assert endpoints.signing_secrets(endpoint) == [secret]


def test_without_a_key_on_a_shared_database_secrets_cannot_be_made_and_the_api_says_which_setting(make_app, identity):
    app = make_app(WEBHOOK_SECRET_KEYS=None)
    app.extensions["webhook_box"] = None  # what init_app leaves on a non-SQLite database with no key
    headers = {"X-API-Key": identity.key()}

    response = app.test_client().post("/_gateway/webhooks/endpoints", json={"url": "https://93.184.216.34/hook"}, headers=headers)

    assert response.status_code == 500
    assert response.mimetype == "application/problem+json"
    assert "GATEWAY_WEBHOOK_SECRET_KEYS" in response.json["detail"]


def test_init_app_needs_no_instance_key_when_the_database_is_not_sqlite(make_app, caplog):
    app = make_app(WEBHOOK_SECRET_KEYS=None, SQLALCHEMY_DATABASE_URI="postgresql+psycopg://nobody@127.0.0.1:1/none")

    assert app.extensions["webhook_box"] is None
    assert "GATEWAY_WEBHOOK_SECRET_KEYS is not set" in caplog.text


def test_a_bad_secret_key_entry_stops_the_app_from_starting(make_app):
    with pytest.raises(ValueError, match="at least 32 characters"):
        make_app(WEBHOOK_SECRET_KEYS="short")


def test_rotate_key_re_encrypts_every_secret_so_the_old_key_can_go(make_app, identity):
    app = make_app(WEBHOOK_SECRET_KEYS=OLD_KEY)
    consumer = identity.consumer()
    first, first_secret = _endpoint(app, consumer)
    second, second_secret = _endpoint(app, consumer)
    with app.app_context():
        endpoint = db.session.get(WebhookEndpoint, second)
        endpoints.rotate_secret(endpoint, None)  # a previous secret is re-encrypted too
    before = _stored(app, first)

    both = make_app(WEBHOOK_SECRET_KEYS=f"{NEW_KEY},{OLD_KEY}")
    result = both.test_cli_runner().invoke(args=["webhooks", "rotate-key", "--batch", "1"])

    assert result.exit_code == 0, result.output
    assert "2 endpoint secrets re-encrypted" in result.output
    assert _stored(app, first) != before
    only_new = SecretBox([NEW_KEY])
    assert only_new.decrypt(_stored(app, first)) == first_secret
    with both.app_context():
        endpoint = db.session.get(
            WebhookEndpoint, second, options=[undefer(WebhookEndpoint.secret_encrypted), undefer(WebhookEndpoint.previous_secret_encrypted)]
        )
        assert only_new.decrypt(endpoint.previous_secret_encrypted) == second_secret


def test_rotate_key_without_a_key_fails_with_the_setting_named(make_app):
    app = make_app(WEBHOOK_SECRET_KEYS=None)
    app.extensions["webhook_box"] = None

    result = app.test_cli_runner().invoke(args=["webhooks", "rotate-key"])

    assert result.exit_code != 0
    assert "GATEWAY_WEBHOOK_SECRET_KEYS" in result.output


def test_deliveries_have_their_own_queue_and_time_limits_inside_the_lease(make_app):
    celery = make_app(WEBHOOK_LEASE=30).extensions["celery"]
    route = celery.amqp.router.route

    assert route({}, "frontdoor.webhooks.deliver", (), {})["queue"].name == "webhooks"
    assert route({}, "frontdoor.webhooks.fan_out", (), {})["queue"].name == "webhooks"
    assert route({}, "frontdoor.webhooks.dispatch", (), {})["queue"].name == "celery"
    for name in ("frontdoor.webhooks.deliver", "frontdoor.webhooks.fan_out"):  # a fan-out sends its batch
        task = celery.tasks[name]
        assert task.time_limit < 30 and task.soft_time_limit < task.time_limit, name
        assert task.acks_late and task.reject_on_worker_lost, name


def test_beat_dispatches_and_sweeps_webhooks_at_their_intervals(app):
    schedule = beat_schedule({**app.config, "WEBHOOK_DISPATCH_INTERVAL": 0.5, "WEBHOOK_SWEEP_INTERVAL": 90})

    assert schedule["dispatch-webhooks"]["task"] == "frontdoor.webhooks.dispatch"
    assert schedule["dispatch-webhooks"]["schedule"] == 0.5
    assert schedule["sweep-webhooks"] == {"task": "frontdoor.webhooks.sweep", "schedule": 90.0, "options": {"expires": 90.0}}
    celery = app.extensions["celery"]
    for entry in celery.conf.beat_schedule.values():
        assert entry["task"] in celery.tasks


@pytest.mark.parametrize("owned", [True, False])
def test_a_job_event_is_published_as_soon_as_its_job_ends_not_at_the_next_dispatch(make_app, identity, owned):
    from unittest import mock

    from app.jobs import service as job_service
    from app.models import Job, JobEvent, WebhookMessage

    app = make_app()
    consumer = identity.consumer() if owned else None
    with app.app_context():
        job = Job(consumer_id=consumer, status="notStarted", method="GET", path="/x", raw_path="/x")
        db.session.add(job)
        db.session.commit()
        with mock.patch("app.queue.send") as send, mock.patch("app.webhooks.messages.fan_out_later"):
            job_service.cancel(job)
            assert send.called is owned
            if owned:
                assert send.call_args.args == ("frontdoor.webhooks.publish_job_events",)  # an anonymous job's event has nobody to go to
            if owned:
                # What the task does when a worker runs it: the event becomes a message at once.
                app.extensions["celery"].tasks["frontdoor.webhooks.publish_job_events"].apply().get()
        event = db.session.execute(select(JobEvent)).scalar_one()
        messages = db.session.execute(select(WebhookMessage)).scalars().all()
        if owned:
            assert [(m.type, m.event_id, m.consumer_id) for m in messages] == [("job.canceled", event.id, consumer)]
            assert event.published_at is not None
        else:
            assert messages == []
