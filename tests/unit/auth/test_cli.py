"""``flask consumers …`` and ``flask keys …``: what an operator types and what the gateway then does."""
from __future__ import annotations

import json
import re

import pytest


@pytest.fixture
def cli(runner, identity):
    """Run a ``flask`` command against the app's database (tables created): ``cli("keys", "list")``."""

    def invoke(*args: str):
        return runner.invoke(args=list(args))

    return invoke


def test_consumers_create_prints_the_new_id_and_list_shows_it(cli):
    created = cli("consumers", "create", "acme", "--plan", "pro")

    assert created.exit_code == 0, created.output
    assert re.fullmatch(r"con_[A-Za-z0-9_-]{22}\n", created.stdout)
    listed = cli("consumers", "list")
    assert listed.stdout == f"{created.stdout.strip()}\tacme\tpro\tenabled\n"


def test_consumers_create_refuses_a_taken_name(cli):
    cli("consumers", "create", "acme")

    again = cli("consumers", "create", "acme")

    assert again.exit_code != 0
    assert "a consumer named 'acme' already exists" in again.stderr
    assert again.stdout == ""


@pytest.mark.parametrize("name", ["has space", "acme\n"], ids=["space", "final-line-break"])
def test_consumers_create_refuses_a_bad_name(cli, name):
    result = cli("consumers", "create", name)

    assert result.exit_code != 0
    assert f"name {name!r} must be" in result.stderr
    assert "acme" not in cli("consumers", "list").stdout


def test_keys_create_prints_only_the_key_on_stdout_and_the_key_works(cli, client, upstream):
    consumer_id = cli("consumers", "create", "acme").stdout.strip()

    created = cli("keys", "create", "--consumer", "acme", "--scopes", "orders:read, orders:write")

    assert created.exit_code == 0, created.output
    [key] = created.stdout.splitlines()
    assert re.fullmatch(r"fd_live_[A-Za-z0-9]{40}", key)
    assert "for acme; the key is shown once" in created.stderr
    response = client.get("/orders", headers={"X-API-Key": key})
    assert response.status_code == 200
    seen = upstream.calls[-1].request.headers
    assert (seen["X-Consumer-ID"], seen["X-Consumer-Scopes"]) == (consumer_id, "orders:read orders:write")


def test_keys_create_for_an_unknown_consumer_fails(cli):
    result = cli("keys", "create", "--consumer", "nobody")

    assert result.exit_code != 0
    assert "no consumer has the id or name 'nobody'" in result.stderr
    assert result.stdout == ""


def test_keys_list_shows_the_prefix_never_the_key(cli):
    cli("consumers", "create", "acme")
    key = cli("keys", "create", "--consumer", "acme", "--scopes", "a,b").stdout.strip()

    listed = cli("keys", "list", "--consumer", "acme")

    assert listed.exit_code == 0
    [line] = listed.stdout.splitlines()
    key_id, prefix, consumer, status, scopes, expires = line.split("\t")
    assert key_id.startswith("key_")
    assert (prefix, consumer, status, scopes, expires) == (f"{key[:16]}…", "acme", "active", "a,b", "never")
    assert key not in listed.stdout


def test_keys_revoke_makes_the_key_refused_at_once_in_this_process(cli, client, upstream):
    cli("consumers", "create", "acme")
    key = cli("keys", "create", "--consumer", "acme").stdout.strip()
    assert client.get("/private", headers={"X-API-Key": key}).status_code == 200  # cached
    key_id = cli("keys", "list").stdout.split("\t")[0]

    revoked = cli("keys", "revoke", key_id)

    assert revoked.exit_code == 0
    assert revoked.stdout == f"revoked {key_id}\n"
    assert client.get("/private", headers={"X-API-Key": key}).status_code == 401
    assert "\trevoked\t" in cli("keys", "list").stdout


def test_keys_revoke_an_unknown_id_fails(cli):
    result = cli("keys", "revoke", "key_nothing")

    assert result.exit_code != 0
    assert "no key has the id 'key_nothing'" in result.stderr


def test_consumers_disable_refuses_its_keys_and_enable_lets_them_in_again(cli, client, upstream):
    cli("consumers", "create", "acme")
    key = cli("keys", "create", "--consumer", "acme").stdout.strip()
    assert client.get("/private", headers={"X-API-Key": key}).status_code == 200

    disabled = cli("consumers", "disable", "acme")
    assert disabled.exit_code == 0 and disabled.stdout.startswith("disabled con_")
    assert client.get("/private", headers={"X-API-Key": key}).status_code in (401, 403)
    assert cli("consumers", "list").stdout.rstrip().endswith("\tdisabled")

    assert cli("consumers", "enable", "acme").exit_code == 0
    assert client.get("/private", headers={"X-API-Key": key}).status_code == 200


def test_consumers_set_plan_takes_a_configured_plan_or_the_default_and_refuses_others(cli, app, monkeypatch):
    monkeypatch.setitem(app.config, "RATELIMIT_PLANS", {"pro": "100/minute"})
    consumer_id = cli("consumers", "create", "acme").stdout.strip()

    assert cli("consumers", "set-plan", "acme", "pro").stdout == f"{consumer_id}\tpro\n"
    assert cli("consumers", "list").stdout.split("\t")[2] == "pro"
    assert cli("consumers", "set-plan", "acme", "-").stdout == f"{consumer_id}\t-\n"
    refused = cli("consumers", "set-plan", "acme", "gold")
    assert refused.exit_code != 0 and "plan 'gold' is not configured" in refused.stderr and refused.stdout == ""


def test_keys_rotate_prints_only_the_new_key_which_works_with_the_same_scopes(cli, client, upstream):
    cli("consumers", "create", "acme")
    old = cli("keys", "create", "--consumer", "acme", "--scopes", "orders:read").stdout.strip()
    key_id = cli("keys", "list").stdout.split("\t")[0]

    rotated = cli("keys", "rotate", key_id, "--expire-old-in", "0")

    assert rotated.exit_code == 0, rotated.output
    [new] = rotated.stdout.splitlines()
    assert re.fullmatch(r"fd_live_[A-Za-z0-9]{40}", new) and new != old
    assert f"in place of {key_id}" in rotated.stderr
    assert client.get("/orders", headers={"X-API-Key": new}).status_code == 200
    assert upstream.calls[-1].request.headers["X-Consumer-Scopes"] == "orders:read"
    assert client.get("/private", headers={"X-API-Key": old}).status_code == 401  # expired at once
    assert cli("keys", "rotate", "key_nothing").exit_code != 0


def test_the_lists_give_json_for_scripts(cli):
    consumer_id = cli("consumers", "create", "acme").stdout.strip()
    cli("keys", "create", "--consumer", "acme", "--scopes", "a")

    consumers = json.loads(cli("consumers", "list", "--json").stdout)
    keys = json.loads(cli("keys", "list", "--json").stdout)

    assert [(c["id"], c["name"]) for c in consumers] == [(consumer_id, "acme")]
    assert [(k["consumer"], k["scopes"], k["status"]) for k in keys] == [(consumer_id, ["a"], "active")]
    assert all("key" not in k for k in keys)
