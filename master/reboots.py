"""Rolling reboots and shutdowns (`pimaster reboot`, `pimaster shutdown`): which nodes, in which
order, and when a rebooted node counts as back.

A node is *back* when its agent answers again from a new boot: its boot identity, which the agent
reports with its health (``piagent.facts.boot_identity``: the kernel's boot id and when PID 1
started), differs from the one it reported before the request. The kernel's boot id alone is new
at each boot of a Pi; a container shares its host's kernel (nspawn, the lab's, shows each
container boot its own boot id; others show the host's), and PID 1's start tells its boots apart.

The master's own node: the one whose ``machine_id`` fact is this host's /etc/machine-id *and*
whose boot id is this host's (as this process reads them: in the lab, node01's). Either alone is
not enough: Pis flashed from one cloned card share a machine id (each has its own boot id), and
containers may share the host's boot id (each has its own machine id). It goes last, alone, and is not waited for (this master
goes down with it): its request carries a longer delay so that the command's report leaves first.

Every step is published on the event bus (``reboot`` events: node, state) and emitted to the
command that asked.
"""

from __future__ import annotations

import asyncio
import time

from piagent import protocol as proto

from .errors import ControlError
from .results import check_health, one_line
from .targets import batches, resolve_target

MACHINE_ID_PATH = "/etc/machine-id"
KERNEL_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
POLL_S = 1.0
PING_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 10.0
# The agent answers, then acts after this delay, so that its answer leaves first.
REBOOT_DELAY_S = 2.0
# The master's own node: long enough for the command's report to reach the person.
OWN_NODE_DELAY_S = 5.0
MAX_TIMEOUT_S = 24 * 3600
UPGRADE_HINT = ("its piagent does not know the reboot request (an agent older than this master drops it "
                "unanswered): upgrade piagent on it")


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


class Roll:
    """One `reboot` or `shutdown` command: its nodes' rows, events, and the order it goes in."""

    def __init__(self, master, emit, action: str, timeout: float) -> None:
        self.master, self.emit, self.action, self.timeout = master, emit, action, timeout
        self.rows: dict[str, dict] = {}
        self.started = time.monotonic()

    def note(self, message: str) -> None:
        self.emit({"type": "note", "message": message})

    def set(self, node: str, state: str, **fields) -> None:
        """Node ``node`` is now in ``state``: its row, an event to the command and on the bus."""
        row = self.rows.setdefault(node, {"ok": False})
        row.update(state=state, **fields)
        row["ok"] = state in ("back", "rebooting", "off", "powering_off")
        self.emit({"type": "node", "node": node, "state": state, **fields})
        self.master.events.publish("reboot", node=node, state=state, action=self.action, **fields)

    def elapsed(self, since: float) -> float:
        return round(time.monotonic() - since, 1)

    async def request(self, nodes: list[str], delay: float) -> list[str]:
        """Sends the reboot/poweroff request to ``nodes``; the ones that took it."""
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

    async def wait_back(self, nodes: list[str], before: dict[str, tuple]) -> list[str]:
        """Waits until each of ``nodes`` answers from a new boot, up to the timeout; the ones not back."""
        since = time.monotonic()
        deadline = since + self.timeout
        waiting = list(nodes)
        down: set[str] = set()
        while waiting and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            connected = [n for n in waiting if self.master.roster.connected(n)]
            for node in waiting:
                if node not in connected and node not in down:
                    down.add(node)
                    self.set(node, "down", after_s=self.elapsed(since))
            for node, health in (await healths(self.master, connected)).items():
                if health is None:
                    if node not in down:
                        down.add(node)
                        self.set(node, "down", after_s=self.elapsed(since))
                    continue
                boot = boot_of(health)
                if boot is not None and boot != before[node]:
                    waiting.remove(node)
                    self.set(node, "back", after_s=self.elapsed(since), boot_id=health.get("boot_id"),
                             boot_init=health.get("boot_init"), boot=boot_text(health))
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
                skipped[node] = "no apply reported that it needs a reboot"
        nodes = [n for n in nodes if n not in skipped]
    health = await healths(master, nodes)
    facts = {n["node_id"]: n["facts"] for n in master.store.nodes()}
    down = [n for n in nodes if health[n] is None]
    old = [n for n in nodes if health[n] is not None and boot_of(health[n]) is None]
    if action == "reboot" and (down or old):
        them = "them" if len(down) > 1 else "it"
        problems = ([f"{', '.join(down)} not answering (bring {them} up, or leave {them} out of the target)"]
                    if down else []) + \
                   ([f"{', '.join(old)}: {UPGRADE_HINT}"] if old else [])
        raise ControlError("cannot reboot: " + "; ".join(problems), code="refused")
    for node in down:
        skipped[node] = "not answering (already off?)"
    for node in old:
        skipped[node] = UPGRADE_HINT
    nodes = [n for n in nodes if n not in skipped]
    if only_required:
        for node in nodes:
            if not needs_reboot(required.get(node), health[node]):
                skipped[node] = "booted since its last apply that needed a reboot"
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
    for node, why in planned["skipped"].items():
        run.emit({"type": "node", "node": node, "state": "skipped", "error": why})
    skipped = {n: why for n, why in planned["skipped"].items()}
    if not order:
        run.note("no node to " + ("reboot" if action == "reboot" else "power off")
                 + (" (none needs a reboot)" if only_required else ""))
        return run.report(order, own, None, skipped=skipped)
    if own:
        run.note(f"{' or '.join(last)} runs this master: it goes last, alone, and is not waited for (this master "
                 "goes down with it: this command ends then; `pimaster ping` once it is back)")
    others = [n for n in order if n not in last]
    stopped = None
    groups = batches(others, batch if wait else None) if others else []
    for index, group in enumerate(groups):
        run.emit({"type": "batch", "index": index + 1, "of": len(groups), "nodes": group})
        taken = await run.request(group, REBOOT_DELAY_S)
        if not wait:
            continue
        if action == "reboot":
            await run.wait_back(taken, planned["before"])
        else:
            await run.wait_down(taken)
        failed = [n for n in group if not run.rows[n]["ok"]]
        if failed:
            stopped = (", ".join(f"{n} {run.rows[n]['state'].replace('_', ' ')}" for n in failed)
                       + ": stopped before the next batch")
            break
    if stopped is None and last:
        await run.request(last, OWN_NODE_DELAY_S)
    run.skip(order, "not started: the roll stopped before it" if stopped else "not started")
    return run.report(order, own, stopped, skipped=skipped)
