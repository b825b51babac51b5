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

PLATFORM = ("DATABASE_URL", "REDIS_URL", "PORT", "WEB_THREADS")


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
