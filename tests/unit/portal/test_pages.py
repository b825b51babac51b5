"""The portal's pages through Flask's test client: sign-in and its cookie, CSRF and origin checks,
the security headers, each consumer's pages showing and changing only its own data, and the
operator's pages for admins only. The browser tests (tests/integration/test_portal.py) drive the
same pages in Chromium under gunicorn with a worker."""
from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from app.extensions import db
from app.models import PortalSession, WebhookEndpoint
from tests.conftest import DEMO_ROUTES
from tests.unit.api.support import auth
from tests.unit.api.test_webhooks import LOCAL, Reply, receiver  # noqa: F401 - the receiver fixture
from tests.unit.portal.support import PORTAL, csrf_of, form_token, post, sign_in

ROUTES = DEMO_ROUTES + """\
  - path: /orders
    upstream: demo
    rate_limit: 10/minute
"""


@pytest.fixture
def app(make_app):
    return make_app(routes=ROUTES, **LOCAL, RATELIMIT_DEFAULT="100/hour")


@pytest.fixture
def alice(identity) -> str:
    return identity.key(identity.consumer("alice"))


@pytest.fixture
def bob(identity) -> str:
    return identity.key(identity.consumer("bob"))


@pytest.fixture
def root(identity) -> str:
    return identity.key(identity.consumer("root"), scopes=("admin",))


def cookie(response, name: str) -> str:
    """The Set-Cookie field for ``name``."""
    found = [value for value in response.headers.getlist("Set-Cookie") if value.startswith(f"{name}=")]
    assert found, response.headers.getlist("Set-Cookie")
    return found[0]


# --- signing in and out -----------------------------------------------------------------------


def test_a_signed_out_browser_is_sent_to_the_sign_in_form_and_its_posts_are_refused(client, alice):
    page = client.get(f"{PORTAL}/keys")
    refused = client.post(f"{PORTAL}/keys", data={"scopes": ""})

    assert page.status_code == 303
    assert page.headers["Location"] == f"{PORTAL}/sign-in?next={PORTAL}/keys"
    assert refused.status_code == 401
    assert "Sign in to the portal first" in refused.text
    assert "text/html" in refused.headers["Content-Type"]


def test_signing_in_sets_an_http_only_lax_cookie_and_never_puts_the_key_in_a_page_or_url(client, alice):
    form = client.get(f"{PORTAL}/sign-in")
    answer = client.post(f"{PORTAL}/sign-in", data={"credential": alice, "csrf_token": csrf_of(form.text), "next": f"{PORTAL}/jobs"})

    assert answer.status_code == 303
    assert answer.headers["Location"] == f"{PORTAL}/jobs"
    session = cookie(answer, "frontdoor-portal")
    assert "HttpOnly" in session and "SameSite=Lax" in session and "Secure" not in session
    assert f"Path={PORTAL}/" in session
    assert alice not in session and alice not in answer.headers["Location"]
    for path in ("/", "/keys", "/jobs"):
        assert alice not in client.get(f"{PORTAL}{path}").text


def test_behind_https_the_cookie_is_secure_and_host_prefixed(make_app, identity):
    app = make_app(routes=ROUTES, **LOCAL, TRUSTED_PROXY_HOPS=1)
    key = key_in(app)
    client = app.test_client()
    https = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    form = client.get(f"{PORTAL}/sign-in", headers=https)
    answer = client.post(f"{PORTAL}/sign-in", data={"credential": key, "csrf_token": csrf_of(form.text)}, headers=https)

    session = cookie(answer, "__Host-frontdoor-portal")
    assert "Secure" in session and "HttpOnly" in session and "Path=/;" in session + ";"


def key_in(app) -> str:
    """A new consumer's key in ``app``'s database."""
    from tests.factories import Identity

    made = Identity(app)
    return made.key(made.consumer("carol"))


def test_a_jwt_signs_in_for_no_longer_than_it_lasts(make_app):
    import time

    import jwt

    from tests.factories import Identity

    secret = "a-shared-secret-long-enough-for-hs512-" + "x" * 32
    app = make_app(routes=ROUTES, **LOCAL, JWT_SECRET=secret)
    Identity(app).consumer("acme")
    client = app.test_client()
    token = jwt.encode({"sub": "acme", "exp": int(time.time() + 120), "scope": "orders:read"}, secret)

    form = client.get(f"{PORTAL}/sign-in")
    answer = client.post(f"{PORTAL}/sign-in", data={"credential": token, "csrf_token": form_token(form.text)})
    overview = client.get(f"{PORTAL}/")

    assert answer.status_code == 303
    assert 100 <= int(re.search(r"Max-Age=(\d+)", cookie(answer, "frontdoor-portal")).group(1)) <= 120
    assert overview.status_code == 200 and "<h1>acme</h1>" in overview.text
    assert "orders:read" in client.get(f"{PORTAL}/keys").text  # the scopes a key made here may have


def test_a_refused_credential_shows_the_form_again_with_a_401(client):
    form = client.get(f"{PORTAL}/sign-in")
    answer = client.post(f"{PORTAL}/sign-in", data={"credential": "fd_notakey", "csrf_token": csrf_of(form.text)})

    assert answer.status_code == 401
    assert "does not accept that key" in answer.text
    assert not [value for value in answer.headers.getlist("Set-Cookie") if value.startswith("frontdoor-portal=")]


def test_signing_in_again_ends_the_earlier_session(app, client, alice):
    sign_in(client, alice)
    first = client.get_cookie("frontdoor-portal", path=f"{PORTAL}/").value
    sign_in(client, alice)
    second = client.get_cookie("frontdoor-portal", path=f"{PORTAL}/").value

    assert first != second
    other = app.test_client()
    other.set_cookie("frontdoor-portal", first, path=f"{PORTAL}/")
    assert other.get(f"{PORTAL}/").status_code == 303
    with app.app_context():
        assert db.session.execute(select(db.func.count()).select_from(PortalSession)).scalar_one() == 1


def test_signing_out_ends_the_session_for_every_copy_of_its_cookie(app, client, alice):
    token = sign_in(client, alice)
    copied = client.get_cookie("frontdoor-portal", path=f"{PORTAL}/").value

    answer = post(client, "/sign-out", token)

    assert answer.status_code == 303
    thief = app.test_client()
    thief.set_cookie("frontdoor-portal", copied, path=f"{PORTAL}/")
    assert thief.get(f"{PORTAL}/keys").status_code == 303


def test_a_session_ends_with_its_lifetime(make_app):
    app = make_app(routes=ROUTES, **LOCAL, PORTAL_SESSION_LIFETIME=0.001)
    client = app.test_client()
    form = client.get(f"{PORTAL}/sign-in")
    client.post(f"{PORTAL}/sign-in", data={"credential": key_in(app), "csrf_token": csrf_of(form.text)})

    assert client.get(f"{PORTAL}/").status_code == 303


def test_revoking_the_key_a_session_signed_in_with_ends_the_session(client, alice):
    token = sign_in(client, alice)
    keys = client.get(f"{PORTAL}/keys").text
    key_id = re.search(r'<tr id="(key_[^"]+)"', keys).group(1)

    answer = post(client, f"/keys/{key_id}/revoke", token)

    assert answer.status_code == 303
    assert client.get(f"{PORTAL}/keys").status_code == 303


# --- CSRF, origin, headers --------------------------------------------------------------------


def test_a_form_posted_without_the_csrf_token_or_with_another_sessions_is_refused(app, client, alice, bob):
    sign_in(client, alice)
    other = app.test_client()
    bobs = sign_in(other, bob)

    missing = client.post(f"{PORTAL}/keys", data={"scopes": ""})
    foreign = post(client, "/keys", bobs)

    assert missing.status_code == foreign.status_code == 403
    assert "CSRF token" in missing.text
    assert "fd_" not in missing.text + foreign.text


def test_a_form_from_another_site_is_refused_even_with_the_token(client, alice):
    token = sign_in(client, alice)

    cross = client.post(f"{PORTAL}/keys", data={"csrf_token": token}, headers={"Sec-Fetch-Site": "cross-site"})
    origin = client.post(f"{PORTAL}/keys", data={"csrf_token": token}, headers={"Origin": "https://evil.example"})
    same = client.post(f"{PORTAL}/keys", data={"csrf_token": token}, headers={"Origin": "http://localhost"})

    assert cross.status_code == origin.status_code == 403
    assert same.status_code == 201


def test_the_sign_in_form_needs_its_own_token(client, alice):
    answer = client.post(f"{PORTAL}/sign-in", data={"credential": alice})

    assert answer.status_code == 403
    assert not client.get_cookie("frontdoor-portal", path=f"{PORTAL}/")


@pytest.mark.parametrize("path", ["/sign-in", "/", "/keys", "/endpoints", "/jobs"])
def test_pages_run_no_inline_script_and_refuse_framing(client, alice, path):
    if path != "/sign-in":
        sign_in(client, alice)

    page = client.get(f"{PORTAL}{path}")

    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Cache-Control"] == "no-store"
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page.text) == []
    assert " style=" not in page.text and "<style" not in page.text
    assert "Content-Encoding" not in page.headers


def test_htmx_is_served_by_the_gateway_with_its_version(client):
    script = client.get(f"{PORTAL}/static/htmx.min.js")
    text = script.text
    script.close()

    assert script.status_code == 200
    assert 'version:"2.0.11"' in text
    assert "max-age=86400" in script.headers["Cache-Control"]
    assert script.headers["ETag"]


# --- a consumer's pages -----------------------------------------------------------------------


def test_the_overview_shows_the_plan_and_what_is_left_of_each_limit(client, alice):
    for _ in range(3):
        client.get("/_gateway/keys", headers=auth(alice))
    sign_in(client, alice)

    page = client.get(f"{PORTAL}/").text

    assert "alice" in page
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td>\s*<td>([^<]+)</td>", page)
    by_policy = {row[0]: row for row in rows}
    assert by_policy["default"][2] == "100 per 1 hour"
    assert by_policy["default"][3] == "97"  # three API calls; the portal's pages count against the browser's address
    assert by_policy["route"][1] == "route /orders" and by_policy["route"][3] == "10"


def test_a_key_made_on_the_page_is_shown_once_and_works(client, alice):
    token = sign_in(client, alice)

    made = post(client, "/keys", token, scopes="", expires_in="3600")
    key = re.search(r'<code class="secret">(fd_[^<]+)</code>', made.text).group(1)

    assert made.status_code == 201
    assert client.get("/_gateway/keys", headers=auth(key)).status_code == 200
    assert key not in client.get(f"{PORTAL}/keys").text


def test_a_key_cannot_be_given_a_scope_its_maker_lacks(client, alice):
    token = sign_in(client, alice)

    refused = post(client, "/keys", token, scopes="admin")

    assert refused.status_code == 422
    assert "cannot grant scopes the caller does not hold: admin" in refused.text


def test_an_endpoint_made_on_the_page_shows_its_secret_once_then_on_request(client, alice, receiver):  # noqa: F811
    token = sign_in(client, alice)

    made = post(client, "/endpoints", token, url=receiver.url(), description="orders", event_types="order.created, order.paid")
    secret = re.search(r'<code class="secret">(whsec_[^<]+)</code>', made.text).group(1)
    endpoint_id = re.search(r"<code>(ep_[^<]+)</code>", made.text).group(1)

    assert made.status_code == 201
    shown = client.get(f"{PORTAL}/endpoints/{endpoint_id}").text
    assert secret not in shown and "order.created, order.paid" in shown
    assert secret in post(client, f"/endpoints/{endpoint_id}/secret", token).text
    rotated = post(client, f"/endpoints/{endpoint_id}/rotate-secret", token).text
    assert "The old secret signs too until" in rotated and secret not in rotated


def test_an_unsafe_url_is_named_on_the_form(client, alice):
    token = sign_in(client, alice)

    refused = post(client, "/endpoints", token, url="http://169.254.169.254/latest", description="")

    assert refused.status_code == 422
    assert "<strong>url</strong>" in refused.text


def test_a_test_event_and_its_attempt_appear_among_the_deliveries_filtered_by_type_and_status(client, alice, receiver):  # noqa: F811
    token = sign_in(client, alice)
    made = post(client, "/endpoints", token, url=receiver.url())
    endpoint_id = re.search(r"<code>(ep_[^<]+)</code>", made.text).group(1)

    sent = post(client, f"/endpoints/{endpoint_id}/test", token)
    listed = client.get(sent.headers["Location"]).text
    by_type = client.get(f"{PORTAL}/endpoints/{endpoint_id}/deliveries?event_type=order.created").text
    failed = client.get(f"{PORTAL}/endpoints/{endpoint_id}/deliveries?status=failed").text

    assert sent.status_code == 303
    assert "webhook.test" in listed and "<td>200</td>" in listed and 'data-live="no"' in listed
    assert "No deliveries match these filters" in by_type and "No deliveries match these filters" in failed
    assert len(receiver.seen) == 1


def test_disabling_an_endpoint_shows_why_and_enabling_clears_it(client, alice, receiver):  # noqa: F811
    token = sign_in(client, alice)
    endpoint_id = re.search(r"<code>(ep_[^<]+)</code>", post(client, "/endpoints", token, url=receiver.url()).text).group(1)

    post(client, f"/endpoints/{endpoint_id}/state", token, disabled="1")
    disabled = client.get(f"{PORTAL}/endpoints/{endpoint_id}").text
    post(client, f"/endpoints/{endpoint_id}/state", token)
    enabled = client.get(f"{PORTAL}/endpoints/{endpoint_id}").text

    assert "disabled by its consumer" in disabled
    assert "healthy" in enabled


def test_a_consumer_cannot_see_or_change_anothers_endpoint_key_or_deliveries_by_url(app, client, alice, bob, receiver):  # noqa: F811
    alices = sign_in(client, alice)
    endpoint_id = re.search(r"<code>(ep_[^<]+)</code>", post(client, "/endpoints", alices, url=receiver.url()).text).group(1)
    post(client, f"/endpoints/{endpoint_id}/test", alices)
    key_id = re.search(r'<tr id="(key_[^"]+)"', client.get(f"{PORTAL}/keys").text).group(1)
    delivery_id = re.search(r'<article class="delivery" id="(dlv_[^"]+)"', client.get(f"{PORTAL}/endpoints/{endpoint_id}/deliveries").text).group(1)
    mallory = app.test_client()
    bobs = sign_in(mallory, bob)

    reads = [mallory.get(f"{PORTAL}/endpoints/{endpoint_id}"), mallory.get(f"{PORTAL}/endpoints/{endpoint_id}/deliveries")]
    writes = [
        post(mallory, f"/endpoints/{endpoint_id}/secret", bobs),
        post(mallory, f"/endpoints/{endpoint_id}/state", bobs, disabled="1"),
        post(mallory, f"/endpoints/{endpoint_id}", bobs, url="http://127.0.0.1:9/stolen"),
        post(mallory, f"/keys/{key_id}/revoke", bobs),
        post(mallory, f"/deliveries/{delivery_id}/redeliver", bobs),
    ]

    assert [answer.status_code for answer in reads + writes] == [404] * 7
    assert all("whsec_" not in answer.text for answer in reads + writes)
    assert endpoint_id not in mallory.get(f"{PORTAL}/endpoints").text
    with app.app_context():
        endpoint = db.session.get(WebhookEndpoint, endpoint_id)
        assert (endpoint.url, endpoint.disabled) == (receiver.url(), False)
    assert client.get(f"{PORTAL}/keys").status_code == 200  # alice's key (and session) still stand


def test_a_job_is_seen_and_cancelled_by_its_owner_only(app, client, alice, bob):
    submitted = client.post("/_gateway/jobs", json={"request": {"path": "/demo/slow"}}, headers=auth(alice))
    job_id = submitted.json["id"]
    alices = sign_in(client, alice)
    mallory = app.test_client()
    bobs = sign_in(mallory, bob)

    listed = client.get(f"{PORTAL}/jobs?status=notStarted").text
    theirs = [mallory.get(f"{PORTAL}/jobs/{job_id}"), mallory.get(f"{PORTAL}/jobs/{job_id}/result"), post(mallory, f"/jobs/{job_id}/cancel", bobs)]
    early = client.get(f"{PORTAL}/jobs/{job_id}/result")
    cancelled = post(client, f"/jobs/{job_id}/cancel", alices)
    page = client.get(f"{PORTAL}/jobs/{job_id}").text

    assert submitted.status_code == 202 and job_id in listed
    assert [answer.status_code for answer in theirs] == [404, 404, 404]
    assert job_id not in mallory.get(f"{PORTAL}/jobs").text
    assert early.status_code == 409 and "available once it has succeeded" in early.text
    assert cancelled.status_code == 303
    assert 'data-status="canceled"' in page and "hx-trigger" not in page


# --- the operator's pages ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/operator/routes", "/operator/upstreams", "/operator/cache", "/operator/consumers"])
def test_operator_pages_need_the_admin_scope(client, alice, path):
    sign_in(client, alice)

    assert client.get(f"{PORTAL}{path}").status_code == 403


def test_an_operator_holds_a_breaker_open_and_a_proxied_call_answers_503_then_closes_it(client, root):
    token = sign_in(client, root)
    upstreams = client.get(f"{PORTAL}/operator/upstreams").text
    target = re.search(r'<tr id="target-([0-9a-f]{12})">', upstreams).group(1)

    held = post(client, f"/operator/upstreams/demo/targets/{target}/breaker/open", token)
    proxied = client.get("/demo/anything")
    closed = post(client, f"/operator/upstreams/demo/targets/{target}/breaker/close", token)

    assert held.status_code == 200 and "(held open)" in held.text and "breaker held open in this process" in held.text
    assert proxied.status_code == 503 and proxied.json["title"]
    assert closed.status_code == 200 and "(held open)" not in closed.text
    assert "(held open)" not in client.get(f"{PORTAL}/operator/upstreams").text


def test_the_routes_page_shows_the_digest_and_a_reload_says_whether_it_changed(app, client, root):
    token = sign_in(client, root)
    with app.app_context():
        digest = app.extensions["gateway"].digest

    page = client.get(f"{PORTAL}/operator/routes").text
    reloaded = post(client, "/operator/reload", token)

    assert digest in page and "<code>/orders</code>" in page
    assert reloaded.status_code == 200 and "the file had not changed" in reloaded.text


def test_an_operator_sets_a_consumers_plan_and_disables_it(app, client, root, alice):
    token = sign_in(client, root)
    page = client.get(f"{PORTAL}/operator/consumers").text
    alice_id = re.search(r'<tr id="(con_[^"]+)">\s*<td>alice</td>', page).group(1)

    answer = post(client, f"/operator/consumers/{alice_id}", token, plan="gold", disabled="1")

    assert answer.status_code == 303
    assert client.get("/_gateway/keys", headers=auth(alice)).status_code == 401


def test_a_cache_purge_needs_a_path_and_says_what_it_removed(client, root):
    token = sign_in(client, root)

    refused = post(client, "/operator/cache", token, by="prefix", value="users")
    purged = post(client, "/operator/cache", token, by="route", value="/orders")

    assert refused.status_code == 400 and "must be a path starting with" in refused.text
    assert purged.status_code == 200 and "0 stored items removed" in purged.text


def test_the_docs_page_links_every_portal_page(app, client):
    pages = sorted(
        rule.rule for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("portal.") and "GET" in rule.methods and not rule.arguments
    )

    docs = client.get("/_gateway/docs").text

    assert len(pages) >= 9
    assert [page for page in pages if f'href="{page}"' not in docs] == []
