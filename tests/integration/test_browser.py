"""The gateway in a real headless Chromium (Debian's ``chromium``, driven by Selenium through
Debian's ``chromium-driver``; nothing is downloaded), against gunicorn, with the network to
anything but this machine's loopback cut: every name but 127.0.0.1 fails to resolve and every
other address goes to a proxy that refuses."""
from __future__ import annotations

import shutil

import pytest
import requests

from tests import services

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
# Chromium's switches for a page that can reach loopback and nothing else.
OFFLINE = (
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",  # loopback bypasses the proxy; anything else is refused
)


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium through Selenium, offline but for loopback."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        services.unavailable("no chromium or chromedriver (Debian packages chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for switch in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,2000", *OFFLINE):
        options.add_argument(switch)
    session = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    session.set_page_load_timeout(30)
    yield session
    session.quit()


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
