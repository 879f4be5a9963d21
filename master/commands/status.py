"""`pimaster status`: the master's own status (version, fingerprint, counts of nodes and of what it
refused)."""

from __future__ import annotations

import json

from . import handler
from ..cli import EXIT_OK, ago, local_time, print_json


def add_parser(sub, name, summary, common, as_json) -> None:
    sub.add_parser(name, parents=[common, as_json], help=summary).set_defaults(run=run)


def run(client, args) -> int:
    status = client.call("status")
    if args.json:
        print_json(status)
    else:
        for key in sorted(status):
            value = status[key]
            if key in ("started", "last_drift_check") and isinstance(value, (int, float)):
                value = f"{local_time(value)} ({ago(value)})"  # an epoch means nothing to a person
            elif isinstance(value, list):
                value = ", ".join(map(str, value)) or "-"
            elif isinstance(value, dict):
                value = json.dumps(value, sort_keys=True)
            elif value is None:
                value = "-"
            print(f"{key}: {value}")
    return EXIT_OK


@handler("status")
async def handle_status(master) -> dict:
    import os
    import socket

    from .. import __version__

    transport, roster = master.transport, master.roster
    return {"version": __version__, "fingerprint": master.fingerprint, "port": master.port,
            "key_port": master.key_port, "listen": master.listen_host, "pid": os.getpid(),
            "started": master.started, "connected": len(roster.connected_nodes()),
            "accepted": len(roster.node_of_key), "pending": len(roster.pending_routes),
            "dropped_messages": master.drops.total, "hostname": socket.gethostname(),
            "unauthenticated_connections": transport.sessions.untrusted(),
            "closed_connections": transport.sessions.closed, "refused_keys": master.enrollment.refused_keys,
            "rate_limited_messages": transport.agent_budget.refused + transport.stranger_budget.refused
            + transport.address_budget.refused,
            "max_pending": master.max_pending, **master.auto.status()}
