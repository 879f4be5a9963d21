"""State modules that act through system commands (service, pkg, kmod, swap, network), without root
and without touching this machine: the commands' output is replayed from a recording.

Each fixture, ``tests/state_replay/<module>/<case>.json`` (in the spirit of pyinfra's
``tests/operations/*/*.json``), is::

    {"function": "service.running", "args": {"name": "chrony", "enable": true}, "test": false,
     "facts": {...},                   # what the module reads from the system other than by commands
     "files": {"etc/fstab": "..."},    # files under a temporary root, where the module's paths point
     "commands": [                     # every command the state runs, in order, with its output
        {"argv": ["systemctl", "show", ...], "stdout": "...", "returncode": 0, "stderr": "",
         "facts": {...}}],             # facts after the command (modprobe loads a module)
     "expect": {"result": true, "status": "changed", "changes": ["started"], "comment": ["fragment"],
                "files": {"etc/fstab": "..."}}}   # a file's text afterwards, null: gone

``{root}`` anywhere in a fixture stands for the temporary root. The state runs through the engine
(type checks, StateError -> a failed result) with a ReplayContext; the commands it runs must be
exactly the recorded ones. Facts: ``systemd`` (is systemd running), ``unit_files`` (unit files on
disk), ``lists_age_s`` (age of apt's lists), ``loaded`` (kernel modules), ``swaps`` (active swap),
``addresses`` (interface -> its IPv4 addresses now).

The lab tier (tests/e2e/test_state_modules_lab.py) stays the proof on real systems.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from piagent import netchange
from piagent.engine import run_states
from piagent.states import kmod, network, pkg, service, swap
from piagent.states.base import CommandResult, StateContext

FIXTURES = Path(__file__).resolve().parent / "state_replay"
CASES = sorted(FIXTURES.glob("*/*.json"))

# The system paths each module uses, moved under the temporary root.
PATHS = {
    kmod: {"MODULES_LOAD_FILE": "etc/modules-load.d/pimaster.conf"},
    swap: {"DPHYS_CONF": "etc/dphys-swapfile", "FSTAB": "etc/fstab", "DPHYS_DEFAULT_SWAPFILE": "var/swap"},
    network: {"NETWORKD_DIR": "etc/systemd/network", "DHCPCD_CONF": "etc/dhcpcd.conf"},
}
# Not paths, but not this test's business either: a started unit is watched for a while before the
# state calls it running (the lab tier proves that, tests/e2e/test_state_modules_lab.py).
SETTINGS = {service: {"START_SETTLE_S": 0}}
# Commands that only read; anything else changes the system.
READ_ONLY = (["systemctl", "show"], ["systemctl", "is-enabled"], ["systemctl", "is-active"], ["dpkg-query"],
             ["apt-cache"], ["journalctl"], ["nmcli", "-t"])


def read_only(argv: list[str]) -> bool:
    return any(argv[:len(prefix)] == prefix for prefix in READ_ONLY)


@dataclass
class ReplayContext(StateContext):
    """A StateContext whose commands are answered from a recording, never run; it keeps what was
    run. A command the recording does not have next fails the test."""
    recording: list = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    ran: list = field(default_factory=list)

    def run(self, argv, *, shell=False, env=None, cwd=None, timeout=3600, input=None, runas=None) -> CommandResult:
        argv = [argv] if isinstance(argv, str) else list(argv)
        self.ran.append(argv)
        position = len(self.ran)
        assert self.recording, f"command {position} was not recorded: {argv}"
        step = self.recording.pop(0)
        assert argv == step["argv"], f"command {position}: ran {argv}, the recording has {step['argv']}"
        self.facts.update(step.get("facts", {}))
        return CommandResult(step.get("returncode", 0), step.get("stdout", ""), step.get("stderr", ""))

    def which(self, program: str) -> str | None:
        return f"/usr/bin/{program}"


def load(path: Path, root: Path) -> dict:
    return json.loads(path.read_text().replace("{root}", str(root)))


@pytest.fixture
def real_commands(monkeypatch) -> list:
    """Every attempt to start a real process (refused, and listed: the test asserts none)."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[0] if args else kwargs)
        raise AssertionError(f"a real command was started: {attempts[-1]}")
    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    for name in ("system", "execv", "execvp", "execve", "spawnv", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)
    return attempts


def replay(case: dict, root: Path, monkeypatch) -> tuple[dict, ReplayContext]:
    """Run the fixture's state against its recording; the result and the context it ran with."""
    for module, paths in PATHS.items():
        for attr, relative in paths.items():
            monkeypatch.setattr(module, attr, str(root / relative))
    for module, settings in SETTINGS.items():
        for attr, value in settings.items():
            monkeypatch.setattr(module, attr, value)
    (root / "etc" / "systemd" / "network").mkdir(parents=True)
    (root / "etc" / "modules-load.d").mkdir(parents=True)
    for relative, text in case.get("files", {}).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    facts = dict(case.get("facts", {}))
    systemd = lambda: facts.get("systemd", True)  # noqa: E731
    for module in (service, network):
        monkeypatch.setattr(module, "systemd_running", systemd)
    monkeypatch.setattr(service, "unit_file_on_disk", lambda unit: unit in facts.get("unit_files", []))
    monkeypatch.setattr(pkg, "_lists_age_s", lambda: facts.get("lists_age_s", 60.0))
    monkeypatch.setattr(kmod, "is_loaded", lambda module: kmod._canonical(module) in facts.get("loaded", []))
    monkeypatch.setattr(swap, "_active_swaps", lambda: list(facts.get("swaps", [])))
    monkeypatch.setattr(netchange, "live_addresses", lambda iface: facts.get("addresses", {}).get(iface))

    contexts: list[ReplayContext] = []

    def make_context(**kwargs) -> ReplayContext:
        kwargs["watch_changed"] = case.get("watch_changed", kwargs["watch_changed"])
        contexts.append(ReplayContext(recording=list(case.get("commands", [])), facts=facts, **kwargs))
        return contexts[-1]

    args = dict(case["args"])
    name = args.pop("name")
    (res,) = run_states([{"id": name, "fun": case["function"], "name": name, "args": args}],
                        test=case.get("test", False), state_dir=str(root / "var" / "lib" / "piagent"),
                        make_context=make_context)
    # No context: the state failed before it ran (its arguments' types).
    return res, contexts[0] if contexts else ReplayContext(facts=facts)


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_replayed_state(path, tmp_path, monkeypatch, real_commands):
    root = tmp_path / "root"
    case = load(path, root)
    res, ctx = replay(case, root, monkeypatch)
    expect = case["expect"]
    described = json.dumps(res, indent=1, default=str)

    assert real_commands == [], "a real command was started"
    # Exactly the recorded commands, in order.
    assert ctx.ran == [step["argv"] for step in case.get("commands", [])], described
    assert res["result"] is expect["result"], described
    assert sorted(res["changes"]) == sorted(expect["changes"]), described
    if "status" in expect:
        assert res["status"] == expect["status"], described
    fragments = expect["comment"] if isinstance(expect["comment"], list) else [expect["comment"]]
    for fragment in fragments:
        assert fragment in res["comment"], described
    for relative, text in expect.get("files", {}).items():
        path = root / relative
        assert (path.read_text() if path.exists() else None) == text, relative

    # The rules every case follows.
    changing = [argv for argv in ctx.ran if not read_only(argv)]
    if case.get("test"):
        assert changing == [], "test mode ran a command that changes the system"
        assert res["result"] is (None if res["changes"] else True)
    if res["result"] is True and not res["changes"]:
        assert changing == [], "a state already as asked ran a command that changes the system"
    if res["result"] is False:
        assert res["status"] == "failed" and res["comment"]


def test_every_module_acting_through_commands_has_each_kind_of_case(tmp_path):
    """Already as asked, a change, test mode and a failing command, for each module."""
    kinds: dict[str, set[str]] = {}
    for path in CASES:
        case = load(path, tmp_path)
        expect = case["expect"]
        kind = ("failing" if expect["result"] is False else "test" if case.get("test")
                else "already" if not expect["changes"] else "change")
        kinds.setdefault(path.parent.name, set()).add(kind)
    assert kinds == {module: {"already", "change", "test", "failing"}
                     for module in ("service", "pkg", "kmod", "swap", "network")}


def test_a_command_out_of_the_recording_fails_the_replay(tmp_path, monkeypatch, real_commands):
    case = {"function": "kmod.loaded", "args": {"name": "br_netfilter", "persist": False}, "facts": {"loaded": []},
            "commands": [{"argv": ["modprobe", "--", "overlay"]}]}
    res, ctx = replay(case, tmp_path / "root", monkeypatch)
    assert res["status"] == "failed" and "ran ['modprobe', '--', 'br_netfilter']" in res["comment"]
    assert ctx.ran == [["modprobe", "--", "br_netfilter"]]
    with pytest.raises(AssertionError, match="a real command was started"):
        subprocess.run(["true"])
    assert real_commands == [["true"]]
