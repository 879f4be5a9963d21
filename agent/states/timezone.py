"""timezone: the system's time zone and how the hardware clock is read (Salt's timezone.system).

When systemd runs, through timedatectl (systemd-timedated sets /etc/localtime and tells the
running system). Without systemd (a container, an early boot), as Debian's tzdata does it:
/etc/localtime a symlink to /usr/share/zoneinfo/NAME and the zone's name in /etc/timezone, which
Debian tools still read; the hardware clock's mode in /etc/adjtime.
"""

from __future__ import annotations

import os
import re

from .base import Outcome, StateContext, StateError, output_tail, read_text, systemd_running, update_file
from .file import make_symlink

__states__ = ("system",)

ZONEINFO = "/usr/share/zoneinfo"
LOCALTIME = "/etc/localtime"
TIMEZONE_FILE = "/etc/timezone"
ADJTIME = "/etc/adjtime"
# IANA names: Europe/Berlin, America/Argentina/Buenos_Aires, Etc/GMT+1, UTC. No "..", no option.
ZONE_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_+-]*(/[A-Za-z0-9_][A-Za-z0-9_+-]*)*\Z")


def _check_zone(name: str) -> None:
    if not ZONE_RE.match(name):
        raise StateError(f"{name!r} is not a time zone name like Europe/Berlin")
    path = os.path.join(ZONEINFO, name)
    try:
        with open(path, "rb") as fh:
            if fh.read(4) == b"TZif":
                return
    except OSError:
        pass
    raise StateError(f"unknown time zone {name!r}: no zone file {path} (package tzdata)")


def linked_zone() -> str | None:
    """The zone /etc/localtime links to (absolute or relative link), or None (a copy, or none)."""
    try:
        target = os.readlink(LOCALTIME)
    except OSError:
        return None
    resolved = os.path.normpath(os.path.join(os.path.dirname(LOCALTIME), target))
    prefix = ZONEINFO.rstrip("/") + "/"
    return resolved[len(prefix):] if resolved.startswith(prefix) else None


def rtc_is_local(adjtime: str | None) -> bool:
    """Whether /etc/adjtime's third line says LOCAL (missing file or line: UTC, as hwclock reads it)."""
    lines = (adjtime or "").splitlines()
    return len(lines) >= 3 and lines[2].strip() == "LOCAL"


def set_rtc_mode(adjtime: str | None, local: bool) -> str:
    """/etc/adjtime's text with the third line LOCAL or UTC (a new file in hwclock's format)."""
    lines = (adjtime or "0.0 0 0.0\n0\n").splitlines()
    lines += ["0.0 0 0.0", "0"][len(lines):2]
    lines[2:3] = ["LOCAL" if local else "UTC"]
    return "\n".join(lines) + "\n"


def system(ctx: StateContext, name: str, utc: bool = True) -> dict:
    """The system's time zone, e.g. Europe/Berlin (Salt's timezone.system).

    With systemd running it is set with ``timedatectl set-timezone``; otherwise /etc/localtime is
    made a symlink to /usr/share/zoneinfo/NAME. /etc/timezone, which Debian tools still read, is
    kept to the same name (written without systemd; with systemd, corrected if it exists and
    differs). ``utc`` says whether the hardware clock (a Pi 5's RTC, or any RTC module) keeps UTC
    or local time.

    Arguments:
      name: the zone's IANA name, as in /usr/share/zoneinfo (default: the state's id), e.g.
        ``Europe/Berlin`` or ``UTC``.
      utc: true (default, as in Salt) for a hardware clock in UTC, false for local time
        (``timedatectl set-local-rtc``; without systemd, the third line of /etc/adjtime).

    Example::

        Europe/Berlin:
          timezone.system
        cluster-time:
          timezone.system:
            - name: UTC
            - utc: true
    """
    _check_zone(name)
    out = Outcome(ctx, name)
    if systemd_running():
        res = ctx.run(["timedatectl", "show", "--property=Timezone", "--property=LocalRTC"])
        if not res.ok:
            raise StateError(f"timedatectl show failed: {output_tail(res)}")
        props = dict(line.partition("=")[::2] for line in res.stdout.splitlines() if "=" in line)
        current, local_rtc = props.get("Timezone", ""), props.get("LocalRTC") == "yes"
        # timedated remembers the zone it last saw until it exits idle: /etc/localtime changed
        # meanwhile (by hand, by a package) is what the system uses, so it decides too.
        linked = linked_zone()
        if linked is not None and linked != current:
            current = linked
        if current != name:
            out.change("timezone", name, f"set the time zone to {name} (from {current or 'none'})",
                       f"set the time zone to {name} (from {current or 'none'})")
            failed = _timedatectl(ctx, ["set-timezone", name])
            if failed:
                out.changes.clear()
                return out.fail(failed)
            if not ctx.test and linked_zone() not in (None, name):
                # timedated believed the zone was already set, so it left /etc/localtime as it was.
                make_symlink(LOCALTIME, os.path.join(ZONEINFO, name), None, None)
        if local_rtc == utc:
            mode = "UTC" if utc else "local time"
            out.change("utc", utc, f"set the hardware clock to {mode}", f"set the hardware clock to {mode}")
            failed = _timedatectl(ctx, ["set-local-rtc", "0" if utc else "1"])
            if failed:
                del out.changes["utc"]
                return out.fail(failed)
        # Debian's timedated writes /etc/timezone too; an older or newer one may not: keep it agreeing.
        old = read_text(TIMEZONE_FILE)
        if old is not None and old.strip() != name:
            out.update(update_file(ctx, TIMEZONE_FILE, old, name + "\n"), f"write {name} to {TIMEZONE_FILE}",
                       f"wrote {name} to {TIMEZONE_FILE}")
        return out.result(f"the time zone is {name}")

    current = linked_zone()
    if current != name:
        shown = current or ("a copied zone file" if os.path.lexists(LOCALTIME) else "none")
        out.change("timezone", name, f"set the time zone to {name} (from {shown})",
                   f"set the time zone to {name} (from {shown})")
        if not ctx.test:
            if os.path.isfile(LOCALTIME) and not os.path.islink(LOCALTIME):
                ctx.backup(LOCALTIME)
            # Absolute, as Debian's tzdata makes it; replaced in one rename.
            make_symlink(LOCALTIME, os.path.join(ZONEINFO, name), None, None)
    old = read_text(TIMEZONE_FILE)
    if old is None or old.strip() != name:
        out.update(update_file(ctx, TIMEZONE_FILE, old, name + "\n"), f"write {name} to {TIMEZONE_FILE}",
                   f"wrote {name} to {TIMEZONE_FILE}")
    adjtime = read_text(ADJTIME)
    if rtc_is_local(adjtime) == utc:
        out.change("utc", utc)
        out.update(update_file(ctx, ADJTIME, adjtime, set_rtc_mode(adjtime, not utc)),
                   f"set the hardware clock to {'UTC' if utc else 'local time'} in {ADJTIME}",
                   f"set the hardware clock to {'UTC' if utc else 'local time'} in {ADJTIME}")
    return out.result(f"the time zone is {name}")


def _timedatectl(ctx: StateContext, args: list[str]) -> str | None:
    """Run ``timedatectl ARGS`` (not in test mode); why it failed, or None."""
    if ctx.test:
        return None
    res = ctx.run(["timedatectl", *args], timeout=120)
    return None if res.ok else f"timedatectl {' '.join(args)} failed: {output_tail(res, 4)}"
