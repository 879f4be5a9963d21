"""`pimaster drift [--json]`: what the latest drift check found, per node and state file.

A drift check (cluster.yaml's `check_interval`, `autoapply.AutoApply.drift_loop`) runs the cluster's
`apply:` list in test mode on every node and records the states that would change: a file edited
by hand on a node, a service someone stopped. With `auto_correct: true` the check applies instead,
and the states it changed are recorded as corrected. A node whose rendering of a file changed since
it got it (a state file, cluster.yaml or another node's facts changed) is not checked against it
but listed as outdated: rolling out a new rendering is a person's `pimaster apply`, and no other
node's facts make the master rewrite this one's files.
"""

from __future__ import annotations

import os

from . import handler
from ..cli import EXIT_FAILED, EXIT_OK, ago, print_json, table


def add_parser(sub, name, summary, common, as_json) -> None:
    sub.add_parser(name, parents=[common, as_json], help=summary,
                   description="The states the latest drift check (cluster.yaml: check_interval) found would "
                               "change on each node, per state file. Exit status 1 when a node has drifted.").set_defaults(run=run)


def run(client, args) -> int:
    answer = client.call("drift")
    drifted = any(not s["corrected"] for n in answer["nodes"].values() for f in n["files"] for s in f["states"])
    if args.json:
        print_json(answer)
        return EXIT_FAILED if drifted else EXIT_OK
    if answer["check_interval_s"] is None:
        print("drift checks are off: `check_interval: 1h` in cluster.yaml of the master's cluster directory "
              "(`pimaster status` shows it as cluster_dir) turns them on")
    rows = []
    for node_id, node in answer["nodes"].items():
        for name in node.get("outdated", []):
            rows.append([node_id, name, "-", ("outdated: its rendering changed; `pimaster apply` rolls it out", "yellow"),
                         "-"])
        for file in node["files"]:
            for state in file["states"] or [None]:
                if state is None:
                    rows.append([node_id, file["file"], "-", "no drift", ago(file["checked"])])
                    continue
                what = "corrected" if state["corrected"] else "would change"
                rows.append([node_id, file["file"], f"{state.get('fun')} {state.get('id')}", what, ago(file["checked"])])
    if rows or answer["check_interval_s"] is not None:
        table(None, ["NODE", "FILE", "STATE", "DRIFT", "CHECKED"], rows)
    return EXIT_FAILED if drifted else EXIT_OK


def drift_by_node(master) -> dict[str, dict]:
    """Accepted node id -> {"drifted": states that would change, "files": [{"file", "job", "checked",
    "states"}]}, from the latest check of each file (files no longer in the list are left out)."""
    from ..highstate import cluster_dir, list_files, load_cluster
    from ..statetree import StateFileError

    accepted = master.roster.accepted_nodes()
    directory = cluster_dir(master)
    try:
        listed = set(list_files(directory, load_cluster(directory).settings))
    except StateFileError:
        listed = None  # cluster.yaml does not parse now: show what was found
    nodes: dict[str, dict] = {}
    for record in master.store.drift():
        name = os.path.basename(record["file"])
        if record["node_id"] not in accepted or (listed is not None and record["file"] not in listed):
            continue
        node = nodes.setdefault(record["node_id"], {"drifted": 0, "files": [], "outdated": []})
        if any(isinstance(s, dict) and s.get("outdated") for s in record["states"]):
            # Not checked: its rendering changed since it got the file (a person's apply rolls it out).
            node["outdated"].append(name)
            continue
        states = [s for s in record["states"] if isinstance(s, dict)]
        node["drifted"] += sum(1 for s in states if not s.get("corrected"))
        node["files"].append({"file": name, "job": record["job_id"], "checked": record["checked"],
                              "states": [{"id": s.get("id"), "fun": s.get("fun"), "comment": s.get("comment"),
                                          "corrected": bool(s.get("corrected"))} for s in states]})
    return dict(sorted(nodes.items()))


@handler("drift")
async def handle_drift(master) -> dict:
    status = master.auto.status()
    return {"check_interval_s": status["check_interval_s"], "auto_correct": status["auto_correct"],
            "last_check": status["last_drift_check"], "nodes": drift_by_node(master)}
