"""Zero touch on the lab: a Pi flashed with only a piagent.conf becomes a Slurm compute node with no
command typed; a re-flashed one comes back after one `keys accept --replace`; a removed one leaves
the other nodes' slurm.conf; a file changed by hand is found by the drift check.

The lab's master runs with a copy of the shipped states as its cluster directory (conftest.py);
this test turns `auto_apply` (and then `check_interval`) on in it, as a person edits cluster.yaml.
It runs last of the e2e tier (it adds and re-flashes nodes) and prints the time from `lab add` to
the new node idle in sinfo (apt installs munge and slurmd from the lab's local cache: most of it).
"""

from __future__ import annotations

import json
import time

import pytest

from lab_harness import Lab

pytestmark = pytest.mark.lab

MASTER = "node01"
ADD_TIMEOUT_S = 900


def sh(lab: Lab, node: str, script: str) -> str:
    return lab.exec(node, "sh", "-c", script).stdout


def node_states(lab: Lab) -> dict[str, str]:
    """sinfo's node -> state (idle, down*, ...), as the controller sees it; {} while it cannot tell."""
    result = lab.exec(MASTER, "sinfo", "-h", "-N", "-o", "%N %t", check=False)
    if result.returncode != 0:
        return {}
    return dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())


def wait_idle(lab: Lab, node: str, timeout: float = ADD_TIMEOUT_S) -> None:
    Lab.wait_for(lambda: node_states(lab).get(node) == "idle", f"{node} idle in sinfo ({node_states(lab)})",
                 timeout=timeout, interval=2)


def auto_idle(lab: Lab, reason: str, timeout: float = ADD_TIMEOUT_S) -> dict:
    """The master's status once its own run for ``reason`` has finished."""
    def done():
        status = json.loads(lab.pimaster("status", "--json").stdout)
        last = status.get("auto_apply_last") or {}
        return status if status["auto_apply_state"] == "idle" and last.get("reason") == reason else None
    return Lab.wait_for(done, f"the master's own apply ({reason}) to finish", timeout=timeout, interval=2)


def full_apply(lab: Lab) -> dict:
    result = lab.pimaster("apply", "--json", check=False, timeout=1800)
    report = json.loads(result.stdout)
    assert result.returncode == 0, (report.get("stopped"), report.get("refused"), result.stderr[-2000:])
    return report


def test_zero_touch_a_flashed_pi_joins_slurm_with_no_command_typed(lab, cluster_yaml):
    # The 4-node cluster converged as a person would: `pimaster apply`, the list of the cluster dir.
    converged = full_apply(lab)
    assert converged["apply"] == ["network.yaml", "time.yaml", "slurm.yaml"]
    wait_idle(lab, "node04", timeout=120)
    try:
        cluster_yaml(auto_apply="true")
        started = time.monotonic()
        node05 = lab.add()
        assert node05 == "node05"
        wait_idle(lab, node05)
        took = time.monotonic() - started
        print(f"\nlab add -> {node05} idle in sinfo: {took:.0f} s (no other command)")

        states = node_states(lab)
        assert sorted(n for n, s in states.items() if s == "idle") == ["node02", "node03", "node04", "node05"], states
        hostnames = sorted(sh(lab, MASTER, "srun -N4 hostname").split())
        assert hostnames == ["node02", "node03", "node04", "node05"]
        for node in lab.nodes:
            assert "node05" in sh(lab, node, "cat /etc/hosts"), f"{node}'s /etc/hosts does not name node05"
        listed = json.loads(lab.pimaster("jobs", "--json").stdout)["jobs"]
        assert {j["reason"] for j in listed[:3]} == {"enrolled node05"}, [j["reason"] for j in listed[:5]]
        status = auto_idle(lab, "enrolled node05")
        assert status["auto_apply_last"]["ok"], status["auto_apply_last"]

        # A second full apply changes nothing anywhere.
        again = full_apply(lab)
        assert {n: v["changed"] for n, v in again["nodes"].items()} == {n: 0 for n in lab.nodes}, again["nodes"]

        # Re-flashed: a new key for node03's id is denied until a person says it is the same Pi.
        fingerprint = lab.reflash("node03")
        keys = json.loads(lab.pimaster("keys", "list", "--json").stdout)["keys"]
        assert {"id": "node03", "state": "denied"}.items() <= next(
            k for k in keys if k["fingerprint"] == fingerprint).items()
        lab.pimaster("keys", "accept", "--replace", "node03", "--fingerprint", fingerprint)
        wait_idle(lab, "node03")
        auto_idle(lab, "enrolled node03")
        assert "node03" in sh(lab, MASTER, "srun -N4 hostname")

        # node05 leaves: its key deleted, the other nodes' slurm.conf no longer lists it.
        lab.remove(node05)
        lab.pimaster("keys", "delete", node05)
        auto_idle(lab, f"removed {node05}")
        for node in lab.nodes:
            conf = sh(lab, node, "cat /etc/slurm/slurm.conf")
            assert f"NodeName={node05}" not in conf and "node05" not in conf, f"{node} still lists node05"
            assert node05 not in sh(lab, node, "cat /etc/hosts"), f"{node}'s /etc/hosts still names node05"

        # Drift: a managed file changed by hand on node02 is named within one interval.
        cluster_yaml(check_interval="10s")
        sh(lab, "node02", "echo '# edited by hand' >> /etc/slurm/cgroup.conf")

        def drifted():
            answer = json.loads(lab.pimaster("drift", "--json", check=False).stdout)
            node = answer["nodes"].get("node02") or {}
            return node if node.get("drifted") else None
        found = Lab.wait_for(drifted, "the drift check to name node02's edited file", timeout=600, interval=3)
        named = [s["id"] for f in found["files"] for s in f["states"] if not s["corrected"]]
        assert any("cgroup.conf" in str(state) for state in named), named
        # The DRIFT column counts it (with what it would restart: slurmd watches cgroup.conf).
        row = next(line for line in lab.pimaster("nodes").stdout.splitlines() if line.startswith("node02"))
        assert row.endswith(f"{found['drifted']} state(s)"), row
    finally:
        cluster_yaml()
