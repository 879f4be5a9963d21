"""`pimaster ping [TARGET]`: which nodes are up, and their health (rtt, uptime, load, temperature,
throttling, clock offset, disk), one request per node answered by the agent.

A target (`pimaster.targets`) means the same as for every command. `role:NAME` needs the nodes'
roles, which live in an inventory (cluster.yaml) next to state files, not in the master: ping uses
the one the last apply read (the master keeps it, as read then), resolved as `apply` resolves it
(`inventory.resolve_nodes`), so that a target means the same in both; `FACT=GLOB` the facts the
agents last reported.
"""

from __future__ import annotations

from . import handler
from ..cli import EXIT_FAILED, EXIT_OK, Duration, add_target, ago, duration, print_json, report_error, table
from ..errors import ControlError

MAX_TIMEOUT_S = 600


def add_parser(sub, name, summary, common, as_json) -> None:
    ping = sub.add_parser(name, parents=[common, as_json], help=summary)
    add_target(ping, positional=True, inventory="the cluster.yaml the last apply read (as it read it)")
    ping.add_argument("--timeout", type=Duration(maximum=MAX_TIMEOUT_S), default=5.0, metavar="DURATION",
                      help="how long to wait for answers: seconds, or 2s, 1m (default 5, at most 10m)")
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
    if not nodes:
        # As `apply` does: a target that matches nothing is refused input, not a node that failed.
        roles_from = result.get("roles_from") or {}
        hint = (f" (roles as the apply of {roles_from.get('file')} read them {ago(roles_from.get('saved'))}: "
                "apply again to use an edited cluster.yaml)" if roles_from else "")
        return report_error(args, f"{result.get('no_match') or 'no accepted node matches ' + (args.target or '*')}"
                                  f"{hint}", "refused", nodes=[])
    if args.json:
        print_json({"nodes": nodes})
    else:
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
    return EXIT_OK if all(n["ok"] for n in nodes) else EXIT_FAILED


@handler("ping")
async def handle_ping(master, target: str | None = None, timeout: float = 5.0) -> dict:
    from ..targets import no_match, target_nodes

    timeout = float(timeout)
    if not 0 < timeout <= MAX_TIMEOUT_S:
        raise ControlError(f"--timeout must be between 0 and {MAX_TIMEOUT_S} seconds")
    nodes, compiled, accepted = await target_nodes(master, target)
    answer: dict = {}
    if compiled.needs_roles:
        saved = master.store.last_inventory() or {}
        answer["roles_from"] = {"file": saved.get("state_file"), "saved": saved.get("saved")}
    if not nodes:
        return {"nodes": [], "no_match": no_match(target, compiled, accepted), **answer}
    return {"nodes": await master.rpc.ping(nodes, timeout), **answer}


async def node_roles(master) -> dict[str, list[str]]:
    """Accepted node id -> its roles, from the inventory the last apply read (``inventory_roles``).
    Refused (ControlError) when there is none. Parsed in a thread: an inventory may be large."""
    import asyncio

    from ..targets import node_facts

    facts = node_facts(master)
    saved = master.store.last_inventory()
    if saved is None and master.store.newest_job_id():
        raise ControlError("role:NAME reads the roles from the cluster.yaml the last apply read, and no apply "
                           "has run since this master was upgraded: apply again, or target by node id (a glob) or fact")
    return await asyncio.to_thread(inventory_roles, saved, facts, master.store.assignments(),
                                   master.store.identities())


def inventory_roles(saved: dict | None, facts: dict[str, dict], assignments: dict[str, dict],
                    identities: dict[str, dict]) -> dict[str, list[str]]:
    """Node id -> its roles, from ``saved`` (the inventory the last apply read, as the store keeps
    it), as an apply of that file resolves them now. Refused (ControlError) when there is none."""
    from ..inventory import parse_inventory, resolve_nodes
    from ..statetree import StateFileError

    why = "role:NAME reads the roles from the cluster.yaml of the last applied state file"
    if saved is None:
        raise ControlError(f"{why}, and nothing was applied yet: target by node id (a glob) or fact, or apply first")
    if saved["path"] is None:
        raise ControlError(f"{why} ({saved['state_file']}), and there was none next to it: "
                           "target by node id (a glob) or fact")
    try:
        entries, _new = resolve_nodes(parse_inventory(saved["text"], saved["path"]), facts, assignments, identities)
    except StateFileError as exc:
        raise ControlError(f"{why}: {exc}") from None
    return {node_id: list(entry.get("roles", [])) for node_id, entry in entries.items()}
