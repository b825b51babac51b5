"""Signing a test client in to the portal as a browser does: the form, its token, the cookie."""
from __future__ import annotations

import re

PORTAL = "/_gateway/portal"
_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
_FORM_TOKEN = re.compile(r'id="form-token" name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token the page's forms carry."""
    found = _TOKEN.search(html)
    assert found is not None, "no form with a CSRF token on the page"
    return found.group(1)


def form_token(html: str) -> str:
    """The sign-in form's own token (the page may hold a session's too, in its sign-out form)."""
    found = _FORM_TOKEN.search(html)
    assert found is not None, "no sign-in form on the page"
    return found.group(1)


def sign_in(client, credential: str) -> str:
    """Sign ``client`` in with ``credential``; returns the session's CSRF token."""
    form = client.get(f"{PORTAL}/sign-in")
    answer = client.post(f"{PORTAL}/sign-in", data={"credential": credential, "csrf_token": form_token(form.text)})
    assert answer.status_code == 303, answer.text
    return csrf_of(client.get(f"{PORTAL}/").text)


def post(client, path: str, token: str, **fields: str):
    """A form POST as the page sends it (same origin, with the session's token)."""
    return client.post(f"{PORTAL}{path}", data={"csrf_token": token, **fields}, headers={"Sec-Fetch-Site": "same-origin"})
