"""kmod: kernel modules loaded now and at every boot (/etc/modules-load.d)."""

from __future__ import annotations

import os
import re

from .base import Outcome, StateContext, StateError, output_tail, read_text, update_file

__states__ = ("loaded",)

MODULES_LOAD_FILE = "/etc/modules-load.d/pimaster.conf"
HEADER = "# Kernel modules loaded at boot, managed by pimaster (kmod.loaded).\n"
MODULE_RE = re.compile(r"\A[A-Za-z0-9_-]+\Z")


def _canonical(module: str) -> str:
    # The kernel names modules with '_' where modprobe accepts '-' too (br-netfilter = br_netfilter).
    return module.replace("-", "_")


def is_loaded(module: str) -> bool:
    """Loaded as a module (/proc/modules) or built into the kernel (/sys/module/NAME)."""
    wanted = _canonical(module)
    try:
        with open("/proc/modules") as fh:
            if any(line.split(" ", 1)[0] == wanted for line in fh):
                return True
    except FileNotFoundError:
        pass  # a kernel without module support: only built-in ones exist
    return os.path.isdir(os.path.join("/sys/module", wanted))


def loaded(ctx: StateContext, name: str, persist: bool = True) -> dict:
    """A kernel module loaded now (modprobe) and, with persist, at every boot.

    Built-in modules (in /sys/module) count as loaded. For boot, the module is listed in
    /etc/modules-load.d/pimaster.conf (one line per module), which systemd-modules-load reads.

    Arguments:
      name: the module, e.g. ``br_netfilter`` (default: the state's id).
      persist: list it for boot too, default true.

    Example::

        br_netfilter:
          kmod.loaded
        overlay:
          kmod.loaded:
            - persist: true
    """
    if not MODULE_RE.match(name):
        raise StateError(f"{name!r} is not a kernel module name")
    out = Outcome(ctx, name, before=f"{name}: ")
    if not is_loaded(name):
        if not ctx.test:
            res = ctx.run(["modprobe", "--", name], timeout=120)
            if res.returncode == 127:
                return out.fail(f"cannot load {name}: modprobe is not installed (package kmod)")
            if not res.ok:
                return out.fail(f"modprobe {name} failed: {output_tail(res, 4)}")
            if not is_loaded(name):
                return out.fail(f"modprobe {name} succeeded but the module is not loaded")
        out.change("loaded", True, "load it now", "loaded it now")
    if persist:
        old = read_text(MODULES_LOAD_FILE)
        new = list_module(old if old is not None else HEADER, name)
        listed = (f"list it in {MODULES_LOAD_FILE} for boot", f"listed it in {MODULES_LOAD_FILE} for boot")
        if new != old and old is None and not os.path.isdir(os.path.dirname(MODULES_LOAD_FILE)):
            if ctx.test:
                out.change("diff", f"{MODULES_LOAD_FILE} would be created\n", *listed)
            else:
                os.makedirs(os.path.dirname(MODULES_LOAD_FILE), mode=0o755, exist_ok=True)
        if "diff" not in out.changes:
            out.update(update_file(ctx, MODULES_LOAD_FILE, old, new), *listed)
    return out.result(f"{name} is loaded" + (f" and listed in {MODULES_LOAD_FILE}" if persist else ""))


def list_module(text: str, module: str) -> str:
    """A modules-load.d file's text with the module listed (appended when it is not yet)."""
    lines = text.splitlines(keepends=True)
    if any(_canonical(ln.split("#", 1)[0].strip()) == _canonical(module) for ln in lines):
        return text
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return "".join(lines) + module + "\n"
