"""``flask consumers …`` and ``flask keys …``: what an operator types and what the gateway then does."""
from __future__ import annotations

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
