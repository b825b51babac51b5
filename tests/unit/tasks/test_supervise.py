"""tasks/supervise.py: the worker's command is started again when it exits on its own, and
never when the platform stops it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tasks import supervise
from tests import services

PYTHON = sys.executable


def run(tmp_path, code: str) -> list[str]:
    """A command that runs ``code`` with ``runs``, the file holding one line per start so far."""
    return [PYTHON, "-c", f"from pathlib import Path; runs = Path({str(tmp_path / 'runs')!r}); runs.open('a').write('x\\n')\n{code}"]


def starts(tmp_path) -> int:
    path = tmp_path / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def lines(text: str) -> list[dict]:
    return [line for line in services.json_lines(text) if line.get("logger") == "frontdoor.supervise"]


def test_the_wait_doubles_per_exit_in_a_row_up_to_thirty_seconds():
    assert [supervise.backoff(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_command_that_exits_0_is_not_started_again(tmp_path, capsys):
    assert supervise.supervise(run(tmp_path, "raise SystemExit(0)"), first=0.01) == 0

    assert starts(tmp_path) == 1
    assert lines(capsys.readouterr().out) == []


def test_a_command_that_exits_on_its_own_is_started_again_after_a_growing_wait(tmp_path, capsys):
    # Exits 1 twice (as Celery does on an unrecoverable error), then 0.
    command = run(tmp_path, "raise SystemExit(1 if len(runs.read_text().splitlines()) < 3 else 0)")
    started = time.monotonic()

    assert supervise.supervise(command, first=0.2, most=5) == 0

    assert starts(tmp_path) == 3
    assert time.monotonic() - started >= 0.2 + 0.4  # 0.2 s, then 0.4 s
    logged = lines(capsys.readouterr().out)
    exited = [line for line in logged if line["msg"] == "worker exited; starting it again"]
    assert [(line["exit_status"], line["restart_in_s"], line["exits"], line["level"]) for line in exited] == [(1, 0.2, 1, "error"), (1, 0.4, 2, "error")]
    assert [line["msg"] for line in logged].count("worker started again") == 2


def test_a_command_killed_by_a_signal_is_started_again(tmp_path, capsys):
    # SIGKILL to the command alone, as the OOM killer sends it; then it exits 0.
    command = run(tmp_path, "import os, signal\nif len(runs.read_text().splitlines()) == 1: os.kill(os.getpid(), signal.SIGKILL)")

    assert supervise.supervise(command, first=0.01) == 0

    assert starts(tmp_path) == 2
    [exited] = [line for line in lines(capsys.readouterr().out) if line["msg"].startswith("worker exited")]
    assert exited["exit_status"] == 128 + signal.SIGKILL


def test_a_run_of_steady_length_starts_the_doubling_afresh(tmp_path, capsys):
    command = run(tmp_path, "import time; time.sleep(0.3); raise SystemExit(1 if len(runs.read_text().splitlines()) < 3 else 0)")

    assert supervise.supervise(command, first=0.05, steady=0.2) == 0

    exited = [line for line in lines(capsys.readouterr().out) if line["msg"].startswith("worker exited")]
    assert [line["restart_in_s"] for line in exited] == [0.05, 0.05]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_the_process_group_ends_the_command_and_the_supervisor(tmp_path, sig):
    # The command exits 1 on the signal, as Celery's soft shutdown (REMAP_SIGTERM=SIGQUIT) does.
    ready = tmp_path / "ready"
    command = run(
        tmp_path,
        "import signal, sys, time\n"
        f"signal.signal({int(sig)}, lambda *a: sys.exit(1))\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(30)",
    )
    log = tmp_path / "supervise.log"
    # In a session of its own, as honcho starts each line; SIGTERM to the group, as honcho and Heroku stop it.
    process = services.start([PYTHON, "-m", "tasks.supervise", *command], log=log)
    try:
        services.wait_until(ready.exists, 10, "the command running", process=process, log=log)
        signalled = time.monotonic()
        os.killpg(process.pid, sig)
        assert process.wait(10) == 1
        assert time.monotonic() - signalled < 5
    finally:
        services.stop(process)
    assert starts(tmp_path) == 1  # not started again
    assert lines(log.read_text()) == []


def test_a_stop_signal_during_the_wait_ends_the_supervisor_at_once(tmp_path):
    log = tmp_path / "supervise.log"
    process = services.start([PYTHON, "-m", "tasks.supervise", *run(tmp_path, "raise SystemExit(3)")], log=log)
    try:
        services.wait_until(lambda: lines(log.read_text()), 10, "the first exit logged", process=process, log=log)
        signalled = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(5) == 3  # the last run's status
        assert time.monotonic() - signalled < 1  # not the 1 s wait out
    finally:
        services.stop(process)
    assert starts(tmp_path) == 1
    assert json.loads(log.read_text().splitlines()[0])["restart_in_s"] == 1.0


def test_without_a_command_it_says_how_to_use_it():
    result = subprocess.run([PYTHON, "-m", "tasks.supervise"], cwd=services.ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "usage: python -m tasks.supervise COMMAND" in result.stderr
