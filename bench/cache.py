"""Response cache and aggregate routes: a cache hit's req/s next to a Flask hello-world, and the
latency of an aggregate of three 50 ms backends, in one run, on loopback, driven by wrk.

Peers (each a gunicorn with ``--config gunicorn.conf.py``, same WEB_CONCURRENCY and WEB_THREADS):

- ``hello``: bench/cache_hello.py, Flask's minimal app;
- ``cache-memory``: the gateway (``app:create_app()``) without REDIS_URL, so the cache is each
  process's in-process LRU;
- ``cache-redis``: the same gateway with REDIS_URL (when Redis answers there) under a unique
  GATEWAY_KEY_PREFIX, whose keys are deleted at the end.

Each gateway's route file has ``/cached`` (``cache: {ttl: 60, public: true}``) to a tiny upstream
and ``/screen``, an aggregate of three calls to an upstream that sleeps 50 ms per request
(bench/cache_upstreams.py). See bench/README.md.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
from cache_upstreams import TINY_BODY
from processes import child_env, free_port, start, stop, tree_cpu_seconds
from proxy import run_wrk, verdict, wait_ready

HIT_TARGET = 0.7  # cache hit req/s over hello-world req/s, at least
AGGREGATE_TARGET_MS = 65.0  # aggregate p50, under
HELLO_BODY = b"Hello, World!"
CALLS = ("a", "b", "c")  # the aggregate's named calls, one backend path each
CHECKS = 20  # requests, each on a new connection, that must all be cache hits
HIT = "frontdoor; hit"

ROUTE_FILE = """\
# Written by bench/cache.py for one run.
upstreams:
  tiny:
    targets: ["{tiny}"]
    timeout: {{connect: 1.0, read: 5.0}}
  slow:
    targets: ["{slow}"]
    timeout: {{connect: 1.0, read: 5.0}}
routes:
  - path: /cached
    upstream: tiny
    strip_prefix: true
    auth: none
    rate_limit: none
    cache: {{ttl: 60, public: true}}
  - path: /screen
    auth: none
    rate_limit: none
    aggregate:
      a: {{upstream: slow, path: /a}}
      b: {{upstream: slow, path: /b}}
      c: {{upstream: slow, path: /c}}
"""


# ---------------------------------------------------------------------------------------------
# HTTP


def fetch(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` on a new connection: ``(status, headers with lower-case names, body)``."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def check_hits(url: str, workers: int) -> tuple[int, list[str]]:
    """Send CHECKS requests; return how many were hits with the upstream's body, and what the
    others got (at most three descriptions). Up to ``workers`` answers may be the refresh of an
    entry whose 60 s ran out (``fwd=miss; stored``): one per process's LRU, one for Redis."""
    hits, refreshed, others = 0, 0, []
    for _ in range(CHECKS):
        status, headers, body = fetch(url)
        said = headers.get("cache-status", "")
        if status == 200 and body == TINY_BODY and said.startswith(HIT):
            hits += 1
        elif status == 200 and said == "frontdoor; fwd=miss; stored" and refreshed < workers:
            refreshed += 1
        elif len(others) < 3:
            others.append(f"{status} Cache-Status={said!r} body={body[:60]!r}")
    return hits + refreshed, others


def check_aggregate(url: str, n: int = 5) -> list[str]:
    """``n`` sequential requests: each must be a complete 200 with every call's answer."""
    problems = []
    for _ in range(n):
        status, headers, body = fetch(url)
        try:
            merged = json.loads(body)
        except ValueError:
            merged = None
        complete = isinstance(merged, dict) and all(
            isinstance(merged.get(name), dict) and merged[name].get("path") == f"/{name}" for name in CALLS
        )
        if status != 200 or headers.get("x-gateway-completed") != "true" or not complete:
            problems.append(f"{status} X-Gateway-Completed={headers.get('x-gateway-completed')!r} body={body[:120]!r}")
    return problems


# ---------------------------------------------------------------------------------------------
# Logs: what the gateway and the slow upstream wrote during one wrk run


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def read_from(path: Path, offset: int) -> list[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().splitlines()


def cached_route_lines(log: Path, offset: int) -> tuple[int, int, str]:
    """Access lines for /cached written after ``offset``: ``(answered without an upstream, with one,
    the share of each worker process)``. A hit has no ``target``: the upstream was not called."""
    hits = calls = 0
    by_pid: collections.Counter[int] = collections.Counter()
    for line in read_from(log, offset):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("logger") == "frontdoor.access" and record.get("route") == "/cached":
            by_pid[record.get("pid")] += 1
            if record.get("target"):
                calls += 1
            else:
                hits += 1
    total = sum(by_pid.values()) or 1
    return hits, calls, "/".join(f"{100 * count / total:.0f}%" for _, count in by_pid.most_common())


# ---------------------------------------------------------------------------------------------
# Processes


def gunicorn_path() -> str:
    path = Path(sys.executable).parent / "gunicorn"
    return str(path) if path.exists() else shutil.which("gunicorn") or "gunicorn"


def redis_reachable(redis_url: str) -> str:
    """'' when Redis answers PING at ``redis_url``, else why not."""
    try:
        redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2).ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    return ""


def delete_keys(redis_url: str, prefix: str) -> int:
    """Delete every key under ``prefix:`` (best effort); return how many were found."""
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    except redis.RedisError as exc:  # cleanup must not hide the report
        print(f"note: could not delete Redis keys {prefix}:*: {exc}", file=sys.stderr)
        return 0


def redis_counters(redis_url: str) -> tuple[int, float]:
    """The Redis server's commands processed and CPU seconds (user + system) so far."""
    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    info = client.info("all")
    return int(info["total_commands_processed"]), float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def web_env(port: int, route_file: Path, **extra: str) -> dict[str, str]:
    """The environment of a peer run with gunicorn.conf.py: loopback, the same process and thread
    counts for all, the route file (which gunicorn.conf.py validates in the master)."""
    return child_env(
        HOST="127.0.0.1",
        PORT=str(port),
        WEB_CONCURRENCY=os.environ.get("WEB_CONCURRENCY", "2"),
        WEB_THREADS=os.environ.get("WEB_THREADS", "8"),
        GATEWAY_CONFIG=str(route_file),
        **extra,
    )


def start_peers(args: argparse.Namespace, tmp: Path, redis_url: str, prefix: str, procs: dict) -> dict[str, str]:
    """Start the upstreams, the hello-world and the gateways; return each one's base URL."""
    gunicorn = gunicorn_path()
    names = ["tiny", "slow", "hello", "cache-memory"] + (["cache-redis"] if args.redis else [])
    ports = {name: free_port() for name in names}
    base = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    route_file = tmp / "routes.yaml"
    route_file.write_text(ROUTE_FILE.format(tiny=base["tiny"], slow=base["slow"]))
    quiet = ["--log-level", "warning", "--no-control-socket", "--chdir", str(BENCH)]

    procs["tiny"] = start("tiny", [
        gunicorn, "--bind", f"127.0.0.1:{ports['tiny']}", "--workers", "1", "--worker-class", "gthread",
        "--threads", "4", *quiet, "cache_upstreams:tiny",
    ], child_env(), BENCH, tmp)
    # The slow backend holds each request 50 ms in a thread: 64 of them, so that the aggregate's
    # three calls per request at 8 connections (24 at once) never queue here.
    procs["slow"] = start("slow", [
        gunicorn, "--bind", f"127.0.0.1:{ports['slow']}", "--workers", "1", "--worker-class", "gthread",
        "--threads", "64", "--keep-alive", "75", "--access-logfile", str(tmp / "slow.access"), *quiet,
        "cache_upstreams:slow",
    ], child_env(CACHE_BENCH_BACKEND_MS=str(args.backend_ms)), BENCH, tmp)

    config = [gunicorn, "--config", "gunicorn.conf.py"]
    procs["hello"] = start("hello", [
        *config, "--control-socket", str(tmp / "hello.ctl"), "--pythonpath", str(BENCH), "cache_hello:app",
    ], web_env(ports["hello"], route_file), ROOT, tmp)

    for name in names[3:]:
        store = name.removeprefix("cache-")
        extra = {
            "DATABASE_URL": f"sqlite:///{tmp / f'{name}.sqlite'}",
            "GATEWAY_KEY_PREFIX": prefix,
            "GATEWAY_RATELIMIT_DEFAULT": "",
        }
        if store == "redis":
            extra["REDIS_URL"] = redis_url
        else:
            # No Redis: the in-process LRU. The embedded Celery broker goes to tmp, not instance/.
            extra["REDIS_URL"] = ""
            extra["GATEWAY_CELERY_BROKER_URL"] = f"sqla+sqlite:///{tmp / 'broker.sqlite'}"
        env = web_env(ports[name], route_file, **extra)
        for inherited in ("GATEWAY_REDIS_URL", "GATEWAY_RATELIMIT_STORAGE_URI") if store == "memory" else ():
            env.pop(inherited, None)
        procs[name] = start(name, [
            *config, "--control-socket", str(tmp / f"{name}.ctl"), "app:create_app()",
        ], env, ROOT, tmp)

    wait_ready("tiny", base["tiny"] + "/", procs["tiny"], tmp)
    wait_ready("slow", base["slow"] + "/a", procs["slow"], tmp)
    wait_ready("hello", base["hello"] + "/", procs["hello"], tmp)
    for name in names[3:]:
        wait_ready(name, base[name] + "/healthz", procs[name], tmp)
    return base


# ---------------------------------------------------------------------------------------------
# Measurement


def cache_runs(args, tmp: Path, base: dict[str, str], procs: dict, problems: list[str]) -> dict[str, list[dict]]:
    """Warm every cache, check the hits, then ``args.rounds`` rounds of wrk over the peers."""
    peers = ["hello", "cache-memory"] + (["cache-redis"] if args.redis else [])
    urls = {peer: base[peer] + ("/" if peer == "hello" else "/cached") for peer in peers}
    status, _, body = fetch(urls["hello"])
    if status != 200 or body != HELLO_BODY:
        problems.append(f"hello answered {status} {body[:60]!r}")
    for peer in peers[1:]:
        status, headers, _ = fetch(urls[peer])
        print(f"{peer}: first request: {status}, Cache-Status: {headers.get('cache-status')!r}", flush=True)
    for peer in peers:  # warm-up: every worker's LRU filled, pools, first-request paths
        run_wrk(urls[peer], 2, args.connections, 1)
    for peer in peers[1:]:
        hits, others = check_hits(urls[peer], args.workers)
        print(f"{peer}: {hits} of {CHECKS} requests on new connections were hits ({HIT}; ...) or refreshes", flush=True)
        if hits != CHECKS:
            problems.append(f"{peer}: {CHECKS - hits} of {CHECKS} checks were not hits: " + "; ".join(others))

    results: dict[str, list[dict]] = {peer: [] for peer in peers}
    label = f"-t2 -c{args.connections} -d{args.duration}s"
    print(f"\n{args.rounds} rounds of wrk {label} --latency on {os.cpu_count()} CPUs, the order of the peers rotated", flush=True)
    for index in range(args.rounds):
        order = peers[index % len(peers):] + peers[:index % len(peers)]
        for peer in order:
            log = tmp / f"{peer}.out"
            offset = log_size(log)
            server = redis_counters(args.redis_url) if peer == "cache-redis" else (0, 0.0)
            before = tree_cpu_seconds(procs[peer].pid)
            run = run_wrk(urls[peer], 2, args.connections, args.duration)
            used = tree_cpu_seconds(procs[peer].pid) - before
            run["cpu_ms"] = used * 1000 / max(run["requests"], 1)
            if peer == "cache-redis":  # the server's work: commands and CPU per request (the INFO call is one)
                commands, cpu = redis_counters(args.redis_url)
                run["redis_commands"] = (commands - server[0] - 1) / max(run["requests"], 1)
                run["redis_cpu_ms"] = (cpu - server[1]) * 1000 / max(run["requests"], 1)
            run["hits"], run["calls"], shares = cached_route_lines(log, offset) if peer != "hello" else (0, 0, "")
            results[peer].append(run)
            flags = f"  non-2xx {run['non2xx']}" if run["non2xx"] else ""
            flags += f"  socket errors {run['socket_errors']}" if run["socket_errors"] else ""
            logged = f"  logged: {run['hits']} hits, {run['calls']} upstream calls, by worker {shares}" if peer != "hello" else ""
            if peer != "hello" and not run["hits"] + run["calls"]:
                logged = "  (no access lines: hits checked by headers only)"
            if peer == "cache-redis":
                logged += f"; Redis: {run['redis_commands']:.2f} commands, {run['redis_cpu_ms']:.3f} ms CPU per request"
            print(
                f"  round {index + 1}  {peer:<13}{run['rps']:>9.1f} req/s  p50 {run['p50']:7.3f} ms"
                f"  p99 {run['p99']:7.3f} ms  CPU {run['cpu_ms']:.3f} ms/req{logged}{flags}",
                flush=True,
            )
    for peer in peers[1:]:  # still hits after the runs
        hits, others = check_hits(urls[peer], args.workers)
        if hits != CHECKS:
            problems.append(f"{peer}: after the runs, {CHECKS - hits} of {CHECKS} checks were not hits: " + "; ".join(others))
    return results


def aggregate_runs(args, tmp: Path, base: dict[str, str], problems: list[str]) -> list[dict]:
    """wrk at 1 and ``args.aggregate_connections`` connections against /screen on each gateway,
    and at 1 against one backend call directly; count the backend's requests per answer."""
    gateways = ["cache-memory"] + (["cache-redis"] if args.redis else [])
    for gateway in gateways:
        found = check_aggregate(base[gateway] + "/screen")
        if found:
            problems.append(f"{gateway} /screen: {len(found)} of 5 answers incomplete: " + "; ".join(found[:2]))
        run_wrk(base[gateway] + "/screen", 1, args.aggregate_connections, 1)  # warm-up: pool threads, connections
    plan = [("backend /a", base["slow"] + "/a", 1, 1)]
    for gateway in gateways:
        for connections in sorted({1, args.aggregate_connections}):
            plan.append((f"{gateway.removeprefix('cache-')} /screen", base[gateway] + "/screen", connections, len(CALLS)))
    rows = []
    access = tmp / "slow.access"
    print(f"\naggregate: wrk -d{args.aggregate_duration}s --latency; backends sleep {args.backend_ms:g} ms", flush=True)
    for name, url, connections, calls_each in plan:
        # wrk stops with requests in flight, whose backend calls still run: let them finish.
        time.sleep(0.5)
        before = len(read_from(access, 0))
        run = run_wrk(url, min(2, connections), connections, args.aggregate_duration)
        time.sleep(0.5)
        calls = len(read_from(access, 0)) - before
        # Up to one unfinished request per connection is cut off by wrk but still calls the backends.
        complete = calls_each * run["requests"] <= calls <= calls_each * (run["requests"] + connections)
        run.update(name=name, connections=connections, calls=calls, calls_per=calls / max(run["requests"], 1),
                   expected=calls_each, complete=complete)
        rows.append(run)
        flags = f"  non-2xx {run['non2xx']}" if run["non2xx"] else ""
        flags += f"  socket errors {run['socket_errors']}" if run["socket_errors"] else ""
        print(
            f"  {name:<18} c{connections:<3}{run['rps']:>8.1f} req/s  p50 {run['p50']:7.2f} ms  p99 {run['p99']:7.2f} ms"
            f"  backend calls per answer {run['calls_per']:.2f}{flags}",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def report(args, results: dict[str, list[dict]], rows: list[dict], problems: list[str]) -> None:
    median = {
        peer: {key: statistics.median(run[key] for run in runs) for key in ("rps", "p50", "p99", "cpu_ms")}
        | {key: sum(run[key] for run in runs) for key in ("requests", "non2xx", "socket_errors", "hits", "calls")}
        for peer, runs in results.items()
    }
    print(f"\ncache hit vs Flask hello-world: wrk -t2 -c{args.connections} -d{args.duration}s --latency, median of {args.rounds} rounds")
    print(f"  {'peer':<14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/req':>12}{'non-2xx':>9}{'sock err':>9}{'upstream calls':>16}")
    for peer, row in median.items():
        calls = "" if peer == "hello" else f"{row['calls']} of {row['hits'] + row['calls']}"
        if peer != "hello" and not row["hits"] + row["calls"]:
            calls = "not logged"  # GATEWAY_LOG_LEVEL above INFO: only the header checks remain
        print(
            f"  {peer:<14}{row['rps']:>9.1f}{row['p50']:>9.3f}{row['p99']:>9.3f}{row['cpu_ms']:>12.3f}"
            f"{row['non2xx']:>9}{row['socket_errors']:>9}{calls:>16}"
        )
    hello = median["hello"]
    if "cache-redis" in results:
        runs = results["cache-redis"]
        print(
            f"  (the Redis server, outside the CPU column: {statistics.median(r['redis_commands'] for r in runs):.2f} commands"
            f" and {statistics.median(r['redis_cpu_ms'] for r in runs):.3f} ms CPU per cache-redis request)"
        )
    print()
    for peer in [p for p in median if p != "hello"]:
        row = median[peer]
        errors = [
            f"{name} answered {r['non2xx']} non-2xx" for name, r in ((peer, row), ("hello", hello)) if r["non2xx"]
        ] + [f"{name} had {r['socket_errors']} socket errors" for name, r in ((peer, row), ("hello", hello)) if r["socket_errors"]]
        logged = row["hits"] + row["calls"]
        if row["calls"] > max(10, logged // 1000):  # a few refreshes after the 60 s ttl are expected
            errors.append(f"{row['calls']} of {logged} requests went to the upstream")
        errors += [problem for problem in problems if problem.startswith((f"{peer}:", "hello"))]
        ratio = row["rps"] / hello["rps"]
        cpu = row["cpu_ms"] / hello["cpu_ms"] if hello["cpu_ms"] else float("nan")
        print(
            f"{peer} hit req/s / hello req/s: {ratio:5.2f}  (target >= {HIT_TARGET})  {verdict(ratio >= HIT_TARGET, errors)}"
            f"   [CPU per request x{cpu:.2f} of hello's]"
        )
    if not args.redis:
        print(f"cache-redis: skipped, no Redis at {args.redis_url} ({args.redis_skip})")

    backend = next(row for row in rows if row["name"].startswith("backend"))
    print(f"\none backend call, direct: p50 {backend['p50']:.2f} ms, p99 {backend['p99']:.2f} ms")
    for row in rows:
        if row is backend:
            continue
        errors = []
        if row["non2xx"]:
            errors.append(f"{row['non2xx']} non-2xx")
        if row["socket_errors"]:
            errors.append(f"{row['socket_errors']} socket errors")
        if not row["complete"]:
            errors.append(f"{row['calls']} backend calls for {row['requests']} answers, not {row['expected']} each")
        errors += [problem for problem in problems if problem.startswith(f"cache-{row['name']}:")]
        print(
            f"aggregate {row['name']} c{row['connections']}: p50 {row['p50']:6.2f} ms (target < {AGGREGATE_TARGET_MS:g} ms)"
            f"  {verdict(row['p50'] < AGGREGATE_TARGET_MS, errors)}   p99 {row['p99']:.2f} ms,"
            f" p50 over one backend call {row['p50'] - backend['p50']:+.2f} ms"
        )
    for problem in problems:
        print(f"WARNING: {problem}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the cache runs; the median is reported (default 3)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per cache run (default 8)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections for the cache runs (default 32)")
    parser.add_argument("--aggregate-duration", type=int, default=5, help="seconds per aggregate run (default 5)")
    parser.add_argument("--aggregate-connections", type=int, default=8, help="the second aggregate setting (default 8; 1 is always run)")
    parser.add_argument("--backend-ms", type=float, default=50.0, help="the slow backend's delay (default 50)")
    args = parser.parse_args()
    args.rounds = max(args.rounds, 1)
    if shutil.which("wrk") is None:
        print("error: wrk is not on PATH (apt-get install wrk)", file=sys.stderr)
        return 1
    args.redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    args.redis_skip = redis_reachable(args.redis_url)
    args.redis = not args.redis_skip
    args.workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
    prefix = f"bench-{secrets.token_hex(4)}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup in finally runs
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()};"
        f" WEB_CONCURRENCY={os.environ.get('WEB_CONCURRENCY', '2')} WEB_THREADS={os.environ.get('WEB_THREADS', '8')};"
        f" Redis: {args.redis_url + ', prefix ' + prefix if args.redis else 'none (' + args.redis_skip + ')'}",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="frontdoor-bench-cache-"))
    procs: dict[str, subprocess.Popen] = {}
    problems: list[str] = []
    try:
        base = start_peers(args, tmp, args.redis_url, prefix, procs)
        results = cache_runs(args, tmp, base, procs, problems)
        rows = aggregate_runs(args, tmp, base, problems)
    except (RuntimeError, redis.RedisError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs.values()):
            stop(proc)
        if args.redis:
            print(f"deleted {delete_keys(args.redis_url, prefix)} Redis keys under {prefix}:", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, results, rows, problems)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
