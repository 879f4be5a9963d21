"""Wall time of `pimaster ping` for 1, 100 and 1000 enrolled agents, and memory figures.

Prints one JSON object:
    {"ping_s": {"1": ..., "100": ..., "1000": ...}, "ping_json_s": {...},
     "master_rss_mb_1000": ..., "agent_rss_mb": ...}
ping_s is the whole `pimaster ping` command (start-up included, table output), median of 5;
ping_json_s the same with --json. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import REPO, use_source_tree  # noqa: E402

SRC = use_source_tree()
sys.path.insert(0, str(REPO / "tests"))
from harness import agent_python, free_port_pair  # noqa: E402

SIZES = (1, 100, 1000)
PER_SWARM = 250


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="pm-bench-", dir="/tmp"))
    state = tmp / "master"
    port = free_port_pair()
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("PIMASTER_STATE_DIR", None)
    procs: list[subprocess.Popen] = []
    log = open(tmp / "bench.log", "ab")

    def start(argv: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pimaster", *args, "--state-dir", str(state)],
                              capture_output=True, text=True, env=env)

    def up_count() -> int:
        result = cli("ping", "--json", "--timeout", "5")
        return sum(1 for n in json.loads(result.stdout or '{"nodes": []}')["nodes"] if n["ok"])

    def timed(*args: str) -> float:
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pimaster", "ping", *args, "--state-dir", str(state)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            runs.append(time.perf_counter() - started)
        return round(statistics.median(runs), 3)

    try:
        master = start([sys.executable, "-m", "pimaster", "serve", "--state-dir", str(state),
                        "--listen", f"127.0.0.1:{port}"])
        deadline = time.monotonic() + 30
        while not (state / "control.sock").exists():
            if time.monotonic() > deadline or master.poll() is not None:
                raise SystemExit("the master did not start; see " + str(tmp / "bench.log"))
            time.sleep(0.1)
        token = json.loads(cli("token", "create", "--uses", "5000", "--ttl", "1h",
                               "--address", f"127.0.0.1:{port}", "--json").stdout)
        config = tmp / "piagent.conf"
        config.write_text(token["config"])

        # A real piagent process for the idle-memory figure (on Debian's python3, as on a Pi).
        agent = start([agent_python(), "-m", "piagent", "run", "--config", str(config), "--id", "real-agent",
                       "--state-dir", str(tmp / "real-agent")])
        figures: dict = {"ping_s": {}, "ping_json_s": {}}
        wait_until = lambda n: _wait(lambda: up_count() >= n, 300, f"{n} agents up")  # noqa: E731
        wait_until(1)
        time.sleep(5)  # idle
        figures["agent_rss_mb"] = round(rss_mb(agent.pid), 1)

        # 1 agent: the real one. Then swarms for the rest.
        running = 1
        swarm_index = 0
        for size in SIZES:
            while running < size:
                count = min(PER_SWARM, size - running)
                start([sys.executable, str(REPO / "bench" / "swarm.py"), "--config", str(config), "--count",
                       str(count), "--prefix", f"swarm{swarm_index}", "--state-dir", str(tmp / f"swarm{swarm_index}")])
                swarm_index += 1
                running += count
            wait_until(size)
            time.sleep(2)
            figures["ping_s"][str(size)] = timed()
            figures["ping_json_s"][str(size)] = timed("--json")
        figures["master_rss_mb_1000"] = round(rss_mb(master.pid), 1)
        print(json.dumps(figures))
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


if __name__ == "__main__":
    sys.exit(main())
