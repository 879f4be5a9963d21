"""`pimaster run` and `apply --batch N --fail-stop` on the lab: four nodes, each its own machine
(hostname, /run), the master in node01."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from lab_harness import Lab, describe, pimaster_cli

MARK = "/run/pimaster-e2e-failstop"


@pytest.mark.lab
def test_run_prints_each_nodes_name(lab: Lab):
    result = lab.pimaster("run", "*", "--", "uname", "-n", check=False)
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    for node in lab.nodes:
        assert f"{node}: {node}" in lines, describe(result)
    report = json.loads(lab.pimaster("run", "*", "--json", "--", "uname", "-n").stdout)
    assert {n: r["stdout"] for n, r in report["nodes"].items()} == {n: f"{n}\n" for n in lab.nodes}


@pytest.mark.lab
def test_apply_batch_fail_stop_leaves_the_later_batch_untouched(lab: Lab):
    nodes = sorted(lab.nodes)
    assert nodes[:2] == ["node01", "node02"] and len(nodes) == 4, nodes
    for node in nodes:
        lab.exec(node, "rm", "-f", MARK)
    site = Path(tempfile.mkdtemp(prefix="pimaster-failstop-", dir="/tmp"))
    try:
        # Every node marks that it ran the job; node02's state then fails.
        (site / "failstop.yaml").write_text(
            f"mark:\n  cmd.run:\n    - name: date > {MARK}; test {{{{ node.id }}}} != node02\n")
        env = {"PIMASTER_STATE_DIR": str(lab.master_state_dir)}
        result = pimaster_cli("apply", "failstop.yaml", "--batch", "2", "--fail-stop", env=env, cwd=site)
        assert result.returncode == 1, describe(result)
        assert "batch 1: node01, node02" in result.stdout and "batch 2" not in result.stdout, describe(result)
        assert "stopped: --fail-stop: node02 failed" in result.stdout, describe(result)
        ran = {node: lab.exec(node, "test", "-e", MARK, check=False).returncode == 0 for node in nodes}
        assert ran == {"node01": True, "node02": True, "node03": False, "node04": False}
        job = json.loads(pimaster_cli("job", "last", "--json", env=env).stdout)
        assert {n: r["result"] for n, r in job["nodes"].items()} == \
            {"node01": "changed", "node02": "failed", "node03": "not sent", "node04": "not sent"}
    finally:
        shutil.rmtree(site, ignore_errors=True)
        for node in nodes:
            lab.exec(node, "rm", "-f", MARK, check=False)
