"""Configuration: defaults, GATEWAY_* and platform variables, and the settings derived from them."""
from __future__ import annotations

import os

import pytest
from flask import Flask
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from app import config
from app.config import normalise_database_url
from app.extensions import db

PLATFORM = ("DATABASE_URL", "REDIS_URL", "PORT", "WEB_THREADS", "WEB_CONCURRENCY", "WORKER_CONCURRENCY", "GUNICORN_TIMEOUT", "HOST")


@pytest.fixture
def env(monkeypatch):
    """A clean environment: no GATEWAY_* nor platform variable leaks in from the shell."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_") or name in PLATFORM:
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def app(tmp_path):
    app = Flask("config-test", instance_path=str(tmp_path / "instance"))
    app.config.from_mapping(config.defaults(app))
    return app


def configured(app) -> Flask:
    config.from_environment(app)
    config.finalise(app)
    return app


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("postgres://u:p@db.example:5432/d", "postgresql+psycopg://u:p@db.example:5432/d"),
        ("postgresql://u@db/d?sslmode=require", "postgresql+psycopg://u@db/d?sslmode=require"),
        ("postgresql+psycopg://u@db/d", "postgresql+psycopg://u@db/d"),
        ("postgresql+psycopg2://u@db/d", "postgresql+psycopg2://u@db/d"),
        ("sqlite:////var/lib/frontdoor.sqlite", "sqlite:////var/lib/frontdoor.sqlite"),
        ("mysql://u@db/d", "mysql://u@db/d"),
    ],
)
def test_database_urls_are_normalised_for_sqlalchemy_and_psycopg3(url, normalised):
    assert normalise_database_url(url) == normalised


def test_without_environment_the_embedded_defaults_apply(env, app, tmp_path):
    configured(app)

    instance = tmp_path / "instance"
    assert app.config["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{instance / 'frontdoor.sqlite'}"
    assert instance.is_dir()  # SQLite can create its file there
    assert app.config["REDIS_URL"] is None
    assert app.config["CELERY_BROKER_URL"] == f"sqla+sqlite:///{instance / 'celery-broker.sqlite'}"
    assert app.config["API_PREFIX"] == "/_gateway"
    assert app.config["MAX_BODY_SIZE"] == 10 * 1024 * 1024
    assert app.config["WEB_THREADS"] == 8
    assert "PORT" not in app.config


def test_herokus_database_url_is_used_and_normalised(env, app):
    env.setenv("DATABASE_URL", "postgres://u:secret@ec2.example:5432/frontdoor")

    configured(app)

    assert app.config["SQLALCHEMY_DATABASE_URI"] == "postgresql+psycopg://u:secret@ec2.example:5432/frontdoor"


def test_redis_url_becomes_the_celery_broker(env, app):
    env.setenv("REDIS_URL", "redis://cache.example:6379/2")

    configured(app)

    assert app.config["REDIS_URL"] == "redis://cache.example:6379/2"
    assert app.config["CELERY_BROKER_URL"] == "redis://cache.example:6379/2"


def test_an_explicit_broker_is_kept(env, app):
    env.setenv("REDIS_URL", "redis://cache.example:6379/2")
    env.setenv("GATEWAY_CELERY_BROKER_URL", "amqp://mq.example//")

    configured(app)

    assert app.config["CELERY_BROKER_URL"] == "amqp://mq.example//"


def test_port_and_web_threads_are_read_as_numbers(env, app):
    env.setenv("PORT", "5050")
    env.setenv("WEB_THREADS", "16")

    configured(app)

    assert app.config["PORT"] == 5050
    assert app.config["WEB_THREADS"] == 16


def test_gateway_prefixed_variables_set_their_keys(env, app):
    env.setenv("GATEWAY_CONFIG", "/etc/frontdoor/routes.yaml")
    env.setenv("GATEWAY_API_PREFIX", "/_admin")
    env.setenv("GATEWAY_MAX_BODY_SIZE", "1048576")
    env.setenv("GATEWAY_TRUSTED_PROXY_HOPS", "1")
    env.setenv("GATEWAY_LOG_LEVEL", "DEBUG")

    configured(app)

    assert app.config["CONFIG"] == "/etc/frontdoor/routes.yaml"
    assert app.config["API_PREFIX"] == "/_admin"
    assert app.config["MAX_BODY_SIZE"] == 1048576  # parsed as JSON, so a number
    assert app.config["TRUSTED_PROXY_HOPS"] == 1
    assert app.config["LOG_LEVEL"] == "DEBUG"


def test_the_platforms_names_win_over_gateway_prefixed_ones(env, app):
    env.setenv("GATEWAY_SQLALCHEMY_DATABASE_URI", "sqlite:////tmp/ignored.sqlite")
    env.setenv("DATABASE_URL", "postgresql://u@db/d")

    configured(app)

    assert app.config["SQLALCHEMY_DATABASE_URI"] == "postgresql+psycopg://u@db/d"


def test_empty_platform_variables_are_ignored(env, app):
    for name in PLATFORM:
        env.setenv(name, "")

    configured(app)

    assert app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite:///")
    assert app.config["REDIS_URL"] is None
    assert app.config["CELERY_BROKER_URL"].startswith("sqla+sqlite:///")
    assert app.config["WEB_THREADS"] == 8


def test_a_failed_statement_does_not_repeat_its_bound_values(make_app):
    # Errors are logged with their tracebacks; a statement's values may be a job's stored request.
    app = make_app()
    with app.app_context(), pytest.raises(OperationalError) as caught:
        db.session.execute(text("INSERT INTO no_such_table (value) VALUES (:value)"), {"value": "tok-5e1f2a"})

    assert "no_such_table" in str(caught.value)
    assert "tok-5e1f2a" not in str(caught.value)


@pytest.mark.parametrize(
    ("variables", "lines"),
    [
        ({"GATEWAY_RATELIMT_DEFAULT": "1/second"}, ["GATEWAY_RATELIMT_DEFAULT is not a setting; did you mean GATEWAY_RATELIMIT_DEFAULT?"]),
        ({"GATEWAY_JOB_LEASE": "abc"}, ["GATEWAY_JOB_LEASE='abc' is not a number (the default is 30.0)"]),
        ({"GATEWAY_WEB_THREADS": "1.5", "GATEWAY_WEBHOOK_ALLOW_HTTP": "maybe", "GATEWAY_NOTHING_LIKE_IT": "1"}, [
            "GATEWAY_NOTHING_LIKE_IT is not a setting (README: Configuration lists them)",
            "GATEWAY_WEBHOOK_ALLOW_HTTP='maybe' is not true or false (the default is False)",
            "GATEWAY_WEB_THREADS='1.5' is not a whole number (the default is 8)",
        ]),
        ({"GATEWAY_RATELIMIT_PLANS": "[1]"}, ["GATEWAY_RATELIMIT_PLANS='[1]' is not a JSON object (the default is {})"]),
        # The platform's variables, checked by the same model of them (config.Platform).
        ({"PORT": "abc", "WEB_CONCURRENCY": "0", "GATEWAY_JOB_LEASE": "x"}, [
            "GATEWAY_JOB_LEASE='x' is not a number (the default is 30.0)",
            "PORT='abc' is not valid: expected a whole number from 0 to 65535 (the default is 8000)",
            "WEB_CONCURRENCY='0' is not valid: expected a whole number from 1 to 512 (the default is 2)",
        ]),
        ({"DATABASE_URL": "mysql://app:hunter2@db/x", "REDIS_URL": "127.0.0.1:6379"}, [
            "DATABASE_URL='mysql://***@db/x' is not valid: expected a URL starting postgres:// or postgresql:// or postgresql+psycopg:// or sqlite:// (unset: the embedded default)",
            "REDIS_URL='127.0.0.1:6379' is not valid: expected a URL starting redis:// or rediss:// or unix:// (unset: the embedded default)",
        ]),
    ],
)
def test_a_variable_that_is_not_a_setting_or_does_not_fit_is_refused_with_a_line_naming_it(env, app, variables, lines):
    for name, value in variables.items():
        env.setenv(name, value)

    with pytest.raises(config.SettingsError) as refused:
        configured(app)

    assert str(refused.value).splitlines() == lines


def test_settings_from_the_environment_take_their_defaults_types(env, app):
    env.setenv("GATEWAY_JOB_LEASE", "12")
    env.setenv("GATEWAY_WEBHOOK_ALLOW_HTTP", "true")
    env.setenv("GATEWAY_VIA_NAME", "123")  # text stays text
    env.setenv("GATEWAY_WEBHOOK_ALLOWED_NETWORKS", '["127.0.0.0/8"]')
    env.setenv("GATEWAY_WEBHOOK_RETRY_SCHEDULE", "5,10")  # a list may be comma-separated
    env.setenv("GATEWAY_CELERY__task_default_priority", "3")

    configured(app)

    assert app.config["JOB_LEASE"] == 12.0 and isinstance(app.config["JOB_LEASE"], float)
    assert app.config["WEBHOOK_ALLOW_HTTP"] is True
    assert app.config["VIA_NAME"] == "123"
    assert app.config["WEBHOOK_ALLOWED_NETWORKS"] == ["127.0.0.0/8"]
    assert app.config["WEBHOOK_RETRY_SCHEDULE"] == "5,10"
    assert app.config["CELERY"] == {"task_default_priority": 3}


@pytest.mark.parametrize("command", ["check", "gunicorn", "celery"])
def test_a_process_started_with_a_bad_setting_exits_with_its_line(command, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from tests.services import ROOT

    bin_dir = Path(sys.executable).parent
    argv = {
        "check": [sys.executable, "-m", "app.gateway.check"],
        "gunicorn": [str(bin_dir / "gunicorn"), "--config", "gunicorn.conf.py", "app:create_app()"],
        "celery": [str(bin_dir / "celery"), "-A", "tasks", "worker", "--pool", "solo"],
    }[command]
    environ = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_") and name not in PLATFORM}
    environ.update(GATEWAY_RATELIMT_DEFAULT="1/second", PORT="0", WEB_THREADS="many", DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}")
    done = subprocess.run(argv, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert "error: GATEWAY_RATELIMT_DEFAULT is not a setting; did you mean GATEWAY_RATELIMIT_DEFAULT?" in lines, done.stderr
    assert "WEB_THREADS='many' is not valid: expected a whole number from 1 to 1024 (the default is 8)" in lines, done.stderr
    assert "Traceback" not in done.stderr
