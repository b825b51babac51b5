"""The ``flask`` commands as an operator scripts them on Heroku (``heroku run``): the answer on
stdout, and nothing else there; log lines on stderr."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests import services
from tests.integration.test_jobs import FLASK
from tests.services import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def flask(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FLASK, "--app", "app", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_a_command_substitution_captures_only_the_answer_while_the_gateway_logs(postgres_database, tmp_path):
    # On Postgres with no GATEWAY_WEBHOOK_SECRET_KEYS every process logs a warning at start-up:
    # a line a script's $(flask keys create ...) must not capture before the key.
    env = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    env.update(DATABASE_URL=postgres_database, GATEWAY_CONFIG=str(ROOT / "gateway.yaml"))
    services.migrate(env)

    consumer = flask(env, "consumers", "create", "acme")
    key = flask(env, "keys", "create", "--consumer", "acme")

    assert consumer.returncode == 0 and key.returncode == 0, consumer.stderr + key.stderr
    assert re.fullmatch(r"con_[A-Za-z0-9_-]{22}\n", consumer.stdout)
    assert re.fullmatch(r"fd_live_[A-Za-z0-9]{40}\n", key.stdout), key.stdout
    logged = [json.loads(line) for line in key.stderr.splitlines() if line.startswith("{")]
    assert any("GATEWAY_WEBHOOK_SECRET_KEYS" in line["msg"] for line in logged), key.stderr
