"""``/_gateway/consumers``: admin only; create, list, read, change plan or disable."""
from __future__ import annotations

import re

import pytest

from tests.factories import Identity
from tests.unit.api.support import all_pages, auth


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/_gateway/consumers"), ("post", "/_gateway/consumers"), ("get", "/_gateway/consumers/ID"),
     ("patch", "/_gateway/consumers/ID")],
)
def test_a_consumer_without_the_admin_scope_is_refused(client, identity, method, path):
    consumer = identity.consumer("a")
    key = identity.key(consumer, scopes=("orders:read",))

    response = getattr(client, method)(path.replace("ID", consumer), json={"disabled": True}, headers=auth(key))

    assert response.status_code == 403
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="frontdoor", error="insufficient_scope", scope="admin"'
    )
    assert client.get("/_gateway/keys", headers=auth(key)).status_code == 200  # still enabled


def test_an_anonymous_caller_is_a_401(client, identity):
    response = client.get("/_gateway/consumers")

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="frontdoor"'


def test_an_admin_creates_a_consumer(client, admin):
    response = client.post("/_gateway/consumers", json={"name": "acme", "plan": "pro"}, headers=admin)

    assert response.status_code == 201
    body = response.json
    assert re.fullmatch(r"con_[A-Za-z0-9_-]{22}", body["id"])
    assert (body["name"], body["plan"], body["disabled"]) == ("acme", "pro", False)
    assert response.headers["Location"] == f"http://localhost/_gateway/consumers/{body['id']}"
    read = client.get(response.headers["Location"], headers=admin)
    assert (read.status_code, read.json) == (200, body)


def test_a_taken_name_is_a_409(client, admin):
    client.post("/_gateway/consumers", json={"name": "acme"}, headers=admin)

    response = client.post("/_gateway/consumers", json={"name": "acme", "plan": "pro"}, headers=admin)

    assert response.status_code == 409
    assert response.json["detail"] == "a consumer named 'acme' already exists"
    names = [row["name"] for row in client.get("/_gateway/consumers", headers=admin).json["data"]]
    assert names.count("acme") == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [({"name": "has space"}, "name"), ({"name": ""}, "name"), ({}, "name"), ({"name": "a", "extra": 1}, "extra")],
)
def test_a_bad_consumer_is_a_422_naming_the_field(client, admin, body, field):
    response = client.post("/_gateway/consumers", json=body, headers=admin)

    assert response.status_code == 422
    assert response.json["errors"][0]["field"] == field


def test_a_plan_must_be_a_configured_one_when_plans_are_configured(make_app):
    app = make_app(RATELIMIT_PLANS={"free": "10/minute", "pro": "100/minute"})
    identity = Identity(app)
    admin = auth(identity.key(identity.consumer("root"), scopes=("admin",)))
    client = app.test_client()

    unknown = client.post("/_gateway/consumers", json={"name": "acme", "plan": "gold"}, headers=admin)
    known = client.post("/_gateway/consumers", json={"name": "acme", "plan": "pro"}, headers=admin)

    assert unknown.status_code == 422
    assert unknown.json["errors"][0]["field"] == "plan"
    assert "known plans: free, pro" in unknown.json["detail"]
    assert known.status_code == 201


def test_a_bad_plan_is_reported_against_plan_whatever_its_value(make_app):
    app = make_app(RATELIMIT_PLANS={"free": "10/minute"})
    identity = Identity(app)
    admin = auth(identity.key(identity.consumer("root"), scopes=("admin",)))

    response = app.test_client().post("/_gateway/consumers", json={"name": "acme", "plan": "surname"}, headers=admin)

    assert response.status_code == 422
    assert response.json["errors"][0]["field"] == "plan"


def test_an_admin_lists_every_consumer_page_by_page(client, identity, admin):
    ids = [identity.consumer(f"c{index}") for index in range(4)]

    pages = all_pages(client, "/_gateway/consumers", admin, limit=2)

    seen = [row["id"] for page in pages for row in page]
    assert len(seen) == len(set(seen)) == 5  # and the admin's own consumer, "root"
    assert set(ids) < set(seen)


def test_patch_changes_the_plan(client, identity, admin):
    consumer = identity.consumer("acme", plan="free")

    response = client.patch(f"/_gateway/consumers/{consumer}", json={"plan": "pro"}, headers=admin)

    assert response.status_code == 200
    assert (response.json["plan"], response.json["disabled"]) == ("pro", False)
    assert client.get(f"/_gateway/consumers/{consumer}", headers=admin).json["plan"] == "pro"


def test_patch_with_plan_null_clears_it_and_without_plan_keeps_it(client, identity, admin):
    kept = identity.consumer("kept", plan="free")
    cleared = identity.consumer("cleared", plan="free")

    client.patch(f"/_gateway/consumers/{kept}", json={"disabled": False}, headers=admin)
    client.patch(f"/_gateway/consumers/{cleared}", json={"plan": None}, headers=admin)

    assert client.get(f"/_gateway/consumers/{kept}", headers=admin).json["plan"] == "free"
    assert client.get(f"/_gateway/consumers/{cleared}", headers=admin).json["plan"] is None


def test_a_disabled_consumers_key_is_refused_at_once_and_enabled_again(client, identity, admin):
    consumer = identity.consumer("acme")
    key = identity.key(consumer)
    assert client.get("/_gateway/keys", headers=auth(key)).status_code == 200  # cached

    disabled = client.patch(f"/_gateway/consumers/{consumer}", json={"disabled": True}, headers=admin)

    assert disabled.status_code == 200
    assert disabled.json["disabled"] is True
    refused = client.get("/_gateway/keys", headers=auth(key))
    assert refused.status_code == 401
    assert refused.json["detail"] == "The credentials are not valid"
    client.patch(f"/_gateway/consumers/{consumer}", json={"disabled": False}, headers=admin)
    assert client.get("/_gateway/keys", headers=auth(key)).status_code == 200


@pytest.mark.parametrize("value", [0, 1, "true", "yes", None])
def test_disabled_must_be_a_json_boolean(client, identity, admin, value):
    consumer = identity.consumer("acme")

    response = client.patch(f"/_gateway/consumers/{consumer}", json={"disabled": value}, headers=admin)

    if value is None:  # null: the field is left as it is
        assert response.status_code == 200
    else:
        assert response.status_code == 422
        assert response.json["errors"][0] == {"field": "disabled", "message": "Input should be a valid boolean"}
    assert client.get(f"/_gateway/consumers/{consumer}", headers=admin).json["disabled"] is False


def test_an_unknown_consumer_is_a_404(client, admin):
    assert client.get("/_gateway/consumers/con_nothing", headers=admin).status_code == 404
    assert client.patch("/_gateway/consumers/con_nothing", json={"plan": "pro"}, headers=admin).status_code == 404
