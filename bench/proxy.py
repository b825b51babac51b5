"""Pass-through load benchmark: the gateway against a naive Flask proxy, the Python floor and the bare upstream, driven by wrk."""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
from processes import child_env, free_port, start, stop, tree_cpu_seconds
from upstream import BODY  # the fixed answer, to check what each peer returns

PEERS = ("upstream", "gateway", "gateway-auth", "naive", "floor", "floor-requests")
# gateway-auth is the same gateway process on a route with key auth and a Redis-backed limit.
PROCESS_OF = {"gateway-auth": "gateway"}
PATH = "/bench/items?page=1"  # what wrk asks for; the gateway gets it under /pass
THROUGHPUT_TARGET = 2.0  # gateway req/s over naive req/s at c32, at least
FLOOR_CPU_TARGET = 1.15  # gateway CPU per request over the floor's (Flask + one urllib3 pool) at c32, at most
AUTH_THROUGHPUT_TARGET = 1.6  # gateway-auth req/s over naive req/s at c32, at least
OVERHEAD_TARGET_MS = 0.5  # gateway p50 minus upstream p50 at c1, at most
NAIVE_WORKERS = 5  # gunicorn's rule of thumb for sync workers: 2 x cores + 1
SANITY_REQUESTS = 20
UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
# Sent through no proxy: a loopback benchmark must not go out through http_proxy.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

ROUTE_FILE = """\
# Written by bench/proxy.py for one run.
upstreams:
  fast:
    targets: ["{target}"]
    timeout: {{connect: 1.0, read: 5.0}}
    retries: {{attempts: 2, backoff: 0.05}}
    breaker: {{fail_max: 5, reset_timeout: 10}}
    max_concurrency: 64
routes:
  - path: /pass
    upstream: fast
    strip_prefix: true
  - path: /auth
    upstream: fast
    strip_prefix: true
    auth: required
    rate_limit: "1000000/hour"  # counted in Redis on every request; never reached
"""


def bootstrap_key(env: dict[str, str]) -> str:
    """Migrate the gateway's database and create a consumer and key, with the gateway's own CLI."""
    flask = str(Path(sys.executable).parent / "flask")
    for argv in (["db", "upgrade"], ["consumers", "create", "bench"]):
        subprocess.run([flask, "--app", "app", *argv], cwd=ROOT, env=env, check=True, capture_output=True)
    done = subprocess.run(
        [flask, "--app", "app", "keys", "create", "--consumer", "bench"],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    )
    return done.stdout.strip()


def get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with OPENER.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(name: str, url: str, proc: subprocess.Popen, logs: Path, timeout: float = 30.0) -> None:
    """Wait for ``url`` to answer 200; fail with the process's stderr if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if get(url, timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    tail = (logs / f"{name}.err").read_text(errors="replace")[-2000:]
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout:.0f} s"
    raise RuntimeError(f"{name} {state}; its stderr ends:\n{tail}")


def sanity(name: str, url: str, headers: dict[str, str] | None = None) -> str:
    """Send a few requests one by one; describe any answer that is not the upstream's 200."""
    statuses: collections.Counter[int] = collections.Counter()
    wrong_body = 0
    for _ in range(SANITY_REQUESTS):
        status, body = get(url, headers=headers)
        statuses[status] += 1
        wrong_body += status == 200 and body != BODY
    if statuses[200] == SANITY_REQUESTS and not wrong_body:
        return ""
    seen = ", ".join(f"{count} x {status}" for status, count in sorted(statuses.items()))
    extra = f", {wrong_body} with a body that is not the upstream's" if wrong_body else ""
    return f"{name}: {SANITY_REQUESTS} sequential requests got {seen}{extra}"


def to_ms(value: str, unit: str) -> float:
    return float(value) * UNITS_MS[unit]


def parse_wrk(output: str) -> dict:
    """Requests/sec, the 50% and 99% latencies (ms), request count and error counts from ``wrk --latency``."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    if not (rps and p50 and p99):
        raise RuntimeError(f"cannot parse wrk's output:\n{output}")
    requests = re.search(r"^\s+(\d+) requests in", output, re.MULTILINE)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "rps": float(rps.group(1)),
        "p50": to_ms(*p50.groups()),
        "p99": to_ms(*p99.groups()),
        "requests": int(requests.group(1)) if requests else 0,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(map(int, sockets.groups())) if sockets else 0,
    }


def run_wrk(url: str, threads: int, connections: int, duration: int, headers: dict[str, str] | None = None) -> dict:
    argv = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration}s", "--timeout", "5s"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    done = subprocess.run(
        [*argv, "--latency", url], capture_output=True, text=True, timeout=duration + 30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def summarise_gateway_log(logs: Path, requests_sent: int) -> list[str]:
    """What the gateway wrote: access lines by status against requests sent, other lines (not
    gunicorn's INFO ones), stderr noise."""
    out = logs / "gateway.out"
    statuses: collections.Counter[object] = collections.Counter()
    levels: collections.Counter[str] = collections.Counter()
    access = other = 0
    with open(out, errors="replace") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                other += 1
                continue
            if record.get("logger") == "frontdoor.access":
                access += 1
                statuses[record.get("status")] += 1
            elif record.get("logger") != "gunicorn.error" or record.get("level") != "info":  # start, stop
                levels[str(record.get("level"))] += 1
    size = out.stat().st_size
    by_status = ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items(), key=str)) or "none"
    report = [
        f"stdout: {size / 1e6:.1f} MB; {access} access lines for about {requests_sent} requests sent",
        f"access lines by status: {by_status}",
    ]
    if levels or other:
        named = ", ".join(f"{count} {level}" for level, count in sorted(levels.items()))
        report.append(f"stdout also has {named or 'no'} other JSON lines and {other} non-JSON lines")
    noisy = [
        line for line in (logs / "gateway.err").read_text(errors="replace").splitlines()
        if line.strip() and "[INFO]" not in line
    ]
    if noisy:
        report.append(f"stderr: {len(noisy)} lines other than gunicorn INFO, first ones:")
        report.extend("  " + line[:200] for line in noisy[:5])
    return report


def delete_keys(redis_url: str, prefix: str) -> None:
    """Remove the breaker state this run left in Redis (best effort)."""
    if not redis_url:
        return
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError as exc:  # cleanup must not hide the report
        print(f"note: could not delete Redis keys {prefix}:*: {exc}")


def verdict(ok: bool, errors: list[str]) -> str:
    if errors:
        return "INVALID (" + "; ".join(errors) + ")"
    return "PASS" if ok else "MISS"


def errors_of(peers: dict[str, dict], names: tuple[str, ...]) -> list[str]:
    found = []
    for name in names:
        row = peers[name]
        if row["non2xx"]:
            found.append(f"{name} answered {row['non2xx']} non-2xx")
        if row["socket_errors"]:
            found.append(f"{name} had {row['socket_errors']} socket errors")
    return found


def per(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN (which meets no target) when the denominator is 0."""
    return numerator / denominator if denominator else float("nan")


def target_line(what: str, value: str, target: str, ok: bool, errors: list[str]) -> None:
    print(f"{what:<42}{value:>10}  (target {target:<9})  {verdict(ok, errors)}")


def median_rows(results: dict[str, list[dict]]) -> dict[str, dict]:
    rows = {}
    for peer, runs in results.items():
        rows[peer] = {key: statistics.median(run[key] for run in runs) for key in ("rps", "p50", "p99", "cpu_ms")}
        rows[peer]["non2xx"] = sum(run["non2xx"] for run in runs)
        rows[peer]["socket_errors"] = sum(run["socket_errors"] for run in runs)
    return rows


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"  {'peer':<15}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'CPU ms/req':>12}{'non-2xx':>10}{'sock err':>10}")
    for peer in PEERS:
        row = rows[peer]
        print(
            f"  {peer:<15}{row['rps']:>10.1f}{row['p50']:>10.3f}{row['p99']:>10.3f}{row['cpu_ms']:>12.3f}"
            f"{row['non2xx']:>10}{row['socket_errors']:>10}"
        )


def measure(args: argparse.Namespace, tmp: Path, redis_url: str, key_prefix: str) -> dict:
    """Start the peers, check them, run wrk over them in rounds; always stop them."""
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    if not os.path.exists(gunicorn):
        gunicorn = shutil.which("gunicorn") or "gunicorn"
    procs: list[subprocess.Popen] = []
    # The gateway's gunicorn settings, which both floors run under too.
    workers, threads = os.environ.get("WEB_CONCURRENCY", "2"), os.environ.get("WEB_THREADS", "8")
    running: dict[str, subprocess.Popen] = {}
    try:
        ports = {peer: free_port() for peer in PEERS}
        base = {peer: f"http://127.0.0.1:{port}" for peer, port in ports.items()}
        urls = {
            "upstream": base["upstream"] + PATH,
            "gateway": base["gateway"] + "/pass" + PATH,
            "gateway-auth": base["gateway"] + "/auth" + PATH,
            "naive": base["naive"] + PATH,
            "floor": base["floor"] + PATH,
            "floor-requests": base["floor-requests"] + PATH,
        }
        route_file = tmp / "routes.yaml"
        route_file.write_text(ROUTE_FILE.format(target=base["upstream"]))
        quiet = ["--log-level", "warning", "--no-control-socket", "--chdir", str(BENCH)]

        # The upstream: gthread, 2 workers x 4 threads, keep-alive for the gateway's pooled connections.
        procs.append(start("upstream", [
            gunicorn, "--bind", f"127.0.0.1:{ports['upstream']}", "--workers", "2",
            "--worker-class", "gthread", "--threads", "4", *quiet, "upstream:app",
        ], child_env(), BENCH, tmp))
        running["upstream"] = procs[-1]
        wait_ready("upstream", urls["upstream"], procs[-1], tmp)

        # The gateway as the Procfile's web process runs it; only the control socket moves to tmp,
        # so that it does not take over a running gateway's ~/.gunicorn/gunicorn.ctl.
        # Other GATEWAY_* variables (GATEWAY_RATELIMIT_STRATEGY, GATEWAY_LOG_LEVEL, ...) come
        # through child_env, which copies the environment.
        gateway_env = child_env(
            PORT=str(ports["gateway"]), HOST="127.0.0.1", WEB_CONCURRENCY=workers, WEB_THREADS=threads,
            REDIS_URL=redis_url, GATEWAY_KEY_PREFIX=key_prefix, GATEWAY_CONFIG=str(route_file),
            DATABASE_URL=f"sqlite:///{tmp / 'frontdoor.sqlite'}",
        )
        headers = {"gateway-auth": {"X-API-Key": bootstrap_key(gateway_env)}}
        procs.append(start("gateway", [
            gunicorn, "--config", "gunicorn.conf.py", "--control-socket", str(tmp / "gateway.ctl"),
            "app:create_app()",
        ], gateway_env, ROOT, tmp))

        # The naive peer: sync workers, one request at a time each, which is what its code assumes.
        procs.append(start("naive", [
            gunicorn, "--bind", f"127.0.0.1:{ports['naive']}", "--workers", str(NAIVE_WORKERS),
            "--worker-class", "sync", "--reuse-port", *quiet, "naive:app",
        ], child_env(NAIVE_UPSTREAM=base["upstream"]), BENCH, tmp))
        running["gateway"] = procs[1]
        running["naive"] = procs[2]
        wait_ready("gateway", base["gateway"] + "/healthz", procs[1], tmp)
        # The floors: a Flask view around one call on a shared pool, streaming, under the gateway's
        # own gunicorn settings. No breaker, retry, bulkhead, request id or log line: what the
        # libraries cost before the gateway does anything. `floor` calls urllib3's pool directly
        # (the Python floor, which the target is set against); `floor-requests` goes through a
        # requests.Session, for context.
        for peer, module in (("floor", "floor_urllib3:app"), ("floor-requests", "floor_requests:app")):
            procs.append(start(peer, [
                gunicorn, "--bind", f"127.0.0.1:{ports[peer]}", "--workers", workers,
                "--worker-class", "gthread", "--threads", threads, "--reuse-port", *quiet, module,  # as gunicorn.conf.py
            ], child_env(FLOOR_UPSTREAM=base["upstream"], WEB_THREADS=threads), BENCH, tmp))
            running[peer] = procs[-1]
        wait_ready("naive", urls["naive"], procs[2], tmp)
        for peer in ("floor", "floor-requests"):
            wait_ready(peer, urls[peer], running[peer], tmp)

        problems = [problem for problem in (sanity(peer, urls[peer], headers.get(peer)) for peer in PEERS) if problem]
        for problem in problems:
            print(f"WARNING: {problem}", flush=True)
        sent = SANITY_REQUESTS
        for peer in PEERS:  # warm-up: connection pools, lazy imports, first-request paths
            warm = run_wrk(urls[peer], 1, 4, 1, headers.get(peer))
            sent += warm["requests"] if peer.startswith("gateway") else 0

        results: dict[str, dict[str, list[dict]]] = {name: {peer: [] for peer in PEERS} for name, *_ in args.settings}
        print(f"{args.rounds} rounds on {os.cpu_count()} CPUs; each round runs every setting on every peer,"
              " the order of the peers rotated", flush=True)
        for index in range(args.rounds):
            order = PEERS[index % len(PEERS):] + PEERS[:index % len(PEERS)]
            for name, label, threads, connections, duration in args.settings:
                for peer in order:
                    # CPU time of the peer's own processes per request: steadier than req/s on a
                    # shared machine, since it does not depend on what else got the cores.
                    process = running[PROCESS_OF.get(peer, peer)]
                    before = tree_cpu_seconds(process.pid)
                    run = run_wrk(urls[peer], threads, connections, duration, headers.get(peer))
                    used = tree_cpu_seconds(process.pid) - before
                    run["cpu_ms"] = used * 1000 / max(run["requests"], 1)
                    results[name][peer].append(run)
                    sent += run["requests"] if peer.startswith("gateway") else 0
                    flags = f"  non-2xx {run['non2xx']}" if run["non2xx"] else ""
                    flags += f"  socket errors {run['socket_errors']}" if run["socket_errors"] else ""
                    print(
                        f"  round {index + 1}  {label:<20} {peer:<15}{run['rps']:>9.1f} req/s"
                        f"  p50 {run['p50']:7.3f} ms  p99 {run['p99']:7.3f} ms{flags}",
                        flush=True,
                    )
    finally:
        for proc in reversed(procs):
            stop(proc)
        delete_keys(redis_url, key_prefix)
    return {"results": results, "sent_to_gateway": sent, "problems": problems}


def report(args: argparse.Namespace, measured: dict, tmp: Path) -> None:
    rows = {name: median_rows(measured["results"][name]) for name, *_ in args.settings}
    for name, label, *_ in args.settings:
        print_table(f"wrk {label} --latency, median of {args.rounds} rounds", rows[name])

    many, one = rows["throughput"], rows["latency"]
    c = f"c{args.connections}"
    print()
    ratio = many["gateway"]["rps"] / many["naive"]["rps"]
    target_line(
        f"gateway req/s / naive req/s at {c}:", f"{ratio:.2f}", f">= {THROUGHPUT_TARGET}",
        ratio >= THROUGHPUT_TARGET, errors_of(many, ("gateway", "naive")),
    )
    floor_cpu = per(many["gateway"]["cpu_ms"], many["floor"]["cpu_ms"])
    target_line(
        f"gateway CPU/req / floor CPU/req at {c}:", f"{floor_cpu:.2f}", f"<= {FLOOR_CPU_TARGET}",
        floor_cpu <= FLOOR_CPU_TARGET, errors_of(many, ("gateway", "floor")),
    )
    auth_ratio = many["gateway-auth"]["rps"] / many["naive"]["rps"]
    target_line(
        f"gateway-auth req/s / naive req/s at {c}:", f"{auth_ratio:.2f}", f">= {AUTH_THROUGHPUT_TARGET}",
        auth_ratio >= AUTH_THROUGHPUT_TARGET, errors_of(many, ("gateway-auth", "naive")),
    )
    overhead = one["gateway"]["p50"] - one["upstream"]["p50"]
    target_line(
        "gateway p50 - upstream p50 at c1:", f"{overhead:.3f} ms", f"<= {OVERHEAD_TARGET_MS} ms",
        overhead <= OVERHEAD_TARGET_MS, errors_of(one, ("gateway", "upstream")),
    )
    print("for reading the figures above:")
    print(f"  naive CPU/req / gateway CPU/req at {c}: {per(many['naive']['cpu_ms'], many['gateway']['cpu_ms']):.2f}")
    for peer, what in (("floor", "Flask + one urllib3 pool"), ("floor-requests", "Flask + requests.Session")):
        print(
            f"  gateway over {peer} ({what}): CPU per request x{per(many['gateway']['cpu_ms'], many[peer]['cpu_ms']):.2f},"
            f" req/s x{per(many['gateway']['rps'], many[peer]['rps']):.2f} at {c};"
            f" p50 at c1 {one['gateway']['p50'] - one[peer]['p50']:+.3f} ms"
        )
    if measured["problems"]:
        print("sanity check: " + "; ".join(measured["problems"]))
    print("\ngateway log (its stdout went to a file):")
    for line in summarise_gateway_log(tmp, measured["sent_to_gateway"]):
        print("  " + line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--duration", type=int, default=8, help="seconds per c32 run; c1 runs take 5/8 of it")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections for the throughput runs")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("error: wrk is not on PATH (apt-get install wrk)", file=sys.stderr)
        return 1
    short = max(1, round(args.duration * 5 / 8))
    args.settings = [
        ("throughput", f"-t2 -c{args.connections} -d{args.duration}s", 2, args.connections, args.duration),
        ("latency", f"-t1 -c1 -d{short}s", 1, 1, short),
    ]
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    key_prefix = f"bench-{secrets.token_hex(4)}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup in finally runs

    tmp = Path(tempfile.mkdtemp(prefix="frontdoor-bench-"))
    try:
        measured = measure(args, tmp, redis_url, key_prefix)
        report(args, measured, tmp)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
