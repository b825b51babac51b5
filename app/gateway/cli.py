"""``flask gateway routes``: the route file as this gateway serves it (the admin API's
``GET /_gateway/admin/routes``, from a shell). Answers on stdout, everything else on stderr."""
from __future__ import annotations

import json

import click
from flask import Flask, current_app
from flask.cli import AppGroup

from app.gateway.runtime import served_routes

gateway_cli = AppGroup("gateway", help="The route file as served.")


@gateway_cli.command("routes")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, as the admin API shows them, for scripts.")
def list_routes(as_json: bool) -> None:
    """Print the routes in the file's order: path, methods ("*": all), what serves them (an
    upstream, or the upstreams of an aggregate), mode, auth, rate limit, cache TTL (seconds).
    The file's path and digest go to stderr first, as the reloads of every process share them
    (the newest reload, where the control record has one)."""
    gateway = current_app.extensions["gateway_control"].current()
    routes = served_routes(gateway)
    click.echo(f"{current_app.config['CONFIG']}: {len(routes)} routes, digest {gateway.digest}", err=True)
    if as_json:
        click.echo(json.dumps(routes))
        return
    for route in routes:
        served = route["upstream"] or ",".join(sorted(set((route["aggregate"] or {}).values()))) or "-"
        cache = "-" if route["cache_ttl"] is None else f"{route['cache_ttl']:g}"
        click.echo(
            f"{route['path']}\t{','.join(route['methods'] or ['*'])}\t{served}\t{route['mode']}\t{route['auth']}"
            f"\t{route['rate_limit'] or '-'}\t{cache}"
        )


def init_app(app: Flask) -> None:
    app.cli.add_command(gateway_cli)
