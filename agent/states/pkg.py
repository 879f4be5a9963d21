"""pkg: Debian packages through apt (non-interactive, keeping changed config files).

The package lists are refreshed (``apt-get update``) before an install when they are older than a
day, and once more when apt does not know a package; a refresh that fails (no network) is noted
and the install tried with the lists there are. The installed state is read with dpkg-query.
"""

from __future__ import annotations

import os
import re
import time

from .base import Outcome, StateContext, StateError, Text, output_tail

__states__ = ("installed", "removed", "purged", "held", "unheld")

LISTS_DIR = "/var/lib/apt/lists"
LISTS_MAX_AGE_S = 24 * 3600
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "APT_LISTCHANGES_FRONTEND": "none", "NEEDRESTART_MODE": "a"}
APT_OPTIONS = ["-y", "-q",
               # Keep a config file a person (or a file.managed state) changed; never ask.
               "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
               # Wait for a running unattended-upgrade instead of failing on the lock at once.
               "-o", "DPkg::Lock::Timeout=300"]
APT_TIMEOUT_S = 3600
NOT_FOUND_RE = re.compile(r"Unable to locate package|has no installation candidate|"
                          r"Version '[^']*' for '[^']*' was not found|Couldn't find any package")
PACKAGE_RE = re.compile(r"\A[a-z0-9][a-z0-9+.-]*(:[a-z0-9-]+)?\Z")
VERSION_RE = re.compile(r"\A[A-Za-z0-9.+~:-]+\Z")
# dpkg's status field: these count as "on the system" (removing them makes sense).
PRESENT_STATUSES = {"installed", "half-configured", "unpacked", "half-installed", "triggers-awaited",
                    "triggers-pending"}


def _targets(name: str, pkgs: list | None, version: Text | None) -> dict[str, str | None]:
    """{package: wanted version or None} from name/version or a pkgs list (names or {name: version})."""
    if pkgs is None:
        found = {str(name): None if version is None else str(version)}
    else:
        if version is not None:
            raise StateError("version goes with a single package; in pkgs write `- NAME: VERSION`")
        if not pkgs:
            raise StateError("pkgs must be a non-empty list of package names")
        found = {}
        for item in pkgs:
            if isinstance(item, dict) and len(item) == 1:
                (pkg, ver), = item.items()
                found[str(pkg)] = None if ver is None else str(ver)
            elif isinstance(item, str):
                found[item] = None
            else:
                raise StateError(f"each entry of pkgs is a name or `NAME: VERSION`, not {item!r}")
    for pkg, ver in found.items():
        if not PACKAGE_RE.match(pkg):
            raise StateError(f"{pkg!r} is not a Debian package name")
        if ver is not None and not VERSION_RE.match(ver):
            raise StateError(f"{ver!r} is not a Debian version (for {pkg})")
    return found


def _query(ctx: StateContext, pkg: str) -> tuple[str, str, str] | None:
    """(want, status, version) from dpkg, e.g. ("hold", "installed", "1.2-3"); None if dpkg never heard of it."""
    res = ctx.run(["dpkg-query", "-W", "-f=${Status}\t${Version}\n", pkg])
    if res.returncode == 127:
        raise StateError("dpkg-query not found: pkg states need a Debian system")
    line = res.stdout.strip().splitlines()[0] if res.ok and res.stdout.strip() else ""
    status, _, ver = line.partition("\t")
    words = status.split()
    if len(words) != 3:
        return None
    return words[0], words[2], ver


def _installed_version(ctx: StateContext, pkg: str) -> str | None:
    info = _query(ctx, pkg)
    return info[2] if info and info[1] == "installed" else None


def _candidate(ctx: StateContext, pkg: str) -> str | None:
    res = ctx.run(["apt-cache", "policy", pkg])
    for line in res.stdout.splitlines():
        if line.strip().startswith("Candidate:"):
            value = line.split(":", 1)[1].strip()
            return None if value == "(none)" else value
    return None


def _lists_age_s() -> float:
    newest = 0.0
    try:
        for entry in os.scandir(LISTS_DIR):
            if entry.is_file() and entry.name != "lock":
                newest = max(newest, entry.stat().st_mtime)
    except OSError:
        pass
    return time.time() - newest if newest else float("inf")


def _apt_get(ctx: StateContext, *args: str):
    return ctx.run(["apt-get", *APT_OPTIONS, *args], env=APT_ENV, timeout=APT_TIMEOUT_S)


class _Refresher:
    """apt-get update at most once per state; remembers a failure for the comment."""

    def __init__(self, ctx: StateContext) -> None:
        self.ctx, self.done, self.notes = ctx, False, []

    def __call__(self, why: str) -> None:
        if self.done:
            return
        self.done = True
        # Without --error-on=any, apt-get update exits 0 when every download failed (keeping the old lists).
        res = _apt_get(self.ctx, "update", "--error-on=any")
        if not res.ok:
            # Offline (a lab node, a Pi without uplink): go on with the lists there are.
            tail = output_tail(res, 2).replace("\n", " ")
            self.notes.append(f"apt-get update ({why}) failed: {tail}")
        else:
            self.notes.append(f"package lists refreshed ({why})")


def _set_hold(ctx: StateContext, pkgs: list[str], hold: bool) -> None:
    res = ctx.run(["apt-mark", "hold" if hold else "unhold", *pkgs])
    if not res.ok:
        raise StateError(f"apt-mark {'hold' if hold else 'unhold'} failed: {output_tail(res)}")


def _names(pkgs) -> str:
    return ", ".join(pkgs)


def _installed(info: tuple[str, str, str] | None) -> str | None:
    """The installed version from dpkg's (want, status, version), None if not installed."""
    return info[2] if info and info[1] == "installed" else None


def _missing(targets: dict[str, str | None], current: dict) -> list[str]:
    """The packages not installed (at the version wanted, if one is)."""
    return [pkg for pkg, version in targets.items()
            if _installed(current[pkg]) is None or (version is not None and current[pkg][2] != version)]


def _hold_changes(targets, current: dict, hold: bool | None) -> list[str]:
    """The packages whose hold differs from ``hold`` (None: holds are left alone)."""
    if hold is None:
        return []
    return [pkg for pkg in targets if (current[pkg] is not None and current[pkg][0] == "hold") != hold]


def installed(ctx: StateContext, name: str, pkgs: list | None = None, version: Text | None = None,
              hold: bool | None = None, refresh: bool | None = None) -> dict:
    """Packages installed (at a version, if given), through apt-get, non-interactively.

    Changed config files are kept (``--force-confold``); the lists are refreshed first when older
    than a day and again when apt does not know a package.

    Arguments:
      name: the package (default: the state's id); ignored when ``pkgs`` is given.
      pkgs: a list of packages to install in one apt-get run; an entry may be ``NAME: VERSION``.
      version: the exact Debian version wanted for ``name`` (downgrades allowed).
      hold: true to hold the packages after installing (``apt-mark hold``), false to release a
        hold; default: leave holds alone.
      refresh: true to ``apt-get update`` before installing even when the lists are fresh, false
        never to; default: when they are older than a day or a package is not found. Nothing is
        refreshed when everything is installed already.

    Example::

        slurm:
          pkg.installed:
            - pkgs: [munge, slurmd, slurm-client]
        chrony:
          pkg.installed:
            - version: 4.3-2+deb12u1
            - hold: true
    """
    targets = _targets(name, pkgs, version)
    current = {pkg: _query(ctx, pkg) for pkg in targets}
    missing = _missing(targets, current)
    out = Outcome(ctx, name)
    if missing:
        if ctx.test:
            out.change("installed", _forecast(ctx, out, targets, current, missing),
                       f"install {_names(missing)}")
        else:
            failure = _install(ctx, out, targets, current, missing, refresh)
            if failure:
                return failure
    hold_change = _hold_changes(targets, current, hold)
    if hold_change:
        if not ctx.test:
            _set_hold(ctx, hold_change, hold)
        verb, key = ("hold", "held") if hold else ("unhold", "unheld")
        out.change(key, hold_change, f"{verb} {_names(hold_change)}", f"{key} {_names(hold_change)}")
    return out.result(f"{_names(targets)}: installed as wanted")


def _forecast(ctx: StateContext, out: Outcome, targets: dict, current: dict, missing: list[str]) -> dict:
    """Test mode: what an install would do, per package {"old": version, "new": candidate}."""
    forecast = {}
    for pkg in missing:
        candidate = targets[pkg] or _candidate(ctx, pkg)
        if candidate is None:
            out.note(f"{pkg} is not in the package lists (a refresh may find it)")
        forecast[pkg] = {"old": _installed(current[pkg]), "new": candidate or "latest"}
    return forecast


def _install(ctx: StateContext, out: Outcome, targets: dict, current: dict, missing: list[str],
             refresh: bool | None) -> dict | None:
    """apt-get install the missing packages (refreshing the lists when due); updates ``current``.
    The failed result, or None when they are installed."""
    refresher = _Refresher(ctx)
    if refresh or (refresh is None and _lists_age_s() > LISTS_MAX_AGE_S):
        refresher("always" if refresh else "lists older than a day")
    args = ["install"] + (["--allow-downgrades"] if any(targets[p] for p in missing) else [])
    args += [f"{pkg}={targets[pkg]}" if targets[pkg] else pkg for pkg in missing]
    res = _apt_get(ctx, *args)
    if not res.ok and refresh is not False and not refresher.done and NOT_FOUND_RE.search(res.stdout + res.stderr):
        refresher("a package was not found")
        res = _apt_get(ctx, *args)
    if not res.ok:
        notes = "; ".join(refresher.notes)
        return out.fail(f"apt-get install {' '.join(args[1:])} failed" + (f" ({notes})" if notes else "")
                        + f":\n{output_tail(res)}")
    installed_now = {}
    for pkg in missing:
        info = _query(ctx, pkg)
        new = _installed(info)
        if new is None or (targets[pkg] and new != targets[pkg]):
            if installed_now:
                out.change("installed", installed_now)
            return out.fail(f"apt-get succeeded but {pkg} is not installed"
                            + (f" at {targets[pkg]}" if targets[pkg] else
                               " (a virtual package? name the package that provides it)"))
        installed_now[pkg] = {"old": _installed(current[pkg]), "new": new}
        current[pkg] = info
    out.change("installed", installed_now, "", f"installed {_names(installed_now)}")
    for note in refresher.notes:
        out.note(note)
    return None


def _remove(ctx: StateContext, name: str, pkgs, purge: bool) -> dict:
    targets = _targets(name, pkgs, None)
    verb = "purge" if purge else "remove"

    def present(pkg: str) -> bool:
        info = _query(ctx, pkg)
        # purge also clears what `remove` leaves: config files (status config-files).
        return bool(info) and (info[1] in PRESENT_STATUSES or (purge and info[1] != "not-installed"))

    before = {pkg: _installed_version(ctx, pkg) for pkg in targets}
    to_remove = [pkg for pkg in targets if present(pkg)]
    out = Outcome(ctx, name)
    if to_remove and not ctx.test:
        res = _apt_get(ctx, verb, *to_remove)
        if not res.ok:
            return out.fail(f"apt-get {verb} {' '.join(to_remove)} failed:\n{output_tail(res)}")
        still = [pkg for pkg in to_remove if present(pkg)]
        if still:
            return out.fail(f"apt-get succeeded but {_names(still)} is still there")
    if to_remove:
        out.change(f"{verb}d", {pkg: {"old": before[pkg], "new": None} for pkg in to_remove},
                   f"{verb} {_names(to_remove)}", f"{verb}d {_names(to_remove)}")
    return out.result(f"{_names(targets)}: not installed")


def removed(ctx: StateContext, name: str, pkgs: list | None = None) -> dict:
    """Packages not installed (apt-get remove; their config files stay, see pkg.purged).

    Arguments:
      name: the package (default: the state's id); ignored when ``pkgs`` is given.
      pkgs: a list of packages to remove in one apt-get run.

    Example::

        triggerhappy:
          pkg.removed
    """
    return _remove(ctx, name, pkgs, purge=False)


def purged(ctx: StateContext, name: str, pkgs: list | None = None) -> dict:
    """Packages not installed and their config files gone (apt-get purge).

    Arguments:
      name: the package (default: the state's id); ignored when ``pkgs`` is given.
      pkgs: a list of packages to purge in one apt-get run.

    Example::

        old-stuff:
          pkg.purged:
            - pkgs: [dphys-swapfile, triggerhappy]
    """
    return _remove(ctx, name, pkgs, purge=True)


def _hold_state(ctx: StateContext, name: str, pkgs, hold: bool) -> dict:
    targets = list(_targets(name, pkgs, None))
    verb = "hold" if hold else "unhold"
    info = {pkg: _query(ctx, pkg) for pkg in targets}
    not_installed = [pkg for pkg in targets if not info[pkg] or info[pkg][1] not in PRESENT_STATUSES]
    out = Outcome(ctx, name)
    if not_installed and hold:
        if ctx.test:  # an earlier pkg.installed in the same run may install it
            out.change("held", targets, f"hold {_names(targets)} ({_names(not_installed)} not installed yet)")
            return out.result()
        raise StateError(f"{_names(not_installed)} not installed (pkg.installed with hold: true installs and holds)")
    to_change = [pkg for pkg in targets if info[pkg] and (info[pkg][0] == "hold") != hold]
    key = "held" if hold else "unheld"
    if to_change:
        if not ctx.test:
            _set_hold(ctx, to_change, hold)
        out.change(key, to_change, f"{verb} {_names(to_change)}", f"{key} {_names(to_change)}")
    return out.result(f"{_names(targets)}: {'held' if hold else 'not held'}")


def held(ctx: StateContext, name: str, pkgs: list | None = None) -> dict:
    """Installed packages held at their version (apt-mark hold): upgrades leave them alone.

    Arguments:
      name: the package (default: the state's id); ignored when ``pkgs`` is given.
      pkgs: a list of packages to hold.

    Example::

        raspberrypi-kernel:
          pkg.held
    """
    return _hold_state(ctx, name, pkgs, True)


def unheld(ctx: StateContext, name: str, pkgs: list | None = None) -> dict:
    """Packages not held (apt-mark unhold): upgrades may replace them again.

    Arguments:
      name: the package (default: the state's id); ignored when ``pkgs`` is given.
      pkgs: a list of packages to release.

    Example::

        raspberrypi-kernel:
          pkg.unheld
    """
    return _hold_state(ctx, name, pkgs, False)
