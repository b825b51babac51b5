"""Migrations run on SQLite and PostgreSQL, and agree with the models."""
from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy

from app.config import normalise_database_url
from tests.services import ROOT

FLASK = str(Path(sys.executable).parent / "flask")


def flask_db(args: list[str], database_url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"DATABASE_URL": database_url, "GATEWAY_CONFIG": str(ROOT / "gateway.yaml"), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run([FLASK, "--app", "app", "db", *args], cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=120)


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    return ScriptDirectory.from_config(config).get_current_head()


def assert_upgraded_and_in_agreement(database_url: str, tmp_path: Path) -> None:
    upgrade = flask_db(["upgrade"], database_url, tmp_path)
    assert upgrade.returncode == 0, upgrade.stderr
    engine = sqlalchemy.create_engine(normalise_database_url(database_url))
    with engine.connect() as connection:
        versions = connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalars().all()
    engine.dispose()
    assert versions == [head_revision()]
    check = flask_db(["check"], database_url, tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr


def test_migrations_on_sqlite(tmp_path):
    assert_upgraded_and_in_agreement(f"sqlite:///{tmp_path / 'migrated.sqlite'}", tmp_path)


@pytest.mark.postgres
def test_migrations_on_postgres_given_a_heroku_style_url(postgres_url, tmp_path):
    name = f"frontdoor_migrate_{uuid.uuid4().hex[:8]}"
    admin = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        base = admin.rsplit("/", 1)[0].replace("postgresql://", "postgres://", 1)
        assert_upgraded_and_in_agreement(f"{base}/{name}", tmp_path)
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
