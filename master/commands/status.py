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
            elif isinstance(value, bool):
                value = "yes" if value else "no"
            elif isinstance(value, list):
                value = ", ".join(map(str, value)) or "-"
            elif key in ("auto_apply_last", "drift_check_last") and isinstance(value, dict):
                value = last_run_text(value)
            elif isinstance(value, dict):
                value = "; ".join(f"{k}: {v}" for k, v in value.items()) or "-"
            elif value is None:
                value = "-"
            print(f"{key}: {value}")
    return EXIT_OK


def last_run_text(run: dict) -> str:
    """One of the master's own runs, as a line: reason, outcome, when, its jobs."""
    outcome = "ok" if run.get("ok") else "not ok" + (f" ({run['error']})" if run.get("error") else "")
    stopped = run.get("stopped") or {}
    if stopped:
        outcome += "; stopped: " + ", ".join(f"{n} at {f}" for n, f in sorted(stopped.items()))
    jobs = run.get("jobs") or []
    when = f"finished {ago(run['finished'])}" if isinstance(run.get("finished"), (int, float)) else ""
    return f"{run.get('reason')}: {outcome}, {when}, {len(jobs)} job(s){': ' + ', '.join(jobs) if jobs else ''}"


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
