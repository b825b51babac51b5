"""``flask webhooks endpoints`` and ``flask webhooks deliveries``: what an operator reads from a
shell, a row per line (or ``--json``), never a secret."""
from __future__ import annotations

import json

from app.extensions import db
from app.models import Consumer
from tests.unit.webhooks.conftest import Reply


def test_endpoints_lists_each_with_its_consumer_and_state_and_no_secret(make_hooks, make_receiver, enqueued):
    hooks = make_hooks()
    acme, other = hooks.consumer(), hooks.consumer()
    healthy = hooks.endpoint(acme, make_receiver().url, ["order.*"])
    switched_off = hooks.endpoint(acme, make_receiver().url, disabled=True)
    hooks.endpoint(other, make_receiver().url)
    cli = hooks.app.test_cli_runner()
    name = hooks.call(lambda: db.session.get(Consumer, acme).name)

    listed = cli.invoke(args=["webhooks", "endpoints", "--consumer", acme])

    assert listed.exit_code == 0, listed.output
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [(row[0], row[1], row[2], row[4]) for row in rows] == [(healthy, name, "enabled", "order.*"), (switched_off, name, "disabled: disabled when registered", "*")]
    assert "whsec_" not in listed.stdout
    everyone = json.loads(cli.invoke(args=["webhooks", "endpoints", "--json"]).stdout)
    assert len(everyone) == 3 and all("secret" not in endpoint for endpoint in everyone)
    assert cli.invoke(args=["webhooks", "endpoints", "--consumer", "nobody"]).exit_code != 0


def test_deliveries_lists_an_endpoints_newest_first_with_the_last_outcome(make_hooks, make_receiver, enqueued):
    hooks = make_hooks()
    consumer = hooks.consumer()
    receiver = make_receiver()
    endpoint = hooks.endpoint(consumer, receiver.url)
    receiver.reply(Reply(500, body=b"boom"), Reply(200))
    first = hooks.publish(consumer, "order.created")[0]
    assert hooks.deliver(first) == "failed"  # 500: pending again, its retry due later
    second = hooks.publish(consumer, "order.paid")[0]
    assert hooks.deliver(second) == "succeeded"
    cli = hooks.app.test_cli_runner()

    listed = cli.invoke(args=["webhooks", "deliveries", endpoint])

    assert listed.exit_code == 0, listed.output
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [row[:5] for row in rows] == [[second, "order.paid", "succeeded", "1", "200"], [first, "order.created", "pending", "1", "500"]]
    assert rows[0][5] == "-" and rows[1][5] != "-"  # the pending one says when it is tried next
    failed_only = json.loads(cli.invoke(args=["webhooks", "deliveries", endpoint, "--status", "pending", "--json"]).stdout)
    assert [(d["id"], [a["status_code"] for a in d["attempts"]]) for d in failed_only] == [(first, [500])]
    assert cli.invoke(args=["webhooks", "deliveries", "whe_nothing"]).exit_code != 0
