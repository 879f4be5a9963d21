"""The `pimaster` commands: one module each, imported only when needed (as pip's commands are).

``COMMANDS`` maps each command name to its module and the one-line summary `pimaster --help`
lists, in the order it lists them. The CLI imports only the invoked command's module; the daemon
imports them all at start (``load_all``), so that their server-side handlers register.

A command module has:

- ``add_parser(sub, name, summary, common, as_json)``: adds command ``name``'s argparse parser to
  ``sub`` (the subparsers of `pimaster`) and sets ``run`` on each leaf: ``run(client, args) -> exit code`` for a
  command that talks to the daemon, or with ``set_defaults(needs_master=False)``, ``run(args)``;
- or, for a command that parses its own arguments (`lab`), ``main(argv) -> exit code`` and
  ``OWN_ARGUMENTS = True``;
- server-side handlers, ``@handler("name")`` (``streaming=True`` when it emits events before its
  answer; ``asks=True`` when it asks its client for data, as `apply` asks for the state tree's
  files): ``async def handle(master, **args) -> dict``; the arguments are the request's.

Adding a command: a module here and its line in ``COMMANDS``.

This module is imported by every `pimaster` command: keep its imports to importlib.
"""

from __future__ import annotations

import importlib

# name -> (module, summary); `pimaster --help` lists them in this order.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("pimaster.commands.serve", "run the master daemon"),
    "token": ("pimaster.commands.token", "enrollment tokens"),
    "keys": ("pimaster.commands.keys", "agent keys: list, accept, reject, delete, fingerprint"),
    "ping": ("pimaster.commands.ping", "which nodes are up, and their health"),
    "apply": ("pimaster.commands.apply", "render a state file for each node, push it, converge"),
    "run": ("pimaster.commands.run", "run a command as root on every targeted node"),
    "jobs": ("pimaster.commands.jobs", "recent jobs"),
    "job": ("pimaster.commands.jobs", "one job's results"),
    "reboot": ("pimaster.commands.reboot", "a rolling reboot: --batch nodes at a time, each back before the next"),
    "shutdown": ("pimaster.commands.reboot", "power nodes off (the master's own node last), for pulling the plug"),
    "health": ("pimaster.commands.health", "a node's health history: raw for 1 h, 1-minute for 24 h, 15-minute for 30 days"),
    "top": ("pimaster.commands.health", "every node's health, live: temperature, load, throttling, under-voltage"),
    "events": ("pimaster.commands.events", "what happens, live: keys, nodes up/down, jobs, rollbacks, reboots"),
    "nodes": ("pimaster.commands.nodes", "enrolled nodes with their facts"),
    "drift": ("pimaster.commands.drift", "what the latest drift check found would change, per node"),
    "status": ("pimaster.commands.status", "the master's own status"),
    "backup": ("pimaster.commands.backup", "the master's keys, key store, jobs and secrets in one file"),
    "restore": ("pimaster.commands.backup", "put a backup's master back (a new SD card): agents reconnect"),
    "doc": ("pimaster.commands.doc", "the reference of a state function (file.managed), or the list of them"),
    "lab": ("pimaster.commands.lab", "a simulated Pi cluster on this machine (see `pimaster lab --help`)"),
}


class Handler:
    """A control-socket request the daemon answers: ``function(master, **args)``."""

    __slots__ = ("name", "function", "streaming", "asks")

    def __init__(self, name: str, function, streaming: bool, asks: bool = False) -> None:
        self.name, self.function, self.streaming, self.asks = name, function, streaming, asks


# request name (e.g. "keys.accept") -> Handler; filled by the @handler decorators.
HANDLERS: dict[str, Handler] = {}


def handler(name: str, streaming: bool = False, asks: bool = False):
    """Registers an ``async def f(master, **args) -> dict`` as the daemon's answer to ``name``.
    A streaming handler also gets ``emit(event: dict)``, which sends an event line before the answer;
    one that asks gets ``ask``: ``await ask(question) -> (answer, data)`` from its client
    (`pimaster.control.ClientAsk`; None when the request came without a connection)."""
    def register(function):
        if name in HANDLERS:
            raise RuntimeError(f"two handlers for the control request {name!r}")
        HANDLERS[name] = Handler(name, function, streaming, asks)
        return function
    return register


def load(name: str):
    """The module of command ``name`` (imported now if not yet)."""
    return importlib.import_module(COMMANDS[name][0])


def load_all() -> dict[str, Handler]:
    """Imports every command module (their handlers register); the daemon's start."""
    for module, _summary in COMMANDS.values():
        importlib.import_module(module)
    return HANDLERS
