"""Node root file systems: the code nodes run, and what a node's overlay holds before first boot.

A node boots the host's own root file system through a copy-on-write overlay (lower layer: the
host's /; for an ARM node, its architecture's root, see arch.py). Before its first boot, the lab
writes into the upper layer what makes it a freshly flashed Pi of its own: hostname, machine-id,
munge key, the agent's join token in /boot/firmware, what makes it look like a Pi (pihardware.py:
the boot partition's files, vcgencmd), and on a native node its networkd address, the packaged
systemd units of pimaster and piagent, and wrappers that run the code of this source tree (bound
read-only into the node). An ARM node runs the agent its root got from the piagent .deb, under the
packaged unit as it is, and gets its address from outside (host.node_network_up).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from .arch import install_agent_in_node, node_lower
from .host import remove_path, run
from .model import Node, LabError
from .pihardware import prepare_pi

# In the node: the repo (read-only) and import-package links, and wrappers on PATH.
NODE_SRC = "/opt/pimaster/src"
NODE_LIB = "/opt/pimaster/lib"
AGENT_CONFIG = "/boot/firmware/piagent.conf"
NODE_MASTER_STATE = "/var/lib/pimaster"
# `lab up --cluster-dir DIR`: DIR is bound here, read-only, into node01, and its master serves it.
NODE_CLUSTER_DIR = "/opt/pimaster/cluster"

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

WRAPPER = """#!/bin/sh
# Written by `pimaster lab`: runs {package} from the source bound into this node.
export PYTHONPATH={lib}${{PYTHONPATH:+:$PYTHONPATH}}
export PYTHONDONTWRITEBYTECODE=1
exec /usr/bin/python3 -m {package} "$@"
"""

# Nodes run the packaged units, read from debian/ (the one source: the .deb installs them as they
# are), so a node's services behave as on a Pi with the .deb (Type=notify, WatchdogSec,
# StateDirectory, UMask, ...). The one thing the lab must change is the command line, in a drop-in:
# the packaged units run /usr/bin/{piagent,pimaster}, which a node does not have (it runs the source
# tree through the wrappers above), and the lab hands each its file paths explicitly.
UNIT_DROPINS = {
    "piagent.service": f"ExecStart=/usr/local/bin/piagent run --config {AGENT_CONFIG}",
    # Prometheus metrics on node01's loopback: reachable only from inside the node.
    "pimaster.service": f"ExecStart=/usr/local/bin/pimaster serve --state-dir {NODE_MASTER_STATE} "
                        "--metrics 127.0.0.1:9466",
}
# Where the .deb puts debian/*.service, for a pimaster that runs installed rather than from a checkout.
INSTALLED_UNIT_DIR = Path("/lib/systemd/system")


@dataclass
class Source:
    """The pimaster/piagent code this process runs, as the nodes will see it."""

    binds: list[tuple[str, str]]          # (host path, node path), read-only
    links: dict[str, str]                 # node path -> symlink target
    units: dict[str, str]                 # unit name -> the packaged unit file's text


def find_source() -> Source:
    """The pimaster/piagent code this process runs, as the nodes will see it, and the units they run."""
    master_dir = Path(__file__).resolve().parent.parent
    spec = importlib.util.find_spec("piagent")
    if spec is None or not spec.submodule_search_locations:
        raise LabError("the piagent package is not importable next to pimaster; install both")
    agent_dir = Path(list(spec.submodule_search_locations)[0]).resolve()
    repo = master_dir.parent
    if master_dir.name == "master" and agent_dir == repo / "agent" and (repo / "pyproject.toml").is_file():
        # A source checkout: bind the whole repo, link the import packages to its folders.
        return Source(binds=[(str(repo), NODE_SRC)],
                      links={f"{NODE_LIB}/pimaster": f"{NODE_SRC}/master", f"{NODE_LIB}/piagent": f"{NODE_SRC}/agent"},
                      units=packaged_units(repo / "debian"))
    return Source(binds=[(str(master_dir), f"{NODE_LIB}/pimaster"), (str(agent_dir), f"{NODE_LIB}/piagent")],
                  links={}, units=packaged_units(INSTALLED_UNIT_DIR))


def packaged_units(unit_dir: Path) -> dict[str, str]:
    units = {}
    for unit in UNIT_DROPINS:
        try:
            units[unit] = (unit_dir / unit).read_text()
        except OSError as exc:
            raise LabError(f"the lab's nodes run the packaged systemd unit {unit}, and it cannot be read "
                           f"({exc.strerror}: {unit_dir / unit}); run the lab from a pimaster source "
                           f"checkout (its debian/ holds the units) or with the pimaster .deb installed") from None
    return units


def host_enabled_units(root: str = "/") -> list[str]:
    """The enabled units of ``root`` (the host's, or an ARM root's) that nodes must not start."""
    out = run(["systemctl", f"--root={root}", "list-unit-files", "--state=enabled", "--no-legend", "--no-pager",
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


def write_file(path: Path, text: str | bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    """Write a file into a node's root (through the overlay, before first boot).

    Not piagent.fileio.write_atomic on purpose: that follows a symlink to its target, and here, on
    the host, an absolute symlink in the node's root (say etc/hosts -> /run/...) resolves to the
    HOST's file. The path itself is replaced instead; atomicity is not needed, as the node is not
    running yet.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(text.encode() if isinstance(text, str) else text)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def prepare_root(node: Node, source: Source, disable: list[str], agent_config: str | None,
                 cluster_dir: str | None = None) -> None:
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
    run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={node_lower(node)},upperdir={upper},workdir={work}",
         str(merged)])
    try:
        write_first_boot_files(merged, node, source, agent_config, cluster_dir)
        install_agent_in_node(node, merged)  # only when its ARM root holds an older agent
        if node.arch:  # the units its own root enables, not the host's
            disable = host_enabled_units(node_lower(node))
        if disable:
            run(["systemctl", f"--root={merged}", "disable", *disable], check=False)
        # An ARM node has no network manager (qemu-user refuses their netlink sockets): the lab sets
        # its address from outside.
        enable = [] if node.arch else ["systemd-networkd.service"]
        if "master" in node.roles:
            enable.append("pimaster.service")
        if agent_config is not None:
            enable.append("piagent.service")
        if enable:
            run(["systemctl", f"--root={merged}", "enable", *enable])
    finally:
        run(["umount", str(merged)])


def write_first_boot_files(root: Path, node: Node, source: Source, agent_config: str | None,
                           cluster_dir: str | None = None) -> None:
    for rel in HOST_STATE_PATHS:
        remove_path(root / rel)
    for dotfile in ("bashrc", "profile"):  # what Debian puts in a fresh /root
        skel = root / "usr/share/base-files" / ("dot." + dotfile)
        if skel.is_file():
            write_file(root / "root" / ("." + dotfile), skel.read_text())
    write_file(root / "etc/hostname", f"{node.name}\n")
    # The host's resolver is out of a node's reach: a lookup would wait out its timeouts (apt-get
    # update took minutes to fail). No server named: lookups fail at once, as on an isolated switch.
    remove_path(root / "etc/resolv.conf")
    write_file(root / "etc/resolv.conf", "# Written by `pimaster lab`: no DNS server here (nodes reach only the "
                                         "lab subnet; their names are in /etc/hosts).\n")
    write_file(root / "etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
    write_file(root / "etc/hosts", "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"
                                    "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n\n"
                                    f"127.0.1.1\t{node.name}\n")
    ids = munge_ids(root)
    if ids:  # munge is installed in the image: this node gets its own random key, like a fresh install
        write_file(root / "etc/munge/munge.key", os.urandom(128), 0o400, *ids)
    if not node.arch:
        write_native_files(root, node, source, cluster_dir)
    (root / "boot/firmware").mkdir(parents=True, exist_ok=True)
    if agent_config is not None:
        write_file(root / AGENT_CONFIG.lstrip("/"), agent_config, 0o600)
    prepare_pi(node, root, write_file)  # model, serial, thermal zone, vcgencmd, cmdline.txt, config.txt


def write_native_files(root: Path, node: Node, source: Source, cluster_dir: str | None) -> None:
    """A native node's address (networkd) and the agent and master of this source tree. An ARM node
    has neither: its root holds the agent installed from its .deb, with the packaged unit as it is."""
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
        write_file(root / "etc/systemd/system" / unit, source.units[unit])
        write_file(root / f"etc/systemd/system/{unit}.d/lab.conf",
                   "# Written by `pimaster lab up`: run from the source bound into this node.\n"
                   f"[Service]\nExecStart=\n{dropin_command(unit, node, cluster_dir)}\n")
    if "master" in node.roles:
        (root / NODE_MASTER_STATE.lstrip("/")).mkdir(parents=True, exist_ok=True)
        if cluster_dir:
            (root / NODE_CLUSTER_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)


def dropin_command(unit: str, node: Node, cluster_dir: str | None) -> str:
    """The unit's ExecStart in the node; the master of a lab up with --cluster-dir serves that tree."""
    command = UNIT_DROPINS[unit]
    if unit == "pimaster.service" and "master" in node.roles and cluster_dir:
        command += f" --cluster-dir {NODE_CLUSTER_DIR}"
    return command


def cluster_binds(cluster_dir: str | None, node: Node) -> list[str]:
    """nspawn's option binding the lab's cluster dir (read-only) into the master's node, if any."""
    if not cluster_dir or "master" not in node.roles:
        return []
    return [f"--bind-ro={cluster_dir}:{NODE_CLUSTER_DIR}"]
