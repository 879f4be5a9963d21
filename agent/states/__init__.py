"""State modules: one file per domain (file, pkg, service, cmd, host, sysctl, mount, boot, swap, kmod,
network, user, group, timezone), and Salt's test states (test), which change nothing.

Each function a module names in its ``__states__`` is a state function, called as
``<module>.<function>`` in a state file. It takes the StateContext first and the state's arguments as keyword arguments (``name``
defaults to the state's id), reads the current state, changes only what differs, honours test
mode, and returns ``{name, result, changes, comment}``, built with base.Outcome (which words the
changes for test mode and for a real run). Its docstring is the user reference; its type hints
say which types each argument takes (see arg_types), so it checks values, not types.

The catalogue of functions, their arguments and the arguments' types is computed from the
signatures here and sent to the master at enrollment, so that the master can refuse a state file
naming an unknown function or argument, or giving an argument a value of another type, before
anything reaches a node, for exactly the agent version each node runs. The engine checks the types
again before a state runs (type_errors): a job may come from an older master.
"""

from __future__ import annotations

import functools
import importlib
import os
import typing
from types import UnionType
from typing import Any, Callable

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


# ---------------------------------------------------------------------------------------------
# Argument types, from the signatures' type hints: the catalogue's "types", checked by the master
# before anything is sent and by the engine before a state runs (a job from an older master).

TYPE_NAMES = ("str", "int", "float", "bool", "list", "dict", "null")
_HINT_NAMES = {str: "str", int: "int", float: "float", bool: "bool", list: "list", tuple: "list", dict: "dict",
               type(None): "null"}
_WORDS = {"str": "text", "int": "a whole number", "float": "a number", "bool": "true or false", "list": "a list",
          "dict": "a mapping", "null": "null"}


def _type_names(hint) -> list[str] | None:
    """The vocabulary's names for a type hint; None: any value (Any, or a hint it has no name for)."""
    if hint is Any:
        return None
    if typing.get_origin(hint) in (typing.Union, UnionType):
        found: set[str] = set()
        for part in typing.get_args(hint):
            names = _type_names(part)
            if names is None:
                return None
            found.update(names)
        return [n for n in TYPE_NAMES if n in found]
    name = _HINT_NAMES.get(typing.get_origin(hint) or hint)
    return None if name is None else [name]


@functools.lru_cache(maxsize=None)
def arg_types(function: Callable) -> dict[str, list[str]]:
    """``{"mode": ["str", "int", "null"], ...}``: each argument's accepted types, from its hint.

    An argument without a hint (or hinted Any) is left out: any value will do.
    """
    hints = typing.get_type_hints(function)
    out = {}
    for arg, hint in hints.items():
        if arg in ("ctx", "return"):
            continue
        names = _type_names(hint)
        if names is not None:
            out[arg] = names
    return out


def accepts(names: list[str], value) -> bool:
    """Whether a value as YAML (or the wire) gives it is one of these types: int takes no bool,
    float takes int too, list is a sequence, dict a mapping."""
    if value is None:
        return "null" in names
    if isinstance(value, bool):
        return "bool" in names
    if isinstance(value, int):
        return "int" in names or "float" in names
    if isinstance(value, float):
        return "float" in names
    if isinstance(value, str):
        return "str" in names
    if isinstance(value, (list, tuple)):
        return "list" in names
    if isinstance(value, dict):
        return "dict" in names
    return False


def _kind(value) -> str:
    """What a value is, in words (never the value itself: it may be a secret)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    for python_type, words in ((str, "text"), (int, "a whole number"), (float, "a decimal number"),
                               ((list, tuple), "a list"), (dict, "a mapping")):
        if isinstance(value, python_type):
            return words
    return f"a {type(value).__name__}"


def type_errors(types: dict[str, list[str]], args: dict) -> list[str]:
    """What is wrong with the arguments' types, one sentence each ("mode must be text or a whole
    number, not true"); [] when they fit. Arguments ``types`` does not name may be anything."""
    problems = []
    for arg, value in args.items():
        names = types.get(arg)
        if names is None or accepts(names, value):
            continue
        shown = [n for n in names if n != "null" and not (n == "int" and "float" in names)] or names
        problems.append(f"{arg} must be {_or_words([_WORDS[n] for n in shown])}, not {_kind(value)}")
    return problems


def _or_words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def catalog() -> dict[str, dict]:
    """What the master needs to validate a state file: argument names, required ones, their types
    (names of TYPE_NAMES; an argument left out takes any value), a summary."""
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
            "types": {a: names for a, names in arg_types(function).items() if a in args},
            "summary": (function.__doc__ or "").strip().split("\n", 1)[0],
        }
    return out


def reference(full_name: str) -> str:
    """A state function's user reference, as `pimaster doc` and `piagent state F --help` print it:
    its docstring, then each argument with the types it takes and whether it is required."""
    import inspect

    entry = catalog()[full_name]
    lines = [full_name, "", inspect.cleandoc(registry()[full_name].__doc__ or "(not documented)"), "",
             "Argument types (checked before anything runs):"]
    for arg in entry["args"]:
        types = " or ".join(entry["types"].get(arg, ["any"]))
        need = "required" if arg in entry["required"] else "default: the state's id" if arg == "name" else "optional"
        lines.append(f"  {arg}: {types} ({need})")
    lines.append("  plus what every state takes: " + ", ".join(COMMON_ARGS))
    return "\n".join(lines) + "\n"


def close_names(word: str, names) -> list[str]:
    """The names ``word`` may be a typo of, best first: for "did you mean"."""
    import difflib

    return difflib.get_close_matches(word, list(names), n=3, cutoff=0.6)


def catalog_signature() -> str:
    """Changes whenever a state module is added, removed or edited (cache key for the catalogue)."""
    from .. import __version__

    here = os.path.dirname(__file__)
    files = sorted(f for f in os.listdir(here) if f.endswith(".py"))
    newest = max(os.stat(os.path.join(here, f)).st_mtime_ns for f in files)
    return f"{__version__}:{len(files)}:{newest}"
