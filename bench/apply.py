"""Wall time of `pimaster apply` of a 20-state file that is already converged, to 10 and 200 agents.

Prints one JSON object: {"apply_noop_s": {"10": ..., "200": ...}, "apply_first_s": {...},
"master_rss_mb": ...} (median of 3 no-op runs; the first, converging run is reported too). Swarm
agents (bench/swarm.py) run the real agent and state engine; the states write files under a temp
dir, one set per agent. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BenchCluster, rss_mb  # noqa: E402

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
    with BenchCluster("apply") as cluster:
        path = state_file(cluster.tmp, cluster.tmp / "out")
        figures: dict = {"apply_noop_s": {}, "apply_first_s": {}}
        running = 0
        for size in SIZES:
            while running < size:
                count = min(PER_SWARM, size - running)
                cluster.add_swarm(count)
                running += count
            cluster.wait_up(size)
            figures["apply_first_s"][str(size)] = round(cluster.timed("apply", str(path)), 3)
            figures["apply_noop_s"][str(size)] = round(statistics.median(
                cluster.timed("apply", str(path)) for _ in range(3)), 3)
        figures["master_rss_mb"] = rss_mb(cluster.master.pid)
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
