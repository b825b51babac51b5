"""Heroku-style add-ons: Heroku Redis is ``rediss://`` with a self-signed certificate. The
gateway (rate limits, the shared cache, breakers), its Celery broker and a worker all use it."""
from __future__ import annotations

import datetime
import shutil
import time

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests import services
from tests.integration.test_jobs import CELERY, migrate

pytestmark = [pytest.mark.slow]

ROUTES = """
upstreams:
  httpbin:
    targets: ["{httpbin}"]
routes:
  - {{path: /limited, upstream: httpbin, strip_prefix: true, auth: none, rate_limit: "5/minute"}}
  - {{path: /cached, upstream: httpbin, strip_prefix: true, auth: none, rate_limit: none, cache: {{ttl: 60, public: true}}}}
  - {{path: /async, upstream: httpbin, strip_prefix: true, auth: none, rate_limit: none, mode: async}}
"""


def self_signed(directory) -> tuple[str, str]:
    """A key and a self-signed certificate for 127.0.0.1, as Heroku Redis presents: their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis.heroku.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "redis.key", directory / "redis.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


@pytest.fixture
def tls_redis(tmp_path):
    """A redis-server of the test's own that speaks only TLS, with a self-signed certificate: its rediss:// URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        services.unavailable("no redis-server binary")
    key, cert = self_signed(tmp_path)
    port = services.free_port()
    process = services.start([
        binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--tls-cert-file", cert, "--tls-key-file", key, "--tls-auth-clients", "no",
    ], log=tmp_path / "redis.log")
    try:
        services.wait_for_port(port, process=process)
    except RuntimeError:
        log = (tmp_path / "redis.log").read_text()
        if "tls" in log.lower():
            services.unavailable(f"redis-server without TLS support: {log[-300:]}")
        raise
    yield f"rediss://127.0.0.1:{port}/0"
    services.stop(process)


def test_rediss_with_a_self_signed_certificate_serves_limits_cache_and_jobs(start_gateway, httpbin_url, tls_redis, tmp_path):
    routes = tmp_path / "gateway.yaml"
    routes.write_text(ROUTES.format(httpbin=httpbin_url))
    env = {
        "REDIS_URL": tls_redis,
        "GATEWAY_KEY_PREFIX": services.unique("tls"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.sqlite'}",
        "GATEWAY_CONFIG": str(routes),
    }
    migrate(env)
    gateway = start_gateway(routes.read_text(), workers=1, **env)
    worker = services.start(
        [CELERY, "-A", "tasks", "worker", "--loglevel", "INFO", "--concurrency", "1", "--hostname", f"{services.unique('tls')}@%h"],
        env=env,
        log=tmp_path / "worker.log",
    )
    try:
        assert requests.get(f"{gateway.url}/readyz", timeout=5).json()["checks"]["redis"] == "ok"
        remaining = [requests.get(f"{gateway.url}/limited/get", timeout=5).headers.get("X-RateLimit-Remaining") for _ in range(3)]
        assert remaining == ["4", "3", "2"]  # counted in Redis, over TLS
        statuses = [requests.get(f"{gateway.url}/cached/get", timeout=5).headers["Cache-Status"] for _ in range(2)]
        assert statuses[0].endswith("fwd=miss; stored") and "; hit" in statuses[1]

        accepted = requests.get(f"{gateway.url}/async/get?via=rediss", timeout=5)
        assert accepted.status_code == 202
        deadline = time.monotonic() + 30
        while (job := requests.get(accepted.headers["Location"], timeout=5).json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, f"the job did not end: {job}\\n{(tmp_path / 'worker.log').read_text()[-2000:]}"
            time.sleep(0.2)
        assert job["status"] == "succeeded"
    finally:
        services.stop(worker)
