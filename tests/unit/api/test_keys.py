"""``/_gateway/keys``: each consumer sees and manages only its own keys; a key is shown once."""
from __future__ import annotations

import base64
import json

import pytest

from tests.unit.api.support import all_pages, auth


def create_key(client, headers: dict[str, str], **body: object) -> dict:
    response = client.post("/_gateway/keys", json=body, headers=headers)
    assert response.status_code == 201, response.json
    return response.json


@pytest.fixture
def two_consumers(client, identity, admin):
    """Consumers ``a`` (two keys) and ``b`` (one key), made by the admin: {name: [key json, ...]}."""
    identity.consumer("a")
    identity.consumer("b")
    return {
        "a": [create_key(client, admin, consumer="a", scopes=["orders:read"]), create_key(client, admin, consumer="a")],
        "b": [create_key(client, admin, consumer="b")],
    }


def test_a_consumer_lists_only_its_own_keys(client, two_consumers):
    a1, a2 = two_consumers["a"]

    response = client.get("/_gateway/keys", headers=auth(a1["key"]))

    assert response.status_code == 200
    assert {row["id"] for row in response.json["data"]} == {a1["id"], a2["id"]}
    assert response.json["next_cursor"] is None


@pytest.mark.parametrize(("method", "suffix"), [("get", ""), ("delete", ""), ("post", "/rotate")])
def test_another_consumers_key_id_answers_like_a_missing_one(client, two_consumers, method, suffix):
    a_key = two_consumers["a"][0]["key"]
    b_row = two_consumers["b"][0]
    call = getattr(client, method)

    theirs = call(f"/_gateway/keys/{b_row['id']}{suffix}", headers=auth(a_key))
    missing = call(f"/_gateway/keys/key_doesnotexist{suffix}", headers=auth(a_key))

    assert (theirs.status_code, missing.status_code) == (404, 404)
    assert theirs.json["title"] == missing.json["title"] == "Not Found"
    assert theirs.json["detail"].replace(b_row["id"], "ID") == missing.json["detail"].replace("key_doesnotexist", "ID")
    still = client.get(f"/_gateway/keys/{b_row['id']}", headers=auth(b_row["key"]))
    assert still.status_code == 200
    assert still.json["status"] == "active"
    assert len(client.get("/_gateway/keys", headers=auth(b_row["key"])).json["data"]) == 1


def test_a_missing_key_is_a_404_that_names_the_key(client, admin):
    response = client.get("/_gateway/keys/key_doesnotexist", headers=admin)

    assert response.status_code == 404
    assert response.json["detail"] == "No key 'key_doesnotexist'"


def test_a_consumer_cannot_create_keys_for_another(client, two_consumers):
    a_key = two_consumers["a"][0]["key"]

    response = client.post("/_gateway/keys", json={"consumer": "b"}, headers=auth(a_key))

    assert response.status_code == 403
    assert response.json["detail"] == "Only a caller with the admin scope may create keys for another consumer"
    assert len(client.get("/_gateway/keys", headers=auth(two_consumers["b"][0]["key"])).json["data"]) == 1


def test_a_consumer_cannot_grant_scopes_it_lacks(client, two_consumers):
    a_key = two_consumers["a"][0]["key"]  # holds orders:read

    response = client.post("/_gateway/keys", json={"scopes": ["orders:read", "admin"]}, headers=auth(a_key))

    assert response.status_code == 422
    assert response.json["errors"] == [
        {"field": "scopes", "message": "cannot grant scopes the caller does not hold: admin"}
    ]


def test_a_consumer_creates_a_key_for_itself_with_scopes_it_holds(client, two_consumers):
    a1 = two_consumers["a"][0]

    response = client.post("/_gateway/keys", json={"consumer": "a", "scopes": ["orders:read"]}, headers=auth(a1["key"]))

    assert response.status_code == 201
    assert response.json["consumer"] == a1["consumer"]
    assert response.json["scopes"] == ["orders:read"]
    assert response.headers["Location"] == f"http://localhost/_gateway/keys/{response.json['id']}"
    assert client.get("/_gateway/keys", headers=auth(response.json["key"])).status_code == 200


def test_an_admin_sees_every_key_and_can_filter_by_consumer(client, two_consumers, admin):
    a_ids = {row["id"] for row in two_consumers["a"]}
    b_ids = {row["id"] for row in two_consumers["b"]}
    a_consumer = two_consumers["a"][0]["consumer"]

    everything = client.get("/_gateway/keys", headers=admin)
    only_a = client.get(f"/_gateway/keys?consumer={a_consumer}", headers=admin)

    assert {row["id"] for row in everything.json["data"]} >= a_ids | b_ids
    assert {row["id"] for row in only_a.json["data"]} == a_ids
    assert client.get(f"/_gateway/keys/{two_consumers['b'][0]['id']}", headers=admin).status_code == 200


def test_a_created_key_has_its_expiry_and_location(client, identity, admin):
    identity.consumer("a")

    response = client.post("/_gateway/keys", json={"consumer": "a", "expires_in": 3600}, headers=admin)

    assert response.status_code == 201
    body = response.json
    assert body["status"] == "active"
    assert body["expires_at"] is not None
    assert body["expires_at"].endswith("Z")
    read = client.get(response.headers["Location"], headers=admin)
    assert read.status_code == 200
    assert {name: value for name, value in body.items() if name != "key"} == read.json


def test_the_key_is_shown_only_when_created_or_rotated(client, identity, admin):
    identity.consumer("a")
    created = create_key(client, admin, consumer="a")
    secret = created["key"]
    rotated = client.post(f"/_gateway/keys/{created['id']}/rotate", headers=admin)
    assert rotated.status_code == 201
    assert rotated.json["key"] != secret

    for response in (
        client.get(f"/_gateway/keys/{created['id']}", headers=admin),
        client.get("/_gateway/keys", headers=admin),
        client.get("/_gateway/keys", headers=auth(secret)),
        client.delete(f"/_gateway/keys/{created['id']}", headers=admin),
    ):
        assert response.status_code == 200
        text = response.get_data(as_text=True)
        assert secret not in text
        assert rotated.json["key"] not in text
        assert '"key":' not in text.replace(" ", "")


# --- rotation ---


def test_rotating_gives_a_new_key_and_both_work(client, identity, admin):
    identity.consumer("a")
    old = create_key(client, admin, consumer="a", scopes=["orders:read"])

    rotated = client.post(f"/_gateway/keys/{old['id']}/rotate", headers=auth(old["key"]))

    assert rotated.status_code == 201
    new = rotated.json
    assert new["id"] != old["id"]
    assert new["key"] != old["key"]
    assert (new["rotated_from"], new["consumer"], new["scopes"]) == (old["id"], old["consumer"], ["orders:read"])
    assert rotated.headers["Location"] == f"http://localhost/_gateway/keys/{new['id']}"
    for key in (old["key"], new["key"]):
        assert client.get(f"/_gateway/keys/{old['id']}", headers=auth(key)).status_code == 200


def test_rotating_with_expire_old_in_zero_retires_the_old_key_at_once(client, identity, admin):
    identity.consumer("a")
    old = create_key(client, admin, consumer="a")
    assert client.get("/_gateway/keys", headers=auth(old["key"])).status_code == 200  # cached

    rotated = client.post(f"/_gateway/keys/{old['id']}/rotate", json={"expire_old_in": 0}, headers=auth(old["key"]))

    assert rotated.status_code == 201
    assert client.get("/_gateway/keys", headers=auth(old["key"])).status_code == 401
    assert client.get("/_gateway/keys", headers=auth(rotated.json["key"])).status_code == 200
    assert client.get(f"/_gateway/keys/{old['id']}", headers=admin).json["status"] == "expired"


def test_rotating_a_revoked_key_is_a_409(client, identity, admin):
    identity.consumer("a")
    old = create_key(client, admin, consumer="a")
    assert client.delete(f"/_gateway/keys/{old['id']}", headers=admin).status_code == 200

    response = client.post(f"/_gateway/keys/{old['id']}/rotate", headers=admin)

    assert response.status_code == 409
    assert response.json["type"] == "/_gateway/problems/conflict"
    assert "revoked" in response.json["detail"]
    assert [row["id"] for row in client.get("/_gateway/keys?consumer=" + old["consumer"], headers=admin).json["data"]] == [old["id"]]


def test_revoking_is_idempotent(client, identity, admin):
    identity.consumer("a")
    old = create_key(client, admin, consumer="a")

    first = client.delete(f"/_gateway/keys/{old['id']}", headers=admin)
    second = client.delete(f"/_gateway/keys/{old['id']}", headers=admin)

    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json["revoked_at"] == second.json["revoked_at"] is not None


# --- pagination ---


@pytest.mark.parametrize("count", [4, 5])
def test_pages_cover_every_key_exactly_once(client, identity, admin, count):
    consumer = identity.consumer("a")
    ids = [create_key(client, admin, consumer="a")["id"] for _ in range(count)]

    pages = all_pages(client, f"/_gateway/keys?consumer={consumer}", admin, limit=2)

    assert [len(page) for page in pages] == [2] * (count // 2) + ([1] if count % 2 else [])
    seen = [row["id"] for page in pages for row in page]
    assert sorted(seen) == sorted(ids)


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=101", "limit=two", "cursor=not-a-cursor", "cursor=" + base64.urlsafe_b64encode(b"[1]").decode()],
)
def test_a_bad_limit_or_cursor_is_a_400(client, admin, query):
    response = client.get(f"/_gateway/keys?{query}", headers=admin)

    assert response.status_code == 400
    assert response.json["type"] == "/_gateway/problems/bad-request"


def test_a_cursor_with_a_naive_timestamp_is_a_400(client, admin):
    cursor = base64.urlsafe_b64encode(json.dumps(["2030-01-01T00:00:00", "key_x"]).encode()).decode().rstrip("=")

    response = client.get(f"/_gateway/keys?cursor={cursor}", headers=admin)

    assert response.status_code == 400


# --- request bodies ---


def test_an_unknown_field_is_a_422_that_names_it(client, admin):
    response = client.post("/_gateway/keys", json={"scopes": [], "colour": "blue"}, headers=admin)

    assert response.status_code == 422
    assert response.json["detail"] == "colour: Extra inputs are not permitted"
    assert response.json["errors"] == [{"field": "colour", "message": "Extra inputs are not permitted"}]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"expires_in": 0}, "expires_in"),
        ({"expires_in": "3600"}, "expires_in"),  # a number, not a string of one
        ({"scopes": "admin"}, "scopes"),
        ({"scopes": ["bad scope"]}, "scopes"),
    ],
)
def test_a_wrong_field_is_a_422_that_names_it(client, admin, body, field):
    response = client.post("/_gateway/keys", json=body, headers=admin)

    assert response.status_code == 422
    assert response.json["errors"][0]["field"] == field


def test_malformed_json_is_a_400(client, admin):
    response = client.post(
        "/_gateway/keys", data=b'{"scopes": [', headers={**admin, "Content-Type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json["detail"].startswith("The request body is not valid JSON: EOF while parsing")


def test_a_body_that_is_not_an_object_is_a_422(client, admin):
    response = client.post("/_gateway/keys", json=["admin"], headers=admin)

    assert response.status_code == 422
    assert response.json["detail"] == "The request body must be a JSON object"


@pytest.mark.parametrize(("method", "suffix"), [("delete", ""), ("post", "/rotate")])
def test_a_weaker_key_cannot_rotate_or_revoke_a_stronger_key_of_its_consumer(client, identity, method, suffix):
    strong = identity.key(identity.consumer("acme"), scopes=("admin", "orders:read"))
    weak = identity.key("acme", scopes=("orders:read",))
    listed = client.get("/_gateway/keys", headers=auth(weak)).json["data"]
    strong_id = next(row["id"] for row in listed if "admin" in row["scopes"])

    response = getattr(client, method)(f"/_gateway/keys/{strong_id}{suffix}", json={}, headers=auth(weak))

    assert response.status_code == 403
    assert response.json["type"] == "/_gateway/problems/insufficient-scope"
    assert "admin" in response.json["detail"]
    assert client.get("/_gateway/consumers", headers=auth(strong)).status_code == 200  # still valid
    assert len(client.get("/_gateway/keys", headers=auth(weak)).json["data"]) == 2  # nothing minted


def test_a_key_made_with_a_short_lived_key_expires_with_it(client, identity):
    parent = identity.key(identity.consumer("acme"), scopes=("orders:read",), expires_in=60)

    forever = create_key(client, auth(parent), scopes=["orders:read"])
    longer = create_key(client, auth(parent), scopes=["orders:read"], expires_in=3600)
    rotated = client.post(f"/_gateway/keys/{forever['id']}/rotate", json={}, headers=auth(parent)).json

    made = {forever["id"], longer["id"], rotated["id"]}
    listed = client.get("/_gateway/keys", headers=auth(parent)).json["data"]
    parent_row = next(row for row in listed if row["id"] not in made)
    assert forever["expires_at"] == longer["expires_at"] == rotated["expires_at"] == parent_row["expires_at"]


def test_an_admin_key_may_mint_keys_that_outlive_it(client, identity):
    admin_key = identity.key(identity.consumer("root"), scopes=("admin",), expires_in=60)

    made = create_key(client, auth(admin_key), scopes=["orders:read"])

    assert made["expires_at"] is None


def test_a_revoked_key_presented_again_is_not_marked_used(app, client, identity):
    key = identity.key(identity.consumer("acme"))
    listed = client.get("/_gateway/keys", headers=auth(key)).json["data"][0]
    client.delete(f"/_gateway/keys/{listed['id']}", headers=auth(key))
    with app.app_context():
        from app.extensions import db
        from app.models import ApiKey

        db.session.execute(db.update(ApiKey).values(last_used_at=None))
        db.session.commit()
    app.extensions["auth"].lookups.forget()

    assert client.get("/_gateway/keys", headers=auth(key)).status_code == 401
    with app.app_context():
        assert db.session.get(ApiKey, listed["id"]).last_used_at is None
