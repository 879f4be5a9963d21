"""ARM lab nodes: what a Pi runs (arm64 and armhf Debian userlands), under qemu-user.

One mixed lab for the module, as the issue has it: node01 native (the master), node02 arm64, node03
armhf, node04 native (`pimaster lab up --arch node02=arm64,node03=armhf`). The first run on a
machine builds the two roots (debootstrap, a few minutes each); later runs reuse them offline.
Marker `arm`: `-m "not arm"` skips the module.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from pimaster import lab as labmod
from pimaster.lab import arch as labarch

from conftest import CLUSTER_DIR
from lab_harness import Lab, assert_nothing_left, describe, pimaster_cli

pytestmark = [pytest.mark.lab, pytest.mark.arm]

ARCHES = {"node01": None, "node02": "arm64", "node03": "armhf", "node04": None}
STATES = "/opt/pimaster/cluster"  # the lab master's cluster dir (a copy of the shipped states)


def host_dpkg() -> tuple[str, str]:
    """This machine's own dpkg: its foreign architectures and the status of what it has installed."""
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout
    return foreign, hashlib.sha256(Path("/var/lib/dpkg/status").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def arm_lab(lab_session):
    """The mixed lab; the shared lab goes down for it and comes back for the next test that needs it."""
    if lab_session.is_up:
        lab_session.down()
    mixed = Lab(cluster_dir=CLUSTER_DIR, arch="node02=arm64,node03=armhf")
    mixed.host_dpkg_before = host_dpkg()  # (building the roots, if they are not cached, happens now)
    try:
        yield mixed.ensure_up()
    finally:
        mixed.down()


def nodes_json(lab: Lab) -> dict[str, dict]:
    return {n["id"]: n for n in json.loads(lab.pimaster("nodes", "--json").stdout)["nodes"]}


def apply(lab: Lab, state: str, target: str, timeout: float = 900) -> dict:
    """`pimaster apply --json` in node01: the job's JSON, whatever its outcome."""
    result = lab.pimaster("apply", f"{STATES}/{state}", "--target", target, "--json", check=False,
                          timeout=timeout)
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"apply {state} printed no JSON: {describe(result)}") from None


def all_ok(job: dict) -> bool:
    return bool(job["nodes"]) and all(n["ok"] and n["status"] == "done" for n in job["nodes"].values())


def test_arm_nodes_run_the_agent_from_its_deb_on_their_own_architecture(arm_lab: Lab):
    """`nodes --json` shows each node's real userland; the ARM nodes run piagent installed by dpkg
    from the project's .deb with Debian's packages of their architecture, under the packaged unit."""
    nodes = nodes_json(arm_lab)
    assert {name: n["facts"].get("arch") for name, n in nodes.items()} == {
        "node01": labarch.native_arch(), "node02": "arm64", "node03": "armhf", "node04": labarch.native_arch()}
    assert nodes["node02"]["facts"]["machine"] == "aarch64"
    assert nodes["node03"]["facts"]["machine"] in ("armv7l", "armv8l")
    for name in ("node02", "node03"):
        assert nodes[name]["facts"]["network_backend"] == "none"  # qemu-user runs no network manager
        assert arm_lab.exec(name, "dpkg", "--print-architecture").stdout.strip() == ARCHES[name]
        # The agent's files belong to the installed piagent package; its Python is the node's own.
        assert arm_lab.exec(name, "dpkg-query", "-W", "-f=${Status}", "piagent").stdout == "install ok installed"
        assert arm_lab.exec(name, "dpkg", "-S", "/usr/bin/piagent").stdout.startswith("piagent:")
        for dep in ("python3-zmq", "python3-msgpack", "python3-systemd"):
            shown = arm_lab.exec(name, "dpkg-query", "-W", "-f=${Architecture}", dep).stdout
            assert shown == ARCHES[name], (name, dep, shown)
        main = arm_lab.exec(name, "systemctl", "show", "-p", "ExecStart", "piagent").stdout
        assert "path=/usr/bin/piagent" in main and "/opt/pimaster" not in main
        assert arm_lab.exec(name, "test", "-e", "/opt/pimaster/src", check=False).returncode != 0
        # Commands entered into an ARM node lose CAP_SYS_TIME too.
        bounding = arm_lab.exec(name, "sh", "-c", "grep CapBnd /proc/self/status").stdout.split()[1]
        assert not int(bounding, 16) & (1 << 25), bounding
    assert nodes["node01"]["facts"]["network_backend"] == "networkd"
    # Fetching and installing the ARM packages left this machine's dpkg as it was: no foreign
    # architecture added, no package installed or removed.
    assert host_dpkg() == arm_lab.host_dpkg_before
    # `lab status` says which node is which.
    status = json.loads(pimaster_cli("lab", "status", "--json").stdout)
    assert {n["name"]: n["arch"] for n in status["nodes"]} == {
        name: a or labarch.native_arch() for name, a in ARCHES.items()}
    assert arm_lab.all_up()


def test_arm_node_targets_by_architecture(arm_lab: Lab):
    """`arch=` and `network_backend=` pick nodes by what their agents report."""
    result = arm_lab.pimaster("run", "arch=arm* network_backend=none", "--json", "--", "uname", "-m")
    shown = {name: n["stdout"].strip() for name, n in json.loads(result.stdout)["nodes"].items()}
    assert sorted(shown) == ["node02", "node03"], result.stdout
    assert shown["node02"] == "aarch64" and shown["node03"].startswith("armv")


def test_time_and_slurm_converge_on_arm64_armhf_slurmd_cannot_list_its_plugins_under_qemu_arm(arm_lab: Lab):
    """`apply time` and `apply slurm` on node02 (arm64) install Debian's arm64 chrony, munge and
    slurmd offline and converge; a second apply changes nothing; srun runs on node02 and node04.
    node03 (armhf) stays out of the Slurm run: its slurmd cannot list its plugin directory under
    qemu-arm (32-bit readdir gets EOVERFLOW from the host's 64-bit ext4 directory offsets; README)."""
    target = "node01,node02,node04"
    for state in ("network.yaml", "time.yaml", "slurm.yaml"):
        job = apply(arm_lab, state, target)
        assert all_ok(job) and sorted(job["nodes"]) == target.split(","), f"{state}: {json.dumps(job, indent=1)[-3000:]}"
    installed = arm_lab.exec("node02", "dpkg-query", "-W", "-f=${Package}:${Architecture} ",
                             "chrony", "munge", "slurmd").stdout.split()
    assert installed == ["chrony:arm64", "munge:arm64", "slurmd:arm64"]
    for unit in ("chrony", "munge", "slurmd"):
        assert arm_lab.exec("node02", "systemctl", "is-active", unit, check=False).stdout.strip() == "active", unit
    for state in ("time.yaml", "slurm.yaml"):
        again = apply(arm_lab, state, "node02")["nodes"]["node02"]
        assert again["ok"] and again["changed"] == 0, f"second {state} on node02 changed something: {again}"

    def answers() -> list[str]:
        out = arm_lab.exec("node01", "timeout", "60", "srun", "-N2", "-w", "node02,node04", "hostname",
                           check=False, timeout=90)
        return sorted(out.stdout.split()) if out.returncode == 0 else []

    Lab.wait_for(lambda: answers() == ["node02", "node04"], "srun -N2 on node02 (arm64) and node04", timeout=120,
                 interval=3)


def test_kubeadm_refuses_the_armhf_node_before_changing_anything(arm_lab: Lab):
    """node03's userland is 32-bit (its own `dpkg --print-architecture`): kubeadm.yaml stops there
    with a message saying so, and nothing on node03 changed."""
    watched = ["/boot/firmware/cmdline.txt", "/etc/sysctl.d/k8s.conf", "/etc/modules-load.d/k8s.conf",
               "/etc/containerd/config.toml"]

    def snapshot() -> str:
        return arm_lab.exec("node03", "sh", "-c", "for f in " + " ".join(watched)
                            + "; do echo \"== $f\"; cat \"$f\" 2>/dev/null; done; "
                              "dpkg-query -W -f='${Package} ' 2>/dev/null | wc -w; swapon --show=NAME 2>/dev/null",
                            check=False).stdout

    before = snapshot()
    job = apply(arm_lab, "kubeadm.yaml", "node03")
    node03 = job["nodes"]["node03"]
    assert not node03["ok"] and node03["changed"] == 0
    # The refusal is the node's only state: nothing after it ran.
    assert [(s["id"], s["status"]) for s in node03["states"]] == [("kubernetes-64-bit", "failed")], node03
    said = node03["states"][0]["changes"]["stderr"]
    assert "node03 runs a 32-bit userland (armhf" in said and "nothing was changed here" in said, said
    assert snapshot() == before


def test_lab_down_removes_every_arm_node_and_leaves_binfmt_as_the_package_made_it(arm_lab: Lab):
    subnet = arm_lab.state.subnet
    registered = {q: Path("/proc/sys/fs/binfmt_misc", q).read_text() for q, _ in labarch.ARM_ARCHES.values()}
    result = arm_lab.down()
    assert result.returncode == 0, describe(result)
    assert_nothing_left(subnet)
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(labarch.ROOTS_DIR) not in mounts
    qemu = [p.name for p in Path("/proc").glob("[0-9]*") if _cmdline(p).startswith("/usr/libexec/qemu-binfmt")]
    assert qemu == []
    # The cached roots stay for the next `up --arch`, and so do qemu-user-static's registrations.
    assert (labarch.ROOTS_DIR / "arm64/usr/bin/piagent").exists()
    assert {q: Path("/proc/sys/fs/binfmt_misc", q).read_text() for q in registered} == registered


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def test_up_with_arch_reuses_the_cached_roots_and_lab_add_takes_an_arch(arm_lab: Lab):
    """A second `up --arch` builds nothing: no debootstrap, no download (the roots are cached); a
    card flashed for an armhf Pi joins the running lab with `lab add --arch armhf`."""
    if arm_lab.is_up:
        arm_lab.down()
    again = Lab(size=2, cluster_dir=CLUSTER_DIR, arch="arm64")
    try:
        again.ensure_up()
        assert "debootstrap" not in again.up_output and "Fetching" not in again.up_output, again.up_output
        assert json.loads(pimaster_cli("lab", "status", "--json").stdout)["nodes"][1]["arch"] == "arm64"
        added = pimaster_cli("lab", "add", "--arch", "armhf", "--json")
        assert added.returncode == 0, describe(added)
        report = json.loads(added.stdout)
        assert (report["name"], report["arch"]) == ("node03", "armhf")
        assert nodes_json(again)["node03"]["facts"]["arch"] == "armhf"
        refused = pimaster_cli("lab", "add", "--arch", "mips")
        assert refused.returncode == 2 and "not an architecture the lab has" in refused.stderr
        assert again.all_up() and again.nodes == ["node01", "node02", "node03"]
    finally:
        again.down()
    assert labmod.Lab.load() is None
