"""swap: no swap, now and after reboots (SD cards wear out under swap; Kubernetes wants none)."""

from __future__ import annotations

import os

from . import file as file_states
from . import service
from .base import Outcome, StateContext, StateError, output_tail, read_text, update_file
from .mount import FSTAB, _unescape, parse_fstab_line

__states__ = ("off",)

PROC_SWAPS = "/proc/swaps"
DPHYS_CONF = "/etc/dphys-swapfile"
DPHYS_UNIT = "dphys-swapfile.service"
DPHYS_DEFAULT_SWAPFILE = "/var/swap"


def _active_swaps() -> list[str]:
    try:
        with open(PROC_SWAPS) as fh:
            rows = fh.read().splitlines()[1:]  # header: Filename Type Size Used Priority
    except FileNotFoundError:
        return []
    return [_unescape(row.split()[0]) for row in rows if row.strip()]


def _dphys_swapfile_path(conf_text: str | None) -> str:
    path = DPHYS_DEFAULT_SWAPFILE
    for line in (conf_text or "").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "CONF_SWAPFILE":
            path = value.strip().strip("'\"") or path
    return path


def off(ctx: StateContext, name: str) -> dict:
    """No swap: active swap turned off, dphys-swapfile disabled, fstab swap lines commented out.

    In order: ``swapoff`` for every swap in /proc/swaps; when Raspberry Pi OS's dphys-swapfile is
    there, its service stopped and disabled, ``CONF_SWAPSIZE=0`` in /etc/dphys-swapfile (so that a
    re-enabled service makes no swap file) and its swap file (``/var/swap``) removed, like
    ``dphys-swapfile uninstall``; swap entries of /etc/fstab commented out (``#`` in front).

    Arguments:
      name: an id for the state; not used otherwise.

    Example::

        no-swap:
          swap.off
    """
    out = Outcome(ctx, name)
    active = _active_swaps()
    if active:
        devices = ", ".join(active)
        out.change("swapoff", active, f"turn off swap on {devices}", f"turned off swap on {devices}")
        if not ctx.test:
            for device in active:
                res = ctx.run(["swapoff", device], timeout=1800)
                if not res.ok:
                    return out.fail(f"swapoff {device} failed: {output_tail(res, 4)}")

    conf_text = read_text(DPHYS_CONF)
    has_unit = service.unit_file_on_disk(DPHYS_UNIT)
    if has_unit:
        try:
            stopped = service.dead(ctx, DPHYS_UNIT, enable=False)
        except StateError as exc:  # no systemd: the unit does not run anyway
            out.note(f"dphys-swapfile service left alone: {exc}")
        else:
            if stopped["result"] is False:
                return out.fail(f"dphys-swapfile: {stopped['comment']}")
            if stopped["changes"]:
                out.change("dphys-swapfile", stopped["changes"], "stop/disable dphys-swapfile",
                           "stopped/disabled dphys-swapfile")
    if conf_text is not None:
        conf = file_states.line(ctx, DPHYS_CONF, key="CONF_SWAPSIZE", value="0")
        if conf["changes"]:
            out.change(DPHYS_CONF, conf["changes"], f"set CONF_SWAPSIZE=0 in {DPHYS_CONF}",
                       f"set CONF_SWAPSIZE=0 in {DPHYS_CONF}")
    if conf_text is not None or has_unit:
        swapfile = _dphys_swapfile_path(conf_text)
        if os.path.isfile(swapfile) and swapfile not in active:
            if not ctx.test:
                try:
                    os.unlink(swapfile)
                except OSError as exc:
                    raise StateError(f"cannot remove {swapfile}: {exc.strerror}") from None
            out.change("removed", swapfile, f"remove the swap file {swapfile}", f"removed the swap file {swapfile}")

    old = read_text(FSTAB)
    if old is not None:
        fstab_changes = update_file(ctx, FSTAB, old, comment_out_swap(old))
        if fstab_changes:
            out.change(FSTAB, fstab_changes, "comment out fstab's swap lines", "commented out fstab's swap lines")
    return out.result("swap is off")


def comment_out_swap(fstab: str) -> str:
    """fstab's text with its swap entries commented out (``#`` in front)."""
    lines = fstab.splitlines(keepends=True)
    for i, line in enumerate(lines):
        entry = parse_fstab_line(line)
        if entry is not None and entry.fstype == "swap":
            lines[i] = "#" + line
    return "".join(lines)
