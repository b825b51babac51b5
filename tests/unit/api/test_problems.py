"""``/_gateway/problems/{slug}``: the ``type`` of every problem the gateway answers with is a
page saying what it means (RFC 9457 section 3.1.1)."""
from __future__ import annotations

import re

import pytest

from app.api.problems import catalog
from tests.services import ROOT


def test_the_type_of_a_problem_answer_resolves_to_its_page(client):
    refused = client.get("/_gateway/keys")
    assert refused.status_code == 401
    page = client.get(refused.json["type"])
    assert page.status_code == 200
    assert page.content_type == "text/html; charset=utf-8"
    text = page.get_data(as_text=True)
    assert "Unauthorized" in text and "401" in text and "credentials missing or not valid" in text
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_every_problem_type_has_a_page_that_says_what_causes_it(client):
    problems = catalog()
    assert {"rate-limited", "breaker-open", "cors-origin-refused", "internal-error", "job-final"} <= set(problems)
    for slug, problem in problems.items():
        if not problem.__module__.startswith("app"):
            continue  # a problem a test defines (test_errors.py's out-of-stock)
        page = client.get(f"/_gateway/problems/{slug}")
        assert page.status_code == 200, slug
        text = page.get_data(as_text=True)
        assert f"<strong>{problem.status}</strong>" in text, slug
        description = re.search(r"</p>\n<p>(.+)</p>\n<p><a", text)
        assert description and len(description.group(1)) > 20, (slug, text)


def test_every_problem_type_the_readme_names_resolves(client):
    named = set(re.findall(r"/_gateway/problems/([a-z-]+)", (ROOT / "README.md").read_text()))
    assert len(named) >= 25
    assert {slug: client.get(f"/_gateway/problems/{slug}").status_code for slug in named} == dict.fromkeys(named, 200)


def test_the_index_links_every_page(client):
    index = client.get("/_gateway/problems").get_data(as_text=True)
    assert set(re.findall(r'href="/_gateway/problems/([a-z-]+)"', index)) == set(catalog())


@pytest.mark.parametrize("slug", ["no-such-problem", "about:blank"])
def test_a_type_the_gateway_never_answers_with_is_a_404(client, slug):
    response = client.get(f"/_gateway/problems/{slug}")
    assert response.status_code == 404
    assert response.content_type == "application/problem+json"
