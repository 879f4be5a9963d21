"""service: systemd units running or stopped, enabled or disabled at boot.

A unit name without a suffix means ``NAME.service``, as with systemctl. When a unit's file changed
on disk (systemd says NeedDaemonReload) a ``systemctl daemon-reload`` comes first; a unit file that
a state just wrote is found by a daemon-reload, too.
"""

from __future__ import annotations

import os
import re
import time

from .base import Outcome, StateContext, StateError, output_tail, systemd_running

__states__ = ("running", "dead", "enabled", "disabled")

UNIT_RE = re.compile(r"\A[A-Za-z0-9:_.@\\-]+\Z")
PROPERTIES = ("Id", "LoadState", "ActiveState", "UnitFileState", "NeedDaemonReload", "CanReload")
RUNNING = {"active", "reloading"}
# is-enabled answers for which `systemctl enable` has nothing to do: the unit has no [Install]
# section (static), is pulled in by another (indirect) or is made by a generator.
NOT_ENABLEABLE = {"static", "indirect", "generated", "transient"}
ENABLED = {"enabled", "alias"}


UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/lib/systemd/system", "/usr/lib/systemd/system")
UNIT_SUFFIXES = (".service", ".socket", ".timer", ".target", ".mount", ".automount", ".path", ".swap",
                 ".slice", ".scope", ".device")


def unit_file_on_disk(name: str) -> bool:
    file_name = name if name.endswith(UNIT_SUFFIXES) else name + ".service"
    prefix, at, rest = file_name.partition("@")
    candidates = {file_name}
    if at:  # an instance (getty@tty1.service) comes from its template (getty@.service)
        candidates.add(prefix + "@" + rest[rest.rfind("."):])
    return any(os.path.exists(os.path.join(d, c)) for d in UNIT_DIRS for c in candidates)


class _Unit:
    def __init__(self, ctx: StateContext, name: str) -> None:
        if not UNIT_RE.match(name) or name.startswith("-"):
            raise StateError(f"{name!r} is not a systemd unit name")
        if not systemd_running():
            raise StateError("systemd is not running on this node: service states need it")
        self.ctx, self.name = ctx, name
        self.daemon_reloaded = False
        self.refresh()
        if self.missing and not ctx.test and unit_file_on_disk(name):
            # A unit file an earlier state wrote is unknown to systemd until a daemon-reload.
            self.daemon_reload()

    def refresh(self) -> None:
        res = self.ctx.run(["systemctl", "show", "--property=" + ",".join(PROPERTIES), "--", self.name])
        if not res.ok:
            raise StateError(f"systemctl show {self.name} failed: {output_tail(res)}")
        self.props = dict(line.partition("=")[::2] for line in res.stdout.splitlines() if "=" in line)
        self.id = self.props.get("Id") or self.name

    def daemon_reload(self) -> None:
        res = self.ctx.run(["systemctl", "daemon-reload"])
        if not res.ok:
            raise StateError(f"systemctl daemon-reload failed: {output_tail(res)}")
        self.daemon_reloaded = True
        self.refresh()

    @property
    def missing(self) -> bool:
        return self.props.get("LoadState") == "not-found"

    @property
    def masked(self) -> bool:
        return self.props.get("LoadState") == "masked"

    @property
    def active(self) -> bool:
        return self.props.get("ActiveState") in RUNNING

    @property
    def enabled_state(self) -> str:
        res = self.ctx.run(["systemctl", "is-enabled", "--", self.id])
        return res.stdout.strip().splitlines()[0] if res.stdout.strip() else "unknown"

    def last_words(self) -> str:
        """The unit's last journal lines, for a failure message ("" when there are none)."""
        journal = self.ctx.run(["journalctl", "--no-pager", "-o", "cat", "-n", "8", "-u", self.id])
        return journal.stdout.strip() if journal.ok else ""

    def systemctl(self, verb: str) -> None:
        res = self.ctx.run(["systemctl", verb, "--", self.id], timeout=600)
        if not res.ok:
            detail = output_tail(res, 4)
            journal = self.last_words()
            if journal:
                detail += "\njournal:\n" + journal
            raise _Failed(f"systemctl {verb} {self.id} failed: {detail}")
        self.refresh()


# How long a unit just started or restarted must stay up before the state calls it running: a daemon
# that reads a bad config and exits (slurmd: a few hundred ms after start, more under qemu-user)
# would otherwise pass as started, and show up dead only in `systemctl --failed`.
START_SETTLE_S = 2.0


def _stays_up(unit: _Unit, verb: str) -> None:
    if unit.active and START_SETTLE_S > 0:
        time.sleep(START_SETTLE_S)
        unit.refresh()
        if not unit.active:
            raise _Failed(f"{unit.id} stopped within {START_SETTLE_S:g} s of its {verb} "
                          f"({unit.props.get('ActiveState')}); journal:\n{unit.last_words() or '(nothing)'}")
    if not unit.active:
        raise _Failed(f"{unit.id} is {unit.props.get('ActiveState')} right after starting")


class _Failed(Exception):
    """A systemctl action failed after other changes were made: report them with the failure."""


def _reload_if_needed(unit: _Unit, out: Outcome) -> None:
    if unit.props.get("NeedDaemonReload") == "yes":
        if not unit.ctx.test:
            unit.daemon_reload()
        out.change("daemon_reload", True, "daemon-reload", "daemon-reloaded")
    elif unit.daemon_reloaded:
        out.change("daemon_reload", True, "daemon-reload", "daemon-reloaded")


def _enable(unit: _Unit, enable: bool | None, out: Outcome) -> None:
    """Make the unit enabled (True) or disabled (False) at boot; None: leave it."""
    if enable is None:
        return
    state = unit.enabled_state
    if enable:
        if state in ENABLED:
            return
        if state in NOT_ENABLEABLE:
            out.note(f"{unit.id} is {state}: it cannot be enabled itself")
            return
        if state.startswith("masked"):
            raise StateError(f"{unit.id} is masked (systemctl unmask {unit.id})")
        out.change("enabled", True, "enable", "enabled")
        if not unit.ctx.test:
            unit.systemctl("enable")
            if unit.enabled_state not in ENABLED:
                raise _Failed(f"systemctl enable {unit.id} did not enable it (is-enabled: {unit.enabled_state})")
    else:
        if state in NOT_ENABLEABLE or state == "disabled" or state.startswith("masked"):
            return
        out.change("enabled", False, "disable", "disabled")
        if not unit.ctx.test:
            unit.systemctl("disable")


def running(ctx: StateContext, name: str, enable: bool | None = None, reload: bool = False) -> dict:
    """A systemd unit running now (started if stopped; restarted when a watched state changed).

    With a ``watch`` requisite (Salt's mod_watch), a change in a watched state -- the unit's config
    file, its package -- restarts the running unit (or reloads it, with ``reload: true``). A unit
    it starts or restarts must still run 2 s later, or the state fails with the unit's last journal
    lines (a daemon that exits on a bad config is not reported as started).

    Arguments:
      name: the unit (default: the state's id); ``chrony`` means ``chrony.service``.
      enable: true to also enable it at boot, false to disable it; default: leave as is.
      reload: on a watched change, ``systemctl reload`` instead of restart (when the unit can).

    Example::

        chrony:
          service.running:
            - enable: true
            - watch:
              - file: /etc/chrony/chrony.conf
    """
    unit = _Unit(ctx, name)
    if unit.missing:
        if ctx.test:  # an earlier pkg.installed in the same run may bring it
            out = Outcome(ctx, name)
            out.change("started", True, f"start {name} (unit not present yet)")
            if enable is not None:
                out.change("enabled", enable)
            return out.result()
        return Outcome(ctx, name).fail(f"no unit {name} on this node")
    if unit.masked:
        raise StateError(f"{unit.id} is masked (systemctl unmask {unit.id})")
    out = Outcome(ctx, name, after=f" {unit.id}")
    try:
        _reload_if_needed(unit, out)
        _enable(unit, enable, out)
        if not unit.active:
            out.change("started", True, "start", "started")
            if not ctx.test:
                unit.systemctl("start")
                _stays_up(unit, "start")
        elif ctx.watch_changed:
            verb = "reload" if reload and unit.props.get("CanReload") == "yes" else "restart"
            out.change(f"{verb}ed", True, verb, f"{verb}ed")
            if not ctx.test:
                unit.systemctl(verb)
                if verb == "restart":
                    _stays_up(unit, verb)
    except _Failed as exc:
        return out.fail(str(exc))
    return out.result(f"{unit.id} is running")


def dead(ctx: StateContext, name: str, enable: bool | None = None) -> dict:
    """A systemd unit stopped now (and, with enable: false, not started at boot either).

    A unit that does not exist counts as dead.

    Arguments:
      name: the unit (default: the state's id).
      enable: false to also disable it at boot, true to keep it enabled; default: leave as is.

    Example::

        bluetooth:
          service.dead:
            - enable: false
    """
    unit = _Unit(ctx, name)
    if unit.missing:
        return Outcome(ctx, name).result(f"no unit {name} on this node: nothing to stop")
    out = Outcome(ctx, name, after=f" {unit.id}")
    try:
        _reload_if_needed(unit, out)
        if unit.props.get("ActiveState") in RUNNING | {"activating", "deactivating"}:
            out.change("stopped", True, "stop", "stopped")
            if not ctx.test:
                unit.systemctl("stop")
        _enable(unit, enable, out)
    except _Failed as exc:
        return out.fail(str(exc))
    return out.result(f"{unit.id} is stopped")


def enabled(ctx: StateContext, name: str) -> dict:
    """A systemd unit enabled at boot (systemctl enable); whether it runs now is left alone.

    Arguments:
      name: the unit (default: the state's id).

    Example::

        ssh:
          service.enabled
    """
    unit = _Unit(ctx, name)
    if unit.missing:
        out = Outcome(ctx, name)
        if ctx.test:
            out.change("enabled", True, f"enable {name} (unit not present yet)")
            return out.result()
        return out.fail(f"no unit {name} on this node")
    return _boot_state(unit, name, True, f"{unit.id} is enabled")


def _boot_state(unit: _Unit, name: str, enable: bool, unchanged: str) -> dict:
    out = Outcome(unit.ctx, name, after=f" {unit.id}")
    try:
        _reload_if_needed(unit, out)
        _enable(unit, enable, out)
    except _Failed as exc:
        return out.fail(str(exc))
    return out.result(unchanged)


def disabled(ctx: StateContext, name: str) -> dict:
    """A systemd unit not started at boot (systemctl disable); whether it runs now is left alone.

    A unit that does not exist counts as disabled.

    Arguments:
      name: the unit (default: the state's id).

    Example::

        apt-daily.timer:
          service.disabled
    """
    unit = _Unit(ctx, name)
    if unit.missing:
        return Outcome(ctx, name).result(f"no unit {name} on this node: nothing to disable")
    return _boot_state(unit, name, False, f"{unit.id} is disabled")
