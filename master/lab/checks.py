"""Checks before `lab up` creates anything: root, tools, the subnet, memory, the nodes' packages."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path

from .host import nspawn_cgroup_roots, run, say
from .model import DEFAULT_SUBNET, HOST_OFFSET, ROUTE_PROTO, LabError, LabRefused

# An idle node (systemd, journald, dbus, logind, networkd, agent) measures 30-50 MB PSS; the rest
# is room for what states add (munge, slurmd, chrony, ...).
NODE_MEMORY_MB = 100
# An ARM node measures ~156 MB idle (arm64; armhf ~132 MB): qemu-user's own memory for every process.
ARM_NODE_MEMORY_MB = 250
HOST_RESERVE_MB = 512               # left for the host itself when estimating capacity

# Packages states may install on nodes. The host fetches them before any node starts (nodes see the
# host's apt cache through their overlay), so `apt-get install` works in a node without a route out.
NODE_PACKAGES = [
    "munge", "slurmd", "slurmctld", "slurm-client",
    "chrony", "ntpsec-ntpdate", "nfs-kernel-server", "nfs-common",
    "dphys-swapfile",  # swap.off's lab test: Raspberry Pi OS's swap file service
    "containerd",      # kubeadm.yaml: the container runtime (bookworm's 1.6)
    "network-manager", "dhcpcd",   # network.static's lab test: the managers of bookworm and bullseye
]


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (namespaces, mounts, cgroups): run it as root")


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


def check_capacity(count: int, arm: int = 0) -> None:
    """LabError unless ``count`` nodes (``arm`` of them ARM nodes) fit in the memory available."""
    available_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available_kb = int(line.split()[1])
    available_mb = available_kb // 1024
    needed = (count - arm) * NODE_MEMORY_MB + arm * ARM_NODE_MEMORY_MB
    if needed > available_mb - HOST_RESERVE_MB:
        fits = max(0, (available_mb - HOST_RESERVE_MB) // NODE_MEMORY_MB)
        raise LabError(f"{count} nodes do not fit: {available_mb} MB of memory is available and a node "
                       f"needs about {NODE_MEMORY_MB} MB (an ARM node {ARM_NODE_MEMORY_MB} MB), so this "
                       f"machine can hold about {fits} native nodes")


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


def check_cluster_dir(text: str) -> str:
    """`up --cluster-dir DIR`: DIR as an absolute path, which must be a directory (LabRefused)."""
    path = os.path.realpath(text)
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise LabRefused(f"--cluster-dir {text} {what}; give the directory holding the cluster's cluster.yaml "
                         f"and state files")
    if ":" in path or "," in path:  # nspawn's --bind-ro splits at ':' (and options at ',')
        raise LabRefused(f"--cluster-dir {path}: the lab cannot bind a path holding ':' or ','; "
                         f"move or link the directory elsewhere")
    return path
