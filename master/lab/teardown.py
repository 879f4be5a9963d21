"""Tearing a lab down: finds everything by its lab prefix, so it also cleans up after a crashed `up`.

Order matters: processes first (a node's PID 1 takes its PID namespace with it), then cgroups,
namespaces and the guard route, nspawn's runtime files, mounts, and only then LAB_DIR, never
through a mount (a still-mounted overlay would expose the host's own files).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

from .host import (lab_cgroup_dirs, lab_netns, lab_processes, lab_routes, mounts_under, reap_own_children,
                   remove_cgroups, remove_network, remove_path, run)
from .model import LAB_DIR, NETNS_PREFIX, NSPAWN_RUN, Lab, LabError
from .node import leader_pid

STOP_TIMEOUT_S = 20


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


def teardown() -> None:
    """Remove every process, cgroup, namespace, route and mount a lab made, then its files."""
    lab = None
    with contextlib.suppress(LabError):  # a damaged state file: clean up by prefix alone
        lab = Lab.load()
    kill_lab_processes(lab, time.time() + STOP_TIMEOUT_S)
    remove_cgroups()
    remove_network()
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
