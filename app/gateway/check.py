"""``python -m app.gateway.check [PATH]``: validate the environment's GATEWAY_* variables and a
route file without starting the gateway."""
from __future__ import annotations

import os
import sys

from flask import Flask

from app.config import SettingsError, environment_settings
from app.gateway.routefile import RouteFileError, load


def main(argv: list[str] | None = None) -> int:
    """Validate the route file at PATH (default ``GATEWAY_CONFIG``, then ``gateway.yaml``).

    Prints ``ok: ...`` and returns 0, or prints ``error: ...`` on stderr and returns 1: every
    variable that is not a setting or whose value does not fit (a line each), else the route
    file's error (``<file>: <key> (line N): <what>``).
    """
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else os.environ.get("GATEWAY_CONFIG", "gateway.yaml")
    prefix = os.environ.get("GATEWAY_API_PREFIX", "/_gateway")
    try:
        environment_settings(Flask("app", instance_relative_config=True), dict(os.environ))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        route_file = load(path, api_prefix=prefix)
    except RouteFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {path}: {len(route_file.upstreams)} upstreams, {len(route_file.routes)} routes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
