"""Wall time of `pimaster ping` for 1, 100 and 1000 enrolled agents, and memory figures.

Prints one JSON object:
    {"ping_s": {"1": ..., "100": ..., "1000": ...}, "ping_json_s": {...},
     "master_rss_mb_1000": ..., "agent_rss_mb": ...}
ping_s is the whole `pimaster ping` command (start-up included, table output), median of 5;
ping_json_s the same with --json. agent_rss_mb is a real `piagent` process (Debian's python3, as
on a Pi), idle. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BenchCluster, rss_mb  # noqa: E402
from harness import agent_python  # noqa: E402

SIZES = (1, 100, 1000)
PER_SWARM = 250


def main() -> int:
    with BenchCluster("ping") as cluster:
        agent = cluster.start([agent_python(), "-m", "piagent", "run", "--config", str(cluster.config),
                               "--id", "real-agent", "--state-dir", str(cluster.tmp / "real-agent")])
        cluster.wait_up(1)
        time.sleep(5)  # idle
        figures: dict = {"ping_s": {}, "ping_json_s": {}, "agent_rss_mb": rss_mb(agent.pid)}
        running = 1  # the real agent; swarms for the rest
        for size in SIZES:
            while running < size:
                count = min(PER_SWARM, size - running)
                cluster.add_swarm(count)
                running += count
            cluster.wait_up(size)
            time.sleep(2)
            for key, args in (("ping_s", ()), ("ping_json_s", ("--json",))):
                figures[key][str(size)] = round(statistics.median(cluster.timed("ping", *args) for _ in range(5)), 3)
        figures["master_rss_mb_1000"] = rss_mb(cluster.master.pid)
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
