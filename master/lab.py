"""`pimaster lab`: a simulated Raspberry Pi cluster on one Linux machine.

Each node is a systemd-nspawn container with systemd as PID 1, booting the host's own root file
system through a copy-on-write overlay, with its own hostname, machine-id, network namespace and
an address on a private bridge. node01 runs the master as well as an agent, like the first Pi of
the seed guide; every node runs the agent as a systemd service and enrolls itself with a join token
dropped into its boot config (/boot/firmware/piagent.conf).

Layout on the host (all of it carries a lab prefix so that `down`, or `up` after a crash, finds
every leftover even without the state file):

    LAB_DIR/lab.json                    what `up` made (nodes, addresses, supervisor pids)
    LAB_DIR/master-state/               node01's /var/lib/pimaster (bind mount): control.sock lives
                                        here, so host-side `pimaster` commands reach the master
                                        through a unix socket, never through the lab network
    LAB_DIR/nodes/NAME/{upper,work}     the node's overlay layers (lower layer: the host's /)
    netns  pimlab-switch                holds bridge br0; one veth per node, made directly in the
           pimlab-NAME                  two namespaces, so no lab interface exists on the host
    cgroup /sys/fs/cgroup/*/pimaster-lab/NAME   every process of a node, for a complete kill
    route  unreachable SUBNET proto 77  host guard: the host never routes to the lab subnet
    /run/systemd/nspawn/...             nspawn's lock and propagate files (removed by `down`)

Network safety: the host never sends a packet to a lab address; it reaches nodes only by entering
their namespaces (nsenter), and every command run that way drops CAP_SYS_TIME, because the clock
is not namespaced and belongs to the host. Nodes have no route out of the lab (no NAT, no gateway).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
# An idle node (systemd, journald, dbus, logind, networkd, agent) measures 30-50 MB PSS; the rest
# is room for what states add (munge, slurmd, chrony, ...).
NODE_MEMORY_MB = 100
HOST_RESERVE_MB = 512               # left for the host itself when estimating capacity

# Generous but bounded: CI is a loaded 2-core VM.
BOOT_TIMEOUT_S = 120
MASTER_TIMEOUT_S = 90
ENROLL_TIMEOUT_S = 150
STOP_TIMEOUT_S = 20

# Packages states may install on nodes. The host fetches them before any node starts (nodes see the
# host's apt cache through their overlay), so `apt-get install` works in a node without a route out.
NODE_PACKAGES = [
    "munge", "slurmd", "slurmctld", "slurm-client",
    "chrony", "ntpsec-ntpdate", "nfs-kernel-server", "nfs-common",
    "dphys-swapfile",  # swap.off's lab test: Raspberry Pi OS's swap file service
    "containerd",      # kubeadm.yaml: the container runtime (bookworm's 1.6)
    "network-manager", "dhcpcd",   # network.static's lab test: the managers of bookworm and bullseye
]

# In the node: the repo (read-only) and import-package links, and wrappers on PATH.
NODE_SRC = "/opt/pimaster/src"
NODE_LIB = "/opt/pimaster/lib"
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
AGENT_CONFIG = "/boot/firmware/piagent.conf"
NODE_MASTER_STATE = "/var/lib/pimaster"

# Host state that must not leak into a node through the overlay: a node starts like a fresh Pi, so
# only what the agent configures can make a cluster work.
HOST_STATE_PATHS = [
    "etc/piagent", "var/lib/piagent", "etc/pimaster", "var/lib/pimaster", "boot/firmware/piagent.conf",
    "etc/slurm/slurm.conf", "etc/slurm/cgroup.conf", "etc/slurm-llnl", "etc/munge/munge.key",
    "usr/sbin/policy-rc.d",   # docker-style "exit 101": a real Pi starts daemons when installed
    # Docker-image apt settings; stock docker-clean deletes the cached .debs after every install,
    # which would leave a node without the packages the host fetched for it.
    "etc/apt/apt.conf.d/docker-clean",
]
# Enabled units of the host image that stay enabled in nodes; everything else (postgresql, apt
# timers, munge/slurm of the host, ...) is disabled, or every node would boot the host's services.
KEEP_ENABLED_RE = re.compile(r"^(getty@|systemd-|dbus)")
# Directories a node gets empty instead of the host's (opaque in the overlay): root's home holds the
# host's dotfiles (pyenv shims on PATH, ...), which a fresh Pi does not have.
FRESH_DIRS = {"root": 0o700}


class LabError(Exception):
    """Something the user can act on: printed as one clear message, never as a traceback."""


# --------------------------------------------------------------------------------------------
# State

@dataclass
class Node:
    name: str
    ip: str
    prefixlen: int
    roles: list[str]
    supervisor_pid: int | None = None
    nspawn_lock: str | None = None      # nspawn's lock file in /run, which it leaves behind when killed

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

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LabError(f"no node {name!r} in the lab (nodes: {', '.join(n.name for n in self.nodes)})")

    def save(self) -> None:
        LAB_DIR.mkdir(parents=True, exist_ok=True)
        tmp = STATE_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, STATE_FILE)

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


# --------------------------------------------------------------------------------------------
# Small helpers

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


def write_file(path: Path, text: str | bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(text.encode() if isinstance(text, str) else text)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


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


def lab_cgroup_dirs() -> list[Path]:
    return [root / CGROUP_NAME for root in cgroup_roots() if (root / CGROUP_NAME).is_dir()]


def cgroup_pids(top: Path) -> set[int]:
    pids: set[int] = set()
    for dirpath, _, files in os.walk(top):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                kids += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return kids


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def in_node_cgroup(pid: int, node: str) -> bool:
    try:
        return f"/{CGROUP_NAME}/{node}" in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def memory_mb(pids: set[int]) -> float:
    """Proportional set size: shared pages (python, libc, ...) count once across all nodes."""
    total_kb = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


# --------------------------------------------------------------------------------------------
# Checks before anything is created

def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (namespaces, mounts, cgroups): run it with sudo")


def require_tools() -> None:
    missing = []
    for tool, package in (("systemd-nspawn", "systemd-container"), ("ip", "iproute2"),
                          ("nsenter", "util-linux"), ("unshare", "util-linux"), ("setpriv", "util-linux"),
                          ("mount", "mount"), ("systemctl", "systemd")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (apt-get install {package})")
    if missing:
        raise LabError("missing tools: " + "; ".join(missing))
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise LabError("this kernel has no overlay file system, which the lab's nodes need")
    if not nspawn_cgroup_roots():
        raise LabError("no cgroup2 or name=systemd cgroup hierarchy is mounted under /sys/fs/cgroup")


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        subnet = ipaddress.IPv4Network(text, strict=True)
    except ipaddress.AddressValueError:
        raise LabError(f"--subnet {text!r} is not an IPv4 subnet like {DEFAULT_SUBNET}") from None
    except (ipaddress.NetmaskValueError, ValueError) as exc:
        if "host bits set" in str(exc):
            fixed = ipaddress.IPv4Network(text, strict=False)
            raise LabError(f"--subnet {text} has host bits set; did you mean {fixed}?") from None
        raise LabError(f"--subnet {text!r}: {exc}") from None
    if subnet.is_loopback or subnet.is_link_local or subnet.is_multicast or not subnet.is_private:
        raise LabError(f"--subnet {subnet} is not a private range; use one from 10.0.0.0/8, "
                       f"172.16.0.0/12 or 192.168.0.0/16 that this machine does not use")
    return subnet


def node_count_fits_subnet(count: int, subnet: ipaddress.IPv4Network) -> None:
    room = subnet.num_addresses - 2 - HOST_OFFSET
    if count > room:
        raise LabError(f"--subnet {subnet} has room for {max(room, 0)} nodes (they get addresses from "
                       f".{HOST_OFFSET + 1} on); pick a larger subnet or fewer nodes")


def check_subnet_free(subnet: ipaddress.IPv4Network) -> None:
    """The lab subnet must not overlap anything the host uses, or the guard route would break it."""
    users = []
    for entry in json.loads(run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]"):
        for addr in entry.get("addr_info", []):
            net = ipaddress.IPv4Interface(f"{addr['local']}/{addr['prefixlen']}").network
            if net.overlaps(subnet):
                users.append(f"address {addr['local']}/{addr['prefixlen']} on {entry['ifname']}")
    for route in json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]"):
        dst = route.get("dst", "")
        if dst in ("default", "") or str(route.get("protocol")) == ROUTE_PROTO:
            continue
        try:
            net = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        if net.overlaps(subnet) and route.get("type") not in ("broadcast", "local"):
            users.append(f"route {dst} ({route.get('dev') or route.get('type', '')})")
    if users:
        raise LabError(f"subnet {subnet} is in use on this machine ({'; '.join(users)}); "
                       f"pick another with --subnet")


def check_capacity(count: int) -> None:
    available_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available_kb = int(line.split()[1])
    available_mb = available_kb // 1024
    fits = max(0, (available_mb - HOST_RESERVE_MB) // NODE_MEMORY_MB)
    if count > fits:
        raise LabError(f"{count} nodes do not fit: {available_mb} MB of memory is available and a node "
                       f"needs about {NODE_MEMORY_MB} MB, so this machine can hold about {fits}")


def ensure_node_packages(packages: list[str] = NODE_PACKAGES) -> None:
    """Have the .debs of `packages` (and their dependencies) in the host's apt cache.

    Must run before nodes start: overlayfs need not show lower-layer files added while mounted.
    Quick when everything is there already: apt only prints what it would download.
    """
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")

    def apt(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env, timeout=timeout)
        except FileNotFoundError:
            raise LabError("apt-get not found: the lab needs a Debian-based host") from None
        except subprocess.TimeoutExpired:
            raise LabError(f"`apt-get {' '.join(args)}` did not finish within {timeout:.0f} s") from None

    probe = apt("install", "--download-only", "-y", "-qq", "--print-uris", *packages, timeout=120)
    if probe.returncode == 0 and not probe.stdout.strip():
        return
    say(f"Fetching packages nodes may install: {' '.join(packages)}")
    fetch = apt("install", "--download-only", "-y", "-q", *packages)
    if fetch.returncode != 0:
        apt("update", "-q")  # a fresh machine may not have package lists yet
        fetch = apt("install", "--download-only", "-y", "-q", *packages)
    if fetch.returncode != 0:
        tail = "\n".join((fetch.stderr or fetch.stdout).strip().splitlines()[-5:])
        raise LabError(f"could not fetch the packages nodes need ({' '.join(packages)}); "
                       f"run `apt-get update` and check the host's network:\n{tail}")


# --------------------------------------------------------------------------------------------
# Source code the nodes run

@dataclass
class Source:
    binds: list[tuple[str, str]]          # (host path, node path), read-only
    links: dict[str, str]                 # node path -> symlink target
    unit_dir: Path | None                 # debian/ with the packaged unit files, if a checkout


def find_source() -> Source:
    """The pimaster/piagent code this process runs, as the nodes will see it."""
    master_dir = Path(__file__).resolve().parent
    spec = importlib.util.find_spec("piagent")
    if spec is None or not spec.submodule_search_locations:
        raise LabError("the piagent package is not importable next to pimaster; install both")
    agent_dir = Path(list(spec.submodule_search_locations)[0]).resolve()
    repo = master_dir.parent
    if master_dir.name == "master" and agent_dir == repo / "agent" and (repo / "pyproject.toml").is_file():
        # A source checkout: bind the whole repo, link the import packages to its folders.
        return Source(binds=[(str(repo), NODE_SRC)],
                      links={f"{NODE_LIB}/pimaster": f"{NODE_SRC}/master", f"{NODE_LIB}/piagent": f"{NODE_SRC}/agent"},
                      unit_dir=repo / "debian" if (repo / "debian").is_dir() else None)
    return Source(binds=[(str(master_dir), f"{NODE_LIB}/pimaster"), (str(agent_dir), f"{NODE_LIB}/piagent")],
                  links={}, unit_dir=None)


WRAPPER = """#!/bin/sh
# Written by `pimaster lab`: runs {package} from the source bound into this node.
export PYTHONPATH={lib}${{PYTHONPATH:+:$PYTHONPATH}}
export PYTHONDONTWRITEBYTECODE=1
exec /usr/bin/python3 -m {package} "$@"
"""

FALLBACK_UNITS = {
    "piagent.service": """[Unit]
Description=pimaster agent
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
ExecStart=/usr/bin/piagent run
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
""",
    "pimaster.service": """[Unit]
Description=pimaster master
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
ExecStart=/usr/bin/pimaster serve
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
""",
}

# The packaged units run /usr/bin/{piagent,pimaster}; until the .deb exists nodes run the source.
UNIT_DROPINS = {
    "piagent.service": f"ExecStart=/usr/local/bin/piagent run --config {AGENT_CONFIG}",
    "pimaster.service": f"ExecStart=/usr/local/bin/pimaster serve --state-dir {NODE_MASTER_STATE}",
}


def host_enabled_units() -> list[str]:
    out = run(["systemctl", "--root=/", "list-unit-files", "--state=enabled", "--no-legend", "--no-pager",
               "--type=service,socket,timer,path,target"], check=False).stdout
    units = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [u for u in units if not KEEP_ENABLED_RE.match(u) and u not in UNIT_DROPINS]


def munge_ids(root: Path) -> tuple[int, int] | None:
    try:
        for line in (root / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == "munge":
                return int(fields[2]), int(fields[3])
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------
# Nodes: network, root file system, boot, exec

def make_nodes(count: int, subnet: ipaddress.IPv4Network) -> list[Node]:
    nodes = []
    for i in range(1, count + 1):
        name = f"node{i:02d}"
        roles = ["master", "agent"] if name == MASTER_NODE else ["agent"]
        nodes.append(Node(name=name, ip=str(subnet.network_address + HOST_OFFSET + i),
                          prefixlen=subnet.prefixlen, roles=roles))
    return nodes


def network_up(lab: Lab) -> None:
    # Guard first: from now on a mistaken host-side packet to the lab fails locally (EHOSTUNREACH)
    # instead of leaving the machine through the host's default route.
    run(["ip", "route", "replace", "unreachable", lab.subnet, "proto", ROUTE_PROTO])
    run(["ip", "netns", "add", SWITCH_NETNS])
    run(["ip", "-n", SWITCH_NETNS, "link", "set", "lo", "up"])
    run(["ip", "-n", SWITCH_NETNS, "link", "add", BRIDGE, "type", "bridge"])
    run(["ip", "-n", SWITCH_NETNS, "link", "set", BRIDGE, "up"])
    for node in lab.nodes:
        run(["ip", "netns", "add", node.netns])
        # Both ends are created directly in their namespaces: no lab interface ever exists on the host.
        run(["ip", "link", "add", "name", f"v-{node.name}", "netns", SWITCH_NETNS, "type", "veth",
             "peer", "name", "eth0", "netns", node.netns])
        run(["ip", "-n", SWITCH_NETNS, "link", "set", f"v-{node.name}", "master", BRIDGE, "up"])
        # eth0 stays down without an address: systemd-networkd in the node configures it.


def prepare_root(node: Node, source: Source, disable: list[str], agent_config: str | None) -> None:
    """Write the node's first-boot files into its overlay, the way a freshly flashed Pi looks."""
    upper, work, merged = node.dir / "upper", node.dir / "work", node.dir / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    for rel, mode in FRESH_DIRS.items():  # before mounting: the upper layer may change only then
        fresh = upper / rel
        fresh.mkdir(mode=mode, exist_ok=True)
        os.setxattr(fresh, "trusted.overlay.opaque", b"y")
    # A short-lived mount in the host's mount namespace, only to write through the overlay (which
    # makes whiteouts for removed host files); the node later mounts the same layers privately.
    run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={upper},workdir={work}", str(merged)])
    try:
        root = merged
        for rel in HOST_STATE_PATHS:
            remove_path(root / rel)
        for dotfile in ("bashrc", "profile"):  # what Debian puts in a fresh /root
            skel = Path("/usr/share/base-files/dot." + dotfile)
            if skel.is_file():
                write_file(root / "root" / ("." + dotfile), skel.read_text())
        write_file(root / "etc/hostname", f"{node.name}\n")
        write_file(root / "etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
        write_file(root / "etc/hosts", "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"
                                        "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n\n"
                                        f"127.0.1.1\t{node.name}\n")
        ids = munge_ids(root)
        if ids:  # munge is installed in the image: this node gets its own random key, like a fresh install
            write_file(root / "etc/munge/munge.key", os.urandom(128), 0o400, *ids)
        # The address comes from inside, from systemd-networkd, as on a real system; states may change it.
        netdir = root / "etc/systemd/network"
        if netdir.is_dir():
            for old in netdir.glob("*.network"):
                old.unlink()
        write_file(netdir / "10-eth0.network",
                   "# Written by `pimaster lab up`: this node's lab address.\n"
                   "[Match]\nName=eth0\n\n"
                   f"[Network]\nAddress={node.ip}/{node.prefixlen}\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n")
        for package in ("pimaster", "piagent"):
            write_file(root / f"usr/local/bin/{package}", WRAPPER.format(package=package, lib=NODE_LIB), 0o755)
        for link, target in source.links.items():
            remove_path(root / link.lstrip("/"))
            (root / link.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, root / link.lstrip("/"))
        for _, inside in source.binds:
            (root / inside.lstrip("/")).mkdir(parents=True, exist_ok=True)
        units = ["piagent.service"] + (["pimaster.service"] if "master" in node.roles else [])
        for unit in units:
            packaged = source.unit_dir / unit if source.unit_dir else None
            text = packaged.read_text() if packaged and packaged.is_file() else FALLBACK_UNITS[unit]
            write_file(root / "etc/systemd/system" / unit, text)
            write_file(root / f"etc/systemd/system/{unit}.d/lab.conf",
                       "# Written by `pimaster lab up`: run from the source bound into this node.\n"
                       f"[Service]\nExecStart=\n{UNIT_DROPINS[unit]}\n")
        if "master" in node.roles:
            (root / NODE_MASTER_STATE.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / "boot/firmware").mkdir(parents=True, exist_ok=True)
        if agent_config is not None:
            write_file(root / AGENT_CONFIG.lstrip("/"), agent_config, 0o600)
        if disable:
            run(["systemctl", f"--root={root}", "disable", *disable], check=False)
        enable = ["systemd-networkd.service"]
        if "master" in node.roles:
            enable.append("pimaster.service")
        if agent_config is not None:
            enable.append("piagent.service")
        run(["systemctl", f"--root={root}", "enable", *enable])
    finally:
        run(["umount", str(merged)])


# The node's supervisor: runs in its own mount namespace (so the overlay and everything nspawn mounts
# vanish with it) and in the node's cgroups (so `down` can find and kill every process of the node).
SUPERVISOR = r"""
set -e
for cg in $LAB_CGROUPS; do echo $$ > "$cg/cgroup.procs"; done
mount -t overlay overlay -o "lowerdir=/,upperdir=$LAB_UPPER,workdir=$LAB_WORK" "$LAB_MERGED"
set +e
while :; do
    "$@"
    rc=$?
    # 133: the node ran `systemctl reboot`; boot it again, like a Pi comes back after a reboot.
    [ "$rc" -eq 133 ] || exit "$rc"
done
"""


def start_node(lab: Lab, node: Node, source: Source) -> None:
    cgroups = []
    for root in nspawn_cgroup_roots():
        cg = root / CGROUP_NAME / node.name
        cg.mkdir(parents=True, exist_ok=True)
        cgroups.append(str(cg))
    nspawn = ["systemd-nspawn", "--quiet", "--boot", f"--directory={node.dir / 'merged'}",
              # Never ask a host systemd (there may be none) for a scope or a machine registration.
              "--register=no", "--keep-unit",
              # The machine name carries the lab prefix: nspawn names its runtime dirs in /run after it.
              f"--machine={node.netns}", f"--hostname={node.name}",
              f"--network-namespace-path=/run/netns/{node.netns}",
              # nspawn grants CAP_NET_ADMIN only for networks it makes itself; systemd-networkd (and
              # states that change the address) need it. It reaches only the node's own netns.
              "--capability=CAP_NET_ADMIN",
              "--console=passive", "--link-journal=no", "--resolv-conf=off", "--timezone=off",
              # The lab's own files (other nodes' layers, the master's keys) stay invisible in nodes.
              # (--inaccessible= would need the host systemd's /run/systemd/inaccessible.)
              f"--tmpfs={LAB_DIR}:mode=0700"]
    nspawn += [f"--bind-ro={host}:{inside}" for host, inside in source.binds]
    if "master" in node.roles:
        nspawn.append(f"--bind={MASTER_STATE_DIR}:{NODE_MASTER_STATE}")
    env = dict(os.environ, LAB_CGROUPS=" ".join(cgroups), LAB_UPPER=str(node.dir / "upper"),
               LAB_WORK=str(node.dir / "work"), LAB_MERGED=str(node.dir / "merged"))
    log = open(node.dir / "nspawn.log", "ab")
    with log:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", SUPERVISOR, "sh",
                                 *nspawn], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True)
    # unshare and sh exec in place, so this pid stays the supervisor's for the node's lifetime.
    node.supervisor_pid = proc.pid
    lab.save()
    # nspawn locks its root directory in /run by inode: note the name (the overlay's, seen in the
    # supervisor's mount namespace) so that `down` can remove the lock file after a kill.
    merged = node.dir / "merged"
    host_dev = os.stat(merged).st_dev
    deadline = time.time() + BOOT_TIMEOUT_S
    while True:
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{proc.pid}/root{merged}")
            if st.st_dev != host_dev:
                node.nspawn_lock = str(NSPAWN_RUN / "locks" / f"inode-{st.st_dev}:{st.st_ino}")
                lab.save()
                return
        if proc.poll() is not None:
            raise LabError(f"{node.name} could not start:\n{node_log_tail(node)}")
        if time.time() > deadline:
            raise LabError(f"{node.name}: its overlay was not mounted within {BOOT_TIMEOUT_S} s")
        time.sleep(0.01)


def leader_pid(node: Node) -> int | None:
    """Host pid of the node's PID 1 (its systemd): the nspawn child living in another PID namespace."""
    sup = node.supervisor_pid
    if not sup or not pid_alive(sup) or not in_node_cgroup(sup, node.name):
        return None
    try:
        own_ns = os.readlink(f"/proc/{sup}/ns/pid")
    except OSError:
        return None
    for nspawn in children(sup):
        for child in children(nspawn):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{child}/ns/pid") != own_ns and pid_alive(child):
                    return child
    return None


def exec_argv(leader: int, cmd: list[str]) -> list[str]:
    env = ["PATH=" + NODE_PATH, "HOME=/root", "USER=root", "LOGNAME=root", "LANG=C.UTF-8"]
    if os.environ.get("TERM"):
        env.append("TERM=" + os.environ["TERM"])
    return ["nsenter", f"--target={leader}", "--mount", "--uts", "--ipc", "--net", "--pid", "--",
            # nsenter keeps our capabilities, and CAP_SYS_TIME would let a node set the HOST's clock
            # (e.g. ntpdate): drop it for good, from the bounding and the inheritable set.
            "/usr/bin/setpriv", "--inh-caps=-sys_time", "--bounding-set=-sys_time", "--",
            # A clean environment, as in a login on the node: nothing of the caller's (e.g. a
            # PIMASTER_STATE_DIR meant for the host) leaks in.
            "/usr/bin/env", "-i", *env, *cmd]


def node_leader(node: Node) -> int:
    leader = leader_pid(node)
    if leader is None:
        raise LabError(f"{node.name} is not running (see `pimaster lab status`)")
    return leader


def node_exec(node: Node, cmd: list[str], *, input: str | None = None, timeout: float = 60,
              check: bool = False) -> subprocess.CompletedProcess:
    argv = exec_argv(node_leader(node), cmd)
    try:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LabError(f"{node.name}: `{shlex.join(cmd)}` did not finish within {timeout:.0f} s") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise LabError(f"{node.name}: `{shlex.join(cmd)}` failed (exit {result.returncode})"
                       + (f": {detail}" if detail else ""))
    return result


def node_log_tail(node: Node, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        text = (node.dir / "nspawn.log").read_text(errors="replace").strip()
        return "\n".join(text.splitlines()[-lines:])
    return ""


def journal_tail(node: Node, unit: str, lines: int = 15) -> str:
    try:
        out = node_exec(node, ["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "short"],
                        timeout=30).stdout
    except LabError as exc:
        out = str(exc)
    return "\n".join("    " + line for line in out.strip().splitlines())


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


def create_token(lab: Lab, master: Node, deadline: float) -> str:
    """A join token for every node, from the master in node01 (which may still be starting)."""
    cmd = ["pimaster", "token", "create", "--ttl", "1h", "--uses", str(len(lab.nodes)),
           "--address", lab.master_address, "--json"]
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


def wait_enrolled(lab: Lab, deadline: float) -> None:
    expected = [n.name for n in lab.nodes]
    answered: dict[str, bool] = {}
    while True:
        answered = ping_all(lab, timeout=3)
        missing = [name for name in expected if not answered.get(name)]
        if not missing:
            return
        if time.time() > deadline:
            parts = [f"these nodes did not enroll and answer ping within {ENROLL_TIMEOUT_S} s: "
                     f"{', '.join(missing)}"]
            for name in missing:
                parts.append(f"  journalctl -u piagent on {name}:\n{journal_tail(lab.node(name), 'piagent')}")
            raise LabError("\n".join(parts))
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------
# Tear-down: finds everything by its lab prefix, so it also cleans up after a crashed `up`

def lab_netns() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(NETNS_PREFIX)]


def lab_routes() -> list[dict]:
    out = run(["ip", "-j", "-4", "route", "show", "table", "all", "proto", ROUTE_PROTO], check=False).stdout
    return json.loads(out or "[]")


def nspawn_runtime_files(lab: Lab | None) -> list[Path]:
    found = sorted((NSPAWN_RUN / "propagate").glob(NETNS_PREFIX + "*"))
    for node in lab.nodes if lab else []:
        if node.nspawn_lock and Path(node.nspawn_lock).exists():
            found.append(Path(node.nspawn_lock))
    return found


def leftovers(lab: Lab | None = None) -> list[str]:
    """Everything of a lab that is still on this machine, described for people."""
    found = [f"network namespace {ns}" for ns in lab_netns()]
    found += [f"nspawn runtime file {p}" for p in nspawn_runtime_files(lab)]
    found += [f"route {r.get('type', '')} {r.get('dst')}" for r in lab_routes()]
    found += [f"mount {m}" for m in mounts_under(LAB_DIR)]
    for cg in lab_cgroup_dirs():
        found.append(f"cgroup {cg}")
    live = sorted(pid for pid, state in lab_processes().items() if state != "Z")
    if live:
        found.append(f"processes {live}")
    if LAB_DIR.exists():
        found.append(f"directory {LAB_DIR}")
    return found


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


def kill_lab_processes(lab: Lab | None, deadline: float) -> None:
    """Kill every process of every node, and anything `lab exec` started in them."""
    # Each node's PID 1 first: its PID namespace dies with it, then nspawn and the supervisor exit
    # on their own and get reaped by their parents.
    for node in lab.nodes if lab else []:
        leader = leader_pid(node)
        if leader:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGKILL)
    # Then SIGKILL whatever is left (all of it, after a crash without a state file).
    grace = time.time() + 2
    while True:
        reap_own_children()
        live = {pid for pid, state in lab_processes().items() if state != "Z"}
        live.discard(os.getpid())
        if not live:
            break
        if time.time() > deadline:
            raise LabError(f"processes of the lab would not die: {sorted(live)}")
        if time.time() > grace or lab is None:
            for pid in live:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    # A supervisor whose `up` has exited is reaped by the host's PID 1, which may take a moment.
    # Zombies hold no namespace, mount or cgroup; wait a little for tidiness, never fail on them.
    zombie_deadline = min(deadline, time.time() + 5)
    while lab_processes() and time.time() < zombie_deadline:
        reap_own_children()
        time.sleep(0.05)


def remove_cgroups() -> None:
    for top in lab_cgroup_dirs():
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(dirpath)


def teardown() -> None:
    """Remove every process, cgroup, namespace, route and mount a lab made, then its files."""
    lab = None
    with contextlib.suppress(LabError):  # a damaged state file: clean up by prefix alone
        lab = Lab.load()
    kill_lab_processes(lab, time.time() + STOP_TIMEOUT_S)
    remove_cgroups()
    for ns in lab_netns():
        run(["ip", "netns", "delete", ns], check=False)
    for route in lab_routes():
        run(["ip", "route", "del", route.get("type", "unicast"), route["dst"], "proto", ROUTE_PROTO], check=False)
    for path in nspawn_runtime_files(lab):
        remove_path(path)
    for empty in (NSPAWN_RUN / "locks", NSPAWN_RUN / "propagate", NSPAWN_RUN):
        with contextlib.suppress(OSError):  # only if empty: another nspawn user may have files there
            empty.rmdir()
    for target in mounts_under(LAB_DIR):
        if run(["umount", target], check=False).returncode != 0:
            run(["umount", "--lazy", target], check=False)
    if LAB_DIR.exists():
        # Never delete through a mount: a still-mounted overlay would expose the host's own files.
        still = mounts_under(LAB_DIR)
        if still:
            raise LabError(f"cannot remove {LAB_DIR}: still mounted: {', '.join(still)}")
        shutil.rmtree(LAB_DIR)
    left = leftovers(lab)
    if left:
        raise LabError("the lab could not be removed completely; left: " + "; ".join(left))


# --------------------------------------------------------------------------------------------
# Commands

def lab_running(lab: Lab) -> bool:
    return all(pid_alive(n.supervisor_pid) and in_node_cgroup(n.supervisor_pid, n.name) for n in lab.nodes)


def cmd_up(count: int, subnet_text: str, keep_on_failure: bool = False) -> int:
    if not 1 <= count <= MAX_NODES:
        raise LabError(f"--nodes must be between 1 and {MAX_NODES}, not {count}")
    subnet = parse_subnet(subnet_text)
    node_count_fits_subnet(count, subnet)
    require_root()
    require_tools()
    started = time.time()
    with lab_lock(), terminate_as_interrupt():
        try:
            old = Lab.load()
        except LabError:  # a damaged state file: what it described is cleaned up by prefix below
            old = None
        if old and old.status == "up" and lab_running(old):
            raise LabError(f"a lab with {len(old.nodes)} nodes is already up on {old.subnet}; "
                           f"`pimaster lab down` first")
        if old or leftovers():
            say("Cleaning up what an earlier lab left behind ...")
            teardown()
        check_subnet_free(subnet)
        check_capacity(count)
        ensure_node_packages()
        lab = Lab(subnet=str(subnet), nodes=make_nodes(count, subnet))
        master = lab.node(MASTER_NODE)
        lab.master_address = f"{master.ip}:{MASTER_PORT}"
        try:
            bring_up(lab)
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


def bring_up(lab: Lab) -> None:
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    MASTER_STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    lab.save()
    source = find_source()
    disable = host_enabled_units()
    network_up(lab)
    master = lab.node(MASTER_NODE)
    agents = [n for n in lab.nodes if n is not master]
    say(f"Booting {master.name} (master) ...")
    prepare_root(master, source, disable, agent_config=None)
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


def print_summary(lab: Lab, seconds: float) -> None:
    say(f"\nLab up: {len(lab.nodes)} nodes on {lab.subnet} in {seconds:.1f} s "
        f"(the master listens on {lab.master_address} inside the lab)\n")
    for node in lab.nodes:
        say(f"  {node.name}  {node.ip:<15}  {' + '.join(node.roles)}")
    say(f"""
Use it:
  pimaster lab exec node01 -- pimaster ping     run a command on a node (no CMD: a shell)
  export PIMASTER_STATE_DIR={MASTER_STATE_DIR}
                                                then `pimaster ping`, `pimaster apply ...` on this
                                                host talk to the lab's master (via its control socket)
  pimaster lab status                           nodes, addresses, services, memory
  pimaster lab down                             remove the lab and everything it made""")


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
    info: dict = {"name": node.name, "ip": node.ip, "roles": node.roles, "state": "stopped",
                  "addresses": [], "services": {}, "memory_mb": 0.0}
    # Every process of the node sits in its cgroup (one hierarchy is enough to count them).
    pids = cgroup_pids(nspawn_cgroup_roots()[0] / CGROUP_NAME / node.name)
    info["memory_mb"] = round(memory_mb(pids), 1)
    if leader_pid(node) is None:
        return info
    info["state"] = node_exec(node, ["systemctl", "is-system-running"], timeout=30).stdout.strip() or "unknown"
    addr = node_exec(node, ["ip", "-j", "-4", "addr", "show", "dev", "eth0"], timeout=30).stdout
    with contextlib.suppress(ValueError, IndexError, KeyError):
        info["addresses"] = [f"{a['local']}/{a['prefixlen']}" for link in json.loads(addr)
                             for a in link["addr_info"]]
    units = ["piagent"] + (["pimaster"] if "master" in node.roles else [])
    states = node_exec(node, ["systemctl", "is-active", *units], timeout=30).stdout.split()
    info["services"] = dict(zip(units, states))
    return info


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
    report = {"up": lab.status == "up", "status": lab.status, "subnet": lab.subnet,
              "master_address": lab.master_address, "master_state_dir": str(MASTER_STATE_DIR),
              "lab_dir": str(LAB_DIR), "nodes": nodes}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        state = lab.status if lab.status == "up" else f"{lab.status} (an `up` is running or crashed)"
        say(f"Lab {state}: {len(nodes)} nodes on {lab.subnet}; master {lab.master_address} in {MASTER_NODE}")
        say(f"  export PIMASTER_STATE_DIR={MASTER_STATE_DIR}\n")
        say(f"  {'NODE':<7} {'STATE':<10} {'ADDRESS':<18} {'SERVICES':<36} MEMORY")
        for n in nodes:
            services = " ".join(f"{u}:{s}" for u, s in n["services"].items()) or "-"
            say(f"  {n['name']:<7} {n['state']:<10} {', '.join(n['addresses']) or '-':<18} {services:<36} "
                f"{n['memory_mb']:.0f} MB")
    healthy = lab.status == "up" and all(n["state"] in ("running", "degraded") for n in nodes)
    return 0 if healthy else 1


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
    node = lab.node(name)
    argv_ = exec_argv(node_leader(node), cmd or ["/bin/bash", "--login"])
    sys.stdout.flush()
    os.execvp(argv_[0], argv_)  # the command's exit status, stdin and stdout become ours
    return 127


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pimaster lab", description=(
        "A simulated Raspberry Pi cluster on this machine: systemd-nspawn nodes on a private bridge, "
        "node01 running the master, every node an enrolled agent. Needs root."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    up = sub.add_parser("up", help="start the nodes, the master and the agents; wait until all answer ping")
    up.add_argument("--nodes", type=int, default=DEFAULT_NODES, help=f"how many nodes (default {DEFAULT_NODES})")
    up.add_argument("--subnet", default=DEFAULT_SUBNET,
                    help=f"private IPv4 subnet of the lab (default {DEFAULT_SUBNET})")
    up.add_argument("--keep-on-failure", action="store_true", help="leave a failed lab in place for debugging")
    status = sub.add_parser("status", help="the nodes, their addresses, services and memory")
    status.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("exec", help="run a command on a node: exec NODE -- CMD ...", add_help=False)
    sub.add_parser("down", help="stop the lab and remove everything it made")
    return parser


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["exec"]:
            return cmd_exec(argv[1:])
        args = _parser().parse_args(argv)
        if args.command == "up":
            return cmd_up(args.nodes, args.subnet, args.keep_on_failure)
        if args.command == "down":
            return cmd_down()
        if args.command == "status":
            return cmd_status(args.json)
        return 2
    except LabError as exc:
        print(f"pimaster lab: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pimaster lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
