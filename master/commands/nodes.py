"""`pimaster nodes [TARGET]`: the enrolled (accepted) nodes with their facts, connection and last
contact; with a TARGET (`pimaster.targets`), those in it (none in it is refused, as for `ping`)."""

from __future__ import annotations

import json

from . import handler
from ..cli import EXIT_OK, add_target, ago, print_json, table


def add_parser(sub, name, summary, common, as_json) -> None:
    parser = sub.add_parser(name, parents=[common, as_json], help=summary)
    add_target(parser, positional=True, inventory="the cluster.yaml the last apply read (as it read it)")
    parser.add_argument("--catalog", action="store_true",
                        help="with --json: include each node's catalogue of state functions (large)")
    parser.set_defaults(run=run)


def run(client, args) -> int:
    request = {"catalog": args.catalog}
    if args.target is not None:
        request["target"] = args.target
    nodes = client.call("nodes", **request)["nodes"]
    if args.json:
        print_json({"nodes": nodes})
        return EXIT_OK
    rows = []
    for n in nodes:
        f = n["facts"]
        model = f.get("pi_model") or f.get("machine", "-")
        os_name = f.get("os", {}).get("PRETTY_NAME", "-")
        drift = n.get("drift")
        rows.append([n["id"], f.get("hostname", "-"), ", ".join(f.get("ips", [])[:2]) or "-", model,
                     f.get("arch", "-"), os_name, "yes" if n["connected"] else "no", ago(n["last_seen"]),
                     "-" if drift is None else (f"{drift} state(s)", "yellow") if drift
                     else ("outdated", "yellow") if n.get("drift_outdated") else "none"])
    # DRIFT: states the latest drift check found would change (`pimaster drift`); "-": never checked.
    table(None, ["NODE", "HOSTNAME", "IP", "MODEL", "ARCH", "OS", "CONNECTED", "LAST SEEN", "DRIFT"], rows)
    return EXIT_OK


@handler("nodes")
async def handle_nodes(master, catalog: bool = False, target: str | None = None) -> dict:
    from ..targets import resolve_target
    from .drift import drift_by_node

    roster = master.roster
    drift = drift_by_node(master)
    accepted = set(roster.node_of_key.values())
    if target is not None:
        accepted &= set(await resolve_target(master, target))
    nodes = []
    for node in master.store.nodes():
        node_id = node["node_id"]
        if node_id not in accepted:
            continue
        node["last_seen"] = roster.last_seen.get(node_id, node["last_seen"])
        node["connected"] = roster.connected(node_id)
        node["id"] = node.pop("node_id")
        # States the latest drift check found would change; None: never checked.
        node["drift"] = drift[node_id]["drifted"] if node_id in drift else None
        # Files of the list not checked for drift: its rendering changed since it got them.
        node["drift_outdated"] = drift[node_id]["outdated"] if node_id in drift else []
        # Stored as JSON text; shown as an object, and only when asked: it runs to many kilobytes.
        stored_catalog = node.pop("catalog", None)
        if catalog:
            node["catalog"] = json.loads(stored_catalog or "{}")
        nodes.append(node)
    return {"nodes": nodes}
