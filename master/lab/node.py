"""Node lifecycle: start a node, find its PID 1, run commands inside it, read its logs.

A node is a systemd-nspawn container with systemd as PID 1, started by a supervisor that lives in
its own mount namespace and in the node's cgroups. The host reaches a node only by entering its
namespaces (nsenter), never through the lab network, and every command run that way drops
CAP_SYS_TIME: the clock is not namespaced and belongs to the host.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import time

from .arch import node_lower
from .host import children, in_node_cgroup, node_cgroups, pid_alive
from .model import LAB_DIR, MASTER_STATE_DIR, NSPAWN_RUN, Lab, LabError, Node
from .pihardware import nspawn_binds
from .rootfs import NODE_MASTER_STATE, Source, cluster_binds

NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Generous but bounded: CI is a loaded 2-core VM.
BOOT_TIMEOUT_S = 120

# The node's supervisor: runs in its own mount namespace (so the overlay and everything nspawn mounts
# vanish with it) and in the node's cgroups (so `down` can find and kill every process of the node).
SUPERVISOR = r"""
set -e
for cg in $LAB_CGROUPS; do echo $$ > "$cg/cgroup.procs"; done
mount -t overlay overlay -o "lowerdir=$LAB_LOWER,upperdir=$LAB_UPPER,workdir=$LAB_WORK" "$LAB_MERGED"
set +e
while :; do
    "$@"
    rc=$?
    # 133: the node ran `systemctl reboot`; boot it again, like a Pi comes back after a reboot.
    [ "$rc" -eq 133 ] || exit "$rc"
done
"""


def nspawn_argv(node: Node, source: Source) -> list[str]:
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
    if not node.arch:  # an ARM node runs the agent installed from its .deb, not this source tree
        nspawn += [f"--bind-ro={host}:{inside}" for host, inside in source.binds]
    if "master" in node.roles:
        nspawn.append(f"--bind={MASTER_STATE_DIR}:{NODE_MASTER_STATE}")
    nspawn += nspawn_binds(node)  # its Pi: device tree, thermal zone, throttled word (read-only)
    return nspawn


def start_node(lab: Lab, node: Node, source: Source) -> None:
    cgroups = node_cgroups(node)
    env = dict(os.environ, LAB_CGROUPS=" ".join(cgroups), LAB_LOWER=node_lower(node), LAB_UPPER=str(node.dir / "upper"),
               LAB_WORK=str(node.dir / "work"), LAB_MERGED=str(node.dir / "merged"))
    nspawn = nspawn_argv(node, source) + cluster_binds(lab.cluster_dir, node)
    log = open(node.dir / "nspawn.log", "ab")
    with log:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", SUPERVISOR, "sh",
                                 *nspawn], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=env, start_new_session=True)
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


def node_running(node: Node) -> bool:
    """The node's supervisor is alive (the node is up, booting or rebooting)."""
    return pid_alive(node.supervisor_pid) and in_node_cgroup(node.supervisor_pid, node.name)


# Linux capability names by bit number (linux/capability.h), as setpriv spells them.
CAPABILITIES = [
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid", "setpcap",
    "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw", "ipc_lock", "ipc_owner",
    "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
    "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write", "audit_control", "setfcap",
    "mac_override", "mac_admin", "syslog", "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf",
    "checkpoint_restore",
]


def node_capabilities(leader: int) -> list[str]:
    """The capabilities nspawn left the node's PID 1 (its bounding set), without CAP_SYS_TIME."""
    try:
        status = open(f"/proc/{leader}/status").read()
        bounding = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapBnd:")), 16)
    except (OSError, StopIteration, ValueError, IndexError):
        raise LabError(f"cannot read the capabilities of the node's PID 1 (pid {leader})") from None
    return [name for bit, name in enumerate(CAPABILITIES) if bounding & (1 << bit) and name != "sys_time"]


def exec_argv(leader: int, cmd: list[str]) -> list[str]:
    env = ["PATH=" + NODE_PATH, "HOME=/root", "USER=root", "LOGNAME=root", "LANG=C.UTF-8"]
    if os.environ.get("TERM"):
        env.append("TERM=" + os.environ["TERM"])
    keep = ",".join("+" + name for name in node_capabilities(leader))
    # This host's setpriv bounds what every program after it may hold, before anything of the node
    # runs: the programs run from nsenter on are the node's own (root in the node may have replaced
    # them), so they get no more than nspawn gave the node itself, never the host's full set
    # (CAP_SYS_MODULE, CAP_SYS_RAWIO, ...), and never CAP_SYS_TIME, which would let them set the
    # HOST's clock (e.g. ntpdate): the clock is not namespaced.
    return ["/usr/bin/setpriv", "--inh-caps=-all", f"--bounding-set=-all,{keep}", "--",
            "nsenter", f"--target={leader}", "--mount", "--uts", "--ipc", "--net", "--pid", "--",
            # A clean environment, as in a login on the node: nothing of the caller's (e.g. a
            # PIMASTER_STATE_DIR meant for the host) leaks in.
            "/usr/bin/env", "-i", *env, *cmd]


def node_leader(node: Node) -> int:
    leader = leader_pid(node)
    if leader is None:
        raise LabError(f"{node.name} is not running (see `pimaster lab status`)")
    return leader


def node_command(node: Node, cmd: list[str]) -> list[str]:
    """The host argv that runs `cmd` inside the node: all its namespaces, CAP_SYS_TIME dropped."""
    return exec_argv(node_leader(node), cmd)


def node_exec(node: Node, cmd: list[str], *, input: str | None = None, timeout: float = 60,
              check: bool = False) -> subprocess.CompletedProcess:
    argv = node_command(node, cmd)
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
