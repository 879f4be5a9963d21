"""mount: file systems mounted now and listed in /etc/fstab, or neither.

fstab is edited line by line: other entries, comments and blank lines stay byte for byte.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .base import Outcome, StateContext, Text, StateError, absolute_path, output_tail, read_text, update_file

__states__ = ("mounted", "unmounted")

FSTAB = "/etc/fstab"
MOUNTINFO = "/proc/self/mountinfo"
# What the kernel reports for a type fstab may name otherwise.
SAME_FSTYPE = {"nfs": {"nfs", "nfs4"}, "nfs4": {"nfs", "nfs4"}, "vfat": {"vfat", "msdos"}}


def _unescape(field: str) -> str:
    # fstab and mountinfo write space, tab, newline and backslash as \040 \011 \012 \134.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _escape(text: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in text)


@dataclass
class FstabEntry:
    device: str
    mount_point: str
    fstype: str
    opts: list[str]
    dump: int
    pass_num: int

    def line(self) -> str:
        return (f"{_escape(self.device)} {_escape(self.mount_point)} {self.fstype} {','.join(self.opts)} "
                f"{self.dump} {self.pass_num}\n")


def parse_fstab_line(text: str) -> FstabEntry | None:
    """The entry on an fstab line, None for comments, blank and malformed lines (left alone)."""
    fields = text.split("#", 1)[0].split() if not text.lstrip().startswith("#") else []
    if len(fields) < 3:
        return None
    try:
        dump = int(fields[4]) if len(fields) > 4 else 0
        pass_num = int(fields[5]) if len(fields) > 5 else 0
    except ValueError:
        return None
    opts = fields[3].split(",") if len(fields) > 3 else ["defaults"]
    return FstabEntry(_unescape(fields[0]), _unescape(fields[1]), fields[2], opts, dump, pass_num)


def fstab_with(text: str, entry: FstabEntry) -> str:
    """fstab's text with ``entry`` for its mount point: the first line for that mount point
    replaced when it differs (later ones removed: they would fight it), else appended."""
    lines = text.splitlines(keepends=True)
    hits = [i for i, ln in enumerate(lines)
            if (e := parse_fstab_line(ln)) is not None and os.path.normpath(e.mount_point) == entry.mount_point]
    if hits:
        if parse_fstab_line(lines[hits[0]]) != entry:
            lines[hits[0]] = entry.line()
        for i in reversed(hits[1:]):
            del lines[i]
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(entry.line())
    return "".join(lines)


def fstab_without(text: str, mount_point: str, device: str | None = None) -> str:
    """fstab's text without the entries for ``mount_point`` (only ``device``'s, if given)."""
    return "".join(ln for ln in text.splitlines(keepends=True)
                   if (e := parse_fstab_line(ln)) is None or os.path.normpath(e.mount_point) != mount_point
                   or (device is not None and e.device != device))


def _mounted_at(mount_point: str) -> dict | None:
    """The file system mounted on mount_point now (the top one), from /proc/self/mountinfo."""
    found = None
    try:
        with open(MOUNTINFO) as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) >= 5 and len(tail) >= 2 and _unescape(fields[4]) == mount_point:
                    found = {"fstype": tail[0], "source": _unescape(tail[1]), "root": _unescape(fields[3])}
    except OSError as exc:
        raise StateError(f"cannot read {MOUNTINFO}: {exc.strerror}") from None
    return found


def _options(opts: str | list) -> list[str]:
    if isinstance(opts, str):
        items = opts.split(",")
    elif all(isinstance(o, str) for o in opts):
        items = opts
    else:
        raise StateError(f"opts must be a comma-separated string or a list, not {opts!r}")
    items = [o.strip() for o in items]
    if not items or not all(items) or any(re.search(r"\s", o) for o in items):
        raise StateError(f"opts {opts!r} has an empty option or blanks in one")
    return items


def _small_int(value: int | str, what: str) -> int:
    if not str(value).isdigit():
        raise StateError(f"{what} must be a number, not {value!r}")
    return int(value)


def _word(value: str, what: str) -> str:
    if not value or re.search(r"\s", value):
        raise StateError(f"{what} must be a non-empty word, not {value!r}")
    return value


def mounted(ctx: StateContext, name: str, device: str, fstype: str, opts: str | list[str] = "defaults",
            dump: int | str = 0, pass_num: int | str = 0, config: str = FSTAB, persist: bool = True,
            mkmnt: bool = False) -> dict:
    """A file system mounted now and (with persist) listed in /etc/fstab for the next boot.

    The fstab entry for the mount point is replaced in place when it differs (other entries,
    comments and blank lines stay as they are), or appended. A file system already mounted there is
    left mounted: changed ``opts`` take effect at the next mount (``mount -o remount`` is yours to
    run); a different file system type there is an error.

    Arguments:
      name: the mount point (default: the state's id).
      device: what to mount: ``/dev/sda1``, ``UUID=...``, ``LABEL=...``, ``server:/export`` (NFS),
        ``tmpfs``, or a directory for a bind mount (with ``opts: bind``).
      fstype: the file system type: ext4, vfat, nfs, tmpfs, none (bind mounts), ...
      opts: mount options, a comma-separated string or a list (default ``defaults``).
      dump, pass_num: fstab's fifth and sixth fields (default 0 and 0).
      config: the fstab file, default /etc/fstab.
      persist: keep the entry in fstab, default true; false mounts now only.
      mkmnt: create the mount point directory if missing, default false.

    Example::

        /srv/shared:
          mount.mounted:
            - device: node01:/srv/shared
            - fstype: nfs
            - opts: [rw, hard, _netdev]
            - mkmnt: true
    """
    mount_point = absolute_path(name)
    if not device.strip() or "\n" in device:
        raise StateError(f"device must name what to mount, not {device!r}")
    fstype = _word(fstype, "fstype")
    options = _options(opts)
    wanted = FstabEntry(device, mount_point, fstype, options, _small_int(dump, "dump"),
                        _small_int(pass_num, "pass_num"))
    out = Outcome(ctx, name, before=f"{mount_point}: ")

    # Another file system on the mount point fails the state before anything is changed.
    current = _mounted_at(mount_point)
    bind = "bind" in options or "rbind" in options
    if current is not None and not bind and fstype not in ("auto", "none") and \
            current["fstype"] not in SAME_FSTYPE.get(fstype, {fstype}):
        raise StateError(f"{mount_point} has a {current['fstype']} file system mounted ({current['source']}), "
                         f"not {fstype}; unmount it first")
    if current is None and not os.path.isdir(mount_point):
        if os.path.lexists(mount_point):
            raise StateError(f"mount point {mount_point} exists and is not a directory")
        if not mkmnt and not ctx.test:
            raise StateError(f"mount point {mount_point} does not exist (mkmnt: true creates it)")

    if persist:
        fstab_path = absolute_path(config, "config")
        old = read_text(fstab_path)
        out.update(update_file(ctx, fstab_path, old, fstab_with(old or "", wanted)),
                   "write its fstab entry", "wrote its fstab entry")
    if current is None:
        failure = _mount(ctx, out, wanted, mkmnt)
        if failure:
            return out.fail(failure)
    return out.result(f"{device} is mounted on {mount_point}" + (" and in fstab" if persist else ""))


def _mount(ctx: StateContext, out: Outcome, entry: FstabEntry, mkmnt: bool) -> str | None:
    """Mount ``entry`` now (creating the mount point with mkmnt); why not, if it failed."""
    mount_point = entry.mount_point
    if not os.path.isdir(mount_point):
        if not mkmnt:  # test mode: an earlier file.directory state may create it
            out.note(f"{mount_point} does not exist yet")
        else:
            if not ctx.test:
                try:
                    os.makedirs(mount_point, mode=0o755)
                except OSError as exc:
                    raise StateError(f"cannot create {mount_point}: {exc.strerror}") from None
            out.change("created", mount_point)
    if not ctx.test:
        argv = ["mount", "-t", entry.fstype, "-o", ",".join(entry.opts), entry.device, mount_point]
        res = ctx.run(argv, timeout=300)
        if not res.ok:
            return f"mount failed: {output_tail(res, 4)}"
        if _mounted_at(mount_point) is None:
            return f"mount exited 0 but nothing is mounted on {mount_point}"
    out.change("mounted", True, "mount it", "mounted it")
    return None


def unmounted(ctx: StateContext, name: str, device: Text | None = None, persist: bool = False,
              config: str = FSTAB) -> dict:
    """Nothing mounted on a mount point now; with persist, no fstab entry for it either.

    Arguments:
      name: the mount point (default: the state's id).
      device: with persist, remove only the fstab entries for this device (default: any).
      persist: also remove the mount point's fstab entries, default false (as in Salt).
      config: the fstab file, default /etc/fstab.

    Example::

        /mnt/usb:
          mount.unmounted:
            - persist: true
    """
    mount_point = absolute_path(name)
    out = Outcome(ctx, name, before=f"{mount_point}: ")
    if _mounted_at(mount_point) is not None:
        if not ctx.test:
            res = ctx.run(["umount", mount_point], timeout=300)
            if not res.ok:
                return out.fail(f"umount failed: {output_tail(res, 4)}")
        out.change("unmounted", True, "unmount it", "unmounted it")
    if persist:
        fstab_path = absolute_path(config, "config")
        old = read_text(fstab_path)
        if old is not None:
            new = fstab_without(old, mount_point, None if device is None else str(device))
            out.update(update_file(ctx, fstab_path, old, new), "remove its fstab entry", "removed its fstab entry")
    return out.result(f"{mount_point} is not mounted" + (" nor in fstab" if persist else ""))
