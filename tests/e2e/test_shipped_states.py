"""The shipped state files (states/time.yaml, nfs.yaml, slurm.yaml) on the 4-node lab, as a person uses them.

node01 is the master, Slurm controller, NFS and time server, node02..node04 are compute nodes: the
example inventory states/cluster.yaml describes exactly this lab. Every test runs `pimaster apply
NAME --json` in node01 with the bare name of a shipped file (found in the source tree's states/,
bound into the node), checks the nodes themselves (ntpdate, exportfs, fstab, munge, sinfo, srun),
and applies the file a second time, which must change nothing.

What the lab cannot do, and the tests say so in their names: set the clock (it is the host's;
chronyd runs with -x there and `ntpdate -q` only queries), run kernel NFS (no nfsd or nfs in this
kernel: the export is checked with exportfs, the clients' fstab lines are checked, the mounts fail
and the tests assert that those are the only failures), and set up loop devices (a disk image
stands in for the NFS server's disk; it is formatted, never reformatted, but not mounted).

The lab is shared with the other e2e tests: time sync and the Slurm cluster stay (both survive a
node reboot), the NFS parts that cannot work here are taken back so that no unit fails at a boot.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest
import yaml

from lab_harness import Lab, describe

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
MASTER = "node01"
COMPUTE = ["node02", "node03", "node04"]
NODE_STATES = "/opt/pimaster/src/states"      # the source tree's states/, as node01 sees it
EXPORT = "/clusterfs"


def apply(lab: Lab, spec: str, *args: str) -> tuple[dict, float, str]:
    """`pimaster apply SPEC --json ARGS` in node01: the report, the wall time, and the raw output."""
    started = time.monotonic()
    result = lab.pimaster("apply", spec, "--json", *args, check=False, timeout=900)
    elapsed = time.monotonic() - started
    try:
        report = json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"pimaster apply {spec} printed no report: {describe(result)}") from None
    failed = any(n["failed"] or n["status"] != "done" for n in report["nodes"].values())
    assert result.returncode == (1 if failed else 0), describe(result)
    return report, elapsed, result.stdout


def failures(report: dict) -> dict[str, list[tuple[str, str]]]:
    """Node -> the (function, name) of each failed state; nodes without failures are left out."""
    found = {node: [(s["fun"], s["name"]) for s in item["states"] if s["status"] == "failed"]
             for node, item in report["nodes"].items()}
    return {node: states for node, states in found.items() if states}


def comment(report: dict, node: str, fun: str, name: str) -> str:
    return next(s["comment"] for s in report["nodes"][node]["states"] if s["fun"] == fun and s["name"] == name)


def changed(report: dict) -> dict[str, list[str]]:
    """Node -> the states that changed something (a second run must have none)."""
    return {node: [f"{s['fun']} {s['name']}" for s in item["states"] if s["status"] == "changed"]
            for node, item in report["nodes"].items()}


def assert_every_node_done(report: dict, lab: Lab) -> None:
    assert sorted(report["nodes"]) == sorted(lab.nodes), f"applied to {sorted(report['nodes'])}"
    not_done = {n: i["status"] for n, i in report["nodes"].items() if i["status"] != "done"}
    assert not not_done, not_done


def sh(lab: Lab, node: str, script: str, check: bool = True, **kwargs) -> str:
    return lab.exec(node, "sh", "-c", script, check=check, **kwargs).stdout


def figures(what: str, first: float, second: float) -> None:
    print(f"\n{what}: first apply {first:.1f} s, second apply {second:.1f} s")


# ---------------------------------------------------------------------------------------------
# time.yaml

def chrony_sources(lab: Lab, node: str) -> list[str]:
    """The sources chronyd uses, as `chronyc -n sources` lists them ("^* 10.77.0.11 ...")."""
    return [line for line in sh(lab, node, "chronyc -n sources", check=False).splitlines() if line.startswith("^")]


def test_time_master_serves_every_node_follows_it_query_only_lab_cannot_set_clock(lab):
    first, first_s, _ = apply(lab, "time")
    assert_every_node_done(first, lab)
    assert not failures(first), failures(first)
    master_ip = lab.ip(MASTER)

    # Every node gets an answer from the master's chrony: stratum 8 is its `local stratum`, what it
    # serves with no internet. Query only (-q): setting the clock would set the host's.
    for node in lab.nodes:
        answer = lab.exec(node, "ntpdate", "-q", master_ip).stdout
        assert f" {master_ip} s8 " in answer, f"{node}: {answer}"

    # Every other node follows the master alone, and has picked it (`^*`) as its time source.
    for node in COMPUTE:
        Lab.wait_for(lambda: any(s.startswith("^*") and f" {master_ip} " in s for s in chrony_sources(lab, node)),
                     f"{node}'s chronyd to select {master_ip}", timeout=90, interval=2)
        assert len(chrony_sources(lab, node)) == 1, chrony_sources(lab, node)
    # In a container chronyd may not set the clock: it runs with -x, there only.
    for node in lab.nodes:
        assert sh(lab, node, "systemctl is-active chrony").strip() == "active"
        assert " -x " in sh(lab, node, "systemctl show -p ExecStart chrony") + " "

    ping = json.loads(lab.pimaster("ping", "--json").stdout)["nodes"]
    offsets = {n["id"]: n.get("clock_offset_ms") for n in ping}
    assert all(o is not None and abs(o) < 100 for o in offsets.values()), offsets

    second, second_s, _ = apply(lab, "time")
    assert not failures(second), failures(second)
    assert changed(second) == {n: [] for n in lab.nodes}
    figures("time.yaml", first_s, second_s)
    print(f"clock offsets from the master (ms): {offsets}")


# ---------------------------------------------------------------------------------------------
# nfs.yaml

FSTAB_LINE = f"{{server}}:{EXPORT} {EXPORT} nfs defaults,_netdev,nofail 0 0"


def kernel_has(lab: Lab, node: str, fs: str) -> bool:
    return fs in sh(lab, node, "cat /proc/filesystems").split()


def test_nfs_exported_and_in_clients_fstab_mounts_fail_kernel_nfs_impossible_in_lab(lab):
    master_ip = lab.ip(MASTER)
    assert not kernel_has(lab, MASTER, "nfsd") and not kernel_has(lab, "node02", "nfs"), \
        "this kernel can do NFS: the test should expect the mounts to work"
    fstab_before = {node: sh(lab, node, "cat /etc/fstab") for node in COMPUTE}
    try:
        first, first_s, _ = apply(lab, "nfs")
        assert_every_node_done(first, lab)
        # The only failures: the NFS server cannot start (no nfsd) and the clients cannot mount.
        expected = {MASTER: [("service.running", "nfs-server")], **{n: [("mount.mounted", EXPORT)] for n in COMPUTE}}
        assert failures(first) == expected, failures(first)
        assert "nfs-server" in comment(first, MASTER, "service.running", "nfs-server")
        assert "Failed to mount proc-fs-nfsd.mount" in sh(lab, MASTER, "journalctl -u proc-fs-nfsd.mount -o cat")
        for node in COMPUTE:
            assert "No such device" in comment(first, node, "mount.mounted", EXPORT)

        # The server side, for real: the export the kernel would serve, with safe options.
        exports = sh(lab, MASTER, "exportfs -v")
        entry = " ".join(exports.split())
        assert entry.startswith(f"{EXPORT} 10.77.0.0/24("), exports
        options = entry.split("(", 1)[1].rstrip(")").split(",")
        for option in ("rw", "sync", "no_subtree_check", "root_squash"):
            assert option in options, exports
        assert "no_root_squash" not in options
        assert sh(lab, MASTER, f"stat -c %a {EXPORT}").strip() == "1777"
        assert sh(lab, MASTER, "systemctl is-enabled nfs-server").strip() == "enabled"
        # The clients: package, mount point, fstab line that lets a node boot without the server.
        for node in COMPUTE:
            assert sh(lab, node, "dpkg-query -W -f='${Status}' nfs-common") == "install ok installed"
            assert lab.exec(node, "test", "-d", EXPORT, check=False).returncode == 0
            fstab = sh(lab, node, "cat /etc/fstab")
            assert fstab == fstab_before[node] + FSTAB_LINE.format(server=master_ip) + "\n", fstab

        second, second_s, _ = apply(lab, "nfs")
        assert failures(second) == expected, failures(second)
        assert changed(second) == {n: [] for n in lab.nodes}
        figures("nfs.yaml", first_s, second_s)
        print(f"exportfs -v on {MASTER}: {' '.join(exports.split())}")
    finally:
        # What cannot work here must not fail at the next boot of a node (another test may reboot one).
        sh(lab, MASTER, "systemctl disable nfs-server; systemctl reset-failed", check=False)
        for node in COMPUTE:
            lab.exec(node, "sh", "-c", "cat > /etc/fstab", input=fstab_before[node])
            sh(lab, node, "systemctl daemon-reload; systemctl reset-failed", check=False)


DISK_DIR = "/root/pm-nfs-disk"               # a copy of the shipped states with a disk in the inventory
DISK_IMAGE = "/var/tmp/pm-clusterfs.img"     # stands in for the server's USB disk
DISK_EXPORT = "/srv/pm-clusterfs"
NEW_IMAGE = f"rm -f {DISK_IMAGE} && truncate -s 32M {DISK_IMAGE}"
# A DOS partition table with one Linux partition, as `fdisk` writes it (the lab has no fdisk).
MBR = ("import struct, sys; f = open(sys.argv[1], 'r+b'); f.seek(446); "
       "f.write(bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack('<II', 2048, 20480)); f.seek(510); f.write(b'\\x55\\xaa')")


def blkid(lab: Lab, what: str) -> str:
    return sh(lab, MASTER, f"blkid -p -o value -s {what} {DISK_IMAGE}", check=False).strip()


def test_nfs_disk_formatted_only_when_blank_fstab_by_uuid_lab_has_no_loop_devices(lab):
    assert lab.exec(MASTER, "test", "-e", "/dev/loop-control", check=False).returncode != 0, \
        "this node has loop devices: the test should expect the disk image to mount"
    inventory = yaml.safe_load((REPO / "states" / "cluster.yaml").read_text())
    inventory["cluster"]["nfs"].update(device=DISK_IMAGE, export=DISK_EXPORT)
    fstab_before = sh(lab, MASTER, "cat /etc/fstab")
    sh(lab, MASTER, f"rm -rf {DISK_DIR} && cp -r {NODE_STATES} {DISK_DIR}")
    lab.exec(MASTER, "sh", "-c", f"cat > {DISK_DIR}/cluster.yaml", input=yaml.safe_dump(inventory))
    state_file = f"{DISK_DIR}/nfs.yaml"
    try:
        # A blank disk: formatted once, put in fstab by its UUID. Mounting it needs a loop device,
        # which the lab's nodes do not have: that is the one failure, and what needs it is not run.
        sh(lab, MASTER, NEW_IMAGE)
        first, _, _ = apply(lab, state_file, "--target", MASTER)
        node = first["nodes"][MASTER]
        assert failures(first) == {MASTER: [("mount.mounted", DISK_EXPORT)]}, failures(first)
        assert "mount failed: Operation not permitted" in comment(first, MASTER, "mount.mounted", DISK_EXPORT)
        status = {s["id"]: s["status"] for s in node["states"]}
        assert status["clusterfs-format"] == "changed" and status["clusterfs-fstab"] == "changed", status
        assert blkid(lab, "TYPE") == "ext4" and blkid(lab, "LABEL") == "clusterfs"
        uuid = blkid(lab, "UUID")
        fstab_line = f"UUID={uuid} {DISK_EXPORT} ext4 defaults,noatime,nofail 0 2\n"
        assert sh(lab, MASTER, "cat /etc/fstab") == fstab_before + fstab_line

        # Applied again: the file system is not made again (same UUID), fstab stays.
        again, _, _ = apply(lab, state_file, "--target", MASTER)
        assert failures(again) == {MASTER: [("mount.mounted", DISK_EXPORT)]}, failures(again)
        assert changed(again) == {MASTER: []}
        assert blkid(lab, "UUID") == uuid and sh(lab, MASTER, "cat /etc/fstab") == fstab_before + fstab_line

        # A disk that holds something is never formatted: an ext4 file system of its own is used as
        # it is (fstab then names its UUID); anything else is left alone, and the state says what it is.
        sh(lab, MASTER, f"{NEW_IMAGE} && mkfs.ext4 -q -L photos {DISK_IMAGE}")
        theirs = blkid(lab, "UUID")
        apply(lab, state_file, "--target", MASTER)
        assert blkid(lab, "LABEL") == "photos" and blkid(lab, "UUID") == theirs != uuid
        assert sh(lab, MASTER, "cat /etc/fstab") == fstab_before + fstab_line.replace(uuid, theirs)
        for make, what in ((f"mkswap -q {DISK_IMAGE}", "a swap file system"),
                           (f"python3 -c {shlex.quote(MBR)} {DISK_IMAGE}", "a dos partition table")):
            sh(lab, MASTER, f"{NEW_IMAGE} && {make}")
            before = sh(lab, MASTER, f"blkid -p {DISK_IMAGE}")
            kept, _, _ = apply(lab, state_file, "--target", MASTER)
            assert sh(lab, MASTER, f"blkid -p {DISK_IMAGE}") == before, f"{what} was formatted"
            assert [fun for fun, _ in failures(kept)[MASTER]] == ["cmd.run"], failures(kept)
            check = next(s for s in kept["nodes"][MASTER]["states"] if s["id"] == "clusterfs-filesystem")
            assert check["status"] == "failed" and f"holds {what}, not ext4" in check["changes"]["stderr"], check
    finally:
        sh(lab, MASTER, f"rm -rf {DISK_DIR} {DISK_IMAGE} /etc/fstab.before-clusterfs; rmdir {DISK_EXPORT}",
           check=False)
        lab.exec(MASTER, "sh", "-c", "cat > /etc/fstab", input=fstab_before)


# ---------------------------------------------------------------------------------------------
# slurm.yaml

def idle_nodes(lab: Lab) -> dict[str, str]:
    out = sh(lab, MASTER, "sinfo -h -N -o '%N %t'", check=False)
    return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)


def wait_idle(lab: Lab, timeout: float = 120) -> None:
    Lab.wait_for(lambda: idle_nodes(lab) == {n: "idle" for n in COMPUTE}, f"sinfo to show {COMPUTE} idle "
                 f"(last: {idle_nodes(lab)})", timeout=timeout, interval=1)


def srun_hostnames(lab: Lab) -> list[str]:
    out = lab.exec(MASTER, "timeout", "60", "srun", "-N3", "hostname", timeout=90).stdout
    return sorted(out.split())


def main_pid(lab: Lab, node: str, unit: str) -> str:
    return sh(lab, node, f"systemctl show -p MainPID --value {unit}").strip()


def main_pids(lab: Lab) -> dict[str, str]:
    """The daemons' process ids: a restart gives a new one."""
    return {MASTER: main_pid(lab, MASTER, "slurmctld"), **{n: main_pid(lab, n, "slurmd") for n in COMPUTE}}


def test_slurm_cluster_from_one_file_srun_on_every_compute_node_key_never_shown(lab):
    first, first_s, first_output = apply(lab, "slurm")
    assert_every_node_done(first, lab)
    assert not failures(first), failures(first)

    # One munge key, made on the master, the same on every node, readable by munge only.
    key = (lab.master_state_dir / "secrets" / "munge.key").read_text().strip()
    assert len(key) >= 64
    for node in lab.nodes:
        assert sh(lab, node, "stat -c '%a %U %G' /etc/munge/munge.key").strip() == "400 munge munge"
        assert sh(lab, node, "cat /etc/munge/munge.key") == key + "\n", f"{node} has another munge key"
    credential = lab.exec(MASTER, "munge", "-n").stdout
    decoded = lab.exec("node04", "unmunge", input=credential).stdout
    assert "STATUS:          Success (0)" in decoded and "ENCODE_HOST:     node01" in decoded, decoded

    # One slurm.conf, the same everywhere, in Debian's place, with today's option names, and no node
    # declaring more CPUs than it has.
    confs = {node: sh(lab, node, "cat /etc/slurm/slurm.conf") for node in lab.nodes}
    conf = confs[MASTER]
    assert all(c == conf for c in confs.values()), "slurm.conf differs between nodes"
    assert f"SlurmctldHost=node01({lab.ip(MASTER)})" in conf and "SelectType=select/cons_tres" in conf
    settings = "\n".join(line for line in conf.splitlines() if not line.startswith("#"))
    for outdated in ("ControlMachine", "select/cons_res", "FastSchedule", "CgroupAutomount", "slurm-llnl"):
        assert outdated not in settings
    for node in COMPUTE:
        line = next(ln for ln in conf.splitlines() if ln.startswith(f"NodeName={node} "))
        cpus = int(line.split("CPUs=")[1].split()[0])
        assert cpus <= int(sh(lab, node, "nproc --all")), line
    assert "PartitionName=main Nodes=node02,node03,node04 Default=YES" in conf

    # The cluster works: every compute node idle, a job step runs on all three.
    wait_idle(lab)
    hostnames = srun_hostnames(lab)
    assert hostnames == COMPUTE, hostnames

    # The key is never shown: not in the apply's output, the job history, the master's database,
    # the agents' kept results, nor any journal.
    history = lab.pimaster("job", first["job"], "--json").stdout
    assert key not in first_output and key not in history
    for db in lab.master_state_dir.glob("pimaster.db*"):   # the database, its WAL: free pages too
        assert key.encode() not in db.read_bytes(), f"the munge key is in {db}"
    for node in lab.nodes:
        kept = sh(lab, node, f"grep -rlF {key[:64]} /var/lib/piagent /var/log || true")
        assert kept.strip() == "", f"{node} keeps the key in {kept}"
        assert key[:64] not in sh(lab, node, "journalctl --no-pager -o cat"), f"the key is in {node}'s journal"

    # Applied again: nothing changes, no daemon restarts.
    pids = main_pids(lab)
    second, second_s, _ = apply(lab, "slurm")
    assert not failures(second), failures(second)
    assert changed(second) == {n: [] for n in lab.nodes}
    assert main_pids(lab) == pids

    # A node whose key was replaced by hand gets the cluster's back; munge and slurmd restart with it.
    lab.exec("node03", "sh", "-c", "head -c 1024 /dev/urandom > /etc/munge/munge.key && systemctl restart munge")
    repaired, _, _ = apply(lab, "slurm")
    assert not failures(repaired), failures(repaired)
    assert changed(repaired) == {**{n: [] for n in lab.nodes},
                                 "node03": ["file.managed /etc/munge/munge.key", "service.running munge",
                                            "service.running slurmd"]}, changed(repaired)
    assert sh(lab, "node03", "cat /etc/munge/munge.key") == key + "\n"
    assert main_pids(lab)["node03"] != pids["node03"]
    wait_idle(lab)
    assert srun_hostnames(lab) == COMPUTE

    figures("slurm.yaml", first_s, second_s)
    print(f"srun -N3 hostname on {MASTER}: {' '.join(hostnames)}")
    print(sh(lab, MASTER, "sinfo"))
