"""`pimaster ping [TARGET]`: which nodes are up, and their health (rtt, uptime, load, temperature,
throttling, clock offset, disk), one request per node answered by the agent."""

from __future__ import annotations

import sys

from . import handler
from ..cli import EXIT_FAILED, EXIT_OK, ago, duration, print_json, table
from ..errors import ControlError


def add_parser(sub, name, summary, common, as_json) -> None:
    ping = sub.add_parser(name, parents=[common, as_json], help=summary)
    ping.add_argument("target", nargs="?", help="glob on the node id (default: all accepted nodes)")
    ping.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for answers (default 5)")
    ping.set_defaults(run=run)


def _note(node: dict) -> str | tuple[str, str]:
    rollback = node.get("network_rollback")
    if not isinstance(rollback, dict):
        return ""
    moved = ", ".join(f"{c.get('interface')} {c.get('address')}" for c in rollback.get("changes", []))
    return (f"network change ({moved}) rolled back {ago(rollback.get('time'))}: {rollback.get('reason', '')}", "yellow")


def run(client, args) -> int:
    result = client.call("ping", target=args.target, timeout=args.timeout, timeout_extra=args.timeout + 10)
    nodes = result["nodes"]
    if args.json:
        print_json({"nodes": nodes})
    elif nodes:
        rows = []
        for n in nodes:
            if not n["ok"]:
                rows.append([n["id"], ("down", "red"), "-", "-", "-", "-", "-", "-", "-", (n.get("error", ""), "red")])
                continue
            flags = ",".join(n.get("throttled_flags", [])) or ("ok" if "throttled" in n else "-")
            rows.append([
                n["id"], ("up", "green"), f"{n['rtt_ms']:.1f} ms", duration(n.get("uptime_s")),
                " ".join(f"{x:.2f}" for x in n.get("load", [])[:1]) or "-",
                f"{n['temp_c']:.1f}°C" if "temp_c" in n else "-", flags,
                f"{n['clock_offset_ms']:+.1f} ms" if "clock_offset_ms" in n else "-",
                f"{n['disk_root_used_pct']:.0f}%" if "disk_root_used_pct" in n else "-", _note(n)])
        table(None, ["NODE", "STATE", "RTT", "UPTIME", "LOAD", "TEMP", "THROTTLING", "CLOCK", "DISK /", "NOTE"], rows)
        down = sum(1 for n in nodes if not n["ok"])
        print(f"{len(nodes) - down} up, {down} down")
    if not nodes:
        print(f"pimaster: no accepted node matches {args.target or '*'}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if all(n["ok"] for n in nodes) else EXIT_FAILED


@handler("ping")
async def handle_ping(master, target: str | None = None, timeout: float = 5.0) -> dict:
    timeout = float(timeout)
    if not 0 < timeout <= 600:
        raise ControlError("--timeout must be between 0 and 600 seconds")
    return {"nodes": await master.rpc.ping(target, timeout)}
