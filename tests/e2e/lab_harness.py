"""Helpers for the end-to-end tier: drive a `pimaster lab` and reach into its nodes.

Tests take the `lab` fixture (tests/e2e/conftest.py), an instance of `Lab`:

    def test_something(lab):
        lab.exec("node02", "systemctl", "is-active", "piagent")      # CompletedProcess, checked
        lab.pimaster("ping", "--json")                               # the master's CLI in node01
        lab.nodes, lab.ip("node03"), lab.master_state_dir
        name = lab.add()            # `pimaster lab add`: a new node enrolled by its card's token
        fp = lab.reflash(name)      # a fresh card: the new key's fingerprint (denied at the master)
        lab.remove(name)            # out of the lab (the master keeps its key)

`Lab(cluster_dir=DIR)` brings the lab up with `--cluster-dir DIR` (node01's master serves DIR),
`Lab(arch="node02=arm64")` with `--arch` (ARM nodes, tests/e2e/test_arm_lab.py).

Everything runs inside the nodes' namespaces: the host never sends a packet to a lab address.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pimaster
from pimaster import lab as labmod

LAB_NODES = 4


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root (systemd-nspawn nodes, namespaces, mounts)"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is missing: apt-get install systemd-container"
    return None


def pythonpath() -> str:
    """Where this process imports pimaster from, so CLI subprocesses run the same code."""
    here = str(Path(pimaster.__file__).parent.parent)
    return os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)


def pimaster_cli(*args: str, env: dict | None = None, input: str | None = None,
                 timeout: float = 600, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """`pimaster ARGS...` on the host, as a user would run it (in ``cwd``)."""
    full_env = {**os.environ, "PYTHONPATH": pythonpath(), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pimaster", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, env=full_env, cwd=cwd)


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


class Lab:
    """A `pimaster lab`, brought up and down through its CLI, with helpers to reach into nodes."""

    def __init__(self, size: int = LAB_NODES, cluster_dir: str | Path | None = None, arch: str | None = None):
        self.size = size
        # `lab up --cluster-dir`: the tree node01's master serves (None: its default, the shipped states).
        self.cluster_dir = cluster_dir
        self.arch = arch  # `lab up --arch` (node02=arm64,...; None: every node native)
        self.is_up = False
        self.up_failure: str | None = None
        self.up_output = ""

    # -- lifecycle ------------------------------------------------------------------------
    def ensure_up(self) -> Lab:
        if self.up_failure:  # do not retry a broken bring-up for every test
            pytest.fail(f"the lab did not come up:\n{self.up_failure}")
        if self.is_up:
            stopped = [n.name for n in self.state.nodes if not labmod.node_running(n)]
            if stopped:
                # A node stays off after a test powered it off (`pimaster shutdown`): press its power
                # button, as a user would; the master keeps its keys and jobs.
                self.start(*stopped)
        if not self.is_up:
            existing = labmod.Lab.load()
            # A lab someone left up is theirs; leftovers of a crashed one `up` cleans by itself (and
            # boots again the nodes of a lab that is there with every node powered off).
            if existing is not None and existing.status == "up" and any(map(labmod.node_running, existing.nodes)):
                pytest.fail(f"a lab is already up on this machine ({len(existing.nodes)} nodes, started by "
                            f"pid {existing.owner_pid}); run `pimaster lab down` before the e2e tests")
            args = ["lab", "up", "--nodes", str(self.size)]
            if self.cluster_dir is not None:
                args += ["--cluster-dir", str(self.cluster_dir)]
            if self.arch is not None:
                args += ["--arch", self.arch]
            # A first `--arch` builds each architecture's root (a few minutes each).
            result = pimaster_cli(*args, timeout=600 if self.arch is None else 1800)
            if result.returncode != 0:
                self.up_failure = describe(result)
                pytest.fail(f"`pimaster {' '.join(args)}` failed:\n{self.up_failure}")
            self.is_up = True
            self.up_output = result.stdout
        return self

    def start(self, *nodes: str) -> subprocess.CompletedProcess:
        """`pimaster lab start NODES...`: boot stopped nodes again (fails the test if it fails)."""
        result = pimaster_cli("lab", "start", *nodes)
        if result.returncode != 0:
            pytest.fail(f"`pimaster lab start {' '.join(nodes)}` failed:\n{describe(result)}")
        return result

    def set(self, node: str, **values: str) -> subprocess.CompletedProcess:
        """`pimaster lab set NODE KEY=VALUE...` (temp, throttled): what NODE's agent reads as its Pi's
        temperature and throttled word (fails the test if refused)."""
        result = pimaster_cli("lab", "set", node, *(f"{k}={v}" for k, v in values.items()))
        if result.returncode != 0:
            pytest.fail(f"`pimaster lab set {node}` failed:\n{describe(result)}")
        return result

    def add(self, name: str | None = None) -> str:
        """`pimaster lab add [--name NAME]`: a new node whose card holds only a piagent.conf; returns
        its name once its agent answers the master's ping (fails the test if it does not)."""
        result = pimaster_cli("lab", "add", "--json", *(["--name", name] if name else []))
        if result.returncode != 0:
            pytest.fail(f"`pimaster lab add{' --name ' + name if name else ''}` failed:\n{describe(result)}")
        return json.loads(result.stdout)["name"]

    def remove(self, node: str) -> subprocess.CompletedProcess:
        """`pimaster lab remove NODE` (fails the test if it fails); the master's keys stay."""
        result = pimaster_cli("lab", "remove", node)
        if result.returncode != 0:
            pytest.fail(f"`pimaster lab remove {node}` failed:\n{describe(result)}")
        return result

    def reflash(self, node: str) -> str:
        """`pimaster lab reflash NODE`: a fresh card with a new join token; returns the fingerprint of
        the node's new key, once the master lists it (denied while the old key is accepted)."""
        result = pimaster_cli("lab", "reflash", node, "--json")
        if result.returncode != 0:
            pytest.fail(f"`pimaster lab reflash {node}` failed:\n{describe(result)}")
        return json.loads(result.stdout)["fingerprint"]

    def down(self) -> subprocess.CompletedProcess:
        result = pimaster_cli("lab", "down")
        self.is_up = False
        return result

    # -- reaching nodes -------------------------------------------------------------------
    @property
    def state(self) -> labmod.Lab:
        return labmod.load_lab()

    @property
    def nodes(self) -> list[str]:
        return [n.name for n in self.state.nodes]

    @property
    def master_state_dir(self) -> Path:
        return labmod.MASTER_STATE_DIR

    @contextlib.contextmanager
    def keep_files(self, node: str, *paths: str):
        """NODE's files at PATHS as they were before the block, after it (failures too): a test that
        writes a node's /boot/firmware/cmdline.txt must leave the lab's own behind, not none."""
        quoted = " ".join(shlex.quote(p) for p in paths)
        self.exec(node, "sh", "-c", f"for f in {quoted}; do rm -f \"$f.pm-kept\"; "
                                    f"if [ -e \"$f\" ]; then cp -a \"$f\" \"$f.pm-kept\"; fi; done")
        try:
            yield
        finally:
            self.exec(node, "sh", "-c", f"for f in {quoted}; do rm -f \"$f\"; "
                                        f"if [ -e \"$f.pm-kept\" ]; then mv \"$f.pm-kept\" \"$f\"; fi; done",
                      check=False)

    def ip(self, node: str) -> str:
        return self.state.node(node).ip

    def exec(self, node: str, *cmd: str, check: bool = True, input: str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
        """Run CMD inside NODE (all its namespaces, CAP_SYS_TIME dropped), like `pimaster lab exec`."""
        argv = labmod.node_command(self.state.node(node), list(cmd))
        result = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{node}: {' '.join(cmd)} -> {describe(result)}")
        return result

    def pimaster(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """The pimaster CLI next to the master, in node01."""
        return self.exec(labmod.MASTER_NODE, "pimaster", *args, check=check, timeout=timeout)

    def ping(self, timeout: float = 3) -> dict[str, bool]:
        """Node id -> answered, from `pimaster ping --json` in node01."""
        result = self.pimaster("ping", "--json", "--timeout", str(timeout), check=False)
        try:
            return {n["id"]: bool(n["ok"]) for n in json.loads(result.stdout)["nodes"]}
        except (ValueError, KeyError):
            return {}

    @staticmethod
    def wait_for(predicate, what: str, timeout: float = 120, interval: float = 0.5):
        """Poll until predicate() is truthy; bounded, with a message naming what never happened."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)

    # -- faults: background commands, links, reboots, memory (test_faults.py, test_soak.py) ----
    def spawn(self, node: str, *cmd: str) -> subprocess.Popen:
        """Start CMD inside NODE without waiting for it (text stdout/stderr piped); `reap` stops it."""
        argv = labmod.node_command(self.state.node(node), list(cmd))
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    @staticmethod
    def reap(proc: subprocess.Popen, timeout: float = 10) -> None:
        """Stop a spawned command, and what it started in the node (nsenter forks into the node's
        PID namespace, so killing nsenter alone would leave the command running there)."""
        if proc.poll() is None:
            for pid in reversed(labmod.descendants(proc.pid)):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def write_file(self, node: str, path: str, text: str) -> None:
        self.exec(node, "sh", "-c", 'cat > "$0"', path, input=text)

    def link(self, node: str, up: bool) -> None:
        """Take NODE's eth0 down or up inside its network namespace (`ip -n`): nothing on the host
        touches the lab network, the node just loses (or gets back) its cable."""
        subprocess.run(["ip", "-n", self.state.node(node).netns, "link", "set", "eth0", "up" if up else "down"],
                       check=True, capture_output=True, timeout=30)

    def addresses(self, node: str) -> list[str]:
        """NODE's IPv4 addresses on eth0 (empty while the link is down or being configured)."""
        out = self.exec(node, "ip", "-j", "-4", "addr", "show", "dev", "eth0", check=False).stdout
        try:
            return [a["local"] for link in json.loads(out or "[]") for a in link.get("addr_info", [])]
        except (ValueError, KeyError, TypeError):
            return []

    def leader(self, node: str) -> int | None:
        """Host pid of NODE's PID 1 (None while it is down, e.g. rebooting): changes on a reboot."""
        return labmod.leader_pid(self.state.node(node))

    def booted(self, node: str) -> bool:
        """NODE is up and systemd has finished starting it (running or degraded)."""
        if self.leader(node) is None:
            return False
        try:
            state = self.exec(node, "systemctl", "is-system-running", check=False, timeout=30).stdout.strip()
        except (labmod.LabError, subprocess.TimeoutExpired):
            return False
        return state in ("running", "degraded")

    def main_pid(self, node: str, unit: str) -> int:
        out = self.exec(node, "systemctl", "show", "-p", "MainPID", "--value", unit, check=False).stdout.strip()
        return int(out) if out.isdigit() else 0

    def rss_kb(self, node: str, pid: int) -> int:
        """Resident memory of process PID in NODE (/proc/PID/status VmRSS), in kB."""
        status = self.exec(node, "cat", f"/proc/{pid}/status").stdout
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for pid {pid} in {node}")

    def job(self, job_id: str) -> dict | None:
        """`pimaster job ID --json`, or None while the master does not answer (restarting)."""
        result = self.pimaster("job", job_id, "--json", check=False)
        try:
            report = json.loads(result.stdout)
        except ValueError:
            return None
        # With --json a master that does not answer yet prints {"error": ..., "code": ...}: no report.
        return report if isinstance(report, dict) and "nodes" in report else None

    def job_ids(self) -> list[str]:
        result = self.pimaster("jobs", "--json", check=False)
        try:
            return [j["id"] for j in json.loads(result.stdout)["jobs"]]
        except (ValueError, KeyError, TypeError):
            return []

    def all_up(self, nodes: list[str] | None = None, timeout: float = 3) -> bool:
        answers = self.ping(timeout)
        return all(answers.get(n) for n in (nodes or self.nodes))


def assert_nothing_left(subnet: str) -> None:
    """After `lab down`: no namespace, route, mount, cgroup, process or file of the lab is left."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert labmod.NETNS_PREFIX not in netns
    routes = subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    assert subnet not in routes and "proto 77" not in routes
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(labmod.LAB_DIR) not in mounts and "pimlab-" not in mounts
    cgroups = [p for p in Path("/sys/fs/cgroup").glob("*/" + labmod.CGROUP_NAME)]
    cgroups += list(Path("/sys/fs/cgroup").glob(labmod.CGROUP_NAME))
    assert cgroups == []
    in_lab = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"/{labmod.CGROUP_NAME}/" not in (proc / "cgroup").read_text():
                continue
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        # An exited supervisor not yet reaped by the host's PID 1 (`up` had exited, so it is PID 1's
        # child) holds no namespace, mount or cgroup; anything else is a leftover.
        if not (state == "Z" and ppid == "1"):
            in_lab.append(f"{proc.name} ({state}, parent {ppid})")
    assert in_lab == []
    assert not labmod.LAB_DIR.exists()
    assert not list(Path("/run/systemd/nspawn/propagate").glob("pimlab-*"))
