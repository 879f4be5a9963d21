"""Network changes that could cut the agent off from its master: confirmed, or rolled back.

A new address (or gateway, or netmask) can leave a node unreachable, and a node nobody can reach
is a walk to the rack with a keyboard. So the `network` state module only *stages* a change: it
writes the new configuration (not yet in effect) and records here how to put it in effect and what
to restore. The agent then

1. waits until the master has acknowledged every job result (the person applying sees what
   changed, reported from the old address);
2. puts the change in effect and reconnects from the new address;
3. confirms it when the master accepts the agent again -- or, if that has not happened within the
   confirm window (60 s by default), restores the old files, puts them in effect and reconnects
   from the old address. A note about the rollback shows in `pimaster ping` until the next change
   is confirmed.

The record lives in the agent's state dir and survives restarts and reboots: a change in effect
when the agent starts (or that a reboot put in effect) gets a fresh window, so a power cut during
the window cannot leave the node stranded either.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
from typing import Callable

from . import fileio

PENDING_FILE = "network-pending.json"
ROLLBACK_NOTE_FILE = "network-rollback.json"
DEFAULT_CONFIRM_S = 60.0
MIN_CONFIRM_S = 10.0    # shorter, and a slow boot or a dhcpcd probe would roll back a good change
COMMAND_TIMEOUT_S = 60
LIVE_TIMEOUT_S = 30.0   # how long a new address may take to appear (dhcpcd's ARP probe: ~5 s)

STAGED = "staged"    # written, not in effect: waiting for the master to have every result
ACTIVE = "active"    # in effect: waiting for the master to accept the agent from it


def _valid(record) -> bool:
    """A record this agent can act on (anything else is dropped, loudly, never half-used)."""
    if not isinstance(record, dict) or record.get("status") not in (STAGED, ACTIVE) \
            or not isinstance(record.get("confirm_s"), (int, float)):
        return False
    changes = record.get("changes")
    return isinstance(changes, list) and bool(changes) and all(
        isinstance(c, dict) and isinstance(c.get("interface"), str) and isinstance(c.get("address"), str)
        and isinstance(c.get("restore"), dict) and isinstance(c.get("apply"), list) for c in changes)


def _load(path: str) -> dict | None:
    """The record; None when there is none; {"status": "corrupt"} when it cannot be used."""
    try:
        with open(path) as fh:
            record = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"status": "corrupt"}
    return record if _valid(record) else {"status": "corrupt"}


def _save(path: str, record: dict) -> None:
    fileio.write_atomic(path, json.dumps(record, indent=1).encode(), 0o600)


def describe(changes: list[dict]) -> str:
    return ", ".join(f"{c['interface']} {c['address']}" for c in changes)


def stage(state_dir: str, change: dict, confirm_s: float) -> None:
    """Record a staged change (called by the `network` state module after writing the new files).

    ``change``: ``interface``, ``address`` (the new one, to tell whether a reboot put it in effect),
    ``restore`` (path -> the content before, or None: the file did not exist), ``apply`` (commands,
    argv lists, that put the files' setting in effect; run after a rollback's restore as well) and
    ``undo`` (commands run first on rollback, for managers keeping state outside files).
    A second change of the same interface before the first took effect keeps the first's
    ``restore``: a rollback goes back to what was in effect, not to the first staged version.
    """
    path = os.path.join(state_dir, PENDING_FILE)
    record = _load(path)
    if not record or record.get("status") not in (STAGED, ACTIVE):
        record = {"status": STAGED, "changes": []}
    kept = {c["interface"]: c for c in record["changes"]}
    earlier = kept.get(change["interface"])
    if earlier is not None:
        change = dict(change, restore=earlier["restore"], undo=earlier.get("undo", []))
    kept[change["interface"]] = change
    record.update(status=STAGED, changes=list(kept.values()), staged=time.time(),
                  confirm_s=max(MIN_CONFIRM_S, float(confirm_s)))
    os.makedirs(state_dir, exist_ok=True)
    _save(path, record)


def staged_change(state_dir: str, interface: str) -> dict | None:
    """The change waiting for ``interface``, if one is staged or in effect and unconfirmed."""
    record = _load(os.path.join(state_dir, PENDING_FILE))
    if not record or record.get("status") not in (STAGED, ACTIVE):
        return None
    return next((c for c in record["changes"] if c["interface"] == interface), None)


def live_addresses(interface: str) -> list[str] | None:
    """``["10.77.0.12/24", ...]`` on the interface now (IPv4), or None when it does not exist."""
    try:
        proc = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", interface], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        links = json.loads(proc.stdout or "[]")
    except ValueError:
        return None
    return [f"{a['local']}/{a['prefixlen']}" for link in links for a in link.get("addr_info", [])
            if "local" in a and "prefixlen" in a]


def _all_live(changes: list[dict]) -> bool:
    return all(c["address"] in (live_addresses(c["interface"]) or []) for c in changes)


class NetworkGuard:
    """The agent's side: put staged changes in effect, and confirm or roll them back."""

    def __init__(self, state_dir: str, log: logging.Logger, reconnect: Callable[[], None]) -> None:
        self.path = os.path.join(state_dir, PENDING_FILE)
        self.note_path = os.path.join(state_dir, ROLLBACK_NOTE_FILE)
        self.log = log
        self.reconnect = reconnect    # makes the agent drop its connection and connect afresh
        self.window_from: float | None = None   # monotonic: a connection made after it can confirm
        self._busy = False
        self._watchdog: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    def note(self) -> dict | None:
        """The last rollback, for `pimaster ping`."""
        try:
            with open(self.note_path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(self._guarded(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guarded(self, coro) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:  # never let the guard die silently with a change unconfirmed
            self.log.exception("the network guard failed; rolling back whatever is pending")
            record = _load(self.path)
            if record and record.get("status") != "corrupt":
                try:
                    await self._rollback("the agent hit an error while guarding the change")
                except Exception:
                    self.log.exception("the rollback failed too")

    def at_start(self) -> None:
        """A pending change when the agent starts gets a fresh window, whatever its state: a boot
        may have put a staged change in effect (or be about to, once networkd or dhcpcd is up), and
        a change whose master never answers must not stay."""
        record = _load(self.path)
        if record is None:
            return
        if record.get("status") == "corrupt":
            self.log.error("unusable %s: no network change to confirm or roll back; removed", self.path)
            os.unlink(self.path)
            return
        self.log.warning("a network change (%s) is not confirmed yet; rolling it back unless the master "
                         "accepts this agent within %.0f s", describe(record["changes"]), record["confirm_s"])
        self._start_window(record)

    def maybe_activate(self, results_pending: bool) -> None:
        """Called when the master acknowledges a result or accepts the agent."""
        if results_pending or self._busy:
            return
        record = _load(self.path)
        if record and record.get("status") == STAGED:
            self._busy = True
            task = self._spawn(self._activate(record))
            task.add_done_callback(lambda _t: setattr(self, "_busy", False))

    def on_accepted(self, session_started: float) -> None:
        """The master accepted the agent on a connection made at ``session_started`` (monotonic)."""
        if self.window_from is None or session_started < self.window_from:
            return
        record = _load(self.path)
        self._stop_window()
        if not record or record.get("status") == "corrupt":
            return
        if _all_live(record["changes"]):
            os.unlink(self.path)
            try:
                os.unlink(self.note_path)
            except FileNotFoundError:
                pass
            self.log.info("network change confirmed: the master accepted this agent from %s",
                          describe(record["changes"]))
        elif record["status"] == ACTIVE:
            # Accepted, but not from the new setting (the old address survived, another link):
            # the change did not take.
            self._spawn(self._rollback("the master accepted this agent, but the new address is not in effect"))
        # A staged change not in effect yet stays staged: maybe_activate puts it in effect.

    async def _activate(self, record: dict) -> None:
        self.log.warning("putting the network change in effect (%s); rolling it back unless the master "
                         "accepts this agent within %.0f s", describe(record["changes"]), record["confirm_s"])
        record["status"] = ACTIVE
        record["activated"] = time.time()
        _save(self.path, record)
        failed = await asyncio.to_thread(self._run_all, [cmd for c in record["changes"] for cmd in c["apply"]])
        if not failed:
            failed = await self._wait_live(record["changes"])
        if failed:
            await self._rollback(f"putting it in effect failed: {failed}")
            return
        self._start_window(record)
        self.reconnect()

    async def _wait_live(self, changes: list[dict]) -> str:
        """Wait until every new address is on its interface (dhcpcd probes it first, for seconds)."""
        deadline = time.monotonic() + LIVE_TIMEOUT_S
        while True:
            missing = [c for c in changes if c["address"] not in (live_addresses(c["interface"]) or [])]
            if not missing:
                return ""
            if time.monotonic() > deadline:
                return ", ".join(f"{c['address']} did not appear on {c['interface']}" for c in missing) + \
                    f" within {LIVE_TIMEOUT_S:.0f} s"
            await asyncio.sleep(0.5)

    def _start_window(self, record: dict) -> None:
        self._stop_window()
        self.window_from = time.monotonic()
        self._watchdog = self._spawn(self._expire(float(record["confirm_s"])))

    def _stop_window(self) -> None:
        self.window_from = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def _expire(self, confirm_s: float) -> None:
        await asyncio.sleep(confirm_s)
        self._watchdog = None
        if self.window_from is None:
            return
        self.window_from = None
        await self._rollback(f"the master did not accept this agent within {confirm_s:.0f} s")

    async def _rollback(self, reason: str) -> None:
        # From the file, not from memory: a change staged meanwhile for another interface is
        # undone with the rest rather than left written and unguarded.
        record = _load(self.path)
        if not record or record.get("status") == "corrupt":
            return
        self._stop_window()
        self.log.critical("ROLLING BACK the network change (%s): %s", describe(record["changes"]), reason)
        errors = []
        for change in record["changes"]:
            for path, old in change["restore"].items():
                try:
                    if old is None:
                        os.unlink(path)
                    else:  # keeps the file's mode and owner, writes through a symlink
                        fileio.write_atomic(path, old)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    errors.append(f"{path}: {exc.strerror}")
        # Every command, even after one fails: a half-done rollback (dhcpcd stopped, the connection
        # not brought up) is the worst place to stop.
        commands = [cmd for c in record["changes"] for cmd in c.get("undo", []) + c["apply"]]
        errors += await asyncio.to_thread(self._run_all, commands, True) or []
        note = {"time": time.time(), "changes": [{"interface": c["interface"], "address": c["address"]}
                                                  for c in record["changes"]],
                "reason": reason, "errors": errors}
        try:
            _save(self.note_path, note)
        except OSError as exc:
            errors.append(f"{self.note_path}: {exc.strerror}")
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if errors:
            self.log.critical("the rollback had errors: %s", "; ".join(errors))
        else:
            self.log.warning("network rolled back to the previous setting")
        self.reconnect()

    def _run_all(self, commands: list[list[str]], best_effort: bool = False):
        """Run the commands in order. Stops at the first failure and returns its description ('' when
        all succeeded); with ``best_effort`` runs them all and returns the list of failures."""
        failures = []
        for argv in commands:
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
                failure = "" if proc.returncode == 0 else \
                    f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"
            except (OSError, subprocess.TimeoutExpired) as exc:
                failure = f"{' '.join(argv)}: {exc}"
            if failure:
                if not best_effort:
                    return failure
                failures.append(failure)
        return failures if best_effort else ""
