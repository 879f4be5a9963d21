"""sysctl: kernel settings, now (/proc/sys) and after reboots (/etc/sysctl.d)."""

from __future__ import annotations

import os
import re

from .base import Outcome, StateContext, StateError, absolute_path, read_text, update_file

__states__ = ("present",)

DEFAULT_CONFIG = "/etc/sysctl.d/99-pimaster.conf"
CONFIG_HEADER = "# Kernel settings managed by pimaster (sysctl.present); edits here are overwritten.\n"
KEY_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.:@/+-]*\Z")


def _proc_path(key: str) -> str:
    # sysctl(8): with a '/' the name is a path (its dots are literal, e.g. a VLAN "eth0.5").
    relative = key if "/" in key else key.replace(".", "/")
    return os.path.join("/proc/sys", relative)


def _normalize(value: str) -> str:
    # /proc shows multi-value settings tab-separated ("4096\t87380\t6291456"); compare words.
    return " ".join(value.split())


def _read_runtime(path: str) -> str | None:
    try:
        with open(path) as fh:
            return _normalize(fh.read())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None


def present(ctx: StateContext, name: str, value: str | int | float | bool, config: str | None = None) -> dict:
    """A kernel setting at a value, now and at every boot (a line in /etc/sysctl.d).

    Arguments:
      name: the setting, e.g. ``net.ipv4.ip_forward`` (default: the state's id).
      value: the value; several numbers as one string ("4096 87380 6291456"); true/false mean 1/0.
      config: the file for the boot-time setting, default /etc/sysctl.d/99-pimaster.conf (created
        if missing; a line for the setting is replaced in place, duplicates removed).

    Example::

        vm.swappiness:
          sysctl.present:
            - value: 10
        net.ipv4.ip_forward:
          sysctl.present:
            - value: 1
    """
    if not KEY_RE.match(name) or ".." in name or "//" in name:
        raise StateError(f"{name!r} is not a sysctl name like net.ipv4.ip_forward")
    if isinstance(value, bool):
        value = int(value)
    wanted = _normalize(str(value))
    if not wanted:
        raise StateError(f"value must be a number or text, not {value!r}")
    if "\n" in str(value).strip():
        raise StateError("value must be one line")
    path = absolute_path(config or DEFAULT_CONFIG, "config")

    out = Outcome(ctx, name, before=f"{name} = {wanted}: ")
    proc = _proc_path(name)
    current = _read_runtime(proc)
    if current is None:
        if not ctx.test:
            raise StateError(f"the kernel has no setting {name} ({proc} does not exist)")
        # A module an earlier state loads may bring it (net.bridge.* with br_netfilter).
        out.note(f"{name} does not exist in the running kernel yet")
        out.change("value", {"old": None, "new": wanted}, "set it now", "set it now")
    elif current != wanted:
        if not ctx.test:
            try:
                with open(proc, "w") as fh:
                    fh.write(wanted + "\n")
            except OSError as exc:
                return out.fail(f"cannot set {name} = {wanted} now: {exc.strerror} (writing {proc})")
            now = _read_runtime(proc)
            if now != wanted:
                return out.fail(f"the kernel took {name} = {now!r}, not {wanted!r}")
        out.change("value", {"old": current, "new": wanted}, "set it now", "set it now")

    old = read_text(path)
    if old is None and not os.path.isdir(os.path.dirname(path)):
        raise StateError(f"{os.path.dirname(path)} does not exist")
    new = set_line(old if old is not None else CONFIG_HEADER, name, wanted)
    out.update(update_file(ctx, path, old, new), f"write it to {path}", f"wrote it to {path}")
    return out.result(f"{name} = {wanted}, now and in {path}")


def set_line(text: str, name: str, value: str) -> str:
    """A sysctl.d file's text with ``name = value`` in place of the setting's first line (later
    ones removed: they would win), or appended."""
    setting = re.compile(rf"^\s*-?\s*{re.escape(name)}\s*=")
    lines = text.splitlines(keepends=True)
    hits = [i for i, ln in enumerate(lines) if setting.match(ln)]
    wanted_line = f"{name} = {value}\n"
    if hits:
        lines[hits[0]] = wanted_line
        for i in reversed(hits[1:]):
            del lines[i]
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(wanted_line)
    return "".join(lines)
