"""Helpers for the /_gateway API tests."""
from __future__ import annotations


def auth(key: str) -> dict[str, str]:
    """Headers that present ``key``."""
    return {"X-API-Key": key}


def all_pages(client, url: str, headers: dict[str, str], limit: int) -> list[list[dict]]:
    """Follow ``next_cursor`` from ``url`` until it is null; return each page's ``data``."""
    pages, cursor = [], None
    while True:
        query = f"limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        response = client.get(f"{url}{'&' if '?' in url else '?'}{query}", headers=headers)
        assert response.status_code == 200, response.json
        pages.append(response.json["data"])
        cursor = response.json["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50, "pagination does not end"


def problem(response, status: int, field: str | None = None) -> dict:
    """Assert ``response`` is a problem+json with ``status`` (naming ``field`` when given); return its body."""
    assert response.status_code == status, response.data
    assert response.headers["Content-Type"] == "application/problem+json"
    body = response.json
    assert body["status"] == status
    assert body["title"] and body["detail"]
    if field is not None:
        assert [error["field"] for error in body["errors"]] == [field]
        assert body["detail"].startswith(f"{field}: ")
    return body
