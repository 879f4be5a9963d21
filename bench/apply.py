"""Wall time of `pimaster apply` of a 20-state file that is already converged, to 10 and 200 agents.

Prints one JSON object: {"apply_noop_s": {"10": ..., "200": ...}, "apply_first_s": {...}}
(median of 3 no-op runs; the first, converging run is reported too). Swarm agents (bench/swarm.py)
run the real agent and state engine; the states write files under a temp dir, one set per agent.
All traffic stays on 127.0.0.1.
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
from harness import free_port_pair  # noqa: E402

SIZES = (10, 200)
PER_SWARM = 100


def state_file(directory: Path, out: Path) -> Path:
    lines = []
    for i in range(20):
        lines += [f"{out}/{{{{ node.id }}}}/file{i:02d}.conf:",
                  "  file.managed:",
                  f"    - contents: \"setting{i} = {{{{ node.id }}}}\\n\"",
                  "    - makedirs: true"]
    path = directory / "twenty.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="pm-bench-apply-", dir="/tmp"))
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

    def timed_apply(path: Path) -> float:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pimaster", "apply", str(path), "--state-dir", str(state)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"apply failed: {result.stderr}")
        return elapsed

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
        path = state_file(tmp, tmp / "out")
        figures: dict = {"apply_noop_s": {}, "apply_first_s": {}}
        running, index = 0, 0
        for size in SIZES:
            while running < size:
                count = min(PER_SWARM, size - running)
                start([sys.executable, str(REPO / "bench" / "swarm.py"), "--config", str(config), "--count",
                       str(count), "--prefix", f"swarm{index}", "--state-dir", str(tmp / f"swarm{index}")])
                index += 1
                running += count
            deadline = time.monotonic() + 300
            while up_count() < size:
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out waiting for {size} agents")
                time.sleep(0.5)
            figures["apply_first_s"][str(size)] = round(timed_apply(path), 3)
            figures["apply_noop_s"][str(size)] = round(statistics.median(timed_apply(path) for _ in range(3)), 3)
        figures["master_rss_mb"] = round(int(next(l for l in Path(f"/proc/{master.pid}/status").read_text().splitlines()
                                                  if l.startswith("VmRSS:")).split()[1]) / 1024, 1)
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


if __name__ == "__main__":
    sys.exit(main())
