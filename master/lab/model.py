"""The lab's model: where everything lives, what `up` made (lab.json), and the lock of `up`/`down`.

Layout on the host (all of it carries a lab prefix so that `down`, or `up` after a crash, finds
every leftover even without the state file):

    LAB_DIR/lab.json                    what `up` made (nodes, addresses, supervisor pids)
    LAB_DIR/master-state/               node01's /var/lib/pimaster (bind mount): control.sock lives
                                        here, so host-side `pimaster` commands reach the master
                                        through a unix socket, never through the lab network
    LAB_DIR/nodes/NAME/{upper,work}     the node's overlay layers (lower layer: the host's /, or for
                                        an ARM node its architecture's root, arch.py)
    netns  pimlab-switch                holds bridge br0; one veth per node, made directly in the
           pimlab-NAME                  two namespaces, so no lab interface exists on the host
    cgroup /sys/fs/cgroup/*/pimaster-lab/NAME   every process of a node, for a complete kill
    route  unreachable SUBNET proto 77  host guard: the host never routes to the lab subnet
    /run/systemd/nspawn/...             nspawn's lock and propagate files (removed by `down`)
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from piagent.fileio import write_atomic

LAB_DIR = Path("/var/lib/pimaster-lab")
STATE_FILE = LAB_DIR / "lab.json"
MASTER_STATE_DIR = LAB_DIR / "master-state"
# Outside LAB_DIR on purpose: `down` deletes LAB_DIR while holding this lock.
LOCK_FILE = Path("/run/lock/pimaster-lab.lock")

NETNS_PREFIX = "pimlab-"
SWITCH_NETNS = NETNS_PREFIX + "switch"
BRIDGE = "br0"
CGROUP_NAME = "pimaster-lab"
# Routing-protocol number tagging the host guard route, so cleanup finds it without the state file.
ROUTE_PROTO = "77"
# nspawn keeps runtime files here, named after the machine (lab prefix) or the root's inode. It
# cannot remove them itself when /run is on disk ("we can't allow that"), as on a host without systemd.
NSPAWN_RUN = Path("/run/systemd/nspawn")

DEFAULT_SUBNET = "10.77.0.0/24"
DEFAULT_NODES = 4
MAX_NODES = 99                      # node01..node99
HOST_OFFSET = 10                    # nodeNN gets the subnet's address number 10 + NN (.11, .12, ...)
MASTER_NODE = "node01"
MASTER_PORT = 4510


class LabError(Exception):
    """Something the user can act on: printed as one clear message, never as a traceback."""


class LabRefused(LabError):
    """A request refused before anything was done (an unknown node, a running one): exit status 2."""


@dataclass
class Node:
    name: str
    ip: str
    prefixlen: int
    roles: list[str]
    supervisor_pid: int | None = None
    nspawn_lock: str | None = None      # nspawn's lock file in /run, which it leaves behind when killed
    arch: str | None = None             # an ARM architecture (arm64, armhf; see arch.py), or None: native

    @property
    def netns(self) -> str:
        return NETNS_PREFIX + self.name

    @property
    def dir(self) -> Path:
        return LAB_DIR / "nodes" / self.name


@dataclass
class Lab:
    subnet: str
    nodes: list[Node]
    status: str = "starting"            # "starting" while `up` runs, then "up"
    owner_pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    master_address: str = ""
    version: int = 1
    cluster_dir: str | None = None      # `up --cluster-dir`: the host dir node01's master serves

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LabError(f"no node {name!r} in the lab (nodes: {', '.join(n.name for n in self.nodes)})")

    def save(self) -> None:
        LAB_DIR.mkdir(parents=True, exist_ok=True)
        write_atomic(str(STATE_FILE), json.dumps(asdict(self), indent=2) + "\n", 0o644)

    @classmethod
    def load(cls) -> Lab | None:
        try:
            data = json.loads(STATE_FILE.read_text())
            data["nodes"] = [Node(**n) for n in data["nodes"]]
            return cls(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            raise LabError(f"{STATE_FILE} is damaged ({exc}); run `pimaster lab down` to clean up") from None


def load_lab() -> Lab:
    lab = Lab.load()
    if lab is None:
        raise LabError("no lab is up (start one with `pimaster lab up`)")
    return lab


def make_nodes(count: int, subnet: ipaddress.IPv4Network) -> list[Node]:
    nodes = []
    for i in range(1, count + 1):
        name = f"node{i:02d}"
        roles = ["master", "agent"] if name == MASTER_NODE else ["agent"]
        nodes.append(Node(name=name, ip=str(subnet.network_address + HOST_OFFSET + i),
                          prefixlen=subnet.prefixlen, roles=roles))
    return nodes


@contextlib.contextmanager
def lab_lock():
    """One `up`/`down` at a time; `exec` and `status` need no lock."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise LabError(f"another `pimaster lab up/down` is running (pid {holder}); wait for it") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (a CI timeout, `kill`) cleans up like Ctrl-C instead of leaving a half-made lab."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
