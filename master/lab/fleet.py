"""`lab add|remove|reflash`: Pis joining the running lab, leaving it, and getting a re-flashed card.

A node added here is what a person gets who flashes a card with nothing but a `piagent.conf` and
boots the Pi: a fresh root file system whose /boot/firmware holds a join token for that one node
(from the master in node01, exactly as `up` prepares its agents), and no entry in any inventory.
Removing a node pulls its plug and throws its card away: its processes, cgroup, overlay, network
namespace and nspawn's runtime files go, the master's keys stay (its key stays accepted until
`pimaster keys delete NODE`). Re-flashing keeps the node's name, address and cable, and gives it a
new card: a new root file system (new machine-id, no agent keys) with a new join token, so its agent
enrolls with a new key for an id the master already holds, which the master shows as `denied`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from piagent.config import NODE_ID_RE

from .arch import ensure_roots, native_arch, parse_arch_option
from .bringup import ENROLL_TIMEOUT_S, MASTER_TIMEOUT_S, create_token, wait_booted, wait_enrolled
from .checks import NODE_PACKAGES, check_capacity, require_root, require_tools
from .host import (lab_cgroup_dirs, lab_netns, mounts_under, node_network_down, node_network_up, node_processes,
                   reap_own_children, remove_node_cgroups, remove_path, run, say)
from .model import (HOST_OFFSET, MASTER_NODE, NETNS_PREFIX, NSPAWN_RUN, SWITCH_NETNS, Lab, LabError, LabRefused,
                    Node, lab_lock, load_lab, terminate_as_interrupt)
from .node import BOOT_TIMEOUT_S, leader_pid, node_exec, node_running, start_node
from .rootfs import find_source, host_enabled_units, prepare_root

# What the lab can carry besides a valid node id: the name is the node's hostname, part of its
# nspawn machine name (letters, digits, '-') and of its veth `v-NAME` (at most 15 characters).
LAB_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9-]{0,12}\Z")
NUMBERED_RE = re.compile(r"\Anode(\d+)\Z")
STOP_TIMEOUT_S = 20


# ------------------------------------------------------------------------------------------------
# Names and addresses

def check_new_name(lab: Lab, name: str) -> None:
    """LabRefused unless ``name`` is a valid node id, one the lab can carry, and not taken."""
    if not NODE_ID_RE.fullmatch(name) or not LAB_NAME_RE.fullmatch(name):
        raise LabRefused(f"{name!r}: a lab node's name is its hostname and names its network link, so it "
                         f"takes letters, digits and '-' only, at most 13 (like node05)")
    if NETNS_PREFIX + name == SWITCH_NETNS:
        raise LabRefused(f"{name!r} names the lab's own switch (its namespace {SWITCH_NETNS}); pick another name")
    if name == MASTER_NODE:
        raise LabRefused(f"{name} is already a node of the lab: the master's own")
    if any(n.name == name for n in lab.nodes):
        raise LabRefused(f"{name} is already a node of the lab (`pimaster lab reflash {name}` gives it a "
                         f"fresh card, `pimaster lab remove {name}` takes it out)")


def next_name(lab: Lab, known_ids: set[str] = frozenset()) -> str:
    """The next nodeNN after the highest numbered node of the lab (node05 after node01..node04), or
    after the highest id the master holds a key for (a node removed earlier keeps its key) or
    hostname a node reports (the master names nodes by its name_pattern)."""
    names = [n.name for n in lab.nodes] + sorted(known_ids)
    numbers = [int(m.group(1)) for name in names if (m := NUMBERED_RE.match(name))]
    return f"node{max(numbers, default=0) + 1:02d}"


def check_no_accepted_key(name: str, accepted_ids: set[str]) -> None:
    """A new card under a name the master holds an accepted key for would only show as denied."""
    if name in accepted_ids:
        raise LabRefused(f"the master still accepts a key for {name} (a node removed earlier?): its new card "
                         f"would show as denied; `pimaster keys delete {name}` first, or pick another name")


def pick_address(lab: Lab, name: str) -> str:
    """nodeNN's address by the lab's convention (the subnet's address number 10 + NN), when that is
    in the subnet and free; otherwise, and for other names, the subnet's next free address after the
    lab's reserved ones. LabRefused when the subnet is full."""
    subnet = ipaddress.IPv4Network(lab.subnet)
    used = {ipaddress.IPv4Address(n.ip) for n in lab.nodes}
    first = subnet.network_address + HOST_OFFSET + 1
    match = NUMBERED_RE.match(name)
    if match:
        conventional = subnet.network_address + HOST_OFFSET + int(match.group(1))
        if conventional >= first and conventional < subnet.broadcast_address and conventional not in used:
            return str(conventional)
    address = first
    while address < subnet.broadcast_address:
        if address not in used:
            return str(address)
        address += 1
    raise LabRefused(f"the lab's subnet {subnet} is full: no address left for {name} (nodes get addresses "
                     f"from .{HOST_OFFSET + 1} on); `pimaster lab remove` a node first")


# ------------------------------------------------------------------------------------------------
# The lab and its master

def running_lab() -> Lab:
    """The lab, up, with its master's node running (it hands out the join tokens); LabRefused if not."""
    lab = Lab.load()
    if lab is None:
        raise LabRefused("no lab is up (start one with `pimaster lab up`)")
    if lab.status != "up":
        raise LabRefused("the lab's `up` did not finish (it is running or crashed); `pimaster lab down` "
                         "removes what it left, then `pimaster lab up`")
    if leader_pid(lab.node(MASTER_NODE)) is None:
        raise LabRefused(f"{MASTER_NODE}, the master's node, is not running; `pimaster lab start "
                         f"{MASTER_NODE}` boots it again")
    return lab


def lab_node(lab: Lab, name: str, verb: str) -> Node:
    if name == MASTER_NODE:
        raise LabRefused(f"{MASTER_NODE} runs the lab's master: it cannot be {verb} (`pimaster lab down` "
                         f"removes the whole lab)")
    try:
        return lab.node(name)
    except LabError as exc:
        raise LabRefused(str(exc)) from None


def node_keys(lab: Lab, name: str) -> list[dict]:
    """The master's keys for node id ``name``."""
    return [k for k in all_keys(lab) if k.get("id") == name]


def all_keys(lab: Lab) -> list[dict]:
    """The master's keys (`pimaster keys list --json` in node01): id, state, fingerprint, ..."""
    result = node_exec(lab.node(MASTER_NODE), ["pimaster", "keys", "list", "--json"], timeout=60)
    try:
        return [k for k in json.loads(result.stdout)["keys"] if isinstance(k, dict) and isinstance(k.get("id"), str)]
    except (ValueError, KeyError, TypeError):
        raise LabError(f"`pimaster keys list --json` in {MASTER_NODE} failed (exit {result.returncode}): "
                       f"{(result.stderr or result.stdout).strip()[-500:]}") from None


def node_hostnames(lab: Lab) -> set[str]:
    """The hostnames the master's nodes report (the master may have named a node nodeNN)."""
    result = node_exec(lab.node(MASTER_NODE), ["pimaster", "nodes", "--json"], timeout=60)
    try:
        return {n["facts"]["hostname"] for n in json.loads(result.stdout)["nodes"]
                if isinstance(n.get("facts", {}).get("hostname"), str)}
    except (ValueError, KeyError, TypeError, AttributeError):
        return set()


def token_for(lab: Lab, name: str) -> str:
    """A piagent.conf with a join token for ``name`` alone, good for one enrollment within an hour."""
    return create_token(lab, lab.node(MASTER_NODE), time.time() + MASTER_TIMEOUT_S, for_node=name)


# ------------------------------------------------------------------------------------------------
# Stopping a node and throwing its card away

def stop_node(node: Node) -> None:
    """Kill every process of the node (its PID 1 first: its PID namespace goes with it), then remove
    its cgroups and nspawn's lock file of its last boot."""
    leader = leader_pid(node)
    if leader:
        with contextlib.suppress(ProcessLookupError):
            os.kill(leader, signal.SIGKILL)
    deadline = time.time() + STOP_TIMEOUT_S
    grace = time.time() + 2
    while True:
        reap_own_children()
        live = {pid for pid, state in node_processes(node.name).items() if state != "Z"}
        live.discard(os.getpid())
        if not live:
            break
        if time.time() > deadline:
            raise LabError(f"processes of {node.name} would not die: {sorted(live)}")
        if time.time() > grace:
            for pid in live:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    # Zombies (a supervisor whose parent is not us) hold no namespace, mount or cgroup that matters,
    # but a cgroup with one listed cannot be removed yet: wait a little for the host to reap them.
    zombies_gone = time.time() + 5
    while node_processes(node.name) and time.time() < zombies_gone:
        reap_own_children()
        time.sleep(0.05)
    remove_node_cgroups(node.name)
    for path in node_runtime_files(node):
        remove_path(path)
    node.supervisor_pid = None
    node.nspawn_lock = None


def node_runtime_files(node: Node) -> list[Path]:
    found = [p for p in [NSPAWN_RUN / "propagate" / node.netns] if p.exists() or p.is_symlink()]
    if node.nspawn_lock and Path(node.nspawn_lock).exists():
        found.append(Path(node.nspawn_lock))
    return found


# A node's card: the layers of its root file system. The rest of node.dir is the Pi itself (its
# console log, and what else the lab keeps of its hardware): a re-flash keeps that.
CARD_DIRS = ("upper", "work", "merged")


def remove_node_files(node: Node, card_only: bool = False) -> None:
    """Remove the node's directory (``card_only``: only its overlay layers); never through a mount."""
    for target in mounts_under(node.dir):
        if run(["umount", target], check=False).returncode != 0:
            run(["umount", "--lazy", target], check=False)
    still = mounts_under(node.dir)
    if still:
        raise LabError(f"cannot remove {node.dir}: still mounted: {', '.join(still)}")
    for path in [node.dir / d for d in CARD_DIRS] if card_only else [node.dir]:
        if path.exists():
            shutil.rmtree(path)


def node_leftovers(node: Node) -> list[str]:
    """What of the node is still on this machine, described for people (empty: nothing)."""
    found = [f"network namespace {node.netns}"] if node.netns in lab_netns() else []
    if SWITCH_NETNS in lab_netns() and run(["ip", "-n", SWITCH_NETNS, "link", "show", f"v-{node.name}"],
                                           check=False).returncode == 0:
        found.append(f"switch port v-{node.name}")
    found += [f"nspawn runtime file {p}" for p in node_runtime_files(node)]
    found += [f"cgroup {top / node.name}" for top in lab_cgroup_dirs() if (top / node.name).exists()]
    live = sorted(pid for pid, state in node_processes(node.name).items() if state != "Z")
    if live:
        found.append(f"processes {live}")
    if node.dir.exists():
        found.append(f"directory {node.dir}")
    return found


# ------------------------------------------------------------------------------------------------
# The commands

def add_node(name: str | None, arch_text: str | None = None) -> dict:
    """`lab add`: boot a new node whose card holds only a piagent.conf; wait until its agent answers
    the master's ping. Returns {name, ip, arch, booted_s, enrolled_s} (seconds from its start)."""
    require_root()
    require_tools()
    source = find_source()
    with lab_lock(), terminate_as_interrupt():
        lab = running_lab()
        keys = all_keys(lab)
        name = name or next_name(lab, {k["id"] for k in keys} | node_hostnames(lab))
        check_new_name(lab, name)
        arch = parse_arch_option(arch_text, [name]).get(name) if arch_text is not None else None
        check_no_accepted_key(name, {k["id"] for k in keys if k.get("state") == "accepted"})
        try:
            check_capacity(1, arm=1 if arch else 0)
        except LabError as exc:
            raise LabRefused(str(exc)) from None
        node = Node(name=name, ip=pick_address(lab, name), prefixlen=ipaddress.IPv4Network(lab.subnet).prefixlen,
                    roles=["agent"], arch=arch)
        if arch:
            ensure_roots({arch}, NODE_PACKAGES, in_use=running_arches(lab))
        config = token_for(lab, name)
        say(f"Flashing a card for {name} ({node.ip}{', ' + arch if arch else ''}): a fresh root file system and "
            f"a piagent.conf with a join token in /boot/firmware, nothing else ...")
        # Recorded first, so that `lab down` (or `lab remove`) finds the node however far this gets.
        lab.nodes.append(node)
        lab.save()
        try:
            node_network_up(node)
            prepare_root(node, source, host_enabled_units(), agent_config=config)
            started = time.time()
            say(f"Booting {name} ...")
            start_node(lab, node, source)
            wait_booted([node], time.time() + BOOT_TIMEOUT_S)
            booted = time.time()
            say(f"Waiting for {name}'s agent to enroll with its token and answer ping ...")
            wait_enrolled(lab, time.time() + ENROLL_TIMEOUT_S, [name])
        except BaseException:
            say(f"{name} is not up (failed or interrupted): removing it again")
            with contextlib.suppress(LabError):
                discard_node(lab, node)
            raise
        enrolled = time.time()
    return {"name": name, "ip": node.ip, "arch": arch or native_arch(), "booted_s": round(booted - started, 1),
            "enrolled_s": round(enrolled - started, 1)}


def discard_node(lab: Lab, node: Node) -> None:
    stop_node(node)
    node_network_down(node)
    remove_node_files(node)
    lab.nodes = [n for n in lab.nodes if n.name != node.name]
    lab.save()
    left = node_leftovers(node)
    if left:
        raise LabError(f"{node.name} could not be removed completely; left: " + "; ".join(left))


def remove_node(name: str) -> dict:
    """`lab remove`: the node's processes, cgroup, overlay, namespace and runtime files go, and it
    leaves lab.json; the master's keys are not touched."""
    require_root()
    with lab_lock(), terminate_as_interrupt():
        lab = load_lab()
        node = lab_node(lab, name, "removed")
        discard_node(lab, node)
    return {"removed": name, "ip": node.ip}


def reflash_node(name: str) -> dict:
    """`lab reflash`: stop the node, give it a fresh root file system with a piagent.conf holding a new
    join token, boot it, and wait until the master lists its new key. Returns {name, fingerprint,
    state, old_fingerprints}."""
    require_root()
    require_tools()
    source = find_source()
    with lab_lock(), terminate_as_interrupt():
        lab = running_lab()
        node = lab_node(lab, name, "re-flashed")
        known = node_keys(lab, name)
        if node.arch:
            # It still runs on its root here: a newer agent goes into its new card, not into the root.
            ensure_roots({node.arch}, NODE_PACKAGES, in_use=running_arches(lab))
        config = token_for(lab, name)
        say(f"Re-flashing {name}: powering it off and writing a fresh card (new root file system, "
            f"new join token) ...")
        stop_node(node)
        lab.save()
        remove_node_files(node, card_only=True)
        prepare_root(node, source, host_enabled_units(), agent_config=config)
        say(f"Booting {name} ...")
        start_node(lab, node, source)
        wait_booted([node], time.time() + BOOT_TIMEOUT_S)
        say(f"Waiting for the master to hear {name}'s new key ...")
        key = wait_new_key(lab, name, {k["fingerprint"] for k in known})
    return {"name": name, "fingerprint": key["fingerprint"], "state": key["state"],
            "old_fingerprints": sorted(k["fingerprint"] for k in known)}


def running_arches(lab: Lab) -> set[str]:
    """The ARM architectures whose roots running nodes use (the lab never changes those)."""
    return {n.arch for n in lab.nodes if n.arch and node_running(n)}


def wait_new_key(lab: Lab, name: str, old: set[str]) -> dict:
    deadline = time.time() + ENROLL_TIMEOUT_S
    while True:
        new = [k for k in node_keys(lab, name) if k.get("fingerprint") not in old]
        if new:
            return new[0]
        if time.time() > deadline:
            raise LabError(f"the master did not hear a new key from {name} within {ENROLL_TIMEOUT_S} s "
                           f"(`pimaster lab exec {name} -- journalctl -u piagent`)")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------
# Their command line (cli.py registers and dispatches them)

def add_parsers(sub) -> None:
    add = sub.add_parser("add", help="boot a new node whose card holds only a piagent.conf with a join token "
                                     "(as a person flashes it; in no inventory); wait until it answers ping")
    add.add_argument("--name", metavar="NODE", help="its node id (default: the next nodeNN after the highest)")
    add.add_argument("--arch", metavar="ARCH", help="its userland: arm64 or armhf (a Debian root of that "
                                                    "architecture run by qemu-user), or this machine's own (default)")
    add.add_argument("--json", action="store_true", help="print JSON")
    remove = sub.add_parser("remove", help="stop a node and remove it from the lab (the master keeps its key)")
    remove.add_argument("node", metavar="NODE", help="a node of the lab other than node01")
    remove.add_argument("--json", action="store_true", help="print JSON")
    reflash = sub.add_parser("reflash", help="re-flash a node's card: a fresh root file system and a new join "
                                             "token, so its new key shows as denied until `keys accept --replace`")
    reflash.add_argument("node", metavar="NODE", help="a node of the lab other than node01")
    reflash.add_argument("--json", action="store_true", help="print JSON")


def progress_to_stderr(as_json: bool):
    """With --json, stdout holds only the JSON document: progress lines go to stderr."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


def cmd_add(name: str | None, as_json: bool, arch: str | None = None) -> int:
    started = time.time()
    with progress_to_stderr(as_json):
        report = add_node(name, arch)
    report["seconds"] = round(time.time() - started, 1)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        say(f"\n{report['name']} ({report['ip']}, {report['arch']}) is up and enrolled by its token: booted in {report['booted_s']} s, "
            f"answered the master's ping {report['enrolled_s']} s after it was switched on "
            f"({report['seconds']} s in all).")
    return 0


def cmd_remove(name: str, as_json: bool) -> int:
    with progress_to_stderr(as_json):
        report = remove_node(name)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        say(f"{name} removed from the lab. The master still accepts its key until "
            f"`pimaster keys delete {name}`.")
    return 0


def cmd_reflash(name: str, as_json: bool) -> int:
    with progress_to_stderr(as_json):
        report = reflash_node(name)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    fp = report["fingerprint"]
    if report["state"] == "denied":
        say(f"\n{name} booted from a fresh card; its new key {fp} is denied, as the master holds another key "
            f"for {name}. Accept it with:\n  pimaster keys accept --replace {name} --fingerprint {fp}")
    else:
        say(f"\n{name} booted from a fresh card; the master lists its new key {fp} as {report['state']}.")
    return 0
