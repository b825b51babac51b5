"""Keep the worker running: ``python -m tasks.supervise COMMAND...`` starts COMMAND again when it exits on its own.

The Procfile's worker runs under it. Heroku restarts a crashed dyno at once the first time and
then only after a growing cool-off (up to 20 minutes); honcho restarts nothing and stops every
other process when one exits. A worker that exits (an error Celery calls unrecoverable, the
kernel's OOM killer) would leave jobs and deliveries waiting that long or for good.

Stopping is the platform's: Heroku sends SIGTERM to every process of the dyno, honcho to the
process group of each line, a terminal SIGINT to its foreground group. COMMAND runs in this
process's group, so it gets that signal itself (the Procfile's REMAP_SIGTERM=SIGQUIT makes it a
soft shutdown, which exits 1); the supervisor, getting it too, passes nothing on and starts
nothing again. Signal the group, not this process alone (``kill -TERM -PGID``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
FIRST_WAIT = 1.0  # seconds before the first restart
MOST_WAIT = 30.0  # seconds: the wait doubles per exit in a row, up to this
STEADY = 60.0  # seconds: a run at least this long starts the doubling afresh


def backoff(exits: int, first: float = FIRST_WAIT, most: float = MOST_WAIT) -> float:
    """Seconds to wait before starting the command again after ``exits`` (>= 1) exits in a
    row, none of them after a steady run: ``first``, doubled per further exit, at most ``most``."""
    return min(first * 2 ** (exits - 1), most)


def log(level: str, msg: str, **fields: object) -> None:
    """One JSON line on stdout, in the fields app.observability.logging writes (without importing
    the app, which the supervised command does)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}+00:00"
    line = {"ts": stamp, "level": level, "logger": "frontdoor.supervise", "msg": msg, "pid": os.getpid(), **fields}
    print(json.dumps(line), flush=True)


def supervise(command: list[str], first: float = FIRST_WAIT, most: float = MOST_WAIT, steady: float = STEADY) -> int:
    """Run ``command`` until it exits 0 or a stop signal (SIGTERM, SIGINT, SIGQUIT) arrives;
    after any other exit, start it again after ``backoff`` seconds (``first``, ``most``), the
    count of exits starting afresh after a run of ``steady`` seconds. Returns the exit status
    of its last run, a shell's way (128 + N when signal N ended it)."""
    stop: list[int] = []

    def stopping(signum: int, frame: object) -> None:
        stop.append(signum)

    previous = {sig: signal.signal(sig, stopping) for sig in STOP_SIGNALS}
    try:
        exits = 0
        while True:
            started = time.monotonic()
            child = subprocess.Popen(command)
            if exits:
                log("info", "worker started again", child_pid=child.pid, exits=exits)
            code = child.wait()
            status = code if code >= 0 else 128 - code
            ran = time.monotonic() - started
            if stop or code == 0:
                return status
            exits = 1 if ran >= steady else exits + 1
            wait = backoff(exits, first, most)
            log("error", "worker exited; starting it again", exit_status=status, ran_s=round(ran, 3), restart_in_s=wait, exits=exits)
            deadline = time.monotonic() + wait
            while not stop and time.monotonic() < deadline:
                time.sleep(min(0.1, wait))
            if stop:
                return status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m tasks.supervise COMMAND [ARG...]")
    sys.exit(supervise(sys.argv[1:]))
