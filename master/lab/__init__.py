"""`pimaster lab`: a simulated Raspberry Pi cluster on one Linux machine.

Each node is a systemd-nspawn container with systemd as PID 1, booting the host's own root file
system through a copy-on-write overlay, with its own hostname, machine-id, network namespace and
an address on a private bridge. node01 runs the master as well as an agent; every node runs the
agent as a systemd service and enrolls itself with a join token in its boot config.

Network safety: the host never sends a packet to a lab address; it reaches nodes only by entering
their namespaces (nsenter), and every command run that way drops CAP_SYS_TIME, because the clock
is not namespaced and belongs to the host. The host's routing table holds an `unreachable` route
for the lab subnet; nodes have no route out of the lab (no NAT, no gateway).

The package, along its seams:

    model.py      where everything lives, the state file (Lab, Node), the lock of up/down
    host.py       host plumbing: running tools, processes, cgroups, mounts, netns, the guard route
    checks.py     checks before `up` creates anything (root, tools, subnet, memory, packages)
    rootfs.py     the code nodes run and their root file systems before first boot
    pihardware.py what makes a node look like a Pi to its agent: device tree (model, serial), thermal
                  zone, a vcgencmd stand-in, a bookworm boot partition; `lab set`'s values
    node.py       node lifecycle: start, PID 1, exec inside a node (CAP_SYS_TIME dropped), logs
    bringup.py    `up`: network, master, join token, agents, until every node answers ping;
                  `start`: boot stopped nodes again
    teardown.py   `down`: every process, cgroup, namespace, route, mount and file, found by prefix
    fleet.py      `add`, `remove`, `reflash`: Pis joining the running lab, leaving it, re-flashed
    cli.py        `pimaster lab up|start|add|remove|reflash|down|status|exec|set`

The public API is what this module exports (``__all__``), for the master's CLI (``main``) and the
end-to-end tests (tests/e2e/lab_harness.py); everything else is internal to the lab and may change.

- ``main(argv) -> int``: the `pimaster lab` command line.
- ``LabError``: a failure the user can act on (its message is the whole story).
- ``Lab``, ``Node``: the lab's state as `up` recorded it; ``Lab.load()`` (None: no lab) and
  ``load_lab()`` (LabError: no lab); ``lab.node(name)``, ``lab.subnet``, ``lab.master_address``,
  ``node.ip``, ``node.netns``.
- ``lab_running(lab)``: every node of the lab is running; ``node_running(node)``: this one is (up,
  booting or rebooting; False: stopped, e.g. powered off by `pimaster shutdown`).
- ``leftovers()``: what a lab left on this machine, described for people (empty: nothing).
- ``node_command(node, cmd) -> argv``: the host command that runs ``cmd`` inside the node (its
  namespaces, CAP_SYS_TIME dropped, a clean environment); LabError if the node is not running.
- ``leader_pid(node)``: host pid of the node's PID 1, None while it is down (changes on a reboot).
- ``descendants(pid)``: every process below ``pid``, e.g. to stop what a ``node_command`` started
  inside the node (nsenter forks into the node's PID namespace).
- ``node_memory_mb(node)``: PSS of every process of the node, as `lab status` counts it.
- ``check_capacity(count)``, ``check_subnet_free(subnet)``: two of `up`'s checks (LabError).
- Where things are: ``LAB_DIR``, ``MASTER_STATE_DIR`` (the master's state dir on the host: its
  control socket), ``MASTER_NODE``, ``NODE_SRC`` (the source tree inside a node),
  ``DEFAULT_SUBNET``, and the names every lab object carries: ``NETNS_PREFIX``, ``CGROUP_NAME``.
"""

from __future__ import annotations

from .bringup import lab_running
from .checks import check_capacity, check_subnet_free
from .cli import main
from .host import descendants, node_memory_mb
from .model import (CGROUP_NAME, DEFAULT_SUBNET, LAB_DIR, MASTER_NODE, MASTER_STATE_DIR, NETNS_PREFIX,
                    Lab, LabError, Node, load_lab)
from .node import leader_pid, node_command, node_running
from .pihardware import pi_status
from .rootfs import NODE_SRC
from .teardown import leftovers

__all__ = [
    "main", "LabError", "Lab", "Node", "load_lab", "lab_running", "node_running", "leftovers", "node_command",
    "leader_pid", "descendants", "node_memory_mb", "check_capacity", "check_subnet_free",
    "LAB_DIR", "MASTER_STATE_DIR", "MASTER_NODE", "NODE_SRC", "DEFAULT_SUBNET", "NETNS_PREFIX",
    "CGROUP_NAME", "pi_status",
]
