"""The route file's identity keys: auth, scopes, forward_credentials and rate_limit, and their errors."""
from __future__ import annotations

import textwrap

import pytest

from app.gateway.routefile import RouteFileError, load
from app.identity import Policy


def write(tmp_path, text: str):
    path = tmp_path / "gateway.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def routes_with(route_lines: str) -> str:
    """A route file with one upstream and one route at /orders whose extra keys start on line 7."""
    return "upstreams:\n  backend:\n    targets: [\"http://upstream.test\"]\nroutes:\n  - path: /orders\n    upstream: backend\n" + textwrap.indent(textwrap.dedent(route_lines), "    ")


def test_auth_scopes_and_rate_limit_load_into_the_routes_policy(tmp_path):
    route_file = load(write(tmp_path, routes_with("""\
        auth: required
        scopes: [orders:read, orders:write]
        forward_credentials: true
        rate_limit: 10/second;600/minute
    """)))

    [route] = route_file.routes
    assert route.policy == Policy("required", frozenset({"orders:read", "orders:write"}))
    assert route.forward_credentials is True
    assert route.rate_limit == "10/second;600/minute"


def test_a_route_is_optional_auth_without_forwarded_credentials_by_default(tmp_path):
    [route] = load(write(tmp_path, routes_with(""))).routes

    assert route.policy == Policy("optional", frozenset())
    assert route.forward_credentials is False
    assert route.rate_limit is None


def test_rate_limit_none_turns_the_limit_off(tmp_path):
    [route] = load(write(tmp_path, routes_with("rate_limit: None\n"))).routes

    assert route.rate_limit == "none"


@pytest.mark.parametrize("auth", ["optional", "none"])
def test_scopes_without_auth_required_name_the_route_and_its_line(tmp_path, auth):
    path = write(tmp_path, routes_with(f"auth: {auth}\nscopes: [orders:read]\n"))

    with pytest.raises(RouteFileError) as caught:
        load(path)

    assert str(caught.value) == (
        f"{path}: routes[0] (line 5): scopes ['orders:read'] need 'auth: required' (auth is '{auth}')"
    )


def test_a_bad_rate_limit_names_the_key_and_its_line(tmp_path):
    path = write(tmp_path, routes_with("auth: required\nrate_limit: lots/minute\n"))

    with pytest.raises(RouteFileError) as caught:
        load(path)

    assert str(caught.value) == (
        f"{path}: routes[0].rate_limit (line 8): 'lots/minute' is not a rate limit such as '100/minute'"
        " or '10/second;1000/hour'"
    )


def test_an_unknown_auth_mode_names_the_key_and_its_line(tmp_path):
    path = write(tmp_path, routes_with("auth: sometimes\n"))

    with pytest.raises(RouteFileError, match=r"routes\[0\]\.auth \(line 7\): Input should be 'required', 'optional' or 'none'"):
        load(path)
