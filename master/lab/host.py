"""Host plumbing: running tools, processes, cgroups, mounts, network namespaces and routes.

Network safety: the host never sends a packet to a lab address. The lab network lives in network
namespaces only (a bridge in `pimlab-switch`, each node's eth0 in `pimlab-NAME`, veths made directly
in them), and the host's own routing table gets an `unreachable` route for the lab subnet, tagged
with ROUTE_PROTO so that cleanup finds it without the state file. Nodes have no route out of the
lab (no NAT, no gateway).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .model import (BRIDGE, CGROUP_NAME, NETNS_PREFIX, ROUTE_PROTO, SWITCH_NETNS, Lab, LabError,
                    Node)


def run(argv: list[str], *, check: bool = True, input: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LabError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{shlex.join(argv)}` did not finish within {timeout:.0f} s") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise LabError(f"`{shlex.join(argv)}` failed (exit {result.returncode})" + (f": {detail}" if detail else ""))
    return result


def say(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `lab up | head`: the reader left; the lab must not fail for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def mounts_under(top: Path) -> list[str]:
    """Mount points at or below `top` in this mount namespace, deepest first."""
    found = []
    prefix = str(top).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            target = line.split()[4].encode().decode("unicode_escape")
            if target == str(top) or target.startswith(prefix):
                found.append(target)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


# --------------------------------------------------------------------------------------------
# Processes

def children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                kids += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return kids


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before their children."""
    tree, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        tree += kids
        todo += kids
    return tree


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def memory_mb(pids: set[int]) -> float:
    """Proportional set size: shared pages (python, libc, ...) count once across all nodes."""
    total_kb = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


def lab_processes() -> dict[int, str]:
    """pid -> state letter of every process whose cgroup is the lab's, from /proc (this also sees
    processes that are exiting, and zombies, which cgroup.procs no longer lists)."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            if f"/{CGROUP_NAME}/" in Path(entry.path, "cgroup").read_text():
                found[int(entry.name)] = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
    return found


def reap_own_children() -> None:
    """Supervisors this process started itself (an `up` cleaning up after a failure) are ours to reap."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


# --------------------------------------------------------------------------------------------
# Cgroups: every process of a node sits in CGROUP_NAME/NODE of every hierarchy nspawn uses

def cgroup_roots() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, name=systemd, cgroup2 'unified')."""
    roots = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            _, target, fstype = line.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                roots.append(Path(target))
    return roots


def nspawn_cgroup_roots() -> list[Path]:
    """The hierarchies nspawn places itself in: name=systemd and cgroup2 (hybrid), or cgroup2 alone."""
    roots = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            _, target, fstype, options = line.split()[:4]
            if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options.split(",")):
                roots.append(Path(target))
    return roots


def node_cgroups(node: Node) -> list[str]:
    """The node's cgroup in each hierarchy nspawn uses, made if missing."""
    cgroups = []
    for root in nspawn_cgroup_roots():
        cg = root / CGROUP_NAME / node.name
        cg.mkdir(parents=True, exist_ok=True)
        cgroups.append(str(cg))
    return cgroups


def lab_cgroup_dirs() -> list[Path]:
    return [root / CGROUP_NAME for root in cgroup_roots() if (root / CGROUP_NAME).is_dir()]


def cgroup_pids(top: Path) -> set[int]:
    pids: set[int] = set()
    for dirpath, _, files in os.walk(top):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def node_processes(node: str) -> dict[int, str]:
    """pid -> state letter of every process in the node's own cgroup (``lab_processes`` for one node:
    an exact path match, so node1 never takes node10's processes)."""
    own = f"/{CGROUP_NAME}/{node}"
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            paths = [line.split(":", 2)[2] for line in Path(entry.path, "cgroup").read_text().splitlines()]
            if any(p == own or p.startswith(own + "/") for p in paths):
                found[int(entry.name)] = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
    return found


def remove_node_cgroups(node: str) -> None:
    """The node's cgroup in every hierarchy, deepest first (they must hold no process)."""
    for top in lab_cgroup_dirs():
        for dirpath, _, _ in sorted(os.walk(top / node), key=lambda w: w[0].count("/"), reverse=True):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(dirpath)


def in_node_cgroup(pid: int, node: str) -> bool:
    try:
        return f"/{CGROUP_NAME}/{node}" in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def node_memory_mb(node: Node) -> float:
    """PSS of every process of the node, in MB (one hierarchy is enough to find them all)."""
    pids = cgroup_pids(nspawn_cgroup_roots()[0] / CGROUP_NAME / node.name)
    return round(memory_mb(pids), 1)


def remove_cgroups() -> None:
    for top in lab_cgroup_dirs():
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(dirpath)


# --------------------------------------------------------------------------------------------
# Network namespaces and the host's guard route

def network_up(lab: Lab) -> None:
    # Guard first: from now on a mistaken host-side packet to the lab fails locally (EHOSTUNREACH)
    # instead of leaving the machine through the host's default route.
    run(["ip", "route", "replace", "unreachable", lab.subnet, "proto", ROUTE_PROTO])
    run(["ip", "netns", "add", SWITCH_NETNS])
    run(["ip", "-n", SWITCH_NETNS, "link", "set", "lo", "up"])
    run(["ip", "-n", SWITCH_NETNS, "link", "add", BRIDGE, "type", "bridge"])
    run(["ip", "-n", SWITCH_NETNS, "link", "set", BRIDGE, "up"])
    for node in lab.nodes:
        node_network_up(node)


def node_network_up(node: Node) -> None:
    """The node's namespace and its cable to the switch (`up`, and `lab add` for a newcomer)."""
    run(["ip", "netns", "add", node.netns])
    # Both ends are created directly in their namespaces: no lab interface ever exists on the host.
    run(["ip", "link", "add", "name", f"v-{node.name}", "netns", SWITCH_NETNS, "type", "veth",
         "peer", "name", "eth0", "netns", node.netns])
    run(["ip", "-n", SWITCH_NETNS, "link", "set", f"v-{node.name}", "master", BRIDGE, "up"])
    if node.arch:
        # No network manager runs under qemu-user (arch.py): the address is set from outside, as a
        # DHCP server's fixed lease would hand it to a Pi.
        run(["ip", "-n", node.netns, "addr", "add", f"{node.ip}/{node.prefixlen}", "dev", "eth0"])
        run(["ip", "-n", node.netns, "link", "set", "eth0", "up"])
        run(["ip", "-n", node.netns, "link", "set", "lo", "up"])
    # A native node's eth0 stays down without an address: systemd-networkd in the node configures it.


def node_network_down(node: Node) -> None:
    """Remove the node's namespace; its veth pair (and the switch's end) goes with it."""
    if node.netns in lab_netns():
        run(["ip", "netns", "delete", node.netns])


def lab_netns() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(NETNS_PREFIX)]


def lab_routes() -> list[dict]:
    out = run(["ip", "-j", "-4", "route", "show", "table", "all", "proto", ROUTE_PROTO], check=False).stdout
    return json.loads(out or "[]")


def remove_network() -> None:
    """Every lab namespace (their veths and the bridge go with them) and the guard route."""
    for ns in lab_netns():
        run(["ip", "netns", "delete", ns], check=False)
    for route in lab_routes():
        run(["ip", "route", "del", route.get("type", "unicast"), route["dst"], "proto", ROUTE_PROTO], check=False)
