"""`pimaster lab add|remove|reflash` and `lab up --cluster-dir`: Pis joining, leaving and re-flashed.

A node added to the running lab has a card holding only a piagent.conf (a join token for it alone):
it must enroll by that token with no other command. Re-flashing gives it a fresh root file system
and so a new key, which the master shows as denied until `keys accept --replace`. Removing it leaves
nothing of it on this machine. The test leaves the shared lab as it found it (node01..node04 up, no
key of the newcomer at the master).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from pimaster import lab as labmod

from lab_harness import Lab, describe, pimaster_cli


def lab_status() -> dict:
    result = pimaster_cli("lab", "status", "--json")
    return json.loads(result.stdout)


def keys_of(lab: Lab, node: str) -> dict[str, str]:
    """fingerprint -> state of the master's keys for ``node``."""
    keys = json.loads(lab.pimaster("keys", "list", "--json").stdout)["keys"]
    return {k["fingerprint"]: k["state"] for k in keys if k["id"] == node}


def traces_of(node: str) -> list[str]:
    """What of a lab node is still on this machine: namespace, processes, cgroups, files."""
    found = []
    if os.path.exists(f"/run/netns/{labmod.NETNS_PREFIX}{node}"):
        found.append("network namespace")
    port = subprocess.run(["ip", "-n", f"{labmod.NETNS_PREFIX}switch", "link", "show", f"v-{node}"],
                          capture_output=True, text=True)
    if port.returncode == 0:
        found.append("its port on the lab's switch")
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                text = Path(entry.path, "cgroup").read_text()
            except OSError:
                continue
            own = f"/{labmod.CGROUP_NAME}/{node}"
            paths = [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]
            if any(p == own or p.startswith(own + "/") for p in paths):
                found.append(f"process {entry.name}")
    cgroup_tops = [Path("/sys/fs/cgroup", labmod.CGROUP_NAME), *Path("/sys/fs/cgroup").glob("*/" + labmod.CGROUP_NAME)]
    for cgroup_root in cgroup_tops:
        if (cgroup_root / node).exists():
            found.append(f"cgroup {cgroup_root / node}")
    if (labmod.LAB_DIR / "nodes" / node).exists():
        found.append("overlay directory")
    if Path(f"/run/systemd/nspawn/propagate/{labmod.NETNS_PREFIX}{node}").exists():
        found.append("nspawn runtime directory")
    return found


@pytest.mark.parametrize("args, message", [
    (["up", "--cluster-dir", "/nonexistent/cluster"], "--cluster-dir /nonexistent/cluster does not exist"),
    (["up", "--cluster-dir", "/etc/hostname"], "--cluster-dir /etc/hostname is not a directory"),
])
def test_up_refuses_a_cluster_dir_that_is_no_directory(args, message):
    result = pimaster_cli("lab", *args)
    assert result.returncode == 2, describe(result)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.lab
def test_a_flashed_card_joins_is_reflashed_and_removed(lab):
    before = lab.nodes
    assert before == ["node01", "node02", "node03", "node04"], before

    # Refusals come before anything is made.
    for args, message in ((["add", "--name", "node02"], "node02 is already a node of the lab"),
                          (["add", "--name", "bad_name"], "letters, digits and '-' only"),
                          (["remove", "node01"], "node01 runs the lab's master"),
                          (["reflash", "node01"], "node01 runs the lab's master"),
                          (["remove", "node77"], "no node 'node77' in the lab")):
        result = pimaster_cli("lab", *args)
        assert result.returncode == 2, f"lab {' '.join(args)}: {describe(result)}"
        assert message in result.stderr, result.stderr
    assert lab.nodes == before

    name = "node05"  # the next nodeNN after the highest
    try:
        assert lab.add() == name
        # It enrolled by the token on its card: the master accepted its key with no command typed.
        assert lab.ping().get(name) is True
        assert list(keys_of(lab, name).values()) == ["accepted"]
        status = {n["name"]: n for n in lab_status()["nodes"]}
        conventional = str(ipaddress.IPv4Network(lab.state.subnet).network_address + 15)  # .10 + NN
        assert status[name]["ip"] == conventional and status[name]["state"] in ("running", "degraded")
        assert lab.exec(name, "hostname").stdout.strip() == name
        old_machine_id = lab.exec(name, "cat", "/etc/machine-id").stdout

        # Like the others, it powers off and `lab start` boots it again.
        lab.exec(name, "systemctl", "poweroff", check=False)
        Lab.wait_for(lambda: not labmod.node_running(lab.state.node(name)), f"{name} powering off", timeout=60)
        lab.start(name)
        Lab.wait_for(lambda: lab.ping().get(name), f"{name} answering ping after `lab start`", timeout=60)

        # A re-flashed card: a fresh root file system and a new key, denied while the old one is accepted.
        old_fingerprint = next(iter(keys_of(lab, name)))
        fingerprint = lab.reflash(name)
        assert fingerprint != old_fingerprint
        assert keys_of(lab, name) == {old_fingerprint: "accepted", fingerprint: "denied"}
        assert lab.exec(name, "cat", "/etc/machine-id").stdout != old_machine_id
        # What the person then types brings it back.
        lab.pimaster("keys", "accept", "--replace", name, "--fingerprint", fingerprint)
        Lab.wait_for(lambda: lab.ping().get(name), f"{name} answering ping with its new key", timeout=60)
        assert keys_of(lab, name) == {fingerprint: "accepted"}

        assert traces_of(name)  # what the check below must not find any more
        lab.remove(name)
        assert name not in [n["name"] for n in lab_status()["nodes"]]
        assert name not in lab.nodes
        assert traces_of(name) == []
        # The master was not touched: its key stays accepted until someone deletes it, and a new
        # card under that name is refused while it does.
        assert keys_of(lab, name) == {fingerprint: "accepted"}
        result = pimaster_cli("lab", "add", "--name", name)
        assert result.returncode == 2 and f"the master still accepts a key for {name}" in result.stderr, \
            describe(result)
    finally:
        if name in lab.nodes:
            pimaster_cli("lab", "remove", name)
        lab.pimaster("keys", "delete", name, "--all", "--yes", check=False)
    assert lab.nodes == before
    assert lab.all_up()


@pytest.mark.lab
def test_up_with_a_cluster_dir_runs_the_master_on_it(lab):
    """`lab up --cluster-dir DIR`: node01's master serves DIR (read-only), also after `lab start node01`."""
    cluster = Path(tempfile.mkdtemp(prefix="pimaster-cluster-"))
    (cluster / "cluster.yaml").write_text("# a cluster of the test's own\n")
    served = Lab(cluster_dir=cluster)
    lab.down()
    try:
        result = pimaster_cli("lab", "add")
        assert result.returncode == 2 and "no lab is up" in result.stderr, describe(result)
        served.ensure_up()
        assert lab_status()["cluster_dir"] == os.path.realpath(cluster)

        def master_command() -> str:
            return lab.exec("node01", "sh", "-c", "ps -eo args | grep '[p]imaster serve'", check=False).stdout

        assert "--cluster-dir /opt/pimaster/cluster" in master_command()
        shown = lab.exec("node01", "cat", "/opt/pimaster/cluster/cluster.yaml").stdout
        assert shown == "# a cluster of the test's own\n"
        assert lab.exec("node01", "touch", "/opt/pimaster/cluster/x", check=False).returncode != 0
        assert not (cluster / "x").exists()
        # Its power button boots it with the same cluster dir.
        lab.exec("node01", "systemctl", "poweroff", check=False)
        Lab.wait_for(lambda: not labmod.node_running(lab.state.node("node01")), "node01 powering off", timeout=60)
        served.start("node01")
        Lab.wait_for(lambda: "--cluster-dir /opt/pimaster/cluster" in master_command(),
                     "node01's master serving the cluster dir again", timeout=60)
    finally:
        served.down()
        lab.ensure_up()  # as the lab was: the master's default, node01..node04 up
        assert lab_status()["cluster_dir"] == (os.path.realpath(lab.cluster_dir) if lab.cluster_dir else None)
        shutil.rmtree(cluster)
