"""Real master and agent processes on 127.0.0.1 for the tests.

The master runs on the test's interpreter (the venv: the newest pyzmq/msgpack from PyPI). The
agents run on AGENT_PYTHON, by default Debian's /usr/bin/python3 with bookworm's python3-zmq 24
and python3-msgpack 1.0.3 — what a Pi has — so every loopback test also proves the agent on
those versions. CI sets PIMASTER_REQUIRE_BOOKWORM=1 so that a missing Debian package fails the
run instead of silently falling back to the venv.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = "/usr/bin/python3"


def source_path(tmp_root: Path) -> str:
    """A directory that makes `import pimaster` / `import piagent` find the repo's master/ and agent/."""
    path = tmp_root / "pysrc"
    path.mkdir(exist_ok=True)
    for name, target in (("pimaster", REPO / "master"), ("piagent", REPO / "agent")):
        link = path / name
        if not link.exists():
            link.symlink_to(target)
    return str(path)


def _has_agent_deps(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import zmq, msgpack; assert zmq.has('curve')"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def agent_python() -> str:
    chosen = os.environ.get("AGENT_PYTHON")
    if chosen:
        return chosen
    if os.path.exists(DEBIAN_PYTHON) and _has_agent_deps(DEBIAN_PYTHON):
        return DEBIAN_PYTHON
    if os.environ.get("PIMASTER_REQUIRE_BOOKWORM"):
        raise RuntimeError("Debian's python3-zmq/python3-msgpack are missing: the agent must be tested on them")
    return sys.executable


def free_port_pair() -> int:
    """A port p with p and p+1 both free on 127.0.0.1 (control port and key-announce port)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65000:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class Process:
    def __init__(self, argv: list[str], log_path: Path, env: dict) -> None:
        self.argv, self.log_path, self.env = argv, log_path, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Process":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     stdin=subprocess.DEVNULL)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Master(Process):
    def __init__(self, tmp: Path, port: int | None = None, python: str | None = None, name: str = "master",
                 listen: str = "127.0.0.1:{port}", cluster_dir: Path | None = None) -> None:
        """``listen``: `serve --listen`, with {port} for the port chosen (agents use 127.0.0.1);
        ``cluster_dir``: `serve --cluster-dir` (default an empty directory: the shipped states, the
        master's own default, would have it apply network.yaml to this host's agents by itself)."""
        self.tmp = tmp
        self.state_dir = tmp / name
        self.port = port or free_port_pair()
        self.python = python or sys.executable
        env = dict(os.environ, PYTHONPATH=source_path(tmp), PYTHONUNBUFFERED="1")
        env.pop("PIMASTER_STATE_DIR", None)
        self.cluster_dir = cluster_dir or tmp / f"{name}-cluster"
        self.cluster_dir.mkdir(parents=True, exist_ok=True)
        super().__init__([self.python, "-m", "pimaster", "serve", "--state-dir", str(self.state_dir),
                          "--listen", listen.format(port=self.port), "--cluster-dir", str(self.cluster_dir)],
                         tmp / f"{name}.log", env)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        """The control socket accepts connections (a stale one left by a killed master does not)."""
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.state_dir / "control.sock"))
                return True
            except OSError:
                return False

    def start(self) -> "Master":
        super().start()
        wait_for(lambda: self._answers() or not self.alive(), 30, what="the master's control socket")
        assert self.alive(), f"master exited:\n{self.output()}"
        return self

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run([self.python, "-m", "pimaster", *args, "--state-dir", str(self.state_dir)],
                                capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"pimaster {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str, check: bool = True) -> dict:
        result = self.cli(*args, "--json", check=check)
        return json.loads(result.stdout)

    def token_config(self, uses: int = 10, ttl: str = "1h", token: bool = True) -> str:
        config = self.json("token", "create", "--uses", str(uses), "--ttl", ttl, "--address", self.address)["config"]
        if not token:
            config = "".join(line for line in config.splitlines(True) if not line.startswith("token"))
        return config

    def key_state(self, node_id: str) -> list[str]:
        return [k["state"] for k in self.json("keys", "list")["keys"] if k["id"] == node_id]

    def ping(self, *args: str, timeout: float = 2) -> tuple[int, dict]:
        result = self.cli("ping", *args, "--timeout", str(timeout), "--json", check=False)
        return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {}

    def up_nodes(self, timeout: float = 2) -> set[str]:
        _, data = self.ping(timeout=timeout)
        return {n["id"] for n in data.get("nodes", []) if n["ok"]}


class Agent(Process):
    def __init__(self, tmp: Path, node_id: str, config_text: str, python: str | None = None,
                 state_name: str | None = None) -> None:
        self.node_id = node_id
        self.state_dir = tmp / (state_name or f"agent-{node_id}")
        self.config_path = tmp / f"{state_name or node_id}.conf"
        self.config_path.write_text(config_text)
        env = dict(os.environ, PYTHONPATH=source_path(tmp), PYTHONUNBUFFERED="1")
        # A loopback agent runs on the test machine as its user (root in CI): a `reboot` request
        # (a test's, a fuzzer's) must never reach `systemctl reboot` here. Tests that fake reboots
        # set their own stand-in (tests/test_reboot.py).
        env.setdefault("PIAGENT_TEST_REBOOT_COMMAND", "true")
        super().__init__([python or agent_python(), "-m", "piagent", "run", "--config", str(self.config_path),
                          "--id", node_id, "--state-dir", str(self.state_dir)],
                         tmp / f"agent-{state_name or node_id}.log", env)

    def fingerprint(self) -> str:
        sys.path.insert(0, source_path(self.state_dir.parent))
        from piagent.keys import fingerprint

        return fingerprint((self.state_dir / "agent.pub").read_bytes().strip())


@contextlib.contextmanager
def agent_with_standin_master(tmp: Path, node_id: str = "n1"):
    """A real agent process whose master is the test itself: a CURVE ROUTER with its own key pair
    that announces its key, accepts the agent's enrollment and then sends whatever the test wants
    (fuzzed frames, the same job twice). Yields (agent, router, the agent's routing id)."""
    import zmq

    from piagent import protocol as proto

    from piagent import keys

    from piagent import config as pconfig
    from piagent.protocol import Message

    ctx = zmq.Context()
    port = free_port_pair()
    public, secret = zmq.curve_keypair()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.curve_server = True
    router.curve_publickey, router.curve_secretkey = public, secret
    router.bind(f"tcp://127.0.0.1:{port}")
    announce = ctx.socket(zmq.ROUTER)
    announce.linger = 0
    announce.bind(f"tcp://127.0.0.1:{port + 1}")
    agent = Agent(tmp, node_id, pconfig.render_config(f"127.0.0.1:{port}", keys.fingerprint(public), None)).start()
    try:
        assert announce.poll(30000), agent.output()
        ident, _ = announce.recv_multipart()
        announce.send_multipart([ident, proto.encode(Message(type=proto.MASTER_KEY, body={"key": public.decode()}))])
        assert router.poll(30000), agent.output()
        ident, data = router.recv_multipart()
        enroll = proto.decode(data, proto.AGENT_TO_MASTER)
        router.send_multipart([ident, proto.encode(Message(type=proto.ENROLLED, reply_to=enroll.id,
                                                           body={"status": "accepted", "time": time.time()}))])
        yield agent, router, ident
    finally:
        agent.stop()
        ctx.destroy(linger=0)


# Long-running states: finding their command afterwards, and an apply left to run in the background.

def processes_running(argv: list[str]) -> list[int]:
    """Pids of the live processes whose command line is exactly ``argv`` (zombies have none)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().split(b"\0")[:-1]
        except OSError:
            continue
        if [part.decode(errors="replace") for part in cmdline] == argv:
            found.append(int(pid))
    return found


def unique_sleep(seconds: int = 30) -> list[str]:
    """A sleep command line no other process on this machine has: how a test finds it afterwards."""
    return ["sleep", f"{seconds + random.randrange(1, 10**6) / 10**7:.7f}"]


def start_apply(master, state, *args, **popen) -> subprocess.Popen:
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    popen.setdefault("env", master.env)
    return subprocess.Popen([master.python, "-m", "pimaster", "apply", str(state), *args, "--state-dir",
                             str(master.state_dir)], text=True, **popen)
