"""The gateway in a real headless Chromium (Debian's ``chromium``, driven by Selenium through
Debian's ``chromium-driver``; nothing is downloaded), against gunicorn, with the network to
anything but this machine's loopback cut: every name but 127.0.0.1 fails to resolve and every
other address goes to a proxy that refuses."""
from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from cryptography.fernet import Fernet

from app import create_app
from tests.factories import Identity

pytestmark = pytest.mark.slow

ROUTES = """\
upstreams:
  httpbin:
    targets: ["{httpbin}"]
routes:
  - path: /httpbin
    upstream: httpbin
    strip_prefix: true
"""
@pytest.fixture(scope="module")
def gateway(start_gateway, httpbin_url):
    return start_gateway(ROUTES.format(httpbin=httpbin_url), workers=1)


def loaded_resources(browser) -> list[str]:
    return browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")


@pytest.mark.timeout(120)
def test_the_docs_page_lists_every_operation_with_the_network_cut(browser, gateway, tmp_path):
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    document = requests.get(f"{gateway.url}/_gateway/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.1")
    operations = [(path, method) for path, item in document["paths"].items() for method in item if method in {"get", "put", "post", "delete", "patch"}]

    # The network really is cut: a page from elsewhere does not load.
    with pytest.raises(WebDriverException, match="ERR_PROXY_CONNECTION_FAILED|ERR_NAME_NOT_RESOLVED"):
        browser.get("https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css")

    browser.get(f"{gateway.url}/_gateway/docs")
    shown = WebDriverWait(browser, 30).until(lambda b: (found := b.find_elements(By.CSS_SELECTOR, ".opblock")) and len(found) >= len(operations) and found)
    browser.save_screenshot(str(tmp_path / "docs.png"))
    # Each operation of the document is on the page, by its method and path.
    listed = {(block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"),
               block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text.lower()) for block in shown}
    assert listed == set(operations)
    assert "OpenAPI 3.1" in browser.page_source or "OAS 3.1" in browser.page_source
    # Everything the page loaded came from the gateway.
    resources = loaded_resources(browser)
    assert resources and all(url.startswith(gateway.url) for url in resources), resources
    assert browser.find_element(By.CSS_SELECTOR, ".info .title").text.startswith(document["info"]["title"])


# A page on another origin (another port of loopback) calling an ``auth: required`` route with
# an API key and a JSON body: the browser sends a preflight first, then the call, and shows what
# it could read of the answer.
PAGE_SCRIPT = """
const out = document.getElementById("out");
fetch(GATEWAY + "/orders/anything/7", {
  method: "POST",
  headers: {"X-API-Key": KEY, "Content-Type": "application/json"},
  body: JSON.stringify({order: 7}),
}).then(async (response) => {
  const body = await response.json();
  out.textContent = JSON.stringify({
    status: response.status, json: body.json, method: body.method,
    policy: response.headers.get("RateLimit-Policy"), request_id: response.headers.get("X-Request-ID"),
  });
}).catch((error) => { out.textContent = JSON.stringify({blocked: String(error)}); });
"""
CORS_ROUTES = """\
upstreams:
  httpbin:
    targets: ["{httpbin}"]
routes:
  - path: /orders
    upstream: httpbin
    strip_prefix: true
    auth: required
    rate_limit: 100/minute
    cors:
      origins: ["{page}"]
"""


class Site:
    """Static files served on loopback from ``root``, on a port of their own (an origin of their own)."""

    def __init__(self, root):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
        self.origin = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def write_page(root, gateway_url: str, key: str) -> None:
    """The page and its script (no inline script), calling ``gateway_url`` with ``key``."""
    root.mkdir(exist_ok=True)
    (root / "index.html").write_text('<!doctype html><meta charset="utf-8"><pre id="out">waiting</pre><script src="call.js"></script>')
    (root / "call.js").write_text(f"const GATEWAY = {json.dumps(gateway_url)}; const KEY = {json.dumps(key)};\n{PAGE_SCRIPT}")


@pytest.mark.timeout(120)
def test_a_page_on_another_origin_calls_an_authenticated_route_and_reads_the_answer(browser, start_gateway, httpbin_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for name in ("allowed", "other"):
        (tmp_path / name).mkdir()
    allowed, other = Site(tmp_path / "allowed"), Site(tmp_path / "other")
    try:
        route_file = tmp_path / "gateway.yaml"
        route_file.write_text(CORS_ROUTES.format(httpbin=httpbin_url, page=allowed.origin))
        database = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
        secret_key = Fernet.generate_key().decode()
        app = create_app({"CONFIG": str(route_file), "SQLALCHEMY_DATABASE_URI": database, "CELERY_BROKER_URL": "memory://", "WEBHOOK_SECRET_KEYS": secret_key})
        key = Identity(app).key()
        gateway = start_gateway(route_file.read_text(), workers=1, DATABASE_URL=database, GATEWAY_WEBHOOK_SECRET_KEYS=secret_key)
        for name in ("allowed", "other"):
            write_page(tmp_path / name, gateway.url, key)

        def shown(origin: str) -> dict:
            browser.get(f"{origin}/index.html")
            text = WebDriverWait(browser, 20).until(lambda b: (found := b.find_element(By.ID, "out").text) != "waiting" and found)
            browser.save_screenshot(str(tmp_path / f"cors-{origin.rsplit(':', 1)[1]}.png"))
            return json.loads(text)

        # The allowed page: the preflight passed, the call was authenticated and proxied, and
        # the page could read the body and the exposed fields.
        result = shown(allowed.origin)
        assert result["status"] == 200, result
        assert result["method"] == "POST" and result["json"] == {"order": 7}
        assert result["policy"] and result["request_id"]
        # The preflight was the gateway's: logged without a target, never sent upstream.
        lines = [line for line in gateway.log_lines() if line.get("msg") == "request" and line.get("path") == "/orders/anything/7"]
        assert [(line["method"], line["status"], line.get("target")) for line in lines] == [("OPTIONS", 204, None), ("POST", 200, httpbin_url)]

        # A page of another origin: the browser refuses it the answer.
        refused = shown(other.origin)
        assert "blocked" in refused, refused
        statuses = [(line["method"], line["status"]) for line in gateway.log_lines() if line.get("msg") == "request" and line.get("path") == "/orders/anything/7"]
        assert statuses[2:] == [("OPTIONS", 403)]  # refused at the preflight; the call was never made
    finally:
        allowed.close()
        other.close()
