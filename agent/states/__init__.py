"""State modules: one file per domain (file, pkg, service, cmd, host, sysctl, mount, boot, swap, kmod,
network).

Each public function of a module is a state function, called as ``<module>.<function>`` in a state
file. It takes the StateContext first and the state's arguments as keyword arguments (``name``
defaults to the state's id), reads the current state, changes only what differs, honours test
mode, and returns ``{name, result, changes, comment}`` (see base.result). Its docstring is the
user reference.

The catalogue of functions and their arguments is computed from the signatures here and sent to
the master at enrollment, so that the master can refuse a state file naming an unknown function
or argument before anything reaches a node, for exactly the agent version each node runs.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

# Arguments the engine handles for every state; a state function never sees them. The one list:
# the master validates state files against it too.
REQUISITES = ("require", "watch", "onchanges", "onfail")
REQUISITES_IN = tuple(f"{r}_in" for r in REQUISITES)
COMMON_ARGS = REQUISITES + REQUISITES_IN + ("unless", "onlyif", "order", "sensitive")

_registry: dict[str, Callable] | None = None


def _modules() -> list[str]:
    # A directory listing rather than pkgutil/inspect: the agent stays small on a Pi Zero.
    here = os.path.dirname(__file__)
    return sorted(f[:-3] for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_") and f != "base.py")


def registry() -> dict[str, Callable]:
    """``{"file.managed": function, ...}`` for every state function of every module."""
    global _registry
    if _registry is None:
        found = {}
        for module_name in _modules():
            module = importlib.import_module(f"{__name__}.{module_name}")
            for fun_name in getattr(module, "__states__", ()):
                found[f"{module_name}.{fun_name}"] = getattr(module, fun_name)
        _registry = found
    return _registry


def catalog() -> dict[str, dict]:
    """What the master needs to validate a state file: argument names, required ones, a summary."""
    out = {}
    for full_name, function in registry().items():
        code = function.__code__
        positional = list(code.co_varnames[:code.co_argcount])
        keyword_only = list(code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount])
        defaults = len(function.__defaults__ or ())
        with_default = set(positional[len(positional) - defaults:] if defaults else []) | set(function.__kwdefaults__ or {})
        args = (positional + keyword_only)[1:]  # skip ctx
        out[full_name] = {
            "args": args,
            "required": [a for a in args if a not in with_default and a != "name"],
            "summary": (function.__doc__ or "").strip().split("\n", 1)[0],
        }
    return out


def catalog_signature() -> str:
    """Changes whenever a state module is added, removed or edited (cache key for the catalogue)."""
    from .. import __version__

    here = os.path.dirname(__file__)
    files = sorted(f for f in os.listdir(here) if f.endswith(".py"))
    newest = max(os.stat(os.path.join(here, f)).st_mtime_ns for f in files)
    return f"{__version__}:{len(files)}:{newest}"
