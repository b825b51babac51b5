"""The gateway's own JSON is gzipped for a client that accepts it; the proxy's answers are the upstream's."""
from __future__ import annotations

import gzip
import json


def test_own_json_is_gzipped_when_the_client_accepts_it(client):
    plain = client.get("/_gateway/openapi.json")
    zipped = client.get("/_gateway/openapi.json", headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in plain.headers
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in zipped.headers["Vary"]
    assert int(zipped.headers["Content-Length"]) < len(plain.data) / 3
    assert json.loads(gzip.decompress(zipped.data)) == plain.json


def test_a_page_is_gzipped_too_and_a_small_answer_is_not(client):
    page = client.get("/_gateway/problems", headers={"Accept-Encoding": "gzip"})
    assert page.headers["Content-Encoding"] == "gzip"
    small = client.get("/_gateway/keys", headers={"Accept-Encoding": "gzip"})  # a 401 problem of < 500 bytes
    assert small.status_code == 401 and "Content-Encoding" not in small.headers
    assert small.json["status"] == 401
