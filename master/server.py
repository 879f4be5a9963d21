"""`pimaster serve`: the master daemon's lifecycle. Start (lock the state dir, keys, store, the
rooms, their sockets), run until SIGTERM/SIGINT, stop; the systemd watchdog and the periodic
write of last-contact times.

The rooms it wires together, one process, one asyncio loop:

- `transport`: the ZeroMQ sockets (CURVE ROUTER, ZAP, key announce, monitor) and the router loop;
- `enrollment`: who is who (`Roster`) and the enrollment and key policy (`Enrollment`);
- `rpc`: requests to agents and their answers (`ask`, `ask_following`, `ping`);
- `jobs`: the running applies (`JobBoard`) and the apply itself;
- `control`: the control socket, whose requests go to the handlers of `pimaster.commands`;
- `events`: what happens (keys, nodes up and down, jobs, rollbacks, reboots), for `pimaster events`;
- `auto`: the cluster directory's `apply:` list applied by the master itself, on enrollment and
  for drift checks (`autoapply.AutoApply`).
- `healthwatch`: every health interval, each accepted node's health into the history (`healthlog`,
  health.db) and its changes as events; `metrics`: the Prometheus endpoint (`--metrics`).

Job retention (`--keep-jobs`, `--keep-days`) prunes the job store at start, as each new job is
recorded (the newest N stay N), and hourly (jobs age past D days without new ones); never a job
that is running.

Command handlers get the ``Master``: ``store``, ``roster``, ``enrollment``, ``rpc``, ``jobs``,
``transport``, ``drops``, ``events``, ``health`` (the history), ``healthwatch`` (latest samples) and the daemon's own settings (``fingerprint``, ``port``, ...).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import time

import zmq

from piagent import keys
from piagent import protocol as proto
from piagent import sd

from . import __version__, commands
from .commands.serve import DEFAULT_KEEP_DAYS, DEFAULT_KEEP_JOBS
from .control import ControlServer
from .enrollment import MAX_PENDING_KEYS, Enrollment, Roster
from .autoapply import AutoApply
from .events import EventBus
from .healthlog import DEFAULT_INTERVAL_S, HealthLog
from .healthwatch import HealthWatch
from .board import JobBoard
from .rpc import Rpc
from .secrets import SecretStore
from .store import Store
from .transport import DropLog, ListenError, Transport

log = logging.getLogger("pimaster")

LAST_SEEN_FLUSH_S = 30.0
# How often jobs past --keep-days are pruned when no new job prunes them.
JOB_PRUNE_INTERVAL_S = 3600.0
# Test only: the health interval in seconds, instead of the configured one (the tests' rounds
# come every fraction of a second). As PIAGENT_TEST_* for the agent, never for a real master.
TEST_HEALTH_INTERVAL_ENV = "PIMASTER_TEST_HEALTH_INTERVAL"


class Master:
    def __init__(self, state_dir: str, listen_host: str = "0.0.0.0", port: int = proto.DEFAULT_PORT,
                 key_port: int | None = None, max_pending: int = MAX_PENDING_KEYS,
                 keep_jobs: int = DEFAULT_KEEP_JOBS, keep_days: float = DEFAULT_KEEP_DAYS,
                 cluster_dir: str | None = None, metrics: str | None = None) -> None:
        """``keep_jobs``, ``keep_days``: the job store's bounds; 0 is no bound. ``cluster_dir``: the
        cluster's state tree (default: the shipped states); ``metrics``: HOST:PORT for Prometheus, or None."""
        self.state_dir = os.path.abspath(state_dir)
        self.listen_host = listen_host
        self.port = port
        self.key_port = key_port or port + 1
        self.max_pending = max_pending
        self.keep_jobs, self.keep_days = keep_jobs, keep_days
        self.cluster_dir = os.path.abspath(cluster_dir) if cluster_dir else None
        self.metrics_address = metrics
        self.control_path = os.path.join(self.state_dir, "control.sock")
        self.drops = DropLog()
        self.events = EventBus()
        self.roster = Roster(self.events)
        self.started = time.time()
        self._tasks: list[asyncio.Task] = []
        self.metrics_server = None

    def health_interval(self) -> float:
        """Seconds between two health rounds (`healthwatch`): cluster.yaml's `health_interval` in the
        cluster directory, read again each round (default 30; or, for tests only, the
        PIMASTER_TEST_HEALTH_INTERVAL environment variable's)."""
        test = os.environ.get(TEST_HEALTH_INTERVAL_ENV)
        if test:
            try:
                value = float(test)
            except ValueError:
                value = 0.0
            if 0.01 <= value <= 86400:
                return value
        from .highstate import cluster_dir, load_cluster
        from .statetree import StateFileError

        try:
            return load_cluster(cluster_dir(self)).settings.health_interval
        except StateFileError:  # the drift and enrollment loops log it; health goes on at the default
            return DEFAULT_INTERVAL_S

    def _prepare_state_dir(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self._lock_fd = os.open(os.path.join(self.state_dir, "master.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"pimaster: another master is already running on {self.state_dir}") from None
        if len(self.control_path.encode()) > 107:
            raise SystemExit(f"pimaster: state dir path too long for a Unix socket: {self.control_path}")

    async def start(self) -> None:
        self._prepare_state_dir()
        self.public_key, self.secret_key = keys.load_or_create_keypair(self.state_dir, "master")
        self.fingerprint = keys.fingerprint(self.public_key)
        self.store = Store(os.path.join(self.state_dir, "pimaster.db"))
        self.secrets = SecretStore(self.state_dir)
        self.roster.load(self.store)

        self.transport = Transport(self.listen_host, self.port, self.key_port, self.public_key,
                                   self.secret_key, self.roster, self.drops)
        send = self.transport.send
        self.enrollment = Enrollment(self.store, self.roster, send, self.drops, self.max_pending)
        self.rpc = Rpc(self.roster, send, self.drops)
        self.rpc.on_rollback = self.events.network_rollback
        self.jobs = JobBoard(self.store, self.secrets, self.state_dir, self.roster.accepted_nodes,
                             self.rpc.ask_following, send, self.drops, connected=self.roster.connected,
                             events=self.events)
        self.auto = AutoApply(self)
        self.events.listeners.append(self.auto.on_event)
        self.store.on_job_created = self.prune_jobs
        self.prune_jobs()
        self.transport.on_enroll = self.enrollment.on_enroll
        self.transport.handlers.update({
            proto.JOB_PROGRESS: self.jobs.on_progress,
            proto.JOB_RESULT: self.jobs.on_job_result,
            proto.RESULT: self.rpc.on_reply,
            proto.REFUSED: self.rpc.on_reply,
        })
        loops = self.transport.open()

        self.health = HealthLog(os.path.join(self.state_dir, "health.db"))
        self.healthwatch = HealthWatch(self.health, self.rpc.ping, self.roster.accepted_nodes, self.events.publish,
                                       self.health_interval)
        if self.metrics_address:
            from .metrics import MetricsServer, parse_metrics_address

            self.metrics_server = MetricsServer(self, *parse_metrics_address(self.metrics_address))
            await self.metrics_server.open()

        self.control = ControlServer(self.control_path, self, commands.load_all())
        await self.control.open()

        for coro in loops + [self._flush_loop(), self._prune_loop(), self.healthwatch.run(),
                             self.auto.enrollment_loop(), self.auto.drift_loop()]:
            self._tasks.append(asyncio.ensure_future(coro))
        watchdog = sd.watchdog_interval_s()
        if watchdog:
            self._tasks.append(asyncio.ensure_future(self._watchdog_loop(watchdog)))
        log.info("pimaster %s listening on %s:%d (key announce :%d), key %s, state %s", __version__,
                 self.listen_host, self.port, self.key_port, self.fingerprint, self.state_dir)
        sd.notify("READY=1")

    async def stop(self) -> None:
        sd.notify("STOPPING=1")
        self.events.close()  # every `pimaster events` stream ends, and says why
        await asyncio.sleep(0.1)  # time for them to send their last lines
        self.control.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._flush_last_seen()
        self.transport.close()
        self.store.close()
        self.health.close()
        self.control.remove()
        log.info("pimaster stopped")

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            sd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _flush_last_seen(self) -> None:
        seen = self.roster.take_dirty_seen()
        if seen:
            self.store.touch_nodes(seen)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(LAST_SEEN_FLUSH_S)
            self._flush_last_seen()

    def prune_jobs(self, new_job_id: str | None = None) -> None:
        """Drops the jobs past --keep-jobs and --keep-days, except those running (and the one
        just recorded, which starts running next)."""
        running = set(self.jobs.watchers) | ({new_job_id} if new_job_id else set())
        cutoff = time.time() - self.keep_days * 86400 if self.keep_days else None
        try:
            pruned = self.store.prune_jobs(self.keep_jobs or None, cutoff, spare=running)
        except sqlite3.Error as exc:  # a full or failing SD card must not stop a job from running
            log.warning("pruning old jobs failed: %s", exc)
            return
        if pruned:
            log.info("pruned %d old job(s) (--keep-jobs %d, --keep-days %g)", pruned, self.keep_jobs, self.keep_days)

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(JOB_PRUNE_INTERVAL_S)
            self.prune_jobs()


def serve(state_dir: str, listen_host: str, port: int, key_port: int | None,
          max_pending: int = MAX_PENDING_KEYS, keep_jobs: int = DEFAULT_KEEP_JOBS,
          keep_days: float = DEFAULT_KEEP_DAYS, cluster_dir: str | None = None, metrics: str | None = None) -> int:
    import resource
    import signal

    if not zmq.has("curve"):
        raise SystemExit("pimaster: this libzmq was built without CURVE support")
    # One descriptor per connected agent: a large cluster needs more than the default soft limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def main() -> None:
        master = Master(state_dir, listen_host, port, key_port, max_pending, keep_jobs, keep_days,
                        cluster_dir=cluster_dir, metrics=metrics)
        await master.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await master.stop()

    try:
        asyncio.run(main())
    except zmq.ZMQError as exc:
        raise SystemExit(f"pimaster: cannot listen on {listen_host}:{port}: {exc}") from None
    except ListenError as exc:
        raise SystemExit(f"pimaster: {exc}") from None
    return 0
