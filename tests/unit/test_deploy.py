"""The Heroku-style deploy files agree with each other and with the code: the Procfile's
process types are app.json's formation, the add-ons are the ones the config reads, and every
setting app.json names is one the gateway has; the README documents every setting."""
from __future__ import annotations

import json
import sys

from flask import Flask

from app.config import defaults
from tests import services

ROOT = services.ROOT


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


def app_json() -> dict:
    return json.loads((ROOT / "app.json").read_text())


def test_the_procfile_migrates_on_release_and_runs_web_worker_and_beat():
    processes = procfile()

    assert processes["release"] == "flask --app app db upgrade"
    assert processes["web"].startswith("gunicorn --config gunicorn.conf.py ")  # which binds 0.0.0.0:$PORT
    # REMAP_SIGTERM=SIGQUIT: Heroku's SIGTERM starts Celery's soft shutdown (tests/integration/test_deploy.py),
    # under a supervisor that starts a worker that exits on its own again (tests/integration/test_broker_restart.py).
    assert processes["worker"].startswith("python -m tasks.supervise env REMAP_SIGTERM=SIGQUIT celery -A tasks worker")
    assert processes["beat"].startswith("celery -A tasks beat")


def test_app_json_runs_every_process_type_with_one_beat():
    formation = app_json()["formation"]

    assert set(formation) == set(procfile()) - {"release"}
    assert formation["beat"]["quantity"] == 1  # two schedulers would send every periodic task twice


def test_app_json_provisions_the_postgres_and_redis_the_config_reads():
    attached = {addon["plan"].split(":")[0]: addon.get("as") for addon in app_json()["addons"]}

    # Attached as DATABASE and REDIS, the add-ons set DATABASE_URL and REDIS_URL.
    assert attached == {"heroku-postgresql": "DATABASE", "heroku-redis": "REDIS"}


def test_every_setting_app_json_names_exists(app):
    platform = {"WEB_CONCURRENCY", "WEB_THREADS", "WORKER_CONCURRENCY"}  # read by gunicorn.conf.py and the Procfile
    platform.add("HTTPBIN_URL")  # the demo route file's ${HTTPBIN_URL}: test_app_json_points_the_demo_route_file_at_a_reachable_upstream
    known = set(defaults(app))
    for name, spec in app_json()["env"].items():
        assert spec["description"], name
        assert name in platform or name.removeprefix("GATEWAY_") in known, name


def test_python_version_names_the_interpreter_the_suite_runs_on():
    assert (ROOT / ".python-version").read_text().strip() == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_the_readme_documents_every_setting():
    # The configuration reference: every GATEWAY_* setting, or the platform variable it comes from.
    settings = defaults(Flask("readme-check"))
    readme = (ROOT / "README.md").read_text()
    platform = {"REDIS_URL": "REDIS_URL", "WEB_THREADS": "WEB_THREADS", "SQLALCHEMY_DATABASE_URI": "DATABASE_URL"}
    internal = {"SQLALCHEMY_ENGINE_OPTIONS"}  # set by the gateway, not an operator's setting
    undocumented = [name for name in settings if name not in internal and f"`{platform.get(name, 'GATEWAY_' + name)}`" not in readme]
    assert undocumented == []


def _setup_cfg():
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def _requirements(text: str) -> list:
    from packaging.requirements import Requirement

    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line]


def _pins(name: str) -> dict[str, str]:
    """``{package: version}`` of a lock file (``name==version`` lines, pip-compile's comments left out)."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            package, _, version = line.partition("==")
            pins[canonicalize_name(package)] = version
    return pins


def test_the_lock_files_pin_what_setup_cfg_asks_for_within_its_bounds():
    """requirements.txt (what Heroku's buildpack installs) pins every runtime requirement and none
    of the extras' own; requirements-dev.txt (make install, CI) the runtime set at the same
    versions and every extra. A bound changed in setup.cfg without make lock fails here."""
    from packaging.utils import canonicalize_name

    config = _setup_cfg()
    runtime = _requirements(config["options"]["install_requires"])
    extras = {name: _requirements(value) for name, value in config["options.extras_require"].items()}
    lock, dev_lock = _pins("requirements.txt"), _pins("requirements-dev.txt")
    for requirement in runtime:
        pinned = lock.get(canonicalize_name(requirement.name))
        assert pinned is not None and requirement.specifier.contains(pinned, prereleases=True), (requirement, pinned)
        assert requirement.specifier and any(spec.operator in ("<", "<=", "==", "~=") for spec in requirement.specifier), f"{requirement.name} has no upper bound"
    assert {name: version for name, version in dev_lock.items() if name in lock} == lock
    runtime_names = {canonicalize_name(r.name) for r in runtime}
    for extra, requirements in extras.items():
        for requirement in requirements:
            name = canonicalize_name(requirement.name)
            pinned = dev_lock.get(name)
            assert pinned is not None and requirement.specifier.contains(pinned, prereleases=True), (extra, requirement, pinned)
            assert any(spec.operator in ("<", "<=", "==", "~=") for spec in requirement.specifier), f"{requirement.name} has no upper bound"
            if name not in runtime_names:
                assert name not in lock, f"{requirement.name} (the {extra} extra) is in requirements.txt"


def test_app_json_points_the_demo_route_file_at_a_reachable_upstream(monkeypatch):
    """On Heroku nothing listens on 127.0.0.1:5001 (make run's httpbin): app.json sets the
    variable gateway.yaml takes its upstream from, and the file loads with it."""
    from app.gateway.routefile import load

    spec = app_json()["env"]
    assert spec["GATEWAY_CONFIG"]["value"] == "gateway.yaml"
    assert "${HTTPBIN_URL:-" in (ROOT / "gateway.yaml").read_text()
    monkeypatch.setenv("HTTPBIN_URL", spec["HTTPBIN_URL"]["value"])
    route_file = load(str(ROOT / "gateway.yaml"), api_prefix="/_gateway")
    targets = {target for upstream in route_file.upstreams.values() for target in upstream.targets}
    assert targets == {spec["HTTPBIN_URL"]["value"]} and not any("127.0.0.1" in target for target in targets)
