"""`pimaster nodes`: the enrolled (accepted) nodes with their facts, connection and last contact."""

from __future__ import annotations

from . import handler
from ..cli import EXIT_OK, ago, print_json, table


def add_parser(sub, name, summary, common, as_json) -> None:
    sub.add_parser(name, parents=[common, as_json], help=summary).set_defaults(run=run)


def run(client, args) -> int:
    nodes = client.call("nodes")["nodes"]
    if args.json:
        print_json({"nodes": nodes})
        return EXIT_OK
    rows = []
    for n in nodes:
        f = n["facts"]
        model = f.get("pi_model") or f.get("machine", "-")
        os_name = f.get("os", {}).get("PRETTY_NAME", "-")
        rows.append([n["id"], f.get("hostname", "-"), ", ".join(f.get("ips", [])[:2]) or "-", model,
                     f.get("arch", "-"), os_name, "yes" if n["connected"] else "no", ago(n["last_seen"])])
    table(None, ["NODE", "HOSTNAME", "IP", "MODEL", "ARCH", "OS", "CONNECTED", "LAST SEEN"], rows)
    return EXIT_OK


@handler("nodes")
async def handle_nodes(master) -> dict:
    roster = master.roster
    accepted = set(roster.node_of_key.values())
    nodes = []
    for node in master.store.nodes():
        node_id = node["node_id"]
        if node_id not in accepted:
            continue
        node["last_seen"] = roster.last_seen.get(node_id, node["last_seen"])
        node["connected"] = node_id in roster.routes
        node["id"] = node.pop("node_id")
        nodes.append(node)
    return {"nodes": nodes}
