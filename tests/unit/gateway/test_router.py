"""Route match: longest prefix on segment boundaries, {param} segments, methods, strip_prefix."""
from __future__ import annotations

import pytest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from app.gateway.routefile import Route
from app.gateway.router import Router


def handler_named(name: str):
    def handle(req):  # pragma: no cover - never called: the tests only check which one is picked
        raise AssertionError(name)

    handle.__name__ = name
    return handle


def router(*routes: dict) -> Router:
    """A Router over ``routes`` (Route fields); each route's handler is named after its path."""
    built = []
    for fields in routes:
        route = Route(upstream="svc", **fields)
        built.append((route, handler_named(fields.get("name", route.path))))
    return Router(built)


def picked(r: Router, path: str, method: str = "GET", raw_path: str | None = None) -> str:
    return r.match(method, path, raw_path).handler.__name__


def test_the_longest_prefix_wins_whatever_the_order():
    r = router({"path": "/api"}, {"path": "/api/users"}, {"path": "/api/users/admins"})

    assert picked(r, "/api/users/7") == "/api/users"
    assert picked(r, "/api/users/admins/1") == "/api/users/admins"
    assert picked(r, "/api/orders") == "/api"
    assert picked(r, "/api") == "/api"


@pytest.mark.parametrize("path", ["/users", "/users/", "/users/7", "/users/7/posts"])
def test_a_route_matches_itself_and_everything_below(path):
    assert picked(router({"path": "/users"}), path) == "/users"


@pytest.mark.parametrize("path", ["/usersx", "/user", "/api/users", "/"])
def test_a_prefix_only_matches_on_a_segment_boundary(path):
    with pytest.raises(NotFound) as caught:
        router({"path": "/users"}).match("GET", path)

    assert caught.value.code == 404


def test_parameters_are_captured_by_name():
    match = router({"path": "/orgs/{org}/users/{user_id}"}).match("GET", "/orgs/acme/users/42/avatar")

    assert match.params == {"org": "acme", "user_id": "42"}


def test_a_parameter_needs_a_non_empty_segment():
    with pytest.raises(NotFound):
        router({"path": "/users/{id}/posts"}).match("GET", "/users//posts")


@pytest.mark.parametrize("order", [1, -1])
def test_a_literal_segment_beats_a_parameter_at_equal_length(order):
    r = router(*[{"path": "/users/{id}"}, {"path": "/users/me"}][::order])

    assert picked(r, "/users/me") == "/users/me"
    assert picked(r, "/users/me/settings") == "/users/me"
    assert picked(r, "/users/42") == "/users/{id}"


def test_a_method_the_route_lacks_answers_405_with_the_allowed_methods():
    r = router({"path": "/a", "methods": ["GET", "POST"]})

    with pytest.raises(MethodNotAllowed) as caught:
        r.match("DELETE", "/a/1")

    assert caught.value.code == 405
    assert caught.value.valid_methods == ["GET", "HEAD", "POST"]
    assert dict(caught.value.get_headers())["Allow"] == "GET, HEAD, POST"


def test_a_method_restriction_cannot_be_bypassed_through_a_broader_route():
    r = router({"path": "/"}, {"path": "/admin", "methods": ["GET"]})

    with pytest.raises(MethodNotAllowed):
        r.match("POST", "/admin/users")
    assert picked(r, "/public", "POST") == "/"


def test_routes_on_one_path_split_its_methods():
    r = router({"path": "/a", "methods": ["GET"], "name": "reader"}, {"path": "/a", "methods": ["POST"], "name": "writer"})

    assert picked(r, "/a", "GET") == "reader"
    assert picked(r, "/a", "POST") == "writer"
    with pytest.raises(MethodNotAllowed) as caught:
        r.match("PUT", "/a")
    assert caught.value.valid_methods == ["GET", "HEAD", "POST"]


def test_head_is_allowed_wherever_get_is():
    r = router({"path": "/read", "methods": ["GET"]}, {"path": "/write", "methods": ["POST"]})

    assert picked(r, "/read", "HEAD") == "/read"
    with pytest.raises(MethodNotAllowed):
        r.match("HEAD", "/write")


def test_a_route_without_methods_takes_every_method():
    r = router({"path": "/a"})

    for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]:
        assert picked(r, "/a", method) == "/a"


def test_without_strip_prefix_the_upstream_gets_the_whole_path():
    assert router({"path": "/api"}).match("GET", "/api/users/7").upstream_path == "/api/users/7"


@pytest.mark.parametrize(
    ("path", "upstream_path"),
    [("/api/users/7", "/users/7"), ("/api", "/"), ("/api/", "/"), ("/api/users/", "/users/")],
)
def test_strip_prefix_sends_the_rest_of_the_path(path, upstream_path):
    assert router({"path": "/api", "strip_prefix": True}).match("GET", path).upstream_path == upstream_path


def test_strip_prefix_removes_parameter_segments_too():
    match = router({"path": "/t/{tenant}", "strip_prefix": True}).match("GET", "/t/acme/orders/1")

    assert match.upstream_path == "/orders/1"
    assert match.params == {"tenant": "acme"}


def test_the_upstream_path_keeps_the_clients_percent_encoding():
    r = router({"path": "/api", "strip_prefix": True}, {"path": "/raw"})

    assert r.match("GET", "/api/a b/c/d", "/api/a%20b/c%2Fd").upstream_path == "/a%20b/c%2Fd"
    assert r.match("GET", "/api/x", "/%61pi/x").upstream_path == "/x"
    assert r.match("GET", "/raw/a b", "/raw/a%20b").upstream_path == "/raw/a%20b"


def test_an_encoded_slash_in_the_prefix_does_not_lose_the_rest_of_the_path():
    r = router({"path": "/a/b", "strip_prefix": True})

    try:
        match = r.match("GET", "/a/b/c", "/a%2Fb/c")
    except NotFound:
        return  # also acceptable: %2F is not a segment separator, so the route does not match
    assert match.upstream_path == "/c"


def test_nothing_matching_is_404():
    r = router({"path": "/a"}, {"path": "/b/{id}"})

    with pytest.raises(NotFound):
        r.match("GET", "/c")
    with pytest.raises(NotFound):
        r.match("GET", "/b")


def test_a_root_route_catches_every_path_it_is_not_outdone_on():
    r = router({"path": "/"}, {"path": "/api"})

    assert picked(r, "/") == "/"
    assert picked(r, "/anything/deep/down") == "/"
    assert picked(r, "/api/x") == "/api"
    assert r.match("GET", "/anything/deep", "/anything/deep").upstream_path == "/anything/deep"


def test_strip_prefix_on_the_root_route_keeps_the_path():
    assert router({"path": "/", "strip_prefix": True}).match("GET", "/x/y").upstream_path == "/x/y"


def test_the_match_carries_the_route():
    match = router({"path": "/a", "name": "alpha"}).match("GET", "/a")

    assert match.route.label == "alpha"


def canary_router() -> Router:
    return router(
        {"path": "/api", "name": "stable"},
        {"path": "/api", "name": "v2", "match_headers": {"X-Version": "v2"}},
        {"path": "/api", "name": "v2-beta", "match_headers": {"X-Version": "v2", "X-Beta": "1"}},
    )


def test_a_route_with_match_headers_takes_only_requests_that_carry_them():
    r = canary_router()

    assert r.match("GET", "/api/x", headers={"X-Version": "v2"}).handler.__name__ == "v2"
    assert r.match("GET", "/api/x", headers={"X-Version": "v2", "X-Beta": "1"}).handler.__name__ == "v2-beta"
    assert r.match("GET", "/api/x", headers={"X-Version": "v3"}).handler.__name__ == "stable"
    assert r.match("GET", "/api/x").handler.__name__ == "stable"


def test_without_a_route_lacking_conditions_unmet_headers_are_a_404():
    r = router({"path": "/api", "name": "v2", "match_headers": {"X-Version": "v2"}})

    with pytest.raises(NotFound):
        r.match("GET", "/api/x", headers={"X-Version": "v1"})
