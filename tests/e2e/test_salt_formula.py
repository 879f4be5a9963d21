"""A community-style Salt formula tree (tests/formulas/pitree) applied to every lab node, twice.

The tree is written the way Salt users write theirs: a top.sls at the root, formulas as
directories (`motd/`, `users/`, `tz/`) with init.sls, map.jinja (import_yaml of defaults.yaml,
grains.filter_by, salt['pillar.get'] with merge, defaults.merge), `include:` by SLS name from the
root (`motd.config`) and relative (`.config`), a `- sls:` requisite, `extend:`, `names:`,
templated `salt://` sources (a list: the first that exists) with `defaults:`/`context:`, and the
pillar of cluster.yaml (a node entry's own pillar merged over the cluster's). `site.sls` lists
what top.sls gives every node, and is what `pimaster apply site` applies.

The command runs on the host, in a copy of the tree under the host's /tmp, which node01 (the
master) cannot see: the master reads the tree through the command. The first apply changes every
node (users, a group, /etc/motd, the time zone, a file.replace, file.append, file.symlink and the
cmd.wait watching it); the second changes nothing. At the end the nodes get back what the formula
changed, so the other lab tests see the nodes as before.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from lab_harness import Lab, describe, pimaster_cli

pytestmark = pytest.mark.lab

TREE = Path(__file__).resolve().parents[1] / "formulas" / "pitree"
USERS = {"pitree-alice": (3101, "Alice Example"), "pitree-bob": (3102, "Bob Example")}
CAROL = {"pitree-carol": (3103, "Carol Example")}     # node03's own pillar adds her
GROUP, GID = "pitree", 3100
ZONES = {"node03": "Asia/Tokyo"}                      # node03's own pillar; everyone else the cluster's
DEFAULT_ZONE = "Europe/Berlin"
# Files the formula changes that the nodes had before (kept, and put back at the end).
RESTORED = ["/etc/motd", "/etc/default/useradd", "/etc/timezone"]


def apply_site(lab: Lab, tree: Path) -> tuple[dict, float]:
    """`pimaster apply site --tree . --json`, run on the host in ``tree``: the report and the wall time."""
    started = time.monotonic()
    result = pimaster_cli("apply", "site", "--tree", ".", "--json", cwd=tree, timeout=600,
                          env={"PIMASTER_STATE_DIR": str(lab.master_state_dir)})
    elapsed = time.monotonic() - started
    assert result.returncode == 0, describe(result)
    report = json.loads(result.stdout)
    assert sorted(report["nodes"]) == sorted(lab.nodes), f"applied to {sorted(report['nodes'])}"
    not_ok = {node: [(s["fun"], s["name"], s["comment"]) for s in item["states"] if s["status"] == "failed"]
              or item["status"] for node, item in report["nodes"].items() if not item["ok"]}
    assert not not_ok, not_ok
    return report, elapsed


def changed_states(item: dict) -> list[str]:
    return [f"{s['fun']} {s['name']}" for s in item["states"] if s["status"] == "changed"]


def sh(lab: Lab, node: str, script: str) -> str:
    return lab.exec(node, "sh", "-c", script).stdout


def accounts(node: str) -> dict[str, tuple[int, str]]:
    return {**USERS, **(CAROL if node == "node03" else {})}


def saved_state(lab: Lab, node: str) -> dict:
    files = {path: lab.exec(node, "cat", path, check=False) for path in RESTORED}
    return {"files": {path: r.stdout for path, r in files.items() if r.returncode == 0},
            "localtime": lab.exec(node, "readlink", "/etc/localtime").stdout.strip(),
            "zone": lab.exec(node, "timedatectl", "show", "--property=Timezone", "--value").stdout.strip()}


def restore(lab: Lab, node: str, saved: dict) -> None:
    for name in [*USERS, *CAROL]:
        lab.exec(node, "userdel", "--remove", name, check=False)
    lab.exec(node, "groupdel", GROUP, check=False)
    lab.exec(node, "rm", "-rf", "/etc/pitree", "/usr/local/etc/pitree-accounts", check=False)
    # The zone through timedated, which keeps the one it set until it exits (idle for a while): a
    # link changed behind its back alone would leave it telling the next apply the zone is set.
    lab.exec(node, "timedatectl", "set-timezone", saved["zone"], check=False)
    for path, text in saved["files"].items():
        lab.write_file(node, path, text)
    lab.exec(node, "ln", "-sfn", saved["localtime"], "/etc/localtime", check=False)  # as it was written


def test_a_salt_formula_tree_applies_to_every_node_and_a_second_run_changes_nothing(lab: Lab):
    # The nodes must run this checkout's agent: the formula needs its Salt-named state functions.
    nodes = json.loads(lab.pimaster("nodes", "--json", "--catalog").stdout)["nodes"]
    for entry in nodes:
        missing = {"user.present", "group.present", "timezone.system", "file.append", "file.replace",
                   "file.symlink", "cmd.wait"} - set(entry.get("catalog") or {})
        assert not missing, f"{entry['id']}'s agent lacks {sorted(missing)}: the lab runs another checkout"

    tree = Path(tempfile.mkdtemp(prefix="pimaster-pitree-", dir="/tmp"))
    saved = {node: saved_state(lab, node) for node in lab.nodes}
    try:
        shutil.copytree(TREE, tree, dirs_exist_ok=True)
        assert lab.exec("node01", "test", "-e", str(tree), check=False).returncode != 0, "node01 sees the host's /tmp"

        first, first_s = apply_site(lab, tree)
        for node, item in first["nodes"].items():
            assert item["changed"] > 0 and item["failed"] == 0, (node, item)
            assert [s["status"] for s in item["states"] if s["fun"] == "cmd.wait"] == ["changed"], \
                f"{node}: the cmd.wait watching /etc/pitree/accounts did not run once"
            # names: one user.present per account of the node's pillar (node03's adds one).
            users = sorted(s["name"] for s in item["states"] if s["fun"] == "user.present")
            assert users == sorted(accounts(node)), (node, users)

        for node in lab.nodes:
            # group.present, user.present with names: and per-name arguments
            assert sh(lab, node, f"getent group {GROUP}").split(":")[2] == str(GID)
            for name, (uid, fullname) in accounts(node).items():
                fields = sh(lab, node, f"getent passwd {name}").strip().split(":")
                assert fields[2:5] == [str(uid), str(GID), fullname] and fields[6] == "/bin/bash", (node, fields)
            if node != "node03":
                assert lab.exec(node, "getent", "passwd", "pitree-carol", check=False).returncode == 2
            # file.replace, file.append, file.symlink, and the cmd.wait watching the list
            assert "SHELL=/bin/bash" in sh(lab, node, "cat /etc/default/useradd").splitlines()
            names = sorted(accounts(node))
            assert sh(lab, node, "cat /etc/pitree/accounts").splitlines() == names
            assert sh(lab, node, "readlink /usr/local/etc/pitree-accounts").strip() == "/etc/pitree/accounts"
            assert sh(lab, node, "cat /etc/pitree/accounts.uids").splitlines() == \
                [f"{name}:{accounts(node)[name][0]}" for name in names]
            # timezone.system from the pillar (node03's own pillar wins)
            zone = ZONES.get(node, DEFAULT_ZONE)
            assert sh(lab, node, "readlink /etc/localtime").strip().endswith(f"zoneinfo/{zone}"), node
            # /etc/motd: a templated salt:// source (node01 has its own, the first of the list), with
            # defaults: and context: from map.jinja (defaults.yaml, grains.filter_by, the pillar).
            motd = sh(lab, node, "cat /etc/motd").splitlines()
            assert motd[0] == f"{node}: Welcome to the pitree cluster", (node, motd)
            assert motd[1].startswith("Debian 12 (bookworm), ") and f"Time zone: {zone}" in motd, (node, motd)
            assert f"Accounts: {', '.join(names)}" in motd, (node, motd)
            template = "motd-node01.j2" if node == "node01" else "motd.j2"
            assert f"Managed by pimaster (motd/files/{template}, from motd.config): " \
                   "local changes are overwritten." in motd, (node, motd)
            assert ("node01 runs the master: `pimaster ping` shows the cluster." in motd) == (node == "node01")

        second, second_s = apply_site(lab, tree)
        assert {node: item["changed"] for node, item in second["nodes"].items()} == {node: 0 for node in lab.nodes}, \
            {node: changed_states(item) for node, item in second["nodes"].items()}
        counts = {run: {node: item["changed"] for node, item in sorted(report["nodes"].items())}
                  for run, report in (("first", first), ("second", second))}
        print(f"\npitree: first apply {first_s:.1f} s, changed {counts['first']}; "
              f"second apply {second_s:.1f} s, changed {counts['second']}")
    finally:
        shutil.rmtree(tree, ignore_errors=True)
        for node, state in saved.items():
            restore(lab, node, state)
