"""Lab nodes with a Pi's own architecture: arm64 (Raspberry Pi OS 64-bit) and armhf (32-bit) userlands.

A native node boots the host's own root file system through an overlay. An ARM node boots a
Debian bookworm root of its architecture instead, through the same kind of overlay, with systemd as
PID 1 run by qemu-user (binfmt_misc, registered by Debian's qemu-user-static with the F flag, so
the interpreter works inside the container). Each architecture's root is built once and kept here:

    ROOTS_DIR/ARCH/             debootstrap's minbase root, with:
        etc/systemd/system/*.d/qemu-user.conf   what systemd needs under qemu-user (below)
        var/lib/apt/lists, var/cache/apt/archives
                                the .debs states may install (NODE_PACKAGES, for ARCH), fetched on
                                the host with a private APT configuration (APT_DIR/ARCH/apt.conf),
                                so `apt-get install` in a node works offline as on a native node;
                                the host's own dpkg and apt state are never touched
        usr/bin/piagent ...     the agent, installed from the project's own piagent .deb by dpkg,
                                with the architecture's Debian packages: as on a Pi
    ROOTS_DIR/ARCH.json         what the root was built from (its recipe) and the agent source it
                                holds: a new recipe rebuilds it, a new agent source reinstalls the .deb

Nothing of this is used by a running node except read-only, as an overlay's lower layer: the lab
never changes a root while a node of its architecture runs (`lab add` of a node whose root holds an
older agent installs the new .deb into that node's own overlay instead).

What qemu-user cannot do, and what the lab does about it:
- clone(CLONE_NEWNS) is refused, which systemd uses to set up credentials: units with
  LoadCredential= fail (status 243) unless a drop-in empties it; PrivateNetwork= likewise
  (systemd-hostnamed, -timedated, -localed).
- Netlink sockets of the NETLINK_ROUTE kind that systemd-networkd, NetworkManager and dhcpcd open
  are refused ("Protocol not supported"): no network manager runs in an ARM node. The lab sets its
  address from outside (`ip -n`), and the agent's `network_backend` fact says "none".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .host import remove_path, run, say
from .model import MASTER_NODE, LabError, LabRefused, Node

CACHE_DIR = Path("/var/cache/pimaster-lab")
ROOTS_DIR = CACHE_DIR / "roots"
APT_DIR = CACHE_DIR / "apt"
DEBS_DIR = CACHE_DIR / "debs"

# Debian architecture -> (qemu-user binfmt name, what `uname -m` says in the node).
ARM_ARCHES = {"arm64": ("qemu-aarch64", "aarch64"), "armhf": ("qemu-arm", "armv7l")}
SUITE = "bookworm"
MIRROR = os.environ.get("PIMASTER_LAB_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("PIMASTER_LAB_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
# What debootstrap puts in the root beyond minbase: systemd as PID 1, and the agent's dependencies
# (python3-cffi-backend by name: debootstrap does not resolve the virtual package python3-zmq needs).
ROOT_PACKAGES = ["systemd", "systemd-sysv", "dbus", "iproute2", "python3", "python3-zmq",
                 "python3-cffi-backend", "python3-msgpack", "python3-systemd"]
# The packages states may install on ARM nodes: the lab's NODE_PACKAGES but the network managers
# (qemu-user cannot run them, see above; the network states' tests stay on native nodes) and the
# NFS server (a container cannot serve kernel NFS on any architecture).
NOT_FOR_ARM = {"network-manager", "dhcpcd", "nfs-kernel-server"}
# Empty credentials and no private network for the units that ask for them (see above).
QEMU_DROPIN = "# Written by `pimaster lab`: systemd under qemu-user cannot make a mount namespace.\n[Service]\n"
PRIVATE_NETWORK_UNITS = ["systemd-hostnamed.service", "systemd-timedated.service", "systemd-localed.service"]
# The agent package's files: its .deb is built again (and installed again) when one of them changes.
AGENT_SOURCE_GLOBS = ["agent/**/*.py", "debian/*", "pyproject.toml"]
RECIPE_VERSION = 1
DEBOOTSTRAP_TIMEOUT_S = 1800
APT_TIMEOUT_S = 1800


def native_arch() -> str:
    return run(["dpkg", "--print-architecture"]).stdout.strip()


def parse_arch_option(text: str, names: list[str]) -> dict[str, str]:
    """`--arch arm64` (every node but the master's) or `--arch node02=arm64,node03=armhf` -> node name ->
    ARM architecture; nodes not named stay native. LabRefused for anything else."""
    native = native_arch()
    known = ", ".join(ARM_ARCHES)
    result: dict[str, str] = {}
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise LabRefused(f"--arch needs an architecture ({known}) or NODE=ARCH pairs (node02=arm64,node03=armhf)")
    seen: set[str] = set()
    for word in words:
        name, sep, arch = word.rpartition("=")
        arch = arch.strip().lower()
        if arch != native and arch not in ARM_ARCHES:
            raise LabRefused(f"--arch {word}: {arch!r} is not an architecture the lab has; it has {known} "
                             f"(and {native}, this machine's own)")
        if not sep:
            if len(words) > 1:
                raise LabRefused(f"--arch {text}: give one architecture for every node, or NODE=ARCH pairs")
            if arch != native and names == [MASTER_NODE]:
                raise LabRefused(f"--arch {arch}: the lab's only node, {MASTER_NODE}, runs the master from this "
                                 f"source tree and stays {native}; give --nodes 2 or more")
            return {n: arch for n in names if n != MASTER_NODE and arch != native}
        name = name.strip()
        if name in seen:
            raise LabRefused(f"--arch {text}: {name} is named twice; give each node one architecture")
        seen.add(name)
        if name not in names:
            raise LabRefused(f"--arch {word}: the lab has no node {name!r} (nodes: {', '.join(names)})")
        if name == MASTER_NODE and arch != native:
            raise LabRefused(f"--arch {word}: {MASTER_NODE} runs the master from this source tree, so it stays "
                             f"{native}; give ARM architectures to the other nodes")
        if arch != native:
            result[name] = arch
        else:
            result.pop(name, None)
    return result


def check_arch_support(arches: set[str]) -> None:
    """LabError unless this machine can build and boot roots of ``arches`` (tools, binfmt_misc)."""
    if not arches:
        return
    missing = [f"{tool} (apt-get install {pkg})" for tool, pkg in
               (("debootstrap", "debootstrap"), ("update-binfmts", "binfmt-support"), ("dpkg-buildpackage", "dpkg-dev"))
               if shutil.which(tool) is None]
    if missing:
        raise LabError("ARM nodes need: " + "; ".join(missing) + " (scripts/setup installs them)")
    for arch in sorted(arches):
        qemu = ARM_ARCHES[arch][0]
        entry = Path("/proc/sys/fs/binfmt_misc") / qemu
        try:
            text = entry.read_text()
        except OSError:
            raise LabError(f"{arch} nodes need the {qemu} binfmt_misc entry, which is not registered: "
                           f"apt-get install qemu-user-static binfmt-support, then `update-binfmts --enable "
                           f"{qemu}` (scripts/setup does both)") from None
        if not text.startswith("enabled"):
            raise LabError(f"the {qemu} binfmt_misc entry is disabled: `update-binfmts --enable {qemu}`")
        # Without F the interpreter is looked up inside the node's root, which has none.
        if "F" not in next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags:")), ""):
            raise LabError(f"the {qemu} binfmt_misc entry lacks the F flag (fix-binary), so it cannot run in a "
                           f"container; use Debian's qemu-user-static, which registers it with F")


def root_dir(arch: str) -> Path:
    return ROOTS_DIR / arch


def node_lower(node: Node) -> str:
    """The lower layer of the node's overlay: the host's / for a native node, its architecture's root."""
    return str(root_dir(node.arch)) if node.arch else "/"


def recipe(arch: str, node_packages: list[str]) -> dict:
    """What a root is built from: a different recipe means a new root."""
    return {"version": RECIPE_VERSION, "arch": arch, "suite": SUITE, "mirror": MIRROR,
            "security_mirror": SECURITY_MIRROR, "root_packages": ROOT_PACKAGES,
            "node_packages": sorted(node_packages), "qemu_dropin": QEMU_DROPIN}


def _stamp_path(arch: str) -> Path:
    return ROOTS_DIR / f"{arch}.json"


def _read_stamp(arch: str) -> dict:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(_stamp_path(arch).read_text())
        if isinstance(data, dict):
            return data
    return {}


def _write_stamp(arch: str, data: dict) -> None:
    tmp = _stamp_path(arch).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, _stamp_path(arch))


def agent_source_hash(repo: Path) -> str:
    digest = hashlib.sha256()
    for pattern in AGENT_SOURCE_GLOBS:
        for path in sorted(repo.glob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def source_repo() -> Path:
    """The source checkout the lab runs from: ARM nodes get its agent as a .deb built from it."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "scripts/build-debs").is_file() or not (repo / "debian/control").is_file():
        raise LabError("ARM nodes install the agent from a piagent .deb built from a pimaster source "
                       "checkout (scripts/build-debs); run `pimaster lab` from one")
    return repo


def agent_deb(repo: Path, source_hash: str) -> Path:
    """The piagent .deb of this source (built once per agent source, kept in DEBS_DIR)."""
    out = DEBS_DIR / source_hash
    found = sorted(out.glob("piagent_*_all.deb"))
    if found:
        return found[-1]
    say("Building the piagent .deb for ARM nodes (scripts/build-debs) ...")
    DEBS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{source_hash}.", dir=DEBS_DIR))
    try:
        result = subprocess.run([str(repo / "scripts/build-debs"), str(tmp)], capture_output=True, text=True,
                                timeout=900)
        if result.returncode != 0:
            raise LabError(f"scripts/build-debs failed (exit {result.returncode}):\n{_tail(result)}")
        for stale in DEBS_DIR.iterdir():  # one agent source at a time is enough
            if stale != tmp:
                remove_path(stale)
        os.replace(tmp, out)
    finally:
        remove_path(tmp)
    found = sorted(out.glob("piagent_*_all.deb"))
    if not found:
        raise LabError(f"scripts/build-debs made no piagent .deb in {out}")
    return found[-1]


def _tail(result: subprocess.CompletedProcess, lines: int = 12) -> str:
    return "\n".join((result.stderr + result.stdout).strip().splitlines()[-lines:])


def apt_config(arch: str, root: Path) -> Path:
    """A private APT configuration: the architecture, the root's own sources, lists, cache and dpkg
    status; nothing of the host's apt or dpkg is read or written."""
    conf = APT_DIR / arch / "apt.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "APT::Architecture": arch,
        "Dir::Etc::SourceList": root / "etc/apt/sources.list",
        "Dir::Etc::SourceParts": root / "etc/apt/sources.list.d",
        "Dir::Etc::Parts": APT_DIR / arch / "apt.conf.d",          # none: not the host's apt.conf.d
        "Dir::Etc::Preferences": root / "etc/apt/preferences",
        "Dir::Etc::PreferencesParts": root / "etc/apt/preferences.d",
        "Dir::Etc::Trusted": root / "etc/apt/trusted.gpg",
        "Dir::Etc::TrustedParts": root / "etc/apt/trusted.gpg.d",
        "Dir::State": root / "var/lib/apt",
        "Dir::State::Lists": root / "var/lib/apt/lists",
        "Dir::State::status": root / "var/lib/dpkg/status",
        "Dir::Cache": root / "var/cache/apt",
        "Dir::Cache::Archives": root / "var/cache/apt/archives",
        "Dir::Log": APT_DIR / arch / "log",
    }
    lines = [f'APT::Architectures {{ "{arch}"; }};'] + [f'{key} "{value}";' for key, value in settings.items()]
    conf.write_text("// Written by `pimaster lab`: fetches packages for its " + arch + " nodes.\n"
                    + "\n".join(lines) + "\n")
    return conf


def _apt(conf: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, APT_CONFIG=str(conf), DEBIAN_FRONTEND="noninteractive")
    try:
        return subprocess.run(["apt-get", "-q", *args], capture_output=True, text=True, env=env,
                              timeout=APT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LabError(f"`apt-get {' '.join(args)}` for the lab's ARM nodes took over {APT_TIMEOUT_S} s") from None


def build_root(arch: str, node_packages: list[str]) -> None:
    """debootstrap the architecture's root, fit it for qemu-user, fetch the node packages into it."""
    ROOTS_DIR.mkdir(parents=True, exist_ok=True)
    new = ROOTS_DIR / f"{arch}.new"
    remove_path(new)
    started = time.time()
    say(f"Building the {arch} root for ARM nodes (debootstrap {SUITE}; once, a few minutes) ...")
    argv = ["debootstrap", f"--arch={arch}", "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}",
            SUITE, str(new), MIRROR]
    # In a mount namespace of its own: what debootstrap mounts in the root (/proc, /sys) goes with it
    # even when it is killed.
    try:
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", *argv], capture_output=True,
                                text=True, timeout=DEBOOTSTRAP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LabError(f"debootstrap of the {arch} root took over {DEBOOTSTRAP_TIMEOUT_S} s") from None
    if result.returncode != 0:
        log = new / "debootstrap/debootstrap.log"
        detail = log.read_text(errors="replace")[-1500:] if log.is_file() else _tail(result)
        raise LabError(f"debootstrap of the {arch} root failed (exit {result.returncode}); is {MIRROR} "
                       f"reachable? (PIMASTER_LAB_MIRROR picks another mirror)\n{detail}")
    fit_for_qemu(new)
    (new / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\ndeb {MIRROR} {SUITE}-updates main\ndeb {SECURITY_MIRROR} {SUITE}-security main\n")
    fetch_node_packages(arch, new, node_packages)
    old = root_dir(arch)
    remove_path(old)
    os.replace(new, old)
    say(f"The {arch} root is built ({time.time() - started:.0f} s, {du_mb(old)} MB in {old}).")


def fit_for_qemu(root: Path) -> None:
    """Drop-ins for the units that qemu-user cannot start as they are (see the module's docstring)."""
    units = root / "lib/systemd/system"
    for unit in sorted(units.glob("*.service")):
        text = unit.read_text(errors="replace")
        extra = ""
        if "\nLoadCredential=" in text:
            extra += "LoadCredential=\n"
        if unit.name in PRIVATE_NETWORK_UNITS:
            extra += "PrivateNetwork=no\n"
        if extra:
            dropin = root / "etc/systemd/system" / f"{unit.name}.d" / "qemu-user.conf"
            dropin.parent.mkdir(parents=True, exist_ok=True)
            dropin.write_text(QEMU_DROPIN + extra)


def fetch_node_packages(arch: str, root: Path, packages: list[str]) -> None:
    conf = apt_config(arch, root)
    say(f"Fetching {arch} packages nodes may install: {' '.join(packages)}")
    for args in (("update",), ("install", "--download-only", "-y", *packages)):
        result = _apt(conf, *args)
        if result.returncode != 0:
            raise LabError(f"`apt-get {' '.join(args[:2])}` for the {arch} root failed:\n{_tail(result)}")


def install_agent(root: Path, deb: Path) -> None:
    """dpkg -i the piagent .deb into ``root`` (a cached root, or a node's overlay mounted on the host),
    run by qemu-user like any of the root's programs. Its dependencies are in the root already."""
    inside = Path("tmp") / deb.name
    shutil.copy2(deb, root / inside)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    try:
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", "chroot", str(root),
                                 "dpkg", "-i", f"/{inside}"], capture_output=True, text=True, env=env, timeout=600)
    except subprocess.TimeoutExpired:
        raise LabError(f"installing {deb.name} into {root} took over 600 s") from None
    finally:
        with contextlib.suppress(OSError):
            (root / inside).unlink()
    if result.returncode != 0:
        raise LabError(f"`dpkg -i {deb.name}` in the ARM root {root} failed:\n{_tail(result)}")


def arm_node_packages(node_packages: list[str]) -> list[str]:
    return [p for p in node_packages if p not in NOT_FOR_ARM]


def ensure_roots(arches: set[str], node_packages: list[str], *, in_use: set[str] = frozenset()) -> dict[str, str]:
    """Every root of ``arches`` built for today's recipe and holding the agent of this source.

    Returns arch -> the agent source hash each node of that architecture must run; a root in
    ``in_use`` (nodes of it are running) is never changed: a newer agent then goes into each new
    node's overlay (see install_agent_in_node)."""
    if not arches:
        return {}
    check_arch_support(arches)
    node_packages = arm_node_packages(node_packages)
    repo = source_repo()
    source_hash = agent_source_hash(repo)
    deb: Path | None = None
    for arch in sorted(arches):
        stamp = _read_stamp(arch)
        want = recipe(arch, node_packages)
        if stamp.get("recipe") != want or not root_dir(arch).is_dir():
            if arch in in_use:
                raise LabError(f"the {arch} root is missing or out of date while {arch} nodes run; "
                               f"`pimaster lab down`, then `pimaster lab up` builds it again")
            build_root(arch, node_packages)
            stamp = {"recipe": want, "built": time.strftime("%Y-%m-%d %H:%M:%S")}
            _write_stamp(arch, stamp)
        if stamp.get("agent") != source_hash and arch not in in_use:
            deb = deb or agent_deb(repo, source_hash)
            say(f"Installing {deb.name} into the {arch} root ...")
            install_agent(root_dir(arch), deb)
            stamp["agent"] = source_hash
            _write_stamp(arch, stamp)
    return {arch: source_hash for arch in arches}


def install_agent_in_node(node: Node, merged: Path) -> None:
    """A node of a root that holds an older agent (it was in use when the source changed) gets the
    current .deb in its own overlay, before its first boot."""
    if not node.arch:
        return
    repo = source_repo()
    source_hash = agent_source_hash(repo)
    if _read_stamp(node.arch).get("agent") == source_hash:
        return
    deb = agent_deb(repo, source_hash)
    say(f"Installing {deb.name} into {node.name} (the {node.arch} root holds an older agent) ...")
    install_agent(merged, deb)


def du_mb(path: Path) -> int:
    result = run(["du", "-sm", "--one-file-system", str(path)], check=False)
    with contextlib.suppress(ValueError, IndexError):
        return int(result.stdout.split()[0])
    return 0

