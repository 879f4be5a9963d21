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

from . import protocol as proto

PENDING_FILE = "network-pending.json"
ROLLBACK_NOTE_FILE = "network-rollback.json"
DEFAULT_CONFIRM_S = 60.0
COMMAND_TIMEOUT_S = 60
LIVE_TIMEOUT_S = 30.0   # how long a new address may take to appear (dhcpcd's ARP probe: ~5 s)

STAGED = "staged"    # written, not in effect: waiting for the master to have every result
ACTIVE = "active"    # in effect: waiting for the master to accept the agent from it


def _load(path: str) -> dict | None:
    try:
        with open(path) as fh:
            record = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"status": "corrupt"}
    return record if isinstance(record, dict) else {"status": "corrupt"}


def _save(path: str, record: dict) -> None:
    proto.write_file_atomic(path, json.dumps(record, indent=1).encode(), 0o600)


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
                  confirm_s=max(10.0, float(confirm_s)))
    os.makedirs(state_dir, exist_ok=True)
    _save(path, record)


def staged_change(state_dir: str, interface: str) -> dict | None:
    """The change waiting for ``interface``, if one is staged or in effect and unconfirmed."""
    record = _load(os.path.join(state_dir, PENDING_FILE))
    if not record or record.get("status") not in (STAGED, ACTIVE):
        return None
    return next((c for c in record.get("changes", []) if c.get("interface") == interface), None)


def live_addresses(interface: str) -> list[str] | None:
    """``["10.77.0.12/24", ...]`` on the interface now (IPv4), or None when it does not exist."""
    proc = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", interface], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    try:
        links = json.loads(proc.stdout or "[]")
    except ValueError:
        return None
    return [f"{a['local']}/{a['prefixlen']}" for link in links for a in link.get("addr_info", [])
            if "local" in a and "prefixlen" in a]


class NetworkGuard:
    """The agent's side: put staged changes in effect, and confirm or roll them back."""

    def __init__(self, state_dir: str, log: logging.Logger, reconnect: Callable[[], None]) -> None:
        self.path = os.path.join(state_dir, PENDING_FILE)
        self.note_path = os.path.join(state_dir, ROLLBACK_NOTE_FILE)
        self.log = log
        self.reconnect = reconnect    # makes the agent drop its connection and connect afresh
        self.activated_at: float | None = None   # monotonic, while a change waits for confirmation
        self._busy = False
        self._watchdog: asyncio.Task | None = None

    def note(self) -> dict | None:
        """The last rollback, for `pimaster ping`."""
        try:
            with open(self.note_path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def at_start(self) -> None:
        """A change in effect when the agent stopped (or put in effect by a reboot): a fresh window."""
        record = _load(self.path)
        if record is None:
            return
        if record.get("status") == "corrupt":
            self.log.error("unreadable %s: no network change to confirm or roll back", self.path)
            os.unlink(self.path)
            return
        in_effect = record["status"] == ACTIVE or all(
            c.get("address") in (live_addresses(c["interface"]) or []) for c in record["changes"])
        if in_effect:
            self.log.warning("a network change is in effect but not confirmed yet; rolling it back unless "
                             "the master accepts this agent within %.0f s", record["confirm_s"])
            self._start_window(record)

    def maybe_activate(self, results_pending: bool) -> None:
        """Called when the master acknowledges a result or accepts the agent."""
        if results_pending or self._busy:
            return
        record = _load(self.path)
        if record and record.get("status") == STAGED:
            self._busy = True
            task = asyncio.ensure_future(self._activate(record))
            task.add_done_callback(lambda _t: setattr(self, "_busy", False))

    def on_accepted(self, session_started: float) -> None:
        """The master accepted the agent on a connection made at ``session_started`` (monotonic)."""
        if self.activated_at is None or session_started < self.activated_at:
            return
        record = _load(self.path)
        self.activated_at = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if record and record.get("status") == ACTIVE:
            os.unlink(self.path)
            for path in (self.note_path,):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            self.log.info("network change confirmed: the master accepted this agent from %s",
                          ", ".join(f"{c['interface']} {c['address']}" for c in record["changes"]))

    async def _activate(self, record: dict) -> None:
        what = ", ".join(f"{c['interface']} {c['address']}" for c in record["changes"])
        self.log.warning("putting the network change in effect (%s); rolling it back unless the master "
                         "accepts this agent within %.0f s", what, record["confirm_s"])
        record["status"] = ACTIVE
        record["activated"] = time.time()
        _save(self.path, record)
        failed = await asyncio.to_thread(self._run_all, [cmd for c in record["changes"] for cmd in c["apply"]])
        if not failed:
            failed = await self._wait_live(record["changes"])
        if failed:
            await self._rollback(record, f"putting it in effect failed: {failed}")
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
        self.activated_at = time.monotonic()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = asyncio.ensure_future(self._expire(record, float(record["confirm_s"])))

    async def _expire(self, record: dict, confirm_s: float) -> None:
        await asyncio.sleep(confirm_s)
        self._watchdog = None
        if self.activated_at is None:
            return
        self.activated_at = None
        await self._rollback(record, f"the master did not accept this agent within {confirm_s:.0f} s")

    async def _rollback(self, record: dict, reason: str) -> None:
        what = ", ".join(f"{c['interface']} {c['address']}" for c in record["changes"])
        self.log.critical("ROLLING BACK the network change (%s): %s", what, reason)
        errors = []
        for change in record["changes"]:
            for path, old in change["restore"].items():
                try:
                    if old is None:
                        os.unlink(path)
                    else:
                        proto.write_file_atomic(path, old.encode("utf-8", "surrogateescape"), 0o644)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    errors.append(f"{path}: {exc.strerror}")
        commands = [cmd for c in record["changes"] for cmd in c.get("undo", []) + c["apply"]]
        failed = await asyncio.to_thread(self._run_all, commands)
        if failed:
            errors.append(failed)
        note = {"time": time.time(), "changes": [{"interface": c["interface"], "address": c["address"]}
                                                  for c in record["changes"]],
                "reason": reason, "errors": errors}
        _save(self.note_path, note)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if errors:
            self.log.critical("the rollback had errors: %s", "; ".join(errors))
        else:
            self.log.warning("network rolled back to the previous setting")
        self.reconnect()

    def _run_all(self, commands: list[list[str]]) -> str:
        """Run each command; the first failure's description, or '' when all succeeded."""
        for argv in commands:
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"{' '.join(argv)}: {exc}"
            if proc.returncode != 0:
                return f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"
        return ""
