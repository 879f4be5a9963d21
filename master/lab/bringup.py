"""Bringing a lab up: network, node01 with the master, a join token, the agents, until all answer ping.

node01 runs the master as well as an agent, like the first Pi of the seed guide; every node runs
the agent as a systemd service and enrolls itself with a join token dropped into its boot config
(/boot/firmware/piagent.conf), as on a freshly flashed SD card.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import time

from .host import network_up, pid_alive, say
from .model import LAB_DIR, MASTER_NODE, MASTER_STATE_DIR, Lab, LabError, Node
from .node import (BOOT_TIMEOUT_S, journal_tail, leader_pid, node_exec, node_log_tail, node_running,
                   start_node)
from .rootfs import AGENT_CONFIG, Source, host_enabled_units, prepare_root

# Generous but bounded: CI is a loaded 2-core VM.
MASTER_TIMEOUT_S = 90
ENROLL_TIMEOUT_S = 150


def lab_running(lab: Lab) -> bool:
    """Every node of the lab is running (its supervisor is alive)."""
    return all(node_running(n) for n in lab.nodes)


def bring_up(lab: Lab, source: Source) -> None:
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    MASTER_STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    lab.save()
    disable = host_enabled_units()
    network_up(lab)
    master = lab.node(MASTER_NODE)
    agents = [n for n in lab.nodes if n is not master]
    say(f"Booting {master.name} (master) ...")
    prepare_root(master, source, disable, agent_config=None, cluster_dir=lab.cluster_dir)
    start_node(lab, master, source)
    wait_booted([master], time.time() + BOOT_TIMEOUT_S)
    config = create_token(lab, master, time.time() + MASTER_TIMEOUT_S)
    if agents:
        say(f"Booting {', '.join(n.name for n in agents)} with a join token in /boot/firmware ...")
    for node in agents:
        # The token sits in the boot config before first boot, as on a freshly flashed SD card.
        prepare_root(node, source, disable, agent_config=config)
        start_node(lab, node, source)
    # node01 got its master first; now its agent, with the same token, like the first Pi of the guide.
    node_exec(master, ["sh", "-c", f"umask 077 && mkdir -p {os.path.dirname(AGENT_CONFIG)} && cat > {AGENT_CONFIG}"],
              input=config, check=True)
    node_exec(master, ["systemctl", "enable", "--now", "piagent.service"], check=True, timeout=120)
    wait_booted(agents, time.time() + BOOT_TIMEOUT_S)
    say("Waiting for every agent to enroll and answer ping ...")
    wait_enrolled(lab, time.time() + ENROLL_TIMEOUT_S)


def start_stopped(lab: Lab, nodes: list[Node], source: Source) -> None:
    """Boot stopped nodes again, like a Pi whose plug is put back: the same overlay (root file system,
    keys, the master's state dir), network namespace and address; nothing is prepared afresh.
    Waits until they have booted and, when the master's node runs, until their agents answer ping."""
    for node in nodes:
        # A poweroff leaves nspawn's lock file of the last boot behind; the new boot makes its own.
        if node.nspawn_lock:
            with contextlib.suppress(OSError):
                os.unlink(node.nspawn_lock)
            node.nspawn_lock = None
        say(f"Booting {node.name} ...")
        start_node(lab, node, source)
    wait_booted(nodes, time.time() + BOOT_TIMEOUT_S)
    if node_running(lab.node(MASTER_NODE)):
        say("Waiting for their agents to answer ping ...")
        wait_enrolled(lab, time.time() + ENROLL_TIMEOUT_S, [n.name for n in nodes])


def wait_booted(nodes: list[Node], deadline: float) -> None:
    """Until systemd in every node has finished starting up (running, or degraded with a warning)."""
    pending = list(nodes)
    while pending:
        for node in list(pending):
            if not pid_alive(node.supervisor_pid):
                raise LabError(f"{node.name} stopped while booting:\n{node_log_tail(node)}")
            leader = leader_pid(node)
            if leader is None:
                continue
            state = node_exec(node, ["systemctl", "is-system-running"], timeout=30).stdout.strip()
            if state == "maintenance":
                raise LabError(f"{node.name} booted into maintenance mode (emergency shell):\n"
                               f"{journal_tail(node, 'init.scope')}")
            if state in ("running", "degraded"):
                pending.remove(node)
                if state == "degraded":
                    failed = node_exec(node, ["systemctl", "--failed", "--no-legend", "--plain"]).stdout
                    units = [line.split()[0] for line in failed.splitlines() if line.strip()]
                    say(f"warning: {node.name} booted with failed units: {', '.join(units) or '?'}")
        if not pending:
            return
        if time.time() > deadline:
            names = ", ".join(n.name for n in pending)
            detail = "\n".join(f"{n.name}:\n{node_log_tail(n)}" for n in pending)
            raise LabError(f"{names} did not finish booting within {BOOT_TIMEOUT_S} s\n{detail}")
        time.sleep(0.2)


def create_token(lab: Lab, master: Node, deadline: float, for_node: str | None = None) -> str:
    """A join token for every node, or (``for_node``) for that one node only and once, from the
    master in node01 (which may still be starting)."""
    uses = ["--uses", "1", "--ids", for_node] if for_node else ["--uses", str(len(lab.nodes))]
    cmd = ["pimaster", "token", "create", "--ttl", "1h", *uses, "--address", lab.master_address, "--json"]
    while True:
        result = node_exec(master, cmd, timeout=60)
        if result.returncode == 0:
            try:
                return json.loads(result.stdout)["config"]
            except (ValueError, KeyError, TypeError):
                raise LabError(f"`{shlex.join(cmd)}` printed no config:\n{result.stdout[-500:]}") from None
        if time.time() > deadline:
            raise LabError(f"the master in {master.name} did not hand out a join token within "
                           f"{MASTER_TIMEOUT_S} s: {result.stderr.strip()}\n"
                           f"  journalctl -u pimaster on {master.name}:\n{journal_tail(master, 'pimaster')}")
        time.sleep(0.5)


def ping_all(lab: Lab, timeout: float = 5) -> dict[str, bool]:
    """Node id -> answered, as the master in node01 sees it (via `pimaster ping --json`)."""
    master = lab.node(MASTER_NODE)
    result = node_exec(master, ["pimaster", "ping", "--json", "--timeout", str(timeout)], timeout=timeout + 60)
    try:
        return {n["id"]: bool(n.get("ok")) for n in json.loads(result.stdout)["nodes"]}
    except (ValueError, KeyError, TypeError):
        return {}


def wait_enrolled(lab: Lab, deadline: float, expected: list[str] | None = None) -> None:
    """Until the master in node01 hears every node of ``expected`` (default: all) answer ping."""
    expected = expected or [n.name for n in lab.nodes]
    answered: dict[str, bool] = {}
    while True:
        answered = ping_all(lab, timeout=3)
        missing = [name for name in expected if not answered.get(name)]
        if not missing:
            return
        if time.time() > deadline:
            parts = [f"these nodes did not answer ping within {ENROLL_TIMEOUT_S} s: "
                     f"{', '.join(missing)}"]
            for name in missing:
                parts.append(f"  journalctl -u piagent on {name}:\n{journal_tail(lab.node(name), 'piagent')}")
            raise LabError("\n".join(parts))
        time.sleep(0.5)
