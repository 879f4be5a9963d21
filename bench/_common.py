"""What the benchmarks share: the working tree on the import path, and a master on 127.0.0.1
with a token config, a CLI runner, swarms of agents, and clean-up of every process started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def use_source_tree() -> str:
    """Let the benchmarks import the working tree (master/ as pimaster, agent/ as piagent)."""
    path = Path(tempfile.gettempdir()) / f"pimaster-bench-src-{os.getuid()}"
    path.mkdir(exist_ok=True)
    for name, target in (("pimaster", REPO / "master"), ("piagent", REPO / "agent")):
        link = path / name
        if not link.is_symlink():
            link.symlink_to(target)
    sys.path.insert(0, str(path))
    os.environ["PYTHONPATH"] = str(path) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return str(path)


SRC = use_source_tree()
sys.path.insert(0, str(REPO / "tests"))
from harness import free_port_pair  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class BenchCluster:
    """A master on 127.0.0.1 and whatever agents the benchmark adds; everything stops on exit."""

    def __init__(self, name: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"pm-bench-{name}-", dir="/tmp"))
        self.state = self.tmp / "master"
        self.port = free_port_pair()
        self.env = dict(os.environ, PYTHONPATH=SRC)
        self.env.pop("PIMASTER_STATE_DIR", None)
        self.procs: list[subprocess.Popen] = []
        self.log = open(self.tmp / "bench.log", "ab")
        self.swarms = 0

    def __enter__(self) -> "BenchCluster":
        self.master = self.start([sys.executable, "-m", "pimaster", "serve", "--state-dir", str(self.state),
                                  "--listen", f"127.0.0.1:{self.port}"])
        wait(lambda: (self.state / "control.sock").exists() or self.master.poll() is not None, 30, "the master")
        if self.master.poll() is not None:
            raise SystemExit(f"the master did not start; see {self.tmp / 'bench.log'}")
        token = json.loads(self.cli("token", "create", "--uses", "5000", "--ttl", "1h",
                                    "--address", f"127.0.0.1:{self.port}", "--json").stdout)
        self.config = self.tmp / "piagent.conf"
        self.config.write_text(token["config"])
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def start(self, argv: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(argv, env=self.env, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pimaster", *args, "--state-dir", str(self.state)],
                              capture_output=True, text=True, env=self.env)

    def timed(self, *args: str) -> float:
        """Wall time of one whole `pimaster ARGS` command, start-up included."""
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pimaster", *args, "--state-dir", str(self.state)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self.env)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"pimaster {' '.join(args)} failed: {result.stderr}")
        return elapsed

    def up_count(self) -> int:
        result = self.cli("ping", "--json", "--timeout", "5")
        return sum(1 for n in json.loads(result.stdout or '{"nodes": []}')["nodes"] if n["ok"])

    def add_swarm(self, count: int) -> None:
        name = f"swarm{self.swarms}"
        self.swarms += 1
        self.start([sys.executable, str(REPO / "bench" / "swarm.py"), "--config", str(self.config), "--count",
                    str(count), "--prefix", name, "--state-dir", str(self.tmp / name)])

    def wait_up(self, count: int, timeout: float = 300) -> None:
        wait(lambda: self.up_count() >= count, timeout, f"{count} agents up")


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")
