"""/metrics under gunicorn with two workers: every worker's counts added up, with bounded labels;
and a Celery worker's, on its own port or through the web server's directory."""
from __future__ import annotations

import time
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests import services
from tests.integration import test_jobs
from tests.integration.test_jobs import BACKENDS

stack = test_jobs.stack  # the fixture: a gateway with its database and broker, workers started here

pytestmark = [pytest.mark.slow]

ROUTES = """
upstreams:
  httpbin:
    targets: ["{httpbin}"]
    timeout: {{connect: 1.0, read: 3.0}}
routes:
  - {{path: /httpbin, upstream: httpbin, strip_prefix: true, auth: none, rate_limit: none}}
  - {{path: /cached, upstream: httpbin, strip_prefix: true, auth: none, rate_limit: none, cache: {{ttl: 60, public: true}}}}
"""


def samples(url: str) -> dict[tuple[str, frozenset], float]:
    text = requests.get(f"{url}/metrics", timeout=5).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_metrics_add_up_every_workers_requests_with_route_labels(start_gateway, httpbin_url):
    # No PROMETHEUS_MULTIPROC_DIR given: gunicorn.conf.py makes one for the workers.
    gateway = start_gateway(ROUTES.format(httpbin=httpbin_url), workers=2)
    ids = []
    # New connections until both workers have answered (each connection stays with one worker).
    deadline = time.monotonic() + 20
    while True:
        for _ in range(10):
            request_id = f"m-{uuid.uuid4().hex}"
            assert requests.get(f"{gateway.url}/httpbin/get?n=1", headers={"X-Request-ID": request_id}, timeout=5).status_code == 200
            ids.append(request_id)
        time.sleep(0.2)
        pids = {line["pid"] for line in gateway.log_lines() if line.get("request_id") in ids}
        if len(pids) == 2 or time.monotonic() > deadline:
            break
    assert len(pids) == 2, "both workers answered"
    for _ in range(3):
        assert requests.get(f"{gateway.url}/cached/get", timeout=5).status_code == 200
    assert requests.get(f"{gateway.url}/httpbin/status/503", timeout=5).status_code == 503
    assert requests.get(f"{gateway.url}/not/a/route", timeout=5).status_code == 404
    # The workers' metric updaters apply what they queued: polled for (a fixed 0.3 s on a loaded
    # machine may be too short), then every scrape must show all of it.
    def counted() -> bool:
        found = samples(gateway.url)
        return (sample(found, "frontdoor_http_requests_total", route="/httpbin", method="GET", status="200") == len(ids)
                and sample(found, "frontdoor_http_requests_total", route="/httpbin", method="GET", status="503") == 1
                and sample(found, "frontdoor_http_requests_total", route="unmatched", method="GET", status="404") == 1)

    services.wait_until(counted, 10, "every request counted")

    # Any worker may answer the scrape: it reports both workers' counts.
    for _ in range(4):
        found = samples(gateway.url)
        assert sample(found, "frontdoor_http_requests_total", route="/httpbin", method="GET", status="200") == len(ids)
        assert sample(found, "frontdoor_http_requests_total", route="/httpbin", method="GET", status="503") == 1
        assert sample(found, "frontdoor_http_requests_total", route="unmatched", method="GET", status="404") == 1
        assert sample(found, "frontdoor_http_request_duration_seconds_count", route="/httpbin") == len(ids) + 1
        assert sample(found, "frontdoor_upstream_duration_seconds_count", route="/httpbin") == len(ids) + 1
        assert sample(found, "frontdoor_cache_responses_total", route="/cached", result="hit") + sample(
            found, "frontdoor_cache_responses_total", route="/cached", result="miss"
        ) == 3
        assert sample(found, "frontdoor_cache_responses_total", route="/cached", result="miss") >= 1
    routes = {dict(labels).get("route") for (name, labels) in found if name == "frontdoor_http_requests_total"}
    assert routes <= {"/httpbin", "/cached", "unmatched", "/metrics", "/healthz"}  # route labels, never raw paths


# A Celery worker's metrics: its pool's children count jobs and tasks, each in a process of its own.


def submit_jobs(stack, count: int) -> list[str]:
    """``count`` jobs of one second each on the async route, sent before any worker listens."""
    return [stack.submit(f"/async/delay/1?n={n}").headers["Location"] for n in range(count)]


def wait_succeeded(stack, locations: list[str]) -> None:
    for location in locations:
        job, _ = stack.follow(location, timeout=30)
        assert job["status"] == "succeeded", job


def job_pids(worker) -> set[int]:
    """The pool processes whose ``task`` lines show a job run."""
    lines = services.json_lines(worker.text())
    return {line["pid"] for line in lines if line.get("msg") == "task" and line.get("task") == "frontdoor.jobs.run"}


@pytest.mark.parametrize("stack", [BACKENDS["redis"]], indirect=True)
def test_a_workers_metrics_port_adds_up_every_pool_process(stack):
    # No PROMETHEUS_MULTIPROC_DIR given: tasks/celery.py makes one for the worker's processes.
    port = services.free_port()
    stack.env["GATEWAY_WORKER_METRICS_PORT"] = str(port)
    locations = submit_jobs(stack, 4)
    worker = stack.worker(concurrency=2)
    wait_succeeded(stack, locations)
    assert len(job_pids(worker)) == 2, f"both pool processes ran jobs:\n{stack.logs()}"

    found = samples(f"http://127.0.0.1:{port}")
    assert sample(found, "frontdoor_jobs_total", status="succeeded") == 4
    assert sample(found, "frontdoor_celery_tasks_total", task="frontdoor.jobs.run", outcome="succeeded") == 4
    assert sample(found, "frontdoor_job_queue_wait_seconds_count") == 4
    # The web server's own directory is another: its /metrics counts requests, not these jobs.
    web = samples(stack.gateway.url)
    assert sample(web, "frontdoor_jobs_total", status="succeeded") == 0
    assert sample(web, "frontdoor_http_requests_total", route="async", method="GET", status="202") == 4


@pytest.mark.parametrize("stack", [BACKENDS["sqlite"]], indirect=True)
def test_a_worker_given_the_web_servers_directory_shows_in_its_metrics(stack, tmp_path):
    # One machine (make run, honcho): web and worker share PROMETHEUS_MULTIPROC_DIR.
    stack.env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    locations = submit_jobs(stack, 2)
    stack.worker(concurrency=2)
    wait_succeeded(stack, locations)

    # The web workers' metric updaters apply what they queued (polled for, not a fixed 0.3 s).
    found = services.wait_until(
        lambda: (found := samples(stack.gateway.url))
        and sample(found, "frontdoor_http_requests_total", route="async", method="GET", status="202") == 2
        and found,
        10, "the submissions counted",
    )
    assert sample(found, "frontdoor_jobs_total", status="succeeded") == 2
    assert sample(found, "frontdoor_celery_tasks_total", task="frontdoor.jobs.run", outcome="succeeded") == 2
    assert sample(found, "frontdoor_http_requests_total", route="async", method="GET", status="202") == 2
