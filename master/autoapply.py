"""The master acting by itself on its cluster directory (`highstate`): zero touch and drift.

**Enrollment.** When a node's key is accepted (by a join token, `keys accept`, `keys accept
--replace` for a re-flashed card), the master applies the `apply:` list to it, and renders every
other node's files again with the new `nodes`, applying each file where a node's rendering differs
from what it last got and carried out (`jobs.MasterJob.changed_only`): /etc/hosts and slurm.conf on
every node learn the newcomer, and the states' own watch requisites restart what reads them. A
node leaving (its key deleted or rejected) re-renders the others the same way. Enrollments that come
together (a rack booting, `pimaster lab up`) wait SETTLE_S for each other and make one run. A
newcomer whose agent is not connected yet (a key accepted while its Pi is off) waits for it to
connect. `auto_apply: false` in cluster.yaml turns this off.

The master acts by itself only on nodes with an address in `cluster.subnet` (when the inventory
has one): the shipped inventory describes the lab's 10.77.0.0/24, and a person who installed the
master and has not edited it yet must not see their Pis given the lab's names and addresses. Nodes
left out are logged and shown by `pimaster status` (`auto_apply_skipped`).

**Drift.** With `check_interval`, every interval the list runs in test mode on every node and what
would change is recorded per node and file (`store.set_drift`: `pimaster drift`, the DRIFT column
of `pimaster nodes`); with `auto_correct: true` it is applied instead, and what changed is recorded
as corrected.

These are ordinary jobs (`pimaster jobs` shows their reason: `enrolled node05`, `drift check`), one
run at a time. cluster.yaml is read again for every run, so an edit takes effect without a restart;
one that does not parse is logged and shown by `pimaster status`, and nothing runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from .errors import ControlError
from .results import one_line
from .highstate import apply_list, cluster_dir, load_cluster
from .statetree import StateFileError

log = logging.getLogger("pimaster")

# A burst of enrollments within this many seconds of each other is one run.
SETTLE_S = 3.0
# How often the drift check looks whether its interval has passed (and reads cluster.yaml again).
DRIFT_TICK_S = 2.0
# What a drift record keeps of a state's comment (the job keeps it whole, for its retention).
DRIFT_COMMENT = 300
# Node ids a reason names before it says "and N more".
REASON_NODES = 8


def reason_for(joined: set[str], left: set[str]) -> str:
    def names(nodes: set[str]) -> str:
        ordered = sorted(nodes)
        shown = ", ".join(ordered[:REASON_NODES])
        return shown + (f" and {len(ordered) - REASON_NODES} more" if len(ordered) > REASON_NODES else "")

    parts = ([f"enrolled {names(joined)}"] if joined else []) + ([f"removed {names(left)}"] if left else [])
    return "; ".join(parts)


def _quiet(event: dict) -> None:
    """The master's own runs have no client to show their events to."""


class AutoApply:
    def __init__(self, master) -> None:
        self.master = master
        self.joined: set[str] = set()     # accepted since the last run: they get the whole list
        self.left: set[str] = set()       # keys gone since the last run
        self.waiting: set[str] = set()    # accepted, but their agent has not connected yet
        self.wake = asyncio.Event()
        # One enrollment run at a time, and one drift check: a long check never holds a newcomer back.
        self.lock = asyncio.Lock()
        self.drift_lock = asyncio.Lock()
        self.running: dict[str, str] = {}  # "enrollment"/"drift" -> the reason of the run going on
        self.last_runs: dict[str, dict] = {}  # "enrollment"/"drift" -> how its last run went
        self.error: str | None = None     # why the last look at cluster.yaml found nothing to do
        self.started = time.time()
        self.last_check: float | None = None
        self.skipped: dict[str, str] = {}  # node -> why the master does not act on it by itself
        self.settling = False             # woken, waiting SETTLE_S for more enrollments

    # ------------------------------------------------------------------ events (synchronous)
    def on_event(self, event: dict) -> None:
        node, state = event.get("node"), event.get("state")
        if not node:
            return
        if event.get("type") == "key":
            if state == "accepted":
                self.joined.add(node)
                self.left.discard(node)
                self.wake.set()
            elif state == "replaced":
                self.master.store.forget_node_files(node)  # a re-flashed card has none of it
            elif state in ("deleted", "rejected") and node not in self.master.roster.accepted_nodes():
                self.master.store.forget_node_files(node)
                self.joined.discard(node)
                self.waiting.discard(node)
                self.left.add(node)
                self.wake.set()
        elif event.get("type") == "node" and state == "up" and node in self.waiting:
            self.waiting.discard(node)
            self.joined.add(node)
            self.wake.set()

    # ------------------------------------------------------------------ the loops
    async def enrollment_loop(self) -> None:
        while True:
            await self.wake.wait()
            self.settling = True
            try:
                await asyncio.sleep(SETTLE_S)
                self.wake.clear()
                await self._enrollment_run()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end zero touch for the master's lifetime
                log.exception("the automatic apply failed")
            finally:
                self.settling = False

    async def _enrollment_run(self) -> None:
        accepted = self.master.roster.accepted_nodes()
        connected = self.master.roster.connected_nodes()
        joined = {n for n in self.joined if n in accepted}
        self.waiting |= {n for n in joined if n not in connected}
        joined -= self.waiting
        left = {n for n in self.left if n not in accepted}
        self.joined, self.left = set(), set()
        if not joined and not left:
            return
        cluster = self._cluster()
        if cluster is None or not cluster.settings.auto_apply:
            return
        settings = cluster.settings
        eligible = self._in_subnet(accepted, cluster.subnet)
        joined &= set(eligible)
        if not joined and not left:
            return
        reason = reason_for(joined, left)
        await self._run(self.lock, "enrollment", reason, settings, changed_only=True, newcomers=frozenset(joined),
                        only=eligible)

    def _in_subnet(self, nodes: set[str], subnet) -> list[str]:
        """Those of ``nodes`` the master may act on by itself: with an address in ``subnet`` (the
        inventory's cluster.subnet; every node when it names none)."""
        import ipaddress

        facts = {n["node_id"]: n["facts"] for n in self.master.store.nodes()}
        for gone in set(self.skipped) - self.master.roster.accepted_nodes():
            del self.skipped[gone]
        eligible = []
        for node in sorted(nodes):
            addresses = [a for a in facts.get(node, {}).get("ips", []) if isinstance(a, str)]
            inside = subnet is None
            for address in addresses:
                try:
                    inside = inside or ipaddress.ip_address(address) in subnet
                except ValueError:
                    continue
            if inside:
                eligible.append(node)
                self.skipped.pop(node, None)
            elif node not in self.skipped:
                self.skipped[node] = f"none of its addresses is in cluster.subnet {subnet}"
                log.warning("not applying the cluster's list to %s by itself: none of its addresses (%s) is in "
                            "cluster.subnet %s (edit cluster.yaml for your network)", node,
                            ", ".join(addresses[:4]) or "none", subnet)
        return eligible

    async def drift_loop(self) -> None:
        while True:
            await asyncio.sleep(DRIFT_TICK_S)
            try:
                cluster = self._cluster(quiet=True)
                settings = cluster.settings if cluster else None
                interval = settings.check_interval if settings else None
                if not interval:
                    continue
                last = self.last_check or self.started
                if time.time() - last < interval:
                    continue
                self.last_check = time.time()
                correct = settings.auto_correct
                only = self._in_subnet(self.master.roster.accepted_nodes(), cluster.subnet)
                if not only:
                    continue
                # Only nodes still rendered as they last got it: a changed rendering is a person's to roll
                # out, and another node's facts must not make the master rewrite this one's files.
                run = await self._run(self.drift_lock, "drift", "drift correction" if correct else "drift check",
                                      settings, test=not correct, only=only, unchanged_only=True)
                if run is not None:
                    self._record_drift(run, corrected=correct)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the drift check failed")

    # ------------------------------------------------------------------
    def _cluster(self, quiet: bool = False):
        """The cluster directory's inventory (its settings, its subnet) now, read once per run; None
        (and ``error`` says why) when it cannot be read or has no `apply:` list."""
        directory = cluster_dir(self.master)
        try:
            cluster = load_cluster(directory)
        except StateFileError as exc:
            if not quiet or self.error != str(exc):
                log.warning("the cluster directory %s: %s", directory, exc)
            self.error = str(exc)
            return None
        self.error = None if cluster.settings.apply else "cluster.yaml has no `apply:` list"
        return cluster if cluster.settings.apply else None

    async def _run(self, lock: asyncio.Lock, kind: str, reason: str, settings, test: bool = False,
                   changed_only: bool = False, newcomers: frozenset = frozenset(), only: list[str] | None = None,
                   unchanged_only: bool = False):
        async with lock:
            self.running[kind] = reason
            started = time.time()
            log.info("applying the cluster's list by itself (%s)", reason)
            try:
                run = await apply_list(self.master, _quiet, test=test, timeout=settings.auto_timeout, reason=reason,
                                       changed_only=changed_only, newcomers=newcomers, only=only,
                                       unchanged_only=unchanged_only)
            except ControlError as exc:
                log.warning("the automatic apply (%s) was refused: %s", reason, exc)
                self.last_runs[kind] = {"reason": reason, "started": started, "finished": time.time(), "ok": False,
                                        "jobs": [], "error": str(exc)}
                return None
            finally:
                self.running.pop(kind, None)
            self.last_runs[kind] = {"reason": reason, "started": started, "finished": time.time(), "ok": run.ok,
                                    "jobs": [r["job"] for r in run.reports], "stopped": run.stopped,
                                    "refused": run.refused}
            log.info("the automatic apply (%s) finished: %d job(s), %s", reason, len(run.reports),
                     "ok" if run.ok else f"stopped: {run.stopped or run.refused}")
            return run

    def _record_drift(self, run, corrected: bool) -> None:
        for report in run.reports:
            per_node = {}
            for node_id, item in report["nodes"].items():
                per_node[node_id] = [{"id": s.get("id"), "fun": s.get("fun"), "corrected": corrected,
                                      "comment": one_line(s.get("comment") or "", DRIFT_COMMENT)}
                                     for s in item.get("states", []) if isinstance(s, dict) and s.get("status") == "changed"]
            self.master.store.set_drift(report["file"], report["job"], per_node)
        for path, nodes in run.outdated.items():
            self.master.store.set_drift(path, "", {n: [{"outdated": True}] for n in nodes})

    def status(self) -> dict:
        """What `pimaster status` shows of it."""
        directory = cluster_dir(self.master)
        cluster = self._cluster(quiet=True)
        settings = cluster.settings if cluster else None
        return {"cluster_dir": directory,
                "apply": [os.path.basename(n) for n in settings.apply] if settings else [],
                "auto_apply": bool(settings and settings.auto_apply),
                "auto_apply_state": ("running" if "enrollment" in self.running
                                     else "waiting" if self.wake.is_set() or self.settling else "idle"),
                "auto_apply_running": self.running.get("enrollment"),
                "drift_check_running": self.running.get("drift"),
                "auto_apply_waiting_for": sorted(self.waiting),
                "auto_apply_skipped": dict(sorted(self.skipped.items())),
                "auto_apply_last": self.last_runs.get("enrollment"),
                "drift_check_last": self.last_runs.get("drift"),
                "check_interval_s": settings.check_interval if settings else None,
                "auto_correct": bool(settings and settings.auto_correct),
                "last_drift_check": self.last_check,
                "cluster_error": self.error}
