"""`pimaster lab up|start|add|remove|reflash|down|status|exec|set`: the lab's command line (`main` is
its entry point; add, remove and reflash live in fleet.py)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import sys
import time

from .arch import ROOTS_DIR, check_arch_support, ensure_roots, native_arch, parse_arch_option
from .bringup import bring_up, start_stopped
from .checks import (NODE_PACKAGES, check_capacity, check_cluster_dir, check_subnet_free, ensure_node_packages,
                     node_count_fits_subnet, parse_subnet, require_root, require_tools)
from . import fleet
from .host import lab_netns, node_memory_mb, say
from .model import (DEFAULT_NODES, DEFAULT_SUBNET, LAB_DIR, MASTER_NODE, MASTER_PORT, MASTER_STATE_DIR,
                    MAX_NODES, STATE_FILE, SWITCH_NETNS, Lab, LabError, LabRefused, Node, lab_lock, load_lab,
                    make_nodes, terminate_as_interrupt)
from .node import leader_pid, node_command, node_exec, node_running
from .pihardware import KNOWN_SETTINGS, parse_settings, pi_status, set_values
from .rootfs import NODE_CLUSTER_DIR, find_source
from .teardown import leftovers, teardown


def cmd_up(count: int | None, subnet_text: str | None, keep_on_failure: bool = False,
           cluster_dir_text: str | None = None, arch_text: str | None = None) -> int:
    if count is not None and not 1 <= count <= MAX_NODES:
        raise LabError(f"--nodes must be between 1 and {MAX_NODES}, not {count}")
    cluster_dir = check_cluster_dir(cluster_dir_text) if cluster_dir_text is not None else None
    subnet = parse_subnet(subnet_text or DEFAULT_SUBNET)
    node_count_fits_subnet(count or DEFAULT_NODES, subnet)
    require_root()
    require_tools()
    planned = make_nodes(count or DEFAULT_NODES, subnet)
    arches = parse_arch_option(arch_text, [n.name for n in planned]) if arch_text is not None else {}
    check_arch_support(set(arches.values()))
    source = find_source()
    started = time.time()
    with lab_lock(), terminate_as_interrupt():
        try:
            old = Lab.load()
        except LabError:  # a damaged state file: what it described is cleaned up by prefix below
            old = None
        if old and old.status == "up":
            # A lab that was up holds the master's state (its key pair, which every agent pins, keys,
            # jobs): never wiped here. Its stopped nodes are booted again, as `lab start` does.
            stopped = [n for n in old.nodes if not node_running(n)]
            if not stopped:
                raise LabError(f"a lab with {len(old.nodes)} nodes is already up on {old.subnet}; "
                               f"`pimaster lab down` first")
            if ((count is not None and count != len(old.nodes)) or (subnet_text is not None
                                                                    and str(subnet) != old.subnet)
                    or (cluster_dir is not None and cluster_dir != old.cluster_dir)
                    or (arch_text is not None and arches != {n.name: n.arch for n in old.nodes if n.arch})):
                raise LabError(f"a lab with {len(old.nodes)} nodes on {old.subnet} is here, "
                               f"{describe_stopped(old, stopped)}, with other --nodes, --subnet, --cluster-dir "
                               f"or --arch than asked for; `pimaster lab start "
                               f"{' '.join(n.name for n in stopped)}` boots {them(stopped)} again, "
                               f"`pimaster lab down` removes the lab (and its master's state) for a new one")
            say(f"The lab on {old.subnet} is here, {describe_stopped(old, stopped)}: booting {them(stopped)} "
                f"again (the master keeps its keys and jobs; `pimaster lab down` first for a new lab)")
            start_nodes(old, stopped, source)
            print_summary(old, time.time() - started)
            return 0
        if old or leftovers():
            say("Cleaning up what an earlier lab left behind ...")
            teardown()
        count = count or DEFAULT_NODES
        check_subnet_free(subnet)
        check_capacity(count, arm=len(arches))
        ensure_node_packages()
        for node in planned:
            node.arch = arches.get(node.name)
        ensure_roots(set(arches.values()), NODE_PACKAGES)
        lab = Lab(subnet=str(subnet), nodes=planned, cluster_dir=cluster_dir)
        master = lab.node(MASTER_NODE)
        lab.master_address = f"{master.ip}:{MASTER_PORT}"
        try:
            bring_up(lab, source)
        except BaseException as exc:
            if keep_on_failure and not isinstance(exc, KeyboardInterrupt):
                say("lab left as it is for debugging (--keep-on-failure); `pimaster lab down` removes it")
            else:
                with contextlib.suppress(LabError):
                    teardown()
            raise
        lab.status = "up"
        lab.save()
        print_summary(lab, time.time() - started)
    return 0


def describe_stopped(lab: Lab, stopped: list[Node]) -> str:
    if len(stopped) == len(lab.nodes):
        return f"all {len(stopped)} of its nodes stopped"
    return f"{', '.join(n.name for n in stopped)} stopped"


def them(nodes: list) -> str:
    return "it" if len(nodes) == 1 else "them"


def start_nodes(lab: Lab, nodes: list[Node], source) -> None:
    """Boot stopped nodes of a lab that is up; LabError when the lab's network is gone."""
    missing = sorted({SWITCH_NETNS, *(n.netns for n in nodes)} - set(lab_netns()))
    if missing:
        raise LabError(f"the lab's network is gone ({', '.join(missing)} missing: did this machine reboot?), "
                       f"so its nodes cannot boot again; `pimaster lab down` removes the lab, its master's "
                       f"state in {MASTER_STATE_DIR} included (`pimaster backup` it first if you need it)")
    start_stopped(lab, nodes, source)


def cmd_start(names: list[str]) -> int:
    require_root()
    require_tools()
    source = find_source()
    started = time.time()
    with lab_lock(), terminate_as_interrupt():
        lab = load_lab()
        if lab.status != "up":
            raise LabError("the lab's `up` did not finish (it is running or crashed); `pimaster lab down` "
                           "removes what it left, then `pimaster lab up`")
        try:
            nodes = [lab.node(name) for name in dict.fromkeys(names)]
        except LabError as exc:
            raise LabRefused(str(exc)) from None
        running = [n.name for n in nodes if node_running(n)]
        if running:
            raise LabRefused(f"{', '.join(running)} {'is' if len(running) == 1 else 'are'} running; `lab start` "
                             f"boots stopped nodes only (`pimaster lab exec NODE -- systemctl reboot` reboots one)")
        start_nodes(lab, nodes, source)
    say(f"{', '.join(n.name for n in nodes)} booted again in {time.time() - started:.1f} s.")
    return 0


def print_summary(lab: Lab, seconds: float) -> None:
    say(f"\nLab up: {len(lab.nodes)} nodes on {lab.subnet} in {seconds:.1f} s "
        f"(the master listens on {lab.master_address} inside the lab)")
    say(f"The master serves {describe_cluster_dir(lab)}\n")
    native = native_arch()
    for node in lab.nodes:
        say(f"  {node.name}  {node.ip:<15}  {node.arch or native:<6}  {' + '.join(node.roles)}")
    say(f"""
Use it:
  pimaster lab exec node01 -- pimaster ping     run a command on a node (no CMD: a shell)
  export PIMASTER_STATE_DIR={MASTER_STATE_DIR}
                                                then `pimaster ping`, `pimaster apply ...` on this
                                                host talk to the lab's master (via its control socket)
  pimaster lab status                           nodes, addresses, services, memory
  pimaster lab start NODE...                    boot a stopped node again (`pimaster shutdown` powered it off)
  pimaster lab add | remove NODE | reflash NODE a new Pi, one taken out, one with a re-flashed card
  pimaster lab down                             remove the lab and everything it made""")


def describe_cluster_dir(lab: Lab) -> str:
    if lab.cluster_dir:
        return f"the cluster dir {lab.cluster_dir} (bound read-only into {MASTER_NODE} at {NODE_CLUSTER_DIR})"
    return "its default cluster dir (the shipped states)"


def cmd_down() -> int:
    require_root()
    with lab_lock(), terminate_as_interrupt():
        try:
            lab = Lab.load()
        except LabError:  # damaged state file: teardown finds everything by its prefix
            lab = None
        if lab is None and not leftovers():
            say("No lab is up.")
            return 0
        started = time.time()
        teardown()
        say(f"Lab removed in {time.time() - started:.1f} s.")
    return 0


def node_status(node: Node) -> dict:
    """The node as `lab status` shows it; its state: "stopped" (powered off), "booting" (its supervisor
    runs but PID 1 is not there yet: starting or rebooting), or what systemd in it says (running, ...)."""
    info: dict = {"name": node.name, "ip": node.ip, "arch": node.arch or native_arch(), "roles": node.roles,
                  "state": "stopped",
                  "addresses": [], "services": {}, "memory_mb": 0.0, "pi": pi_status(node)}
    if not node_running(node):
        return info
    info["memory_mb"] = node_memory_mb(node)
    if leader_pid(node) is None:
        info["state"] = "booting"
        return info
    try:
        info["state"] = systemd_word(node_exec(node, ["systemctl", "is-system-running"], timeout=30).stdout)
        addr = node_exec(node, ["ip", "-j", "-4", "addr", "show", "dev", "eth0"], timeout=30).stdout
        units = ["piagent"] + (["pimaster"] if "master" in node.roles else [])
        states = node_exec(node, ["systemctl", "is-active", *units], timeout=30).stdout.split()
    except LabError:  # it stopped or rebooted meanwhile
        info["state"] = "stopped" if not node_running(node) else "booting"
        return info
    # What the node's programs print is the node's (root in it may have replaced them): shown only
    # as the words and addresses it should be, never as terminal control sequences.
    with contextlib.suppress(ValueError, IndexError, KeyError, TypeError):
        info["addresses"] = [str(ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}"))
                             for link in json.loads(addr) for a in link["addr_info"]]
    info["services"] = {unit: systemd_word(state) for unit, state in zip(units, states)}
    return info


def systemd_word(text: str) -> str:
    """systemctl's answer (running, degraded, active, ...), or "unknown" for anything else."""
    word = text.strip()
    return word if re.fullmatch(r"[a-z-]{1,20}", word) else "unknown"


def cmd_status(as_json: bool) -> int:
    require_root()
    lab = Lab.load() if STATE_FILE.exists() else None
    if lab is None:
        left = leftovers()
        if as_json:
            print(json.dumps({"up": False, "leftovers": left}, indent=2))
        else:
            say("No lab is up." + (f" Leftovers ({'; '.join(left)}): run `pimaster lab down`." if left else ""))
        return 1
    nodes = [node_status(n) for n in lab.nodes]
    stopped = [n["name"] for n in nodes if n["state"] == "stopped"]
    # A lab whose nodes are all powered off is not up: it is there, and `lab start` boots it again.
    up = lab.status == "up" and len(stopped) < len(nodes)
    report = {"up": up, "status": lab.status, "stopped": stopped, "subnet": lab.subnet,
              "master_address": lab.master_address, "master_state_dir": str(MASTER_STATE_DIR),
              "lab_dir": str(LAB_DIR), "cluster_dir": lab.cluster_dir, "nodes": nodes}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        if lab.status != "up":
            state = f"{lab.status} (an `up` is running or crashed)"
        elif not up:
            state = "stopped (every node is powered off)"
        elif stopped:
            state = f"up ({', '.join(stopped)} stopped)"
        else:
            state = "up"
        say(f"Lab {state}: {len(nodes)} nodes on {lab.subnet}; master {lab.master_address} in {MASTER_NODE}")
        say(f"  the master serves {describe_cluster_dir(lab)}")
        say(f"  export PIMASTER_STATE_DIR={MASTER_STATE_DIR}\n")
        say(f"  {'NODE':<7} {'ARCH':<6} {'STATE':<10} {'ADDRESS':<18} {'SERVICES':<36} MEMORY")
        for n in nodes:
            services = " ".join(f"{u}:{s}" for u, s in n["services"].items()) or "-"
            say(f"  {n['name']:<7} {n['arch']:<6} {n['state']:<10} {', '.join(n['addresses']) or '-':<18} "
                f"{services:<36} {n['memory_mb']:.0f} MB")
        print_pi_table(nodes)
        if stopped and lab.status == "up":
            say(f"\n  `pimaster lab start {' '.join(stopped)}` boots {them(stopped)} again.")
    healthy = lab.status == "up" and all(n["state"] in ("running", "degraded") for n in nodes)
    return 0 if healthy else 1


def print_pi_table(nodes: list[dict]) -> None:
    """What each node looks like to its agent: the Pi model and the values `lab set` controls."""
    say(f"\n  {'NODE':<7} {'MODEL':<32} {'SERIAL':<17} {'TEMP':<8} THROTTLED")
    for n in nodes:
        pi = n["pi"]
        temp = f"{pi['temp_c']:.1f}°C" if "temp_c" in pi else "-"
        say(f"  {n['name']:<7} {pi.get('model', '-'):<32} {pi.get('serial', '-'):<17} {temp:<8} "
            f"{pi.get('throttled', '-')}")


def cmd_set(name: str, pairs: list[str]) -> int:
    """`lab set NODE KEY=VALUE...`: the node's temperature and throttled word, as its agent reads them."""
    settings = parse_settings(pairs)
    require_root()
    lab = load_lab()
    try:
        node = lab.node(name)
    except LabError as exc:
        raise LabRefused(str(exc)) from None
    set_values(node, settings)
    pi = pi_status(node)
    say(f"{node.name}: temp {pi.get('temp_c', 0):.1f}°C, throttled={pi.get('throttled', '?')}"
        + ("" if node_running(node) else " (it is stopped: its agent sees them when it boots)"))
    return 0


def cmd_exec(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        usage = "usage: pimaster lab exec NODE [--] [CMD ...]   (no CMD: a login shell on NODE)"
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, cmd = argv[0], argv[1:]
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    require_root()
    lab = load_lab()
    argv_ = node_command(lab.node(name), cmd or ["/bin/bash", "--login"])
    sys.stdout.flush()
    os.execvp(argv_[0], argv_)  # the command's exit status, stdin and stdout become ours
    return 127


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pimaster lab", description=(
        "A simulated Raspberry Pi cluster on this machine: systemd-nspawn nodes on a private bridge, "
        "node01 running the master, every node an enrolled agent. Needs root."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    up = sub.add_parser("up", help="start the nodes, the master and the agents; wait until all answer ping")
    up.add_argument("--nodes", type=int, help=f"how many nodes (default {DEFAULT_NODES})")
    up.add_argument("--subnet",
                    help=f"private IPv4 subnet of the lab (default {DEFAULT_SUBNET})")
    up.add_argument("--arch", metavar="ARCH|NODE=ARCH,...",
                    help=f"ARM userlands, as a Pi runs them: arm64 (Raspberry Pi OS 64-bit) or armhf (32-bit) "
                         f"for every node but {MASTER_NODE} (--arch arm64), or per node (--arch "
                         f"node02=arm64,node03=armhf); a Debian bookworm root of that architecture run by "
                         f"qemu-user, built once (a few minutes) and cached in {ROOTS_DIR} (default: every "
                         f"node runs this machine's own architecture)")
    up.add_argument("--keep-on-failure", action="store_true", help="leave a failed lab in place for debugging")
    up.add_argument("--cluster-dir", metavar="DIR",
                    help=f"bind DIR (the cluster's cluster.yaml and states) read-only into {MASTER_NODE} at "
                         f"{NODE_CLUSTER_DIR} and run the master with --cluster-dir there (default: the "
                         f"master's default, the shipped states)")
    start = sub.add_parser("start", help="boot stopped nodes again (powered off by `pimaster shutdown`), as a "
                                         "Pi whose plug is put back: same root file system, keys and address")
    start.add_argument("nodes", nargs="+", metavar="NODE", help="a stopped node of the lab (node04)")
    status = sub.add_parser("status", help="the nodes, their addresses, services and memory")
    status.add_argument("--json", action="store_true", help="print JSON")
    fleet.add_parsers(sub)
    sub.add_parser("exec", help="run a command on a node: exec NODE -- CMD ...", add_help=False)
    sub.add_parser("down", help="stop the lab and remove everything it made")
    add_set_parser(sub)
    return parser


def add_set_parser(sub) -> None:
    known = "; ".join(f"{k}: {v}" for k, v in KNOWN_SETTINGS.items())
    set_ = sub.add_parser("set", help="set what a node's agent reads as its Pi's temperature and throttling: "
                                      "set node03 temp=82 throttled=0x50005",
                          description=f"Changes a node's Pi values without entering it. Keys: {known}.")
    set_.add_argument("node", metavar="NODE", help="a node of the lab (node03)")
    set_.add_argument("settings", nargs="+", metavar="KEY=VALUE", help=f"one or more of: {', '.join(KNOWN_SETTINGS)}")


def main(argv: list[str]) -> int:
    args = None
    try:
        if argv[:1] == ["exec"]:
            return cmd_exec(argv[1:])
        args = _parser().parse_args(argv)
        if args.command == "up":
            return cmd_up(args.nodes, args.subnet, args.keep_on_failure, args.cluster_dir, args.arch)
        if args.command == "start":
            return cmd_start(args.nodes)
        if args.command == "down":
            return cmd_down()
        if args.command == "status":
            return cmd_status(args.json)
        if args.command == "add":
            return fleet.cmd_add(args.name, args.json, args.arch)
        if args.command == "remove":
            return fleet.cmd_remove(args.node, args.json)
        if args.command == "reflash":
            return fleet.cmd_reflash(args.node, args.json)
        if args.command == "set":
            return cmd_set(args.node, args.settings)
        return 2
    except LabError as exc:
        if getattr(args, "json", False):  # a script reading stdout always gets JSON
            print(json.dumps({"error": str(exc), "code": "refused" if isinstance(exc, LabRefused) else "failed"}))
        print(f"pimaster lab: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, LabRefused) else 1
    except KeyboardInterrupt:
        print("pimaster lab: interrupted", file=sys.stderr)
        return 130
