"""JSON log lines: their fields, and the writer thread the web workers log through."""
from __future__ import annotations

import io
import json
import logging
import threading
from datetime import UTC, datetime

import pytest

from app.observability import logging as gateway_logging
from app.observability.logging import JSONFormatter

log = logging.getLogger("frontdoor.test")


def record(created: float, msg: str = "hello", **extra) -> logging.LogRecord:
    made = log.makeRecord(log.name, logging.INFO, "", 0, msg, (), None, extra=extra)
    made.created = created
    return made


@pytest.mark.parametrize("created", [0.0, 1_700_000_000.0, 1_700_000_000.9996, 1_795_000_000.5, 1_795_000_001.0015])
def test_ts_is_rfc3339_utc_with_milliseconds(created):
    line = json.loads(JSONFormatter().format(record(created)))

    assert line["ts"] == datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


def test_ts_follows_the_clock_back_and_forth_across_seconds():
    formatter = JSONFormatter()
    for created in (1_700_000_005.25, 1_700_000_006.5, 1_700_000_005.75, 1_700_000_006.0):
        assert json.loads(formatter.format(record(created)))["ts"] == datetime.fromtimestamp(created, UTC).isoformat(
            timespec="milliseconds"
        )


def test_a_line_carries_the_extras_but_not_the_empty_ones():
    line = json.loads(JSONFormatter().format(record(1_700_000_000.0, "request", route="/x", consumer=None, status=200)))

    assert line["level"] == "info" and line["logger"] == "frontdoor.test" and line["msg"] == "request"
    assert line["route"] == "/x" and line["status"] == 200 and "consumer" not in line


def test_an_access_record_holds_what_logger_info_would_make_of_the_fields():
    fields = {"request_id": "r-1", "method": "GET", "path": "/x", "route": "/x", "consumer": None, "status": 200, "duration_ms": 1.5}
    access = gateway_logging.access
    made = access.makeRecord(access.name, logging.INFO, "(unknown file)", 0, "request", (), None, extra=dict(fields))

    ours = gateway_logging.AccessRecord(access.name, dict(fields))

    timing = {"created", "msecs", "relativeCreated"}
    assert {k: v for k, v in vars(ours).items() if k not in timing} == {k: v for k, v in vars(made).items() if k not in timing}
    assert list(vars(ours)) == list(vars(made))  # the same order: a line's fields come out as they did
    assert abs(ours.created - made.created) < 1
    assert logging.Formatter("%(levelname)s %(name)s %(filename)s %(message)s %(route)s").format(ours) == "INFO frontdoor.access (unknown file) request /x"


@pytest.fixture
def stream():
    """The frontdoor loggers writing to a buffer, as configure() has them write to stdout."""
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in ("frontdoor", "pybreaker")}
    out = io.StringIO()
    gateway_logging._install(gateway_logging._stdout_handler(out))
    logging.getLogger("frontdoor").setLevel(logging.INFO)
    yield out
    gateway_logging.stop_background()
    for name, (handlers, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(text) for text in out.getvalue().splitlines()]


def test_in_the_background_every_line_is_written_whole_and_in_each_threads_order(stream):
    gateway_logging.write_in_background()

    def work(thread: int) -> None:
        for n in range(500):
            log.info("request", extra={"writer": thread, "n": n})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gateway_logging.stop_background()

    written = lines(stream)
    assert len(written) == 8 * 500
    for thread in range(8):
        assert [line["n"] for line in written if line["writer"] == thread] == list(range(500))


def test_in_the_background_a_line_says_what_was_true_when_it_was_logged(stream):
    gateway_logging.write_in_background()
    state = ["before"]
    log.info("state %s", state)
    state[0] = "after"
    try:
        raise ValueError("the cause")
    except ValueError:
        log.exception("failed")
    gateway_logging.stop_background()

    said, failed = lines(stream)
    assert said["msg"] == "state ['before']"
    assert failed["level"] == "error" and failed["msg"] == "failed"
    assert "ValueError: the cause" in failed["exc"] and "Traceback" in failed["exc"]


def test_an_idle_process_writes_a_line_without_waiting_for_more(stream):
    gateway_logging.write_in_background()
    log.info("alone")

    deadline = threading.Event()
    for _ in range(200):
        if stream.getvalue():
            break
        deadline.wait(0.01)
    assert [line["msg"] for line in lines(stream)] == ["alone"]


def test_after_stop_lines_are_written_by_the_thread_that_logs_them(stream):
    gateway_logging.write_in_background()
    gateway_logging.stop_background()

    log.info("now")

    assert [line["msg"] for line in lines(stream)] == ["now"]
