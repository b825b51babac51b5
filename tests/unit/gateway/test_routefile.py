"""The route file: what loads, ${VAR} interpolation, and the errors an operator is shown."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.gateway.routefile import RouteFileError, load

ROOT = Path(__file__).resolve().parents[3]

VALID = """\
upstreams:
  users:
    targets: ["http://127.0.0.1:5001/", "https://users.internal"]
    timeout: {connect: 0.5, read: 5}
    retries: {attempts: 3, backoff: 0.1, max_backoff: 2, statuses: [502, 503]}
    breaker: {fail_max: 2, reset_timeout: 10, failure_statuses: [500, 503]}
    max_concurrency: 4
routes:
  - path: /users/
    upstream: users
    strip_prefix: true
    max_body_size: 1024
  - path: /users/{id}/avatar
    name: avatar
    upstream: users
    methods: [GET, PUT]
"""


@pytest.fixture
def write(tmp_path):
    """Write YAML text to a file and return its path."""

    def write(text: str, name: str = "routes.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


def one_route(path: str = "/a", **route: str) -> str:
    extra = "".join(f"\n    {key}: {value}" for key, value in route.items())
    return f"""\
upstreams:
  svc:
    targets: ["http://127.0.0.1:5001"]
routes:
  - path: {path}
    upstream: svc{extra}
"""


def test_a_valid_file_loads_into_typed_settings(write):
    route_file = load(write(VALID), env={})

    users = route_file.upstreams["users"]
    assert users.targets == ("http://127.0.0.1:5001", "https://users.internal")  # trailing '/' dropped
    assert (users.timeout.connect, users.timeout.read) == (0.5, 5.0)
    assert (users.retries.attempts, users.retries.backoff, users.retries.max_backoff) == (3, 0.1, 2.0)
    assert users.retries.statuses == (502, 503)
    assert (users.breaker.fail_max, users.breaker.reset_timeout) == (2, 10.0)
    assert users.breaker.failure_statuses == (500, 503)
    assert users.max_concurrency == 4
    first, second = route_file.routes
    assert (first.path, first.label, first.strip_prefix, first.max_body_size, first.methods) == (
        "/users",
        "/users",
        True,
        1024,
        None,
    )
    assert (second.path, second.label, second.methods) == ("/users/{id}/avatar", "avatar", ("GET", "PUT"))


def test_omitted_settings_take_their_defaults(write):
    route_file = load(write(one_route()), env={})

    svc = route_file.upstreams["svc"]
    assert (svc.timeout.connect, svc.timeout.read) == (1.0, 25.0)
    assert svc.retries.attempts == 1
    assert (svc.breaker.fail_max, svc.breaker.reset_timeout) == (5, 30.0)
    assert svc.max_concurrency is None
    assert route_file.routes[0].max_body_size is None


def test_an_empty_file_has_no_routes(write):
    route_file = load(write(""), env={})

    assert route_file.upstreams == {}
    assert route_file.routes == ()


def test_variables_are_replaced_with_the_environment_or_their_default(write):
    path = write("""\
        upstreams:
          svc:
            targets: ["${SVC_URL}", "http://${SVC_HOST:-backup.internal}:${SVC_PORT:-8080}"]
            max_concurrency: ${SVC_MAX:-4}
        routes:
          - path: /a
            upstream: svc
            name: "${ROUTE_NAME:-}"
        """)

    route_file = load(path, env={"SVC_URL": "http://primary.internal:9000", "SVC_PORT": "", "SVC_MAX": "12"})

    svc = route_file.upstreams["svc"]
    # an empty variable counts as unset, as in the shell's ${VAR:-default}
    assert svc.targets == ("http://primary.internal:9000", "http://backup.internal:8080")
    assert svc.max_concurrency == 12
    assert route_file.routes[0].label == "/a"  # empty name falls back to the path


def test_a_variable_cannot_change_the_files_structure(write):
    path = write(one_route(name='"${ROUTE_NAME}"'))

    route_file = load(path, env={"ROUTE_NAME": "x\n    strip_prefix: true"})

    assert route_file.routes[0].label == "x\n    strip_prefix: true"
    assert route_file.routes[0].strip_prefix is False


def test_an_unset_variable_without_default_names_the_key_and_variable(write):
    path = write("""\
        upstreams:
          svc:
            targets: ["http://127.0.0.1:1", "${SVC_URL}"]
        routes: []
        """)

    with pytest.raises(RouteFileError) as caught:
        load(path, env={"OTHER": "1"})

    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "upstreams.svc.targets[1]" in message
    assert "SVC_URL is not set" in message


def test_the_process_environment_is_used_by_default(write, monkeypatch):
    monkeypatch.setenv("FRONTDOOR_TEST_TARGET", "http://from-env.internal")
    path = write("""\
        upstreams:
          svc: {targets: ["${FRONTDOOR_TEST_TARGET}"]}
        """)

    assert load(path).upstreams["svc"].targets == ("http://from-env.internal",)


UNDEFINED = "routes[1].upstream (line 8): names upstream 'orders', which is not defined (defined: svc)"


@pytest.mark.parametrize(
    ("path", "errors"),
    [
        ("/b", [UNDEFINED]),  # the fields are valid
        ("b", ["routes[1].path (line 7): must start with '/'", UNDEFINED]),  # not a later round
    ],
    ids=["alone", "with-a-field-error"],
)
def test_every_error_of_a_file_comes_at_once_each_with_its_key_and_line(write, path, errors):
    route_file = write(one_route() + f"  - path: {path}\n    upstream: orders\n")

    with pytest.raises(RouteFileError) as caught:
        load(route_file, env={})

    assert str(caught.value) == f"{route_file}: {'; '.join(errors)}"


def test_a_yaml_syntax_error_names_the_file(write):
    path = write("upstreams:\n  svc: {targets: [\"http://x\"]\nroutes: []\n")

    with pytest.raises(RouteFileError) as caught:
        load(path, env={})

    assert "<unicode string>" not in str(caught.value)
    assert f'in "{path}", line 2' in str(caught.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (one_route(bogus="1"), "routes[0].bogus (line 7)"),
        (one_route().replace("    targets:", "    retry: {attempts: 2}\n    targets:"), "upstreams.svc.retry (line 3)"),
        (one_route() + "extra: true\n", "extra (line 7)"),
    ],
)
def test_an_unknown_key_is_rejected_with_its_name_and_line(write, text, key):
    with pytest.raises(RouteFileError) as caught:
        load(write(text), env={})

    assert f"{key}: Extra inputs are not permitted" in str(caught.value)


def test_every_invalid_value_is_reported_with_its_line(write):
    path = write("""\
        upstreams:
          svc:
            targets: ["http://127.0.0.1:5001"]
            timeout: {connect: 0}
            max_concurrency: 0
        routes: []
        """)

    with pytest.raises(RouteFileError) as caught:
        load(path, env={})

    message = str(caught.value)
    assert "upstreams.svc.timeout.connect (line 4): Input should be greater than 0" in message
    assert "upstreams.svc.max_concurrency (line 5): Input should be greater than or equal to 1" in message


@pytest.mark.parametrize("path", ["/_gateway", "/_gateway/x", "/healthz", "/readyz", "/readyz/deep", "/metrics"])
def test_a_route_on_a_reserved_path_is_rejected(write, path):
    with pytest.raises(RouteFileError) as caught:
        load(write(one_route(path)), env={})

    assert "routes[0].path" in str(caught.value)
    assert "overlaps the reserved path" in str(caught.value)


@pytest.mark.parametrize("path", ["/", "/_gatewayx", "/healthzz", "/api/healthz", "/metrics-public"])
def test_routes_next_to_or_above_reserved_paths_are_allowed(write, path):
    assert load(write(one_route(path)), env={}).routes[0].path == path


def test_the_reserved_prefix_follows_api_prefix(write):
    with pytest.raises(RouteFileError, match="reserved path '/admin'"):
        load(write(one_route("/admin/users")), env={}, api_prefix="/admin/")

    assert load(write(one_route("/_gateway/x")), env={}, api_prefix="/admin").routes[0].path == "/_gateway/x"


@pytest.mark.parametrize(
    ("target", "shown"),
    [
        ("ftp://files.internal", "ftp://files.internal"),
        ("127.0.0.1:5001", "127.0.0.1:5001"),
        ("http://", "http://"),
        # A query or fragment may hold a token: the message names the target without it.
        ("http://svc.internal/?debug=1", "http://svc.internal/?***"),
        ("http://svc.internal/#top", "http://svc.internal/?***"),
    ],
)
def test_a_target_that_is_not_a_plain_http_url_is_rejected(write, target, shown):
    text = one_route().replace('"http://127.0.0.1:5001"', f'"{target}"')

    with pytest.raises(RouteFileError) as caught:
        load(write(text), env={})

    assert "upstreams.svc.targets (line 3)" in str(caught.value)
    assert repr(shown) in str(caught.value)


def test_a_target_with_credentials_is_refused_without_repeating_them(write):
    # The gateway would not send them, and a target is shown in logs, metrics and the admin API.
    path = write(one_route().replace('"http://127.0.0.1:5001"', '"${SVC_URL}"'))

    with pytest.raises(RouteFileError) as caught:
        load(path, env={"SVC_URL": "https://svc-user:s3cret-pw@svc.internal:8443/v1"})

    message = str(caught.value)
    assert "must not carry credentials" in message
    assert "'https://***@svc.internal:8443/v1'" in message
    chain = [caught.value, *(e for e in (caught.value.__cause__, caught.value.__context__) if e)]
    assert not any("s3cret-pw" in str(error) or "svc-user" in str(error) for error in chain)


def test_an_invalid_value_from_the_environment_is_not_repeated_in_the_error(write):
    # A ValidationError's text reaches tracebacks (the release phase, a worker's start).
    path = write(one_route(max_body_size="${MAX}"))

    with pytest.raises(RouteFileError) as caught:
        load(path, env={"MAX": "tok-9f8e7d"})

    assert "routes[0].max_body_size (line 7)" in str(caught.value)
    assert "tok-9f8e7d" not in str(caught.value)
    assert "tok-9f8e7d" not in str(caught.value.__cause__)


def test_an_upstream_needs_a_target(write):
    with pytest.raises(RouteFileError, match=r"upstreams\.svc\.targets"):
        load(write("upstreams:\n  svc: {targets: []}\n"), env={})


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("methods: [GET]", "methods: [GET, POST]"),
        ("methods: [GET]", "strip_prefix: false"),  # no methods: every method, GET included
    ],
)
def test_the_same_path_and_method_twice_is_rejected(write, first, second):
    text = one_route("/a", **dict([first.split(": ")])) + f"  - path: /a/\n    upstream: svc\n    {second}\n"

    with pytest.raises(RouteFileError, match="route '/a' is defined twice for GET"):
        load(write(text), env={})


def test_the_same_path_with_other_methods_is_allowed(write):
    text = one_route("/a", methods="[GET]") + "  - path: /a\n    upstream: svc\n    methods: [POST]\n"

    assert [route.methods for route in load(write(text), env={}).routes] == [("GET",), ("POST",)]


def test_methods_are_accepted_in_lower_case(write):
    assert load(write(one_route(methods="[get, Post]")), env={}).routes[0].methods == ("GET", "POST")


def test_an_unknown_method_is_rejected(write):
    with pytest.raises(RouteFileError, match=r"routes\[0\]\.methods\[0\] \(line 7\)"):
        load(write(one_route(methods="[FETCH]")), env={})


@pytest.mark.parametrize("path", ["users", "/users?x=1", "/users/x{id}", "/users/{id"])
def test_a_malformed_route_path_is_rejected(write, path):
    with pytest.raises(RouteFileError, match=r"routes\[0\]\.path \(line 5\)"):
        load(write(one_route(f'"{path}"')), env={})


def test_a_parameter_name_used_twice_in_one_path_is_rejected(write):
    with pytest.raises(RouteFileError, match=r"routes\[0\]\.path"):
        load(write(one_route("/orgs/{id}/users/{id}")), env={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("upstreams: {svc: [unclosed\n", "not valid YAML"),
    ],
)
def test_a_file_of_the_wrong_shape_is_rejected(write, text, message):
    with pytest.raises(RouteFileError, match=message):
        load(write(text), env={})


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.yaml"

    with pytest.raises(RouteFileError, match=f"{missing}: cannot read the route file: No such file"):
        load(missing, env={})


def run_checker(path: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "app.gateway.check", str(path)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def checked_valid_file(tmp_path_factory) -> subprocess.CompletedProcess:
    path = tmp_path_factory.mktemp("routes") / "ok.yaml"
    path.write_text(VALID)
    return run_checker(path)


def test_the_checker_exits_1_with_the_error_on_stderr(write):
    result = run_checker(write(one_route(bogus="1"), name="bad.yaml"))

    assert result.returncode == 1
    assert result.stdout == ""
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "bad.yaml: routes[0].bogus (line 7)" in error_lines[0]


def test_the_checker_summarises_a_valid_file(checked_valid_file):
    assert checked_valid_file.returncode == 0
    assert checked_valid_file.stdout.strip().endswith("ok.yaml: 1 upstreams, 2 routes")


def test_the_checker_prints_nothing_on_stderr_for_a_valid_file(checked_valid_file):
    assert checked_valid_file.stderr == ""


def test_transform_rules_and_match_headers_load(write):
    route_file = load(
        write(
            one_route(
                match_headers="{X-Version: v2}",
                request_headers="{remove: [X-Debug], rename: {X-Old: X-New}, add: {X-From: gw}}",
                response_headers="{remove: [Server-Timing]}",
                response_body="{deny: [password_hash, address.geo], rename: {name: username}, max_size: 4096}",
            )
        ),
        env={},
    )

    route = route_file.routes[0]
    assert route.match_headers == {"X-Version": "v2"}
    assert route.request_headers.as_rules() == (("X-Debug",), (("X-Old", "X-New"),), (("X-From", "gw"),))
    assert route.response_body.deny == ("password_hash", "address.geo")
    assert route.response_body.max_size == 4096


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("{remove: ['bad name']}", "'bad name' is not a header field name"),
        ("{rename: {X-A: 'x y'}}", "'x y' is not a header field name"),
        ('{add: {X-A: "a\\nb"}}', "the value of X-A has characters a header field cannot carry"),
    ],
)
def test_header_rules_name_the_bad_field(write, rules, message):
    with pytest.raises(RouteFileError) as error:
        load(write(one_route(request_headers=rules)), env={})

    assert message in str(error.value)


def test_two_routes_on_one_path_differ_by_match_headers_or_are_refused(write):
    twice = one_route() + "  - path: /a\n    upstream: svc\n    match_headers: {X-Version: v2}\n"
    assert len(load(write(twice), env={}).routes) == 2

    same = twice + "  - path: /a\n    upstream: svc\n    match_headers: {x-version: v2}\n"
    with pytest.raises(RouteFileError) as error:
        load(write(same, "same.yaml"), env={})
    assert "is defined twice for" in str(error.value)
    assert "match_headers" in str(error.value)


@pytest.mark.parametrize("rules", ["{rename: {X-API-Key: X-Token}}", "{add: {X-Consumer-ID: someone}}", "{remove: [X-Forwarded-For]}"])
def test_request_header_rules_cannot_name_fields_the_gateway_owns(write, rules):
    with pytest.raises(RouteFileError) as error:
        load(write(one_route(request_headers=rules)), env={})

    assert "the gateway sets or checks these fields itself" in str(error.value)


# What checking a route file loads: gunicorn's master validates the file in on_starting, and
# `python -m app.gateway.check` runs on machines that have no database or Redis to talk to.
LOADED = """
import runpy, sys
sys.argv = ["check", sys.argv[1]]
try:
    runpy.run_module("app.gateway.check", run_name="__main__")
except SystemExit:
    pass
import gunicorn_conf
gunicorn_conf.on_starting(None)
print(" ".join(sorted({name.split(".")[0] for name in sys.modules})), file=sys.stderr)
"""


def test_checking_a_route_file_loads_neither_celery_nor_sqlalchemy_nor_redis(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(VALID)
    (tmp_path / "gunicorn_conf.py").write_text((ROOT / "gunicorn.conf.py").read_text())
    (tmp_path / "metrics").mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    env.update(GATEWAY_CONFIG=str(path), PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))

    done = subprocess.run(
        [sys.executable, "-c", LOADED, str(path)], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ok: {path}")
    loaded = set(done.stderr.strip().splitlines()[-1].split())
    assert "app" in loaded and "yaml" in loaded and "pydantic" in loaded  # it did load the route file
    assert not loaded & {"celery", "kombu", "sqlalchemy", "flask_sqlalchemy", "redis", "pybreaker", "psycopg"}
