"""The portal in a real headless Chromium (Selenium, Debian's ``chromium``; the network cut but for
loopback) against the gateway under gunicorn with a Celery worker and beat on Redis: what a
consumer and an operator do, and what one consumer cannot do to another's data.

Each page is saved as a screenshot under the test's temporary directory (``portal-*.png``).
"""
from __future__ import annotations

import re

import pytest
import requests

from tests import services
from tests.conftest import delete_keys
from tests.integration.test_webhooks import ROUTES as WEBHOOK_ROUTES
from tests.integration.test_webhooks import (  # noqa: F401 - the receiver fixture's parts
    built_stack,
    make_receiver,
    receiver,
)

pytestmark = [pytest.mark.slow, pytest.mark.redis]

PORTAL = "/_gateway/portal"
ROUTES = WEBHOOK_ROUTES + """\
  - path: /bin
    name: bin
    upstream: httpbin
    strip_prefix: true
"""
# One retry: a delivery to a failing receiver is failed after two attempts, ready to redeliver.
EXTRA = {"GATEWAY_WEBHOOK_RETRY_SCHEDULE": "[0.5]", "GATEWAY_CONTROL_SYNC_INTERVAL": "0.2", "GATEWAY_RATELIMIT_DEFAULT": "10000/hour"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, start_gateway, httpbin_url, redis_url):
    """The gateway (two gunicorn workers), a worker and beat on Redis, with consumers ``alice``,
    ``bob`` and the operator ``root`` (admin scope): ``stack.keys[name]``."""
    prefix = services.unique("test")
    values = {"redis_url": redis_url, "key_prefix": prefix}
    try:
        with built_stack("redis", EXTRA, tmp_path_factory.mktemp("portal"), start_gateway, httpbin_url, values.__getitem__, ROUTES) as built:
            built.beat_process = built.beat()
            built.worker_process = built.worker()
            built.until(lambda: " ready." in built.worker_process.text(), 60, "the worker ready")
            built.keys = {
                "alice": built.identity.key(built.identity.consumer("alice")),
                "bob": built.identity.key(built.identity.consumer("bob")),
                "root": built.identity.key(built.identity.consumer("root"), scopes=("admin",)),
            }
            yield built
    finally:
        delete_keys(redis_url, prefix)


class Portal:
    """The browser on the portal: pages by path, forms filled and sent as a user does."""

    def __init__(self, browser, base: str, shots):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.browser, self.base, self.shots = browser, base, shots
        self.by, self.wait_class = By, WebDriverWait

    def open(self, path: str) -> None:
        self.browser.get(f"{self.base}{PORTAL}{path}")

    def find(self, css: str):
        return self.browser.find_element(self.by.CSS_SELECTOR, css)

    def all(self, css: str) -> list:
        return self.browser.find_elements(self.by.CSS_SELECTOR, css)

    def text(self) -> str:
        return self.find("main").text

    def until(self, predicate, timeout: float = 20, what: str = ""):
        """Wait for ``predicate``; an element htmx swapped out while it was read is read again."""
        from selenium.common.exceptions import StaleElementReferenceException

        waiting = self.wait_class(self.browser, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))
        return waiting.until(lambda _: predicate(), what)

    def shot(self, name: str) -> None:
        self.browser.save_screenshot(str(self.shots / f"portal-{name}.png"))

    def submit(self, button_text: str, scope: str = "main") -> None:
        """Click the button labelled ``button_text`` (the first one in ``scope``) and wait for
        the page its form leads to."""
        buttons = [b for b in self.all(f"{scope} button") if b.text == button_text]
        assert buttons, f"no button {button_text!r} on {self.browser.current_url}"
        self.mark()
        buttons[0].click()
        self.loaded(f"the answer to {button_text!r}")

    def loaded(self, what: str) -> None:
        """Wait until the marked page has been replaced by another, loaded."""
        self.until(lambda: not self.still_marked() and self.browser.execute_script("return document.readyState") == "complete", what=what)

    def sign_in(self, key: str) -> None:
        self.open("/sign-in")
        self.find("#credential").send_keys(key)
        self.submit("Sign in")
        self.until(lambda: self.browser.current_url == f"{self.base}{PORTAL}/", what="the overview after signing in")

    def mark(self) -> None:
        """Tag the loaded document: ``still_marked`` is true until the browser loads another page."""
        self.browser.execute_script("window.__portal_mark = true;")

    def still_marked(self) -> bool:
        return self.browser.execute_script("return window.__portal_mark === true;")

    def post_form(self, action: str, fields: dict[str, str]) -> None:
        """Send a form that no page of the portal offers (a tampered URL, a missing token)."""
        script = """
        const form = document.createElement('form'); form.method = 'post'; form.action = arguments[0];
        for (const [name, value] of Object.entries(arguments[1])) {
          const input = document.createElement('input'); input.type = 'hidden'; input.name = name; input.value = value; form.appendChild(input);
        }
        document.body.appendChild(form); form.submit();"""
        self.mark()
        self.browser.execute_script(script, f"{self.base}{PORTAL}{action}", fields)
        self.loaded(f"the answer to {action}")


@pytest.fixture
def portal(browser, stack, tmp_path):
    browser.delete_all_cookies()
    return Portal(browser, stack.gateway.url, tmp_path)


# The delivery card whose text holds arguments[0], read in one script: htmx replaces the list
# every few seconds, so elements found in one call may be gone by the next.
CARD = "const card = [...document.querySelectorAll('article.delivery')].find(a => a.textContent.includes(arguments[0]));"


def delivery_of(portal: Portal, text: str) -> dict | None:
    """``{"header": ..., "codes": [status, ...]}`` of the delivery card mentioning ``text``."""
    return portal.browser.execute_script(
        CARD + "if (!card) return null; return {header: card.querySelector('header').textContent,"
        " codes: [...card.querySelectorAll('.attempts tbody td:nth-child(3)')].map(td => td.textContent.trim())};",
        text,
    )


def csrf_token(portal: Portal) -> str:
    return portal.find("input[name=csrf_token]").get_attribute("value")


@pytest.mark.timeout(180)
def test_a_consumer_signs_in_adds_an_endpoint_tests_it_and_redelivers_a_failed_event(portal, stack, receiver):  # noqa: F811
    from app.webhooks.messages import TEST_EVENT

    portal.open("/")
    assert "/sign-in" in portal.browser.current_url  # a signed-out browser is sent to sign in
    portal.shot("sign-in")
    portal.sign_in(stack.keys["alice"])
    assert stack.keys["alice"] not in portal.browser.page_source
    assert "alice" in portal.find("h1").text and portal.all("#limits tbody tr")
    portal.shot("overview")

    # An endpoint pointing at the receiver: its secret is shown once, on the page that made it.
    portal.open("/endpoints")
    portal.find("#url").send_keys(receiver.url("/portal"))
    portal.find("#description").send_keys("orders service")
    portal.find("#event_types").send_keys("order.created webhook.test")
    portal.submit("Add endpoint")
    secret = portal.find("code.secret").text
    assert secret.startswith("whsec_")
    receiver.secrets["/portal"] = [secret]
    endpoint_id = re.search(r"ep_[A-Za-z0-9_-]+", portal.text()).group(0)
    portal.shot("endpoint")
    portal.open("/endpoints")
    assert receiver.url("/portal") in portal.text() and "healthy" in portal.text() and secret not in portal.browser.page_source
    portal.shot("endpoints")

    # A test event: its delivery and its 200 attempt are on the deliveries page it leads to.
    portal.open(f"/endpoints/{endpoint_id}")
    portal.submit("Send a test event")
    portal.until(lambda: "/deliveries" in portal.browser.current_url)
    first = delivery_of(portal, TEST_EVENT)
    assert "succeeded" in first["header"] and first["codes"] == ["200"]
    assert receiver.on("/portal")[0].verified

    # The receiver fails; an event published through the API shows up on the open page, with
    # its failed attempts, without the page being loaded again.
    receiver.answers["/portal"] = lambda n: 500
    portal.mark()
    published = requests.post(f"{stack.gateway.url}/_gateway/events", headers={"X-API-Key": stack.keys["alice"]},
                              json={"type": "order.created", "data": {"order": 7}}, timeout=10)
    assert published.status_code == 202, published.text
    message_id = published.json()["id"]
    portal.until(lambda: (card := delivery_of(portal, message_id)) is not None and "failed" in card["header"], 30, "the failed delivery on the page")
    assert portal.still_marked()
    assert delivery_of(portal, message_id)["codes"] == ["500", "500"]
    portal.shot("deliveries-failed")

    # Fixed, redelivered: the same message arrives and the page shows it succeeded.
    receiver.answers["/portal"] = lambda n: 200
    portal.mark()
    portal.browser.execute_script(CARD + "card.querySelector('button').click();", message_id)
    portal.loaded("the deliveries page after the redelivery")
    portal.until(lambda: "succeeded" in delivery_of(portal, message_id)["header"], 30, "the redelivered delivery succeeded")
    assert delivery_of(portal, message_id)["codes"] == ["500", "500", "200"]
    arrived = [seen for seen in receiver.on("/portal") if seen.webhook_id == message_id]
    assert [seen.answered for seen in arrived] == [500, 500, 200] and all(seen.verified for seen in arrived)
    portal.shot("deliveries-redelivered")

    # Filters: by event type and by status.
    portal.open(f"/endpoints/{endpoint_id}/deliveries?event_type={TEST_EVENT}")
    assert message_id not in portal.text() and TEST_EVENT in portal.text()
    portal.open(f"/endpoints/{endpoint_id}/deliveries?status=failed")
    assert "No deliveries match these filters" in portal.text()

    # Keys: one made on the page is shown once and works.
    portal.open("/keys")
    portal.find("#expires_in").send_keys("3600")
    portal.submit("Create key")
    new_key = portal.find("#new-key code.secret").text
    assert requests.get(f"{stack.gateway.url}/_gateway/keys", headers={"X-API-Key": new_key}, timeout=10).status_code == 200
    portal.shot("keys")


@pytest.mark.timeout(120)
def test_a_slow_job_goes_to_succeeded_on_its_page_and_its_result_opens(portal, stack):
    submitted = requests.get(f"{stack.gateway.url}/async/delay/3", headers={"X-API-Key": stack.keys["alice"]}, timeout=10)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]

    portal.sign_in(stack.keys["alice"])
    portal.open("/jobs")
    assert job_id in portal.text()
    portal.shot("jobs")
    portal.open(f"/jobs/{job_id}")
    assert portal.browser.execute_script("return document.getElementById('job-status').textContent") in ("notStarted", "running")
    portal.shot("job-running")
    portal.mark()
    portal.until(lambda: portal.find("#job-status").text == "succeeded", 30, "the job succeeded on its page")
    assert portal.still_marked()  # the status changed in place
    portal.shot("job-succeeded")

    portal.find("#result").click()
    portal.loaded("the job's result")
    assert portal.browser.current_url.endswith(f"/jobs/{job_id}/result")
    shown = portal.browser.find_element(portal.by.TAG_NAME, "body").text
    assert '"url"' in shown and "/delay/3" in shown  # httpbin's answer, as the upstream sent it
    portal.shot("job-result")


@pytest.mark.timeout(120)
def test_an_operator_holds_a_breaker_open_and_closes_it(portal, stack):
    portal.sign_in(stack.keys["root"])
    for path, name in (("/operator/routes", "routes"), ("/operator/cache", "cache"), ("/operator/consumers", "consumers")):
        portal.open(path)
        portal.shot(f"operator-{name}")
    portal.open("/operator/routes")
    assert re.search(r"[0-9a-f]{64}", portal.find("#digest").text)

    def proxied() -> int:
        return requests.get(f"{stack.gateway.url}/bin/get", timeout=10).status_code

    assert proxied() == 200
    portal.open("/operator/upstreams")
    portal.submit("Hold open", "#upstream-httpbin")
    assert "(held open)" in portal.find("#upstream-httpbin").text
    portal.shot("operator-upstreams")
    stack.until(lambda: {proxied() for _ in range(4)} == {503}, 10, "every gateway worker answering 503")

    portal.submit("Close", "#upstream-httpbin")
    assert "(held open)" not in portal.find("#upstream-httpbin").text
    stack.until(lambda: {proxied() for _ in range(4)} == {200}, 10, "every gateway worker answering 200 again")


@pytest.mark.timeout(120)
def test_a_consumer_cannot_reach_anothers_data_nor_post_without_the_token_or_signed_out(portal, stack, receiver):  # noqa: F811
    alice = {"X-API-Key": stack.keys["alice"]}
    endpoint = requests.post(f"{stack.gateway.url}/_gateway/webhooks/endpoints", headers=alice, json={"url": receiver.url("/theirs")}, timeout=10).json()
    requests.post(f"{stack.gateway.url}/_gateway/webhooks/endpoints/{endpoint['id']}/test", headers=alice, timeout=10)
    delivery = requests.get(f"{stack.gateway.url}/_gateway/webhooks/endpoints/{endpoint['id']}/deliveries", headers=alice, timeout=10).json()["data"][0]
    job = requests.get(f"{stack.gateway.url}/async/get", headers=alice, timeout=10).json()
    key_id = requests.get(f"{stack.gateway.url}/_gateway/keys", headers=alice, timeout=10).json()["data"][0]["id"]

    portal.sign_in(stack.keys["bob"])
    for path in (f"/endpoints/{endpoint['id']}", f"/endpoints/{endpoint['id']}/deliveries", f"/jobs/{job['id']}", f"/jobs/{job['id']}/result"):
        portal.open(path)
        assert portal.find("h1").text == "Not Found", path
    portal.shot("not-found")
    portal.open("/endpoints")
    assert endpoint["id"] not in portal.text()
    token = csrf_token(portal)
    for action in (f"/endpoints/{endpoint['id']}/secret", f"/endpoints/{endpoint['id']}/state", f"/deliveries/{delivery['id']}/redeliver",
                   f"/jobs/{job['id']}/cancel", f"/keys/{key_id}/revoke"):
        portal.post_form(action, {"csrf_token": token, "disabled": "1"})
        assert portal.find("h1").text == "Not Found", action
        assert "whsec_" not in portal.browser.page_source
    after = requests.get(f"{stack.gateway.url}/_gateway/webhooks/endpoints/{endpoint['id']}", headers=alice, timeout=10).json()
    assert after["disabled"] is False
    assert requests.get(f"{stack.gateway.url}/_gateway/keys", headers=alice, timeout=10).status_code == 200

    # Without the token, the form is refused and nothing is made.
    portal.open("/keys")
    before = len(portal.all("#keys tbody tr"))
    portal.post_form("/keys", {"scopes": ""})
    assert portal.find("h1").text == "Forbidden" and "CSRF token" in portal.text()
    portal.shot("csrf-refused")
    portal.open("/keys")
    assert len(portal.all("#keys tbody tr")) == before

    # Signed out: the pages send the browser to sign in, and a form from before is refused.
    token = csrf_token(portal)
    portal.submit("Sign out", "header")
    portal.until(lambda: "/sign-in" in portal.browser.current_url)
    portal.open("/keys")
    assert "/sign-in" in portal.browser.current_url
    portal.post_form("/keys", {"csrf_token": token, "scopes": ""})
    assert portal.find("h1").text == "Unauthorized"
    portal.shot("signed-out")
