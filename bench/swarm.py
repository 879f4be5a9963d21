"""Many agents in one process, like Salt's minionswarm: each has its own key pair and its own
CURVE session to the master, and runs the real agent code (piagent.daemon.Agent); only the facts
and health readers are replaced by cheap constants so that a thousand of them fit on two cores.

    python bench/swarm.py --config piagent.conf --count 250 --prefix swarm-a
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import use_source_tree  # noqa: E402

use_source_tree()

import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402

from piagent.config import load_config  # noqa: E402
from piagent.daemon import Agent, AgentSettings  # noqa: E402


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run_swarm(config_path: str, count: int, prefix: str, state_dir: str) -> None:
    config = load_config(config_path)
    ctx = zmq.asyncio.Context()
    ctx.max_sockets = 4 * count + 100
    boot = time.time()

    async def facts() -> dict:
        return {"hostname": "swarm", "agent_version": "swarm", "cpu_count": 4}

    async def health() -> dict:
        return {"time": time.time(), "uptime_s": time.time() - boot, "load": [0.0, 0.0, 0.0]}

    agents = []
    for i in range(count):
        public, secret = zmq.curve_keypair()
        node_id = f"{prefix}-{i:04d}"
        agent_dir = os.path.join(state_dir, node_id)  # each agent keeps its own jobs and results
        os.makedirs(agent_dir, exist_ok=True)
        settings = AgentSettings(node_id=node_id, master_host=config.master_host,
                                 master_port=config.master_port, state_dir=agent_dir, public_key=public,
                                 secret_key=secret, fingerprint=config.fingerprint, token=config.token)
        agents.append(Agent(settings, context=ctx, facts_source=facts, health_source=health))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = []
    for agent in agents:  # a gentle ramp: a whole cluster powering on at once, not one instant
        tasks.append(asyncio.ensure_future(agent.run()))
        await asyncio.sleep(0.002)
    await stop.wait()
    for agent in agents:
        agent.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    ctx.destroy(linger=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--prefix", default="swarm")
    parser.add_argument("--state-dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="swarm %(levelname)s %(message)s")
    raise_fd_limit()
    state_dir = args.state_dir or tempfile.mkdtemp(prefix="swarm-")
    os.makedirs(state_dir, exist_ok=True)
    asyncio.run(run_swarm(args.config, args.count, args.prefix, state_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
