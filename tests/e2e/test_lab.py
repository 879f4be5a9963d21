"""`pimaster lab`: a simulated Pi cluster comes up, its agents enroll, and `down` leaves nothing.

The lab tests (marked `lab`) need root and systemd-nspawn; the input checks at the top run anywhere.
Tests talk to nodes only through their namespaces, never to a lab address from the host.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pimaster import lab as labmod

from lab_harness import Lab, assert_nothing_left, describe, pimaster_cli, pythonpath

CAP_SYS_TIME = 25


def has_cap(status_text: str, field: str, cap: int) -> bool:
    for line in status_text.splitlines():
        if line.startswith(field + ":"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    raise AssertionError(f"no {field} in /proc/PID/status")


# ---------------------------------------------------------------------------------------------
# Clear errors, before anything is created (no root needed)

@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes must be between 1 and 99"),
    (["--nodes", "100"], "--nodes must be between 1 and 99"),
    (["--subnet", "10.77.0.5/24"], "has host bits set; did you mean 10.77.0.0/24?"),
    (["--subnet", "8.8.8.0/24"], "is not a private range"),
    (["--subnet", "not-a-subnet"], "is not an IPv4 subnet"),
    (["--subnet", "10.77.0.0/29", "--nodes", "4"], "has room for 0 nodes"),
])
def test_up_rejects_bad_input_clearly(args, message):
    result = pimaster_cli("lab", "up", *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_not_root_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert labmod.main(["up", "--nodes", "2"]) == 1
    assert "the lab needs root" in capsys.readouterr().err


def test_missing_nspawn_names_the_package(monkeypatch, capsys):
    real_which = shutil.which
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "systemd-nspawn" else real_which(tool))
    assert labmod.main(["up"]) == 1
    assert "systemd-nspawn (apt-get install systemd-container)" in capsys.readouterr().err


def test_too_many_nodes_for_this_machine_is_a_clear_error():
    with pytest.raises(labmod.LabError, match=r"this machine can hold about \d+"):
        labmod.check_capacity(10**7)


def test_subnet_in_use_is_a_clear_error():
    # Every machine has 127.0.0.1/8 on lo: a subnet overlapping it is "in use".
    with pytest.raises(labmod.LabError, match=r"subnet 127\.0\.0\.0/24 is in use on this machine .*lo"):
        labmod.check_subnet_free(ipaddress.IPv4Network("127.0.0.0/24"))


# ---------------------------------------------------------------------------------------------
# A 4-node lab

@pytest.mark.lab
def test_all_agents_enroll_and_answer_ping(lab: Lab):
    result = pimaster_cli("lab", "exec", "node01", "--", "pimaster", "ping", "--json")
    assert result.returncode == 0, describe(result)
    nodes = json.loads(result.stdout)["nodes"]
    assert sorted(n["id"] for n in nodes) == ["node01", "node02", "node03", "node04"]
    assert all(n["ok"] for n in nodes), nodes


@pytest.mark.lab
def test_host_commands_reach_the_lab_master_through_its_state_dir(lab: Lab):
    # What `lab up` tells users to export: host-side commands use the master's control socket in a
    # bind-mounted directory, so no packet goes from the host to the lab network.
    assert f"export PIMASTER_STATE_DIR={lab.master_state_dir}" in lab.up_output
    env = {"PIMASTER_STATE_DIR": str(lab.master_state_dir)}
    ping = pimaster_cli("ping", "--json", env=env)
    assert ping.returncode == 0, describe(ping)
    assert {n["id"] for n in json.loads(ping.stdout)["nodes"] if n["ok"]} == set(lab.nodes)
    keys = pimaster_cli("keys", "list", "--json", env=env)
    assert keys.returncode == 0, describe(keys)
    assert {k["id"]: k["state"] for k in json.loads(keys.stdout)["keys"]} == {n: "accepted" for n in lab.nodes}


@pytest.mark.lab
def test_apply_from_a_host_directory_node01_cannot_see(lab: Lab):
    # A clone under the host's /tmp: node01 (the master) has a /tmp of its own, so only the client
    # can read the state tree; it serves the files the master's rendering asks for.
    site = Path(tempfile.mkdtemp(prefix="pimaster-hosttree-", dir="/tmp"))
    try:
        (site / "files").mkdir()
        (site / "cluster.yaml").write_text("cluster:\n  name: hosttree\nnodes:\n  - id: node02\n    roles: [probe]\n")
        (site / "files" / "probe.j2").write_text("{{ node.id }} {{ node.roles | join(',') }} {{ cluster.name }}\n")
        (site / "probe.yaml").write_text(
            "/run/pimaster-hosttree:\n  file.managed:\n    - source: files/probe.j2\n    - template: jinja\n")
        assert lab.exec("node01", "test", "-e", str(site), check=False).returncode != 0, "node01 sees the host's /tmp"
        env = {"PIMASTER_STATE_DIR": str(lab.master_state_dir)}
        result = pimaster_cli("apply", "probe.yaml", "--target", "role:probe", "--json", env=env, cwd=site)
        assert result.returncode == 0, describe(result)
        assert list(json.loads(result.stdout)["nodes"]) == ["node02"]
        assert lab.exec("node02", "cat", "/run/pimaster-hosttree").stdout == "node02 probe hosttree\n"
        # `ping role:probe` reads the roles that apply read: the inventory node01 cannot see.
        ping = pimaster_cli("ping", "--target", "role:probe", "--json", env=env)
        assert ping.returncode == 0, describe(ping)
        assert [n["id"] for n in json.loads(ping.stdout)["nodes"]] == ["node02"]
    finally:
        shutil.rmtree(site, ignore_errors=True)
        lab.exec("node02", "rm", "-f", "/run/pimaster-hosttree", check=False)


@pytest.mark.lab
def test_each_node_is_its_own_fresh_machine(lab: Lab):
    host_machine_id = Path("/etc/machine-id").read_text().strip() if Path("/etc/machine-id").exists() else ""
    seen_ids, seen_keys = set(), set()
    for node in lab.nodes:
        assert lab.exec(node, "hostname").stdout.strip() == node
        machine_id = lab.exec(node, "cat", "/etc/machine-id").stdout.strip()
        assert machine_id and machine_id != host_machine_id and machine_id not in seen_ids
        seen_ids.add(machine_id)
        assert lab.exec(node, "systemctl", "is-system-running", check=False).stdout.strip() in ("running", "degraded")
        assert lab.exec(node, "systemctl", "is-active", "piagent").stdout.strip() == "active"
        # The join token was in the node's boot config, as on a freshly flashed SD card.
        assert "token" in lab.exec(node, "cat", "/boot/firmware/piagent.conf").stdout
        # Nothing cluster-specific from the host: munge keys are per node (if munge is there at all).
        key = lab.exec(node, "sh", "-c", "test ! -e /etc/munge/munge.key || sha256sum /etc/munge/munge.key").stdout
        if key:
            assert key not in seen_keys
            seen_keys.add(key)
        assert lab.exec(node, "test", "-e", "/etc/slurm/slurm.conf", check=False).returncode != 0
        assert lab.exec(node, "test", "-e", "/usr/sbin/policy-rc.d", check=False).returncode != 0
    # Only node01 runs the master.
    assert lab.exec("node01", "systemctl", "is-active", "pimaster").stdout.strip() == "active"
    assert lab.exec("node02", "systemctl", "is-active", "pimaster", check=False).stdout.strip() != "active"


@pytest.mark.lab
def test_nodes_run_the_packaged_units(lab: Lab):
    # One source: debian/*.service as the .deb ships them; the lab changes only ExecStart (a drop-in).
    debian = Path(__file__).resolve().parents[2] / "debian"
    for node, unit in (("node01", "pimaster.service"), ("node01", "piagent.service"), ("node02", "piagent.service")):
        assert lab.exec(node, "cat", f"/etc/systemd/system/{unit}").stdout == (debian / unit).read_text()
        shown = lab.exec(node, "systemctl", "show", "-p", "WatchdogUSec,StateDirectory,DropInPaths", unit).stdout
        props = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
        assert props["WatchdogUSec"] == "1min", (node, unit, props)
        assert props["StateDirectory"] == unit.split(".")[0], (node, unit, props)
        assert props["DropInPaths"] == f"/etc/systemd/system/{unit}.d/lab.conf", (node, unit, props)


@pytest.mark.lab
def test_node_address_is_configured_by_networkd_inside_the_node(lab: Lab):
    node = "node04"
    links = lab.exec(node, "networkctl", "list", "--no-legend", "--no-pager").stdout
    assert any(line.split()[1:2] == ["eth0"] and "configured" in line for line in links.splitlines()), links

    def addresses() -> list[str]:
        out = lab.exec(node, "ip", "-j", "-4", "addr", "show", "dev", "eth0").stdout
        # (empty while networkd reconfigures the link)
        return [a["local"] for link in json.loads(out) for a in link["addr_info"]]

    assert addresses() == [lab.ip(node)]
    # Changing the .network file changes the address, as a state would on a real system.
    extra = str(ipaddress.IPv4Address(lab.ip(node)) + 100)
    dropin = "/etc/systemd/network/10-eth0.network.d/test-extra.conf"
    lab.exec(node, "sh", "-c", f"mkdir -p {os.path.dirname(dropin)} && "
                               f"printf '[Network]\\nAddress={extra}/24\\n' > {dropin}")
    try:
        lab.exec(node, "networkctl", "reload")
        Lab.wait_for(lambda: extra in addresses(), f"{extra} on {node}'s eth0", timeout=60)
    finally:
        lab.exec(node, "rm", "-f", dropin)
        lab.exec(node, "networkctl", "reload")
        lab.exec(node, "networkctl", "reconfigure", "eth0")
    Lab.wait_for(lambda: addresses() == [lab.ip(node)], f"{node} back to only {lab.ip(node)}", timeout=60)


@pytest.mark.lab
def test_nothing_in_a_node_can_set_the_host_clock(lab: Lab):
    # Commands entered from the host (`lab exec`) ...
    status = lab.exec("node02", "cat", "/proc/self/status").stdout
    for field in ("CapBnd", "CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert not has_cap(status, field, CAP_SYS_TIME), field
    # ... and the node's own services.
    pid = lab.exec("node02", "systemctl", "show", "-p", "MainPID", "--value", "piagent").stdout.strip()
    status = lab.exec("node02", "cat", f"/proc/{pid}/status").stdout
    assert not has_cap(status, "CapBnd", CAP_SYS_TIME)


@pytest.mark.lab
def test_commands_entered_into_a_node_get_no_more_than_the_node_itself(lab: Lab):
    """`lab exec` (and `lab status`, which runs the node's systemctl and ip) runs the node's own
    programs, which root in the node may have replaced: they get the capabilities nspawn gave the
    node's PID 1 (less CAP_SYS_TIME), never the host's (CAP_SYS_MODULE would load a kernel module)."""
    def caps(status: str, field: str) -> int:
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")), 16)

    entered = lab.exec("node02", "cat", "/proc/self/status").stdout
    pid1 = lab.exec("node02", "cat", "/proc/1/status").stdout
    assert caps(entered, "CapBnd") == caps(pid1, "CapBnd") & ~(1 << CAP_SYS_TIME)
    assert caps(entered, "CapEff") & ~caps(pid1, "CapBnd") == 0
    for cap in (16, 17):  # CAP_SYS_MODULE, CAP_SYS_RAWIO: nspawn never gives them
        assert not caps(entered, "CapEff") & (1 << cap)


@pytest.mark.lab
def test_host_never_routes_to_the_lab(lab: Lab):
    subnet = ipaddress.IPv4Network(lab.state.subnet)
    routes = json.loads(subprocess.run(["ip", "-j", "-4", "route", "show", str(subnet)],
                                       capture_output=True, text=True, check=True).stdout)
    assert [r["type"] for r in routes if r.get("dst") == str(subnet)] == ["unreachable"]
    # `ip route get` only asks the kernel; it sends nothing.
    lookup = subprocess.run(["ip", "route", "get", lab.ip("node01")], capture_output=True, text=True)
    assert lookup.returncode != 0 or "unreachable" in lookup.stdout
    host_addrs = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True,
                                           check=True).stdout)
    for link in host_addrs:
        for a in link.get("addr_info", []):
            assert ipaddress.IPv4Address(a["local"]) not in subnet, link["ifname"]
    # And no way out of the lab: nodes have no default route.
    for node in lab.nodes:
        assert lab.exec(node, "ip", "-4", "route", "show", "default").stdout.strip() == ""


@pytest.mark.lab
def test_restarted_agent_comes_back(lab: Lab):
    def main_pid() -> str:
        return lab.exec("node03", "systemctl", "show", "-p", "MainPID", "--value", "piagent").stdout.strip()

    before = main_pid()
    lab.exec("node03", "systemctl", "restart", "piagent")
    assert main_pid() not in (before, "0")
    Lab.wait_for(lambda: lab.ping().get("node03"), "node03 to answer ping after `systemctl restart piagent`")
    assert all(lab.ping().values())


@pytest.mark.lab
def test_apt_install_works_offline_in_a_node(lab: Lab):
    # The host fetched the .debs before the nodes started; the node has no route out.
    result = lab.exec("node02", "env", "DEBIAN_FRONTEND=noninteractive",
                      "apt-get", "install", "-y", "-q", "ntpsec-ntpdate", timeout=300)
    assert "ntpdate" in lab.exec("node02", "sh", "-c", "command -v ntpdate").stdout, describe(result)
    # Copy-on-write: the package landed in node02 only.
    assert lab.exec("node03", "sh", "-c", "command -v ntpdate", check=False).returncode != 0


@pytest.mark.lab
def test_lab_exec_passes_stdin_stdout_and_exit_status(lab: Lab):
    result = pimaster_cli("lab", "exec", "node02", "--", "sh", "-c", "tr a-z A-Z; exit 3", input="hello\n")
    assert (result.returncode, result.stdout) == (3, "HELLO\n")
    unknown = pimaster_cli("lab", "exec", "node99", "--", "true")
    assert unknown.returncode == 1 and "no node 'node99' in the lab" in unknown.stderr


@pytest.mark.lab
def test_status_and_a_second_up(lab: Lab):
    status = pimaster_cli("lab", "status", "--json")
    assert status.returncode == 0, describe(status)
    report = json.loads(status.stdout)
    assert [(n["name"], n["state"], n["addresses"], n["services"]["piagent"]) for n in report["nodes"]] == [
        (name, "running", [f"{lab.ip(name)}/24"], "active") for name in lab.nodes]
    again = pimaster_cli("lab", "up", "--nodes", "2")
    assert again.returncode == 1 and "is already up" in again.stderr


# ---------------------------------------------------------------------------------------------
# Tear-down (these take the shared lab down; a later test brings it up again)

@pytest.mark.lab
def test_down_leaves_nothing_behind(lab: Lab):
    subnet = lab.state.subnet
    result = lab.down()
    assert result.returncode == 0, describe(result)
    assert_nothing_left(subnet)


@pytest.mark.lab
def test_up_after_a_crash_cleans_up_first(lab_session: Lab):
    if lab_session.is_up:
        lab_session.down()
    env = dict(os.environ, PYTHONPATH=pythonpath())
    crashing = subprocess.Popen([sys.executable, "-m", "pimaster", "lab", "up", "--nodes", "2"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def node01_booting() -> bool:
        try:
            state = labmod.Lab.load()
        except labmod.LabError:
            return False
        return bool(state and labmod.leader_pid(state.nodes[0]))

    try:
        Lab.wait_for(node01_booting, "`lab up` to start booting node01", timeout=300, interval=0.05)
    finally:
        crashing.send_signal(signal.SIGKILL)
        crashing.wait()
    # The crashed `up` left a running node behind; status says so and a new `up` cleans it away.
    assert pimaster_cli("lab", "status").returncode != 0
    again = pimaster_cli("lab", "up", "--nodes", "2")
    try:
        assert again.returncode == 0, describe(again)
        assert "Cleaning up what an earlier lab left behind" in again.stdout
        ping = pimaster_cli("lab", "exec", "node01", "--", "pimaster", "ping", "--json")
        assert {n["id"] for n in json.loads(ping.stdout)["nodes"] if n["ok"]} == {"node01", "node02"}
    finally:
        down = pimaster_cli("lab", "down")
    assert down.returncode == 0, describe(down)
    assert_nothing_left(labmod.DEFAULT_SUBNET)
