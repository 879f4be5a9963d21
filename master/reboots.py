"""Rolling reboots and shutdowns (`pimaster reboot`, `pimaster shutdown`): which nodes, in which
order, and when a rebooted node counts as back.

A node is *back* when its agent answers again from a new boot: its boot identity, which the agent
reports with its health (``piagent.facts.boot_identity``: the kernel's boot id and when PID 1
started), differs from the one it reported before the request. The kernel's boot id alone is new
at each boot of a Pi; a container shares its host's kernel (nspawn, the lab's, shows each
container boot its own boot id; others show the host's), and PID 1's start tells its boots apart.
A node is *down* from when the master saw the connection its request went on go (the roster no
longer routes to it, or routes to a newer connection), or its ping fail: watched every WATCH_S, so
that a node that reboots between two pings is seen down too.

The master's own node: the one whose ``machine_id`` fact is this host's /etc/machine-id *and*
whose boot id is this host's (as this process reads them: in the lab, node01's). Either alone is
not enough: Pis flashed from one cloned card share a machine id (each has its own boot id), and
containers may share the host's boot id (each has its own machine id). It goes last, alone, and is not waited for (this master
goes down with it): its request carries a longer delay so that the command's report leaves first.

Every step is emitted to the command that asked and published on the event bus as a ``reboot``
event (``action``: reboot or poweroff, ``state``; `pimaster.events` lists the fields): the roll's
``started``, each ``batch`` (reboot only), each ``skipped`` node, each node's own states, then
``finished`` or ``stopped``. The roll goes on when the command's client goes (Ctrl-C): the events
are how it is followed then.
"""

from __future__ import annotations

import asyncio
import shlex
import time

from piagent import protocol as proto

from .errors import ControlError
from .results import check_health, one_line
from .targets import batches, node_facts, resolve_target

MACHINE_ID_PATH = "/etc/machine-id"
KERNEL_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
POLL_S = 1.0
# How often a waiting node's connection is looked at (a dictionary look-up: cheap).
WATCH_S = 0.2
PING_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 10.0
# The agent answers, then acts after this delay, so that its answer leaves first.
REBOOT_DELAY_S = 2.0
# The master's own node: long enough for the command's report to reach the person.
OWN_NODE_DELAY_S = 5.0
MAX_TIMEOUT_S = 24 * 3600
# Down nodes named in the refusal's `leave them out` command line; past that, how to.
MAX_SUGGESTED = 8
UPGRADE_HINT = ("its piagent does not know the reboot request (an agent older than this master drops it "
                "unanswered): upgrade piagent on it")
# Why a node is skipped: words for one node and for many alike (`skipped 97 nodes: WHY`).
SKIP_NOT_REQUIRED = "no apply reported that a reboot is needed"
SKIP_BOOTED_SINCE = "booted since the last apply that needed a reboot"
SKIP_NOT_ANSWERING = "not answering (already off?)"
SKIP_TOO_OLD = "piagent older than the reboot request (upgrade piagent)"


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def own_identity() -> dict:
    """This host's machine id and kernel boot id: what the master's own node reports too."""
    return {"machine_id": _read(MACHINE_ID_PATH), "boot_id": _read(KERNEL_BOOT_ID_PATH)}


def is_own_node(facts: dict, health: dict, own: dict) -> bool:
    return bool(own["machine_id"] and own["boot_id"]) and facts.get("machine_id") == own["machine_id"] \
        and health.get("boot_id") == own["boot_id"]


def boot_of(health: dict) -> tuple | None:
    """A node's boot identity from its checked health, None when its agent reports none (older)."""
    if "boot_id" not in health and "boot_init" not in health:
        return None
    return health.get("boot_id"), health.get("boot_init")


def boot_text(health: dict) -> str:
    """A boot identity for people: the kernel's boot id, shortened, and PID 1's start."""
    return f"{str(health.get('boot_id', '-'))[:8]}/{health.get('boot_init', '-')}"


async def healths(master, nodes: list[str], timeout: float = PING_TIMEOUT_S) -> dict[str, dict | None]:
    """Node -> its checked health (None: it did not answer)."""
    if not nodes:
        return {}
    answers = await master.rpc.ask({n: {} for n in nodes}, proto.PING, timeout)
    return {n: check_health(a.get("body") or {}) if a["ok"] else None for n, a in answers.items()}


def needs_reboot(required: dict[str, float], health: dict) -> bool:
    """Whether a node whose newest `reboot_required` apply finished at ``required`` (None: never)
    has not booted since: its PID 1 started before that (both on the node's clock)."""
    if required is None:
        return False
    booted_at = health.get("booted_at")
    return booted_at is None or booted_at < required


def leave_out(action: str, target: str | None, nodes: list[str], only_required: bool = False) -> str:
    """How to run the command again without ``nodes``: `pimaster reboot 'node0[2-4] !node04'`."""
    if len(nodes) > MAX_SUGGESTED:
        return f"leave them out of the target with a `!` term each ({shlex.quote((target or '*') + ' !' + nodes[0])} ...)"
    command = "reboot" if action == "reboot" else "shutdown"
    terms = " ".join([target or "*", *(f"!{n}" for n in nodes)])
    flag = " --only-required" if only_required else ""
    return f"leave {'them' if len(nodes) > 1 else 'it'} out: pimaster {command} {shlex.quote(terms)}{flag}"


class Roll:
    """One `reboot` or `shutdown` command: its nodes' rows, events, and the order it goes in."""

    def __init__(self, master, emit, action: str, timeout: float) -> None:
        self.master, self.emit, self.action, self.timeout = master, emit, action, timeout
        self.rows: dict[str, dict] = {}
        self.links: dict[str, bytes | None] = {}  # node -> the connection its request went on
        self.started = time.monotonic()

    def note(self, message: str) -> None:
        self.emit({"type": "note", "message": message})

    def publish(self, state: str, node: str | None = None, **fields) -> None:
        """A ``reboot`` event on the bus (for `pimaster events`), this roll's ``action`` with it."""
        self.master.events.publish("reboot", node=node, state=state, action=self.action, **fields)

    def set(self, node: str, state: str, **fields) -> None:
        """Node ``node`` is now in ``state``: its row, an event to the command and on the bus."""
        row = self.rows.setdefault(node, {"ok": False})
        row.update(state=state, **fields)
        row["ok"] = state in ("back", "rebooting", "off", "powering_off")
        self.emit({"type": "node", "node": node, "state": state, **fields})
        self.publish(state, node=node, **fields)

    def elapsed(self, since: float) -> float:
        return round(time.monotonic() - since, 1)

    def link(self, node: str) -> bytes | None:
        """The connection the master's requests to ``node`` go on now (None: not connected)."""
        route = self.master.roster.routes.get(node)
        return route[0] if route else None

    async def request(self, nodes: list[str], delay: float) -> list[str]:
        """Sends the reboot/poweroff request to ``nodes``; the ones that took it."""
        for node in nodes:
            self.links[node] = self.link(node)
        answers = await self.master.rpc.ask({n: {"action": self.action, "delay_s": delay} for n in nodes},
                                            proto.REBOOT, REQUEST_TIMEOUT_S)
        taken = []
        for node in nodes:
            answer = answers[node]
            if answer["ok"]:
                taken.append(node)
                self.set(node, "rebooting" if self.action == "reboot" else "powering_off")
                continue
            error = answer.get("error") or (answer.get("body") or {}).get("error")
            error = one_line(error or "failed", 300)
            if error.startswith("no answer") and self.master.roster.connected(node):
                error = UPGRADE_HINT
            self.set(node, "failed", error=error)
        return taken

    async def _watch_links(self, waiting: list[str], down: dict[str, float], since: float) -> None:
        """Marks each of ``waiting`` down as soon as the connection its request went on is gone."""
        while True:
            for node in list(waiting):
                if node not in down and self.link(node) != self.links.get(node):
                    self._down(node, down, since)
            await asyncio.sleep(WATCH_S)

    def _down(self, node: str, down: dict[str, float], since: float) -> None:
        down[node] = time.monotonic()
        self.set(node, "down", after_s=self.elapsed(since))

    async def wait_back(self, nodes: list[str], before: dict[str, tuple]) -> list[str]:
        """Waits until each of ``nodes`` answers from a new boot, up to the timeout; the ones not back."""
        since = time.monotonic()
        deadline = since + self.timeout
        waiting = list(nodes)
        down: dict[str, float] = {}
        watcher = asyncio.ensure_future(self._watch_links(waiting, down, since))
        try:
            while waiting and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
                connected = [n for n in waiting if self.master.roster.connected(n)]
                for node, health in (await healths(self.master, connected)).items():
                    if health is None:
                        if node not in down:
                            self._down(node, down, since)
                        continue
                    boot = boot_of(health)
                    if boot is not None and boot != before[node]:
                        if node not in down:  # a new boot went down before it: seen only now
                            self._down(node, down, since)
                        waiting.remove(node)
                        self.set(node, "back", after_s=self.elapsed(since), boot_id=health.get("boot_id"),
                                 boot_init=health.get("boot_init"), boot=boot_text(health))
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        for node in waiting:
            self.set(node, "not_back", error=f"no new boot within {self.timeout:g} s")
        return waiting

    async def wait_down(self, nodes: list[str]) -> list[str]:
        """Waits until each of ``nodes`` is gone (powered off), up to the timeout; the ones still up."""
        since = time.monotonic()
        deadline = since + self.timeout
        waiting = list(nodes)
        while waiting and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            gone = [n for n in waiting if not self.master.roster.connected(n)]
            answers = await healths(self.master, [n for n in waiting if n not in gone])
            gone += [n for n, health in answers.items() if health is None]
            for node in gone:
                waiting.remove(node)
                self.set(node, "off", after_s=self.elapsed(since))
        for node in waiting:
            self.set(node, "still_up", error=f"answering {self.timeout:g} s after the poweroff request")
        return waiting

    def skip(self, nodes: list[str], why: str) -> None:
        for node in nodes:
            if node not in self.rows:
                self.set(node, "not_started", error=why)

    def report(self, order: list[str], own: str | None, stopped: str | None, **extra) -> dict:
        return {"action": self.action, "order": order, "master_node": own, "stopped": stopped,
                "ok": stopped is None and all(r["ok"] for r in self.rows.values()),
                "elapsed_s": self.elapsed(self.started), "nodes": self.rows, **extra}

    def end(self, report: dict) -> dict:
        """The roll is over: ``finished`` or ``stopped`` on the bus; ``report`` returned."""
        if report["stopped"]:
            self.publish("stopped", reason=report["stopped"], elapsed_s=report["elapsed_s"],
                         not_started=[n for n, r in self.rows.items() if r["state"] == "not_started"])
        else:
            summary: dict[str, int] = {}
            for row in self.rows.values():
                summary[row["state"]] = summary.get(row["state"], 0) + 1
            self.publish("finished", ok=report["ok"], elapsed_s=report["elapsed_s"], summary=summary,
                         skipped=len(report.get("skipped") or {}))
        return report


async def plan(master, target: str | None, action: str, only_required: bool = False,
               chosen: list[str] | None = None) -> dict:
    """The nodes a command acts on, in order, with the master's own last: {"nodes", "master_node",
    "before" (node -> boot identity), "skipped" (node -> why)}. ControlError when a node of the
    target cannot take part (down, or an agent too old to know the request) in a reboot."""
    nodes = await resolve_target(master, target)
    if chosen is not None:  # the nodes a person confirmed: exactly those, if still in the target
        nodes = [n for n in nodes if n in set(chosen)]
    skipped: dict[str, str] = {}
    required = master.store.reboots_required() if only_required else {}
    if only_required:  # first: a node no apply said needs a reboot cannot hold the others' roll
        for node in nodes:
            if node not in required:
                skipped[node] = SKIP_NOT_REQUIRED
        nodes = [n for n in nodes if n not in skipped]
    health = await healths(master, nodes)
    facts = node_facts(master)
    down = [n for n in nodes if health[n] is None]
    old = [n for n in nodes if health[n] is not None and boot_of(health[n]) is None]
    if action == "reboot" and (down or old):
        them = "them" if len(down) > 1 else "it"
        problems = ([f"{', '.join(down)} not answering (bring {them} up, or "
                     f"{leave_out(action, target, down, only_required)})"] if down else []) + \
                   ([f"{', '.join(old)}: {UPGRADE_HINT}"] if old else [])
        raise ControlError("cannot reboot: " + "; ".join(problems), code="refused")
    for node in down:
        skipped[node] = SKIP_NOT_ANSWERING
    for node in old:
        skipped[node] = SKIP_TOO_OLD
    nodes = [n for n in nodes if n not in skipped]
    if only_required:
        for node in nodes:
            if not needs_reboot(required.get(node), health[node]):
                skipped[node] = SKIP_BOOTED_SINCE
        nodes = [n for n in nodes if n not in skipped]
    own_id = own_identity()
    # One node, unless another claims this host's ids too (its facts are its own word): then all
    # of them go last, so that the master's real node never goes before the others.
    own = [n for n in nodes if is_own_node(facts.get(n) or {}, health[n], own_id)]
    order = [n for n in nodes if n not in own] + own
    return {"nodes": order, "master_node": own[0] if own else None, "last": own, "skipped": skipped,
            "before": {n: boot_of(health[n]) for n in order}}


async def roll(master, emit, target: str | None, action: str, batch: str | None, wait: bool = True,
               timeout: float = 600.0, only_required: bool = False, chosen: list[str] | None = None) -> dict:
    """`pimaster reboot` (``action`` "reboot") and `pimaster shutdown` ("poweroff"): the report
    (see `commands/reboot.py` for its fields)."""
    planned = await plan(master, target, action, only_required, chosen)
    run = Roll(master, emit, action, timeout)
    order, own, last = planned["nodes"], planned["master_node"], planned["last"]
    skipped = dict(planned["skipped"])
    others = [n for n in order if n not in last]
    # A reboot goes in batches; a poweroff asks every node at once (then the master's own).
    groups = (batches(others, batch if wait else None) if others else []) if action == "reboot" else \
        ([others] if others else [])
    run.publish("started", order=order, node_count=len(order), master_node=own,
                **({"batches": len(groups)} if action == "reboot" else {}))
    if skipped:
        run.emit({"type": "skipped", "nodes": skipped})
        for node, why in skipped.items():
            run.publish("skipped", node=node, reason=why)
    try:
        if not order:
            run.note("no node to " + ("reboot" if action == "reboot" else "power off")
                     + (" (none needs a reboot)" if only_required else ""))
            return run.end(run.report(order, own, None, skipped=skipped))
        if own:
            run.note(f"{' or '.join(last)} runs this master: it goes last, alone, and is not waited for (this "
                     "master goes down with it: this command ends then; `pimaster ping` once it is back)")
        stopped = None
        for index, group in enumerate(groups):
            if action == "reboot":
                run.emit({"type": "batch", "index": index + 1, "of": len(groups), "nodes": group})
                run.publish("batch", index=index + 1, of=len(groups), nodes=group)
            taken = await run.request(group, REBOOT_DELAY_S)
            if not wait:
                continue
            if action == "reboot":
                await run.wait_back(taken, planned["before"])
            else:
                await run.wait_down(taken)
            failed = [n for n in group if not run.rows[n]["ok"]]
            if failed:
                stopped = "; ".join(f"{n} {run.rows[n]['state'].replace('_', ' ')}"
                                    + (f": {run.rows[n]['error'][:200]}" if run.rows[n].get("error") else "")
                                    for n in failed)
                break
        if stopped is None and last:
            await run.request(last, OWN_NODE_DELAY_S)
        if stopped:
            run.skip(order, "the roll stopped before it")
        return run.end(run.report(order, own, stopped, skipped=skipped))
    except BaseException as exc:  # the master stopping (cancelled) or failing: the roll ends too
        reason = "the master is stopping" if isinstance(exc, asyncio.CancelledError) else \
            f"the master failed: {one_line(exc, 200)}"
        run.publish("stopped", reason=reason, elapsed_s=run.elapsed(run.started))
        raise
