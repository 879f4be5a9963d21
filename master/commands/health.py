"""`pimaster health NODE [--since 24h] [--json]`: a node's health history (`pimaster.healthlog`),
oldest first, each row at its resolution (raw, 1m, 15m), then its health events.

`pimaster top [--once]`: every node's current health, live (`pimaster.top_view`). Both read what
the master's health collector (`pimaster.healthwatch`) gathered; neither asks the nodes.
"""

from __future__ import annotations

from . import handler
from ..cli import EXIT_OK, Duration, print_json, report_error
from ..errors import ControlError

DEFAULT_SINCE_S = 86400.0
MAX_SINCE_S = 31 * 86400.0
SPARK_SLOTS = 24


def add_parser(sub, name, summary, common, as_json) -> None:
    if name == "health":
        parser = sub.add_parser(name, parents=[common, as_json], help=summary,
                                description="A node's health history as the master recorded it every health "
                                            "interval: raw samples for the last hour, 1-minute rows for 24 h, "
                                            "15-minute rows for 30 days (means, with maxima), oldest "
                                            "first; then its health events (throttling, under-voltage, not "
                                            "answering).")
        parser.add_argument("node", metavar="NODE", help="the node's id")
        parser.add_argument("--since", type=Duration(maximum=MAX_SINCE_S), default=DEFAULT_SINCE_S,
                            metavar="DURATION", help="how far back: 90m, 24h, 7d (default 24h, at most 31d)")
        parser.set_defaults(run=run_health)
    else:
        parser = sub.add_parser(name, parents=[common], help=summary,
                                description="Every node's current health, live: nodes down first, throttling "
                                            "and under-voltage in colour, sparklines of the last hour's "
                                            "temperature and load. Keys: t sort by temperature, l by load, "
                                            "n by name, q quit.")
        parser.add_argument("--once", action="store_true",
                            help="print one frame and exit (plain text when not on a terminal)")
        parser.add_argument("--refresh", type=Duration(maximum=3600), default=2.0, metavar="DURATION",
                            help="how often the view is redrawn (default 2s)")
        parser.set_defaults(run=run_top)


def run_health(client, args) -> int:
    from piagent.config import NODE_ID_RE

    if not NODE_ID_RE.fullmatch(args.node):
        return report_error(args, f"{args.node!r} is not a node id", "usage")
    result = client.call("health", node=args.node, since=args.since)
    if args.json:
        print_json(result)
        return EXIT_OK
    from ..top_view import print_history

    print_history(result)
    return EXIT_OK


def run_top(client, args) -> int:
    from ..top_view import run_top as top

    return top(client, args)


@handler("health")
async def handle_health(master, node: str, since: float = DEFAULT_SINCE_S) -> dict:
    import asyncio
    import time

    from piagent.config import NODE_ID_RE

    if not isinstance(node, str) or not NODE_ID_RE.fullmatch(node):
        raise ControlError("not a node id", code="usage")
    if not isinstance(since, (int, float)) or not 0 < since <= MAX_SINCE_S:
        raise ControlError(f"--since must be between 0 and {MAX_SINCE_S / 86400:.0f} days", code="usage")
    if node not in master.roster.accepted_nodes():
        raise ControlError(f"no accepted node {node} (`pimaster keys list` shows the nodes and their keys)")
    now = time.time()
    samples, truncated = await asyncio.to_thread(master.health.history, node, now - since)
    events = await asyncio.to_thread(master.health.events, node, now - since)
    return {"node": node, "since": now - since, "now": now, "interval_s": master.health_interval(),
            "samples": samples, "truncated": truncated, "events": events}


@handler("top")
async def handle_top(master, slots: int = SPARK_SLOTS) -> dict:
    import asyncio
    import time

    from ..healthlog import RAW_KEEP_S, throttle_flags

    if not isinstance(slots, int) or not 1 <= slots <= 120:
        raise ControlError("slots must be between 1 and 120", code="usage")
    now = time.time()
    lines = await asyncio.to_thread(master.health.sparklines, now, RAW_KEEP_S, slots)
    latest, roster = master.healthwatch.latest, master.roster
    nodes = []
    for node in sorted(roster.accepted_nodes()):
        sample = latest.get(node)
        row = {"id": node, "connected": roster.connected(node), "last_seen": roster.last_seen.get(node),
               "sparklines": lines.get(node, {"temp_c": [None] * slots, "load1": [None] * slots})}
        if sample is None:
            row["up"] = None  # no round yet
        else:
            row.update({k: v for k, v in sample.items() if k not in ("node", "throttled", "throttled_known")})
            bits = sample.get("throttled_known")
            if bits is not None:
                row["throttled"] = f"0x{bits:x}"
                row["throttled_flags"] = throttle_flags(bits)
        nodes.append(row)
    return {"time": now, "interval_s": master.health_interval(), "nodes": nodes}
