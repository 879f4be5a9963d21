"""kmod: kernel modules loaded now and at every boot (/etc/modules-load.d).

``kmod.loaded`` is pimaster's own name; ``kmod.present`` is Salt's, with Salt's arguments (``persist``
off by default, ``mods`` for several modules). Both load and list a module the same way.
"""

from __future__ import annotations

import os
import re

from .base import Outcome, StateContext, StateError, output_tail, read_text, update_file

__states__ = ("loaded", "present")

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
    _check_name(name)
    out = Outcome(ctx, name, before=f"{name}: ")
    if not is_loaded(name):
        failed = _load(ctx, name)
        if failed:
            return out.fail(failed)
        out.change("loaded", True, "load it now", "loaded it now")
    if persist:
        _list_for_boot(ctx, [name], out, "it")
    return out.result(f"{name} is loaded" + (f" and listed in {MODULES_LOAD_FILE}" if persist else ""))


def present(ctx: StateContext, name: str, persist: bool = False, mods: list[str] | None = None) -> dict:
    """A kernel module loaded now (Salt's name and arguments; kmod.loaded persists by default).

    The same as kmod.loaded, with Salt's defaults: the module is loaded now, and listed for boot
    only with ``persist: true``. Salt lists it in /etc/modules (with systemd,
    /etc/modules-load.d/salt_managed.conf); pimaster in /etc/modules-load.d/pimaster.conf, which
    systemd-modules-load reads at boot just the same.
    Built-in modules (in /sys/module) count as loaded.

    Arguments:
      name: the module, e.g. ``br_netfilter`` (default: the state's id); a label only when ``mods``
        is given, as in Salt.
      persist: also list it for boot, default false (as in Salt).
      mods: a list of modules to load (and list) instead of ``name``.

    Example::

        br_netfilter:
          kmod.present:
            - persist: true
        k8s-modules:
          kmod.present:
            - mods:
              - overlay
              - br_netfilter
            - persist: true
    """
    modules = [name] if mods is None else [str(m) for m in mods]
    if not modules:
        raise StateError("mods must name at least one module")
    for module in modules:
        _check_name(module)
    out = Outcome(ctx, name)
    missing = [m for m in modules if not is_loaded(m)]
    done: list[str] = []
    for module in missing:
        failed = _load(ctx, module)
        if failed:
            if done:  # a half-done state says what it did
                out.change("loaded", done)
            return out.fail(failed)
        done.append(module)
    if done:
        words = ", ".join(done)
        out.change("loaded", done, f"load {words}", f"loaded {words}")
    if persist:
        _list_for_boot(ctx, modules, out, ", ".join(modules))
    shown = ", ".join(modules)
    return out.result(f"{shown} {'is' if len(modules) == 1 else 'are'} loaded"
                      + (f" and listed in {MODULES_LOAD_FILE}" if persist else ""))


def _check_name(module: str) -> None:
    if not MODULE_RE.match(module):
        raise StateError(f"{module!r} is not a kernel module name")


def _load(ctx: StateContext, module: str) -> str | None:
    """modprobe the module (not in test mode); why it failed, or None."""
    if ctx.test:
        return None
    res = ctx.run(["modprobe", "--", module], timeout=120)
    if res.returncode == 127:
        return f"cannot load {module}: modprobe is not installed (package kmod)"
    if not res.ok:
        return f"modprobe {module} failed: {output_tail(res, 4)}"
    if not is_loaded(module):
        return f"modprobe {module} succeeded but the module is not loaded"
    return None


def _list_for_boot(ctx: StateContext, modules: list[str], out: Outcome, what: str) -> None:
    """List the modules in MODULES_LOAD_FILE (one update of the file for all of them)."""
    old = read_text(MODULES_LOAD_FILE)
    new = old if old is not None else HEADER
    for module in modules:
        new = list_module(new, module)
    listed = (f"list {what} in {MODULES_LOAD_FILE} for boot", f"listed {what} in {MODULES_LOAD_FILE} for boot")
    if new != old and old is None and not os.path.isdir(os.path.dirname(MODULES_LOAD_FILE)):
        if ctx.test:
            out.change("diff", f"{MODULES_LOAD_FILE} would be created\n", *listed)
            return
        os.makedirs(os.path.dirname(MODULES_LOAD_FILE), mode=0o755, exist_ok=True)
    out.update(update_file(ctx, MODULES_LOAD_FILE, old, new), *listed)


def list_module(text: str, module: str) -> str:
    """A modules-load.d file's text with the module listed (appended when it is not yet)."""
    lines = text.splitlines(keepends=True)
    if any(_canonical(ln.split("#", 1)[0].strip()) == _canonical(module) for ln in lines):
        return text
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return "".join(lines) + module + "\n"
