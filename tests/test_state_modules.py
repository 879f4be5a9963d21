"""State modules on real files in temp directories, through the engine as the agent runs them;
the catalogue and its argument types; Outcome; the modules' text editing without files.

Only what is safe on the machine running the tests is here: files, the boot partition's files,
hosts/fstab/sysctl.d files at temp paths, commands in temp dirs. The modules that act through
system commands (service, pkg, kmod, swap, network) run against recorded command output in
tests/test_state_replay.py; on real systems (apt, systemd, the hostname, mounts, /proc/sys,
modules) inside lab nodes: tests/e2e/test_state_modules_lab.py.
"""

from __future__ import annotations

import inspect
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

import pytest

from harness import source_path
from piagent.engine import run_states
from piagent.states import COMMON_ARGS, TYPE_NAMES, accepts, arg_types, catalog, registry, type_errors
from piagent.states.base import Outcome, StateContext
from piagent.fileio import write_atomic

IS_ROOT = os.geteuid() == 0


def assert_cycle(run, fun: str, name: str, unchanged, changed, **args) -> tuple[dict, dict]:
    """Test mode reports a change and makes none; a real run makes it; a second changes nothing.

    ``unchanged()`` and ``changed()`` assert what the system looks like before and after.
    """
    would = run(fun, name, test=True, **args)
    assert would["status"] == "changed" and would["result"] is None, would
    unchanged()
    done = run(fun, name, **args)
    assert done["status"] == "changed" and done["result"] is True, done
    changed()
    again = run(fun, name, **args)
    assert again["status"] == "ok" and again["changes"] == {}, again
    again_test = run(fun, name, test=True, **args)
    assert again_test["status"] == "ok" and again_test["result"] is True and again_test["changes"] == {}, again_test
    changed()
    return would, done


def backups(state_dir: Path, path: Path) -> list[Path]:
    folder = state_dir / "backup" / str(path.parent).lstrip("/")
    return sorted(folder.glob(path.name + ".*")) if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------
# The catalogue: what the master validates state files against, and `piagent state list` shows

def test_every_state_function_documents_itself_and_takes_no_engine_arguments():
    functions = registry()
    assert {name.split(".")[0] for name in functions} == {
        "file", "pkg", "service", "cmd", "host", "sysctl", "mount", "boot", "swap", "kmod", "network", "user",
        "group", "timezone", "test"}
    for full_name, function in functions.items():
        params = list(inspect.signature(function).parameters.values())
        assert params[0].name == "ctx" and params[1].name == "name", full_name
        assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params), f"{full_name}: no *args/**kwargs"
        assert not set(p.name for p in params) & set(COMMON_ARGS), f"{full_name} takes an engine argument"
        doc = inspect.getdoc(function)
        summary = doc.split("\n", 1)[0]
        assert summary and "``" not in summary, f"{full_name}: one-line summary without markup"
        assert "Example::" in doc, f"{full_name}: a YAML example"
        for p in params[1:]:
            assert f"{p.name}" in doc.split("Example::")[0], f"{full_name} does not document {p.name}"
    managed = catalog()["file.managed"]
    assert "source" not in managed["args"] and "template" not in managed["args"]  # the master resolves them
    assert "source:" in inspect.getdoc(functions["file.managed"])
    assert catalog()["mount.mounted"]["required"] == ["device", "fstype"]
    assert catalog()["cmd.run"]["args"][:2] == ["name", "creates"]


def test_every_argument_has_types_from_its_hint():
    for full_name, spec in catalog().items():
        assert set(spec["types"]) == set(spec["args"]), f"{full_name}: an argument without a type hint"
        for arg, names in spec["types"].items():
            assert names and set(names) <= set(TYPE_NAMES), (full_name, arg, names)
            assert names == [n for n in TYPE_NAMES if n in names], "in the vocabulary's order"
        assert spec["types"]["name"] == ["str"]
    types = {fun: spec["types"] for fun, spec in catalog().items()}
    # What the functions took before their hand checks went (YAML's 0644 is a number, "0644" text).
    assert types["file.managed"]["mode"] == ["str", "int", "null"]
    assert types["file.managed"]["contents"] == ["str", "int", "float", "list", "null"]
    assert types["file.line"]["value"] == ["str", "int", "float", "null"]
    assert types["mount.mounted"]["dump"] == ["str", "int"] and types["mount.mounted"]["opts"] == ["str", "list"]
    assert types["sysctl.present"]["value"] == ["str", "int", "float", "bool"]
    assert types["boot.config"]["value"] == ["str", "int", "float", "bool"]
    assert types["network.static"]["confirm_timeout"] == ["str", "float"]
    assert types["cmd.run"]["env"] == ["list", "dict", "null"] and types["cmd.run"]["timeout"] == ["float", "null"]
    assert types["service.running"]["enable"] == ["bool", "null"]


def test_type_hints_become_the_vocabulary():
    def fun(ctx, name: str, a: int, b: float | None, c: list[str] | tuple[int, ...], d: dict[str, int],
            e: Optional[bool], f: Union[str, int], g: Any, h, i: "set[int]") -> dict:
        return {}

    assert arg_types(fun) == {"name": ["str"], "a": ["int"], "b": ["float", "null"], "c": ["list"], "d": ["dict"],
                              "e": ["bool", "null"], "f": ["str", "int"]}  # Any, no hint, unknown: any value


@pytest.mark.parametrize("names, value, fits", [
    (["int"], 3, True), (["int"], True, False), (["int"], 3.5, False),
    (["float"], 3, True), (["float"], 3.5, True), (["float"], False, False),
    (["bool"], True, True), (["bool"], 1, False), (["bool"], "yes", False),
    (["str"], "x", True), (["str"], 1, False), (["list"], [1], True), (["list"], {"a": 1}, False),
    (["dict"], {"a": 1}, True), (["dict"], [], False), (["str"], None, False), (["str", "null"], None, True),
])
def test_the_type_rule(names, value, fits):
    assert accepts(names, value) is fits


def test_type_errors_say_what_was_wanted():
    types = arg_types(registry()["file.managed"])
    assert type_errors(types, {"name": "/x", "mode": "0644", "contents": ["a", 1], "makedirs": True}) == []
    assert type_errors(types, {"mode": True, "makedirs": "yes", "contents": {"a": 1}}) == [
        "mode must be text or a whole number, not true",
        "makedirs must be true or false, not text",
        "contents must be text, a number or a list, not a mapping"]
    assert type_errors(types, {"unknown": object()}) == []  # not in the types: any value


def test_a_wrong_type_fails_the_state_before_anything_runs(run, tmp):
    marker = tmp / "ran"
    res = run("cmd.run", f"touch {marker}", timeout="soon", creates=[str(tmp / "x")])
    assert res["status"] == "failed" and res["comment"] == "timeout must be a number, not text"
    (res,) = run_states([{"id": "x", "fun": "cmd.run", "name": f"touch {marker}", "args": {"env": "A=1"},
                          "onlyif": f"touch {tmp / 'onlyif-ran'}"}], state_dir=str(tmp / "sd"))
    assert res["status"] == "failed" and "env must be a list or a mapping" in res["comment"]
    assert not marker.exists() and not (tmp / "onlyif-ran").exists(), "a state with bad arguments runs nothing"


# ---------------------------------------------------------------------------------------------
# Outcome: the one result-building step of every module

def test_outcome_words_changes_for_test_mode_and_for_a_real_run():
    for test, verb, result in ((True, "would load br_netfilter now and list it", None),
                               (False, "loaded br_netfilter now and listed it", True)):
        out = Outcome(StateContext(test=test), "br_netfilter")
        out.change("loaded", True, "load br_netfilter now", "loaded br_netfilter now")
        out.update({"diff": "+br_netfilter"}, "list it", "listed it")
        out.update({}, "never said", "never said")
        out.note("a note")
        assert out.result("unused") == {"name": "br_netfilter", "result": result, "comment": f"{verb}; a note",
                                        "changes": {"loaded": True, "diff": "+br_netfilter"}}
    quiet = Outcome(StateContext(test=True), "x", before="x: ", after=" (now)")
    assert quiet.result("x is as wanted") == {"name": "x", "result": True, "changes": {}, "comment": "x is as wanted"}
    quiet.change("a", 1, "do a", "did a")
    quiet.change("b", 2, "do b", "did b")
    quiet.change("c", 3, "do c", "did c")
    assert quiet.result()["comment"] == "x: would do a, do b and do c (now)"
    assert quiet.fail("it broke") == {"name": "x", "result": False, "changes": {"a": 1, "b": 2, "c": 3},
                                      "comment": "it broke"}


def test_every_module_builds_its_result_through_outcome():
    # The engine no longer turns a test-mode True with changes into None: each module must not need it.
    states_dir = Path(registry()["file.managed"].__code__.co_filename).parent
    for path in states_dir.glob("*.py"):
        if path.name not in ("base.py", "__init__.py", "__main__.py"):
            text = path.read_text()
            assert " result(" not in text and "import result" not in text, f"{path.name} builds a result by hand"


def test_piagent_state_cli_runs_a_module_and_fails_with_exit_1(tmp):
    env = dict(os.environ, PYTHONPATH=source_path(tmp))
    target = tmp / "motd"

    def piagent(*args):
        return subprocess.run([sys.executable, "-m", "piagent", "state", *args, "--state-dir", str(tmp / "sd")],
                              capture_output=True, text=True, env=env, timeout=60)

    ok = piagent("file.managed", f"name={target}", "contents=hello", "mode=0600")
    assert ok.returncode == 0, ok.stderr
    assert "changed: file.managed" in ok.stdout and "+hello" in ok.stdout
    assert target.read_text() == "hello\n" and stat.S_IMODE(target.stat().st_mode) == 0o600
    bad = piagent("file.managed", f"name={target}", "mode=rwx", "--json")
    assert bad.returncode == 1
    assert "is not an octal mode" in bad.stdout and "Traceback" not in bad.stdout + bad.stderr


# ---------------------------------------------------------------------------------------------
# file.managed

def test_managed_creates_a_file_with_contents_and_mode(run, tmp):
    path = tmp / "etc" / "motd"
    path.parent.mkdir()
    would, _ = assert_cycle(run, "file.managed", str(path), lambda: not path.exists() or pytest.fail("created"),
                            lambda: (path.read_text() == "Welcome\n" and stat.S_IMODE(path.stat().st_mode) == 0o640)
                            or pytest.fail(f"{path.read_text()!r} {path.stat().st_mode:o}"),
                            contents="Welcome", mode="0640")
    assert "+Welcome" in would["changes"]["diff"] and would["changes"]["mode"] == "0640"
    assert would["comment"] == f"would create {path}"


def test_managed_replaces_contents_shows_a_diff_and_keeps_the_old_version(run, tmp, state_dir):
    path = tmp / "hosts.conf"
    path.write_text("one\ntwo\nthree\n")
    os.chmod(path, 0o600)
    would = run("file.managed", str(path), test=True, contents="one\nTWO\nthree\n")
    assert would["result"] is None and path.read_text() == "one\ntwo\nthree\n"
    assert "-two\n+TWO\n" in would["changes"]["diff"] and " one\n" in would["changes"]["diff"]
    assert backups(state_dir, path) == []
    done = run("file.managed", str(path), contents="one\nTWO\nthree\n")
    assert done["status"] == "changed" and path.read_text() == "one\nTWO\nthree\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "an existing file keeps its mode"
    (kept,) = backups(state_dir, path)
    assert kept.read_text() == "one\ntwo\nthree\n"
    # A second change within the same second keeps its own backup: the original is never lost.
    run("file.managed", str(path), contents="four\n")
    assert sorted(p.read_text() for p in backups(state_dir, path)) == ["one\nTWO\nthree\n", "one\ntwo\nthree\n"]


def test_managed_changes_only_the_mode_without_rewriting(run, tmp):
    path = tmp / "script"
    path.write_text("#!/bin/sh\n")
    inode = path.stat().st_ino
    res = run("file.managed", str(path), contents="#!/bin/sh\n", mode=755)  # YAML's 755: octal digits
    assert res["changes"] == {"mode": "0755"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o755 and path.stat().st_ino == inode


def test_managed_without_contents_creates_empty_and_leaves_contents_alone(run, tmp):
    path = tmp / "marker"
    assert run("file.managed", str(path))["changes"]["created"] is True
    assert path.read_text() == ""
    path.write_text("someone else's text\n")
    res = run("file.managed", str(path), mode="0600")
    assert res["changes"] == {"mode": "0600"} and path.read_text() == "someone else's text\n"
    res = run("file.managed", str(path), contents="new\n", replace=False)
    assert res["changes"] == {} and path.read_text() == "someone else's text\n"


def test_managed_contents_list_and_newline(run, tmp):
    path = tmp / "lines"
    run("file.managed", str(path), contents=["a", "b"])
    assert path.read_text() == "a\nb\n"
    run("file.managed", str(path), contents="no newline", contents_newline=False)
    assert path.read_text() == "no newline"


def test_managed_follows_a_symlink(run, tmp):
    target = tmp / "real.conf"
    target.write_text("old\n")
    link = tmp / "link.conf"
    link.symlink_to(target)
    run("file.managed", str(link), contents="new\n")
    assert link.is_symlink() and target.read_text() == "new\n"


def test_line_in_a_missing_directory_gives_advice_that_works(run, tmp):
    # file.line has no makedirs: it used to advise "makedirs: true", which the master then refused.
    failed = run("file.line", str(tmp / "missing" / "file.conf"), content="x = 1", create=True)
    assert failed["status"] == "failed" and "makedirs" not in failed["comment"], failed
    assert "file.directory" in failed["comment"], failed


def test_managed_makedirs(run, tmp):
    path = tmp / "a" / "b" / "file"
    failed = run("file.managed", str(path), contents="x")
    assert failed["status"] == "failed" and "makedirs: true creates it" in failed["comment"]
    # In test mode an earlier file.directory state may create the parent: a warning, not a failure.
    would = run("file.managed", str(path), test=True, contents="x")
    assert would["result"] is None and "does not exist yet" in would["comment"]
    assert run("file.managed", str(path), contents="x", makedirs=True)["result"] is True
    assert path.read_text() == "x\n"


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_managed_owner(run, tmp):
    path = tmp / "owned"
    res = run("file.managed", str(path), contents="x", user="nobody", group="nogroup")
    assert res["changes"]["user"] == "nobody" and res["changes"]["group"] == "nogroup"
    assert path.stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert run("file.managed", str(path), contents="y")["result"] is True
    assert path.stat().st_uid == pwd.getpwnam("nobody").pw_uid, "a rewrite keeps the owner"
    missing = run("file.managed", str(path), contents="y", user="no-such-user-pm")
    assert missing["status"] == "failed" and "no user 'no-such-user-pm'" in missing["comment"]
    # In test mode the user may come with a package an earlier state installs.
    would = run("file.managed", str(path), test=True, contents="z", user="no-such-user-pm")
    assert would["result"] is None and "does not exist yet" in would["comment"]


@pytest.mark.parametrize("args, message", [
    ({"name": "relative/path", "contents": "x"}, "must be an absolute path"),
    ({"mode": "0999"}, "is not an octal mode"),
    ({"mode": True}, "mode must be text or a whole number, not true"),  # checked before the state runs
    ({"contents": {"a": 1}}, "contents must be text"),
])
def test_managed_bad_input_is_a_clear_failure(run, tmp, args, message):
    name = args.pop("name", str(tmp / "f"))
    res = run("file.managed", name, **args)
    assert res["status"] == "failed" and message in res["comment"]
    assert "Traceback" not in res["comment"] and not (tmp / "f").exists()


def test_managed_on_a_directory_fails(run, tmp):
    res = run("file.managed", str(tmp), contents="x")
    assert res["status"] == "failed" and "is a directory" in res["comment"]


WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from piagent.fileio import write_atomic
path, size = sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
n = 0
while True:
    n += 1
    write_atomic(path, (b"A" if n % 2 else b"B") * size)
"""


def test_atomic_write_never_leaves_a_partial_file_when_killed(tmp):
    path = tmp / "big"
    size = 8 * 1024 * 1024
    path.write_bytes(b"O" * size)
    for delay in (0.05, 0.2, 0.35):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, source_path(tmp), str(path), str(size)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        data = path.read_bytes()
        assert len(data) == size and data in (b"A" * size, b"B" * size, b"O" * size)
    # The killed writer's temp file is cleaned up by the next write of the same file.
    write_atomic(str(path), b"done\n")
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".big.")] == []
    assert path.read_bytes() == b"done\n"


# ---------------------------------------------------------------------------------------------
# file.directory and file.absent

def test_directory(run, tmp):
    path = tmp / "srv" / "scratch"
    failed = run("file.directory", str(path))
    assert failed["status"] == "failed" and "makedirs" in failed["comment"]
    assert_cycle(run, "file.directory", str(path), lambda: not path.exists() or pytest.fail("created"),
                 lambda: (path.is_dir() and stat.S_IMODE(path.stat().st_mode) == 0o1777) or pytest.fail("mode"),
                 mode="1777", makedirs=True)
    res = run("file.directory", str(path), mode="0750")
    assert res["changes"] == {"mode": "0750"}
    (tmp / "plain").write_text("x")
    res = run("file.directory", str(tmp / "plain"))
    assert res["status"] == "failed" and "is not a directory" in res["comment"]


def test_absent_removes_files_and_trees_and_keeps_a_backup(run, tmp, state_dir):
    path = tmp / "old.list"
    path.write_text("deb http://old\n")
    assert_cycle(run, "file.absent", str(path), lambda: path.exists() or pytest.fail("removed in test mode"),
                 lambda: not path.exists() or pytest.fail("still there"))
    assert [p.read_text() for p in backups(state_dir, path)] == ["deb http://old\n"]
    tree = tmp / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("x")
    assert run("file.absent", str(tree))["changes"] == {"removed": str(tree)}
    assert not tree.exists()
    refused = run("file.absent", "/etc")
    assert refused["status"] == "failed" and "refusing" in refused["comment"] and Path("/etc").is_dir()


# ---------------------------------------------------------------------------------------------
# file.line

DPHYS = """\
# where we want the swapfile to be, this is the default
#CONF_SWAPFILE=/var/swap

# set size to absolute value
#CONF_SWAPSIZE=
CONF_MAXSWAP=2048
"""


def test_line_sets_a_key_in_place_of_its_commented_default(run, tmp):
    path = tmp / "dphys-swapfile"
    path.write_text(DPHYS)
    would, _ = assert_cycle(run, "file.line", str(path), lambda: path.read_text() == DPHYS or pytest.fail("changed"),
                            lambda: path.read_text() == DPHYS.replace("#CONF_SWAPSIZE=", "CONF_SWAPSIZE=0")
                            or pytest.fail(path.read_text()),
                            key="CONF_SWAPSIZE", value=0)
    assert "-#CONF_SWAPSIZE=\n+CONF_SWAPSIZE=0\n" in would["changes"]["diff"]
    # A new value replaces the setting in place.
    run("file.line", str(path), key="CONF_SWAPSIZE", value=100)
    assert path.read_text() == DPHYS.replace("#CONF_SWAPSIZE=", "CONF_SWAPSIZE=100")


def test_line_key_with_blank_separator_and_duplicates(run, tmp):
    path = tmp / "sshd_config"
    path.write_text("Port 22\nPermitRootLogin yes\nUsePAM yes\nPermitRootLogin prohibit-password\n")
    run("file.line", str(path), key="PermitRootLogin", value="no", separator=" ")
    # The later duplicate would win over the first: it goes.
    assert path.read_text() == "Port 22\nPermitRootLogin no\nUsePAM yes\n"


def test_line_appends_and_inserts_after(run, tmp):
    path = tmp / "modules"
    path.write_text("# /etc/modules\nloop")  # no newline at the end
    run("file.line", str(path), content="i2c-dev")
    assert path.read_text() == "# /etc/modules\nloop\ni2c-dev\n"
    run("file.line", str(path), content="w1-gpio", after="^# /etc/modules")
    assert path.read_text() == "# /etc/modules\nw1-gpio\nloop\ni2c-dev\n"
    assert run("file.line", str(path), content="w1-gpio")["changes"] == {}
    res = run("file.line", str(path), content="x", after="^nothing-matches")
    assert res["status"] == "failed" and "no line" in res["comment"]


def test_line_match_replaces_the_owned_line(run, tmp):
    path = tmp / "fstab"
    path.write_text("proc /proc proc defaults 0 0\n/dev/sda1 /data ext4 defaults 0 2\n")
    run("file.line", str(path), content="/dev/sda1 /data ext4 noatime 0 2", match=r"\s/data\s")
    assert path.read_text() == "proc /proc proc defaults 0 0\n/dev/sda1 /data ext4 noatime 0 2\n"


def test_line_delete(run, tmp):
    path = tmp / "conf"
    path.write_text("a=1\nb=2\n# b=3\nb=4\n")
    assert_cycle(run, "file.line", str(path), lambda: "b=2" in path.read_text() or pytest.fail("deleted"),
                 lambda: path.read_text() == "a=1\n# b=3\n" or pytest.fail(path.read_text()),
                 key="b", mode="delete")
    run("file.line", str(path), content="a=1", mode="absent")
    assert path.read_text() == "# b=3\n"
    assert run("file.line", str(tmp / "missing"), content="x", mode="delete")["changes"] == {}


def test_line_missing_file_and_create(run, tmp):
    path = tmp / "new.conf"
    res = run("file.line", str(path), content="x=1")
    assert res["status"] == "failed" and "create: true" in res["comment"]
    assert run("file.line", str(path), content="x=1", create=True)["result"] is True
    assert path.read_text() == "x=1\n"


@pytest.mark.parametrize("args, message", [
    ({}, "mode ensure needs content"),
    ({"content": "a", "mode": "insert"}, "mode must be ensure or delete"),
    ({"key": "k"}, "key needs a value"),
    ({"key": "k", "value": 1, "content": "k=1"}, "not both"),
    ({"content": "a\nb"}, "single line"),
    ({"match": "([", "content": "a"}, "not a valid regular expression"),
])
def test_line_bad_input(run, tmp, args, message):
    path = tmp / "f"
    path.write_text("keep\n")
    res = run("file.line", str(path), **args)
    assert res["status"] == "failed" and message in res["comment"] and path.read_text() == "keep\n"


# ---------------------------------------------------------------------------------------------
# file.blockreplace

DHCPCD = """\
# A sample configuration for dhcpcd.
hostname
clientid
persistent
"""


def test_blockreplace_appends_then_replaces_only_the_block(run, tmp):
    path = tmp / "dhcpcd.conf"
    path.write_text(DHCPCD)
    args = dict(marker_start="# BEGIN pimaster", marker_end="# END pimaster",
                content="interface eth0\nstatic ip_address=10.0.0.2/24\n", append_if_not_found=True)
    block = "# BEGIN pimaster\ninterface eth0\nstatic ip_address=10.0.0.2/24\n# END pimaster\n"
    assert_cycle(run, "file.blockreplace", str(path), lambda: path.read_text() == DHCPCD or pytest.fail("changed"),
                 lambda: path.read_text() == DHCPCD + block or pytest.fail(path.read_text()), **args)
    # Someone adds a line after the block; a new block content leaves it alone.
    path.write_text(path.read_text() + "slaac private\n")
    res = run("file.blockreplace", str(path), **dict(args, content="interface eth0\nstatic ip_address=10.0.0.3/24"))
    assert "-static ip_address=10.0.0.2/24\n+static ip_address=10.0.0.3/24\n" in res["changes"]["diff"]
    assert path.read_text() == DHCPCD + block.replace("0.2/24", "0.3/24") + "slaac private\n"


def test_blockreplace_without_markers_or_broken_markers_fails_clearly(run, tmp):
    path = tmp / "fstab"
    path.write_text("proc /proc proc defaults 0 0\n")
    res = run("file.blockreplace", str(path), content="x\n")
    assert res["status"] == "failed" and "append_if_not_found: true" in res["comment"]
    path.write_text("#-- start managed zone --\nx\n")
    res = run("file.blockreplace", str(path), content="y\n")
    assert res["status"] == "failed" and "without" in res["comment"] and path.read_text().endswith("x\n")
    path.write_text("#-- start managed zone --\nold\n#-- end managed zone --\n")
    run("file.blockreplace", str(path), content="")
    assert path.read_text() == "#-- start managed zone --\n#-- end managed zone --\n"
    res = run("file.blockreplace", str(path), content="#-- end managed zone --\n")
    assert res["status"] == "failed" and "marker" in res["comment"]


def test_blockreplace_prepends(run, tmp):
    path = tmp / "hosts"
    path.write_text("127.0.0.1 localhost\n")
    run("file.blockreplace", str(path), marker_start="# A", marker_end="# B", content="10.0.0.1 n1",
        prepend_if_not_found=True)
    assert path.read_text() == "# A\n10.0.0.1 n1\n# B\n127.0.0.1 localhost\n"


# ---------------------------------------------------------------------------------------------
# boot.cmdline and boot.config, on a copy of a Pi's boot partition

PI_CMDLINE = ("console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4  fsck.repair=yes "
              "rootwait quiet init=/usr/lib/raspberrypi-sys-mods/firstboot\n")


@pytest.fixture
def boot(tmp) -> Path:
    directory = tmp / "firmware"
    directory.mkdir()
    (directory / "cmdline.txt").write_text(PI_CMDLINE)
    return directory


def test_cmdline_adds_replaces_and_removes_only_what_is_named(run, boot):
    path = boot / "cmdline.txt"
    args = dict(present=["cgroup_memory=1", "cgroup_enable=memory", "fsck.repair=no", "console=ttyAMA0"],
                absent=["quiet", "init"], boot_dir=str(boot))
    expected = ("console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4  fsck.repair=no "
                "rootwait cgroup_memory=1 cgroup_enable=memory console=ttyAMA0\n")
    would, done = assert_cycle(run, "boot.cmdline", "cgroups", lambda: path.read_text() == PI_CMDLINE or pytest.fail(),
                               lambda: path.read_text() == expected or pytest.fail(path.read_text()), **args)
    for res in (would, done):
        assert res["changes"]["reboot_required"] is True
        assert res["changes"]["added"] == ["cgroup_memory=1", "cgroup_enable=memory", "fsck.repair=no", "console=ttyAMA0"]
        assert "quiet" in res["changes"]["removed"] and "fsck.repair=yes" in res["changes"]["removed"]
    assert "-console=serial0" in would["changes"]["diff"]
    # A repeatable parameter is added beside the others, and removing one value keeps the rest.
    run("boot.cmdline", "cg", present=["cgroup_enable=cpuset"], absent=["console=tty1"], boot_dir=str(boot))
    assert path.read_text() == ("console=serial0,115200 root=PARTUUID=4e639091-02 rootfstype=ext4  fsck.repair=no "
                                "rootwait cgroup_memory=1 cgroup_enable=memory console=ttyAMA0 cgroup_enable=cpuset\n")


def test_cmdline_keeps_quoted_values_and_other_lines(run, boot):
    path = boot / "cmdline.txt"
    path.write_text('root=/dev/mmcblk0p2 dyndbg="file drivers/usb/* +p" quiet')  # no newline: kept so
    run("boot.cmdline", "x", present=["splash"], boot_dir=str(boot))
    assert path.read_text() == 'root=/dev/mmcblk0p2 dyndbg="file drivers/usb/* +p" quiet splash'
    run("boot.cmdline", "x", absent=["dyndbg"], boot_dir=str(boot))
    assert path.read_text() == "root=/dev/mmcblk0p2 quiet splash"


@pytest.mark.parametrize("args, message", [
    ({}, "give present and/or absent"),
    ({"present": ["quiet"], "absent": ["quiet"]}, "both present and absent"),
    ({"present": ["a=1"], "absent": ["a"]}, "both present and absent"),
    ({"present": ["two words"]}, "is not one kernel parameter"),
    ({"present": [3, None]}, "must be a string or a list of strings"),
])
def test_cmdline_bad_input(run, boot, args, message):
    res = run("boot.cmdline", "x", boot_dir=str(boot), **args)
    assert res["status"] == "failed" and message in res["comment"]
    assert (boot / "cmdline.txt").read_text() == PI_CMDLINE


def test_cmdline_without_a_boot_partition_says_so(run, tmp):
    res = run("boot.cmdline", "x", present=["quiet"], boot_dir=str(tmp))
    assert res["status"] == "failed" and f"{tmp}/cmdline.txt does not exist" in res["comment"]


PI_CONFIG = """\
# For more options and information see http://rpf.io/configtxt
# Uncomment some or all of these to enable the optional hardware interfaces
#dtparam=i2c_arm=on
#dtparam=spi=on

# Enable audio (loads snd_bcm2835)
dtparam=audio=on

# Enable DRM VC4 V3D driver
dtoverlay=vc4-kms-v3d
max_framebuffers=2

# Run in 64-bit mode
arm_64bit=1

[cm4]
# Enable host mode on the 2711 built-in XHCI USB controller.
otg_mode=1

[pi4]
arm_boost=1

[all]
"""


def test_config_replaces_in_place_and_uncomments(run, boot):
    path = boot / "config.txt"
    path.write_text(PI_CONFIG)
    # dtparam=audio with value off owns the audio line only.
    would, done = assert_cycle(run, "boot.config", "dtparam=audio", lambda: path.read_text() == PI_CONFIG or pytest.fail(),
                               lambda: path.read_text() == PI_CONFIG.replace("dtparam=audio=on", "dtparam=audio=off")
                               or pytest.fail(path.read_text()), value="off", boot_dir=str(boot))
    assert done["changes"]["reboot_required"] is True and "+dtparam=audio=off" in would["changes"]["diff"]
    # The same setting spelled as dtparam: audio=on, with YAML's `on` (True) meaning "on".
    run("boot.config", "dtparam", value="audio=on", boot_dir=str(boot))
    assert path.read_text() == PI_CONFIG
    run("boot.config", "dtparam=i2c_arm", value=True, boot_dir=str(boot))
    assert "\ndtparam=i2c_arm=on\n#dtparam=spi=on\n" in path.read_text()
    run("boot.config", "arm_64bit", value=0, boot_dir=str(boot))
    assert "\narm_64bit=0\n" in path.read_text() and "arm_64bit=1" not in path.read_text()


def test_config_adds_overlays_beside_others_and_into_sections(run, boot):
    path = boot / "config.txt"
    path.write_text(PI_CONFIG)
    res = run("boot.config", "dtoverlay", value="w1-gpio,gpiopin=4", boot_dir=str(boot))
    assert res["result"] is True
    text = path.read_text()
    assert "dtoverlay=vc4-kms-v3d\n" in text, "another overlay stays"
    assert text.endswith("[all]\ndtoverlay=w1-gpio,gpiopin=4\n"), "unconditional: at the end, under [all]"
    run("boot.config", "dtoverlay", value="w1-gpio,gpiopin=17", boot_dir=str(boot))
    assert path.read_text() == text.replace("gpiopin=4", "gpiopin=17")
    # Into the existing [pi4] section, after its last setting.
    run("boot.config", "over_voltage", value=2, section="pi4", boot_dir=str(boot))
    assert "[pi4]\narm_boost=1\nover_voltage=2\n\n[all]\n" in path.read_text()
    # arm_boost outside [pi4] is another setting than the one in [pi4].
    run("boot.config", "arm_boost", value=0, section="[pi4]", boot_dir=str(boot))
    assert "[pi4]\narm_boost=0\n" in path.read_text() and path.read_text().count("arm_boost") == 1
    # A new section goes at the end, followed by [all] so that what follows stays unconditional.
    run("boot.config", "gpu_mem", value=16, section="pi0", boot_dir=str(boot))
    assert path.read_text().endswith("[pi0]\ngpu_mem=16\n[all]\n")
    assert run("boot.config", "gpu_mem", value=16, section="pi0", boot_dir=str(boot))["changes"] == {}


def test_config_appends_under_all_when_the_file_ends_in_a_filter(run, boot):
    path = boot / "config.txt"
    path.write_text("arm_64bit=1\n[pi4]\narm_boost=1\n")
    run("boot.config", "enable_uart", value=True, boot_dir=str(boot))
    assert path.read_text() == "arm_64bit=1\n[pi4]\narm_boost=1\n[all]\nenable_uart=1\n"
    run("boot.config", "arm_64bit", value=1, boot_dir=str(boot))
    assert path.read_text() == "arm_64bit=1\n[pi4]\narm_boost=1\n[all]\nenable_uart=1\n"


def test_config_finds_the_boot_partition_and_rejects_bad_keys(run, boot):
    res = run("boot.config", "bad key", value=1, boot_dir=str(boot))
    assert res["status"] == "failed" and "is not a config.txt key" in res["comment"]
    res = run("boot.config", "gpu_mem", value=[1], boot_dir=str(boot))
    assert res["status"] == "failed" and "value must be" in res["comment"]
    # config.txt missing next to cmdline.txt: created (the firmware's defaults apply otherwise).
    run("boot.config", "gpu_mem", value=16, boot_dir=str(boot))
    assert (boot / "config.txt").read_text() == "gpu_mem=16\n"


# ---------------------------------------------------------------------------------------------
# host.present / host.absent on a hosts file

HOSTS = """\
127.0.0.1\tlocalhost
::1\t\tlocalhost ip6-localhost ip6-loopback

127.0.1.1\tnode01
10.0.0.12   node02   # the second Pi
"""


def test_host_present_adds_names_to_lines_and_new_lines(run, tmp):
    path = tmp / "hosts"
    path.write_text(HOSTS)
    assert_cycle(run, "host.present", "node03", lambda: path.read_text() == HOSTS or pytest.fail(),
                 lambda: path.read_text() == HOSTS + "10.0.0.13\tnode03\n" or pytest.fail(path.read_text()),
                 ip="10.0.0.13", hosts_file=str(path))
    run("host.present", "n2", ip=["10.0.0.12"], hosts_file=str(path))
    assert "10.0.0.12   node02 n2   # the second Pi\n" in path.read_text()
    # The node moved: clean takes it off its old address.
    run("host.present", "node03", ip="10.0.0.23", clean=True, hosts_file=str(path))
    assert path.read_text() == HOSTS.replace("node02 ", "node02 n2 ") + "10.0.0.23\tnode03\n"


def test_host_absent_removes_the_name_and_emptied_lines(run, tmp):
    path = tmp / "hosts"
    path.write_text(HOSTS + "10.0.0.13 node03 n3\n")
    assert_cycle(run, "host.absent", "node02", lambda: "node02" in path.read_text() or pytest.fail(),
                 lambda: path.read_text() == HOSTS.replace("10.0.0.12   node02   # the second Pi\n", "")
                 + "10.0.0.13 node03 n3\n" or pytest.fail(path.read_text()), hosts_file=str(path))
    run("host.absent", "node03", ip="10.0.0.99", hosts_file=str(path))
    assert "node03" in path.read_text()
    run("host.absent", "node03", ip="10.0.0.13", hosts_file=str(path))
    assert path.read_text().endswith("\n10.0.0.13 n3\n"), "the address keeps its spacing"


@pytest.mark.parametrize("fun, args, message", [
    ("host.present", {"ip": "10.0.0.300"}, "is not an IP address"),
    ("host.present", {"ip": []}, "ip must name at least one address"),
    ("host.absent", {"ip": "x"}, "is not an IP address"),
])
def test_host_bad_input(run, tmp, fun, args, message):
    path = tmp / "hosts"
    path.write_text(HOSTS)
    res = run(fun, "node09", hosts_file=str(path), **args)
    assert res["status"] == "failed" and message in res["comment"] and path.read_text() == HOSTS


def test_hostname_rejects_bad_names_before_touching_anything(run, tmp):
    path = tmp / "hosts"
    path.write_text(HOSTS)
    for bad in ("Node_1", "-node", "a" * 65, "node..x"):
        res = run("host.hostname", bad, hosts_file=str(path))
        assert res["status"] == "failed" and "not a valid hostname" in res["comment"], bad
    assert path.read_text() == HOSTS


# ---------------------------------------------------------------------------------------------
# mount: the fstab part (mounting itself runs in lab nodes)

FSTAB = """\
proc            /proc           proc    defaults          0       0
PARTUUID=4e639091-01  /boot/firmware  vfat    defaults          0       2
# a comment
PARTUUID=4e639091-02  /               ext4    defaults,noatime  0       1
"""


def test_mounted_test_mode_shows_the_fstab_entry_and_mounts_nothing(run, tmp):
    path = tmp / "fstab"
    path.write_text(FSTAB)
    mount_point = tmp / "shared dir"
    res = run("mount.mounted", str(mount_point), test=True, device="node01:/srv/shared", fstype="nfs",
              opts=["rw", "hard", "_netdev"], config=str(path), mkmnt=True)
    assert res["result"] is None and res["changes"]["mounted"] is True and res["changes"]["created"]
    assert f"+node01:/srv/shared {str(mount_point).replace(' ', chr(92) + '040')} nfs rw,hard,_netdev 0 0\n" \
        in res["changes"]["diff"]
    assert path.read_text() == FSTAB and not mount_point.exists()


def test_mounted_bad_input(run, tmp):
    path = tmp / "fstab"
    path.write_text(FSTAB)
    for args, message in (({"device": "x", "fstype": "ext 4"}, "fstype must be a non-empty word"),
                          ({"device": "", "fstype": "ext4"}, "device must name what to mount"),
                          ({"device": "x", "fstype": "ext4", "opts": "rw,,x"}, "empty option"),
                          ({"device": "x", "fstype": "ext4", "dump": "a"}, "dump must be a number")):
        res = run("mount.mounted", str(tmp / "m"), config=str(path), **args)
        assert res["status"] == "failed" and message in res["comment"], res
    assert path.read_text() == FSTAB


def test_unmounted_persist_removes_only_that_entry(run, tmp):
    path = tmp / "fstab"
    entry = "server:/export  /mnt/nfs  nfs  defaults  0  0\n"
    path.write_text(FSTAB + entry)
    mount_point = "/mnt/nfs"  # nothing is mounted there on a test machine: only the fstab part acts
    if os.path.ismount(mount_point):
        pytest.skip(f"{mount_point} is mounted on this machine")
    assert run("mount.unmounted", mount_point, config=str(path))["changes"] == {}, "persist defaults to false"
    assert_cycle(run, "mount.unmounted", mount_point, lambda: path.read_text() == FSTAB + entry or pytest.fail(),
                 lambda: path.read_text() == FSTAB or pytest.fail(path.read_text()), persist=True, config=str(path))


# ---------------------------------------------------------------------------------------------
# sysctl: the config file (runtime values change only inside lab nodes)

def test_sysctl_writes_its_config_line_when_the_kernel_already_agrees(run, tmp):
    # kernel.ostype is "Linux" on every Linux: the runtime part has nothing to do, the file part acts.
    path = tmp / "99-pimaster.conf"
    assert_cycle(run, "sysctl.present", "kernel.ostype", lambda: not path.exists() or pytest.fail(),
                 lambda: path.read_text().endswith("\nkernel.ostype = Linux\n") or pytest.fail(path.read_text()),
                 value="Linux", config=str(path))
    path.write_text("# mine\nkernel.ostype=Other\nvm.x = 1\n kernel.ostype = Again\n")
    run("sysctl.present", "kernel.ostype", value="Linux", config=str(path))
    assert path.read_text() == "# mine\nkernel.ostype = Linux\nvm.x = 1\n"


def test_sysctl_test_mode_reports_the_runtime_change(run, tmp):
    path = tmp / "s.conf"
    current = Path("/proc/sys/kernel/ostype").read_text().strip()
    res = run("sysctl.present", "kernel.ostype", test=True, value="NotLinux", config=str(path))
    assert res["result"] is None and res["changes"]["value"] == {"old": current, "new": "NotLinux"}
    assert not path.exists() and Path("/proc/sys/kernel/ostype").read_text().strip() == current


def test_sysctl_unknown_key_and_bad_input(run, tmp):
    path = tmp / "s.conf"
    res = run("sysctl.present", "net.no.such.key", value=1, config=str(path))
    assert res["status"] == "failed" and "the kernel has no setting net.no.such.key" in res["comment"]
    res = run("sysctl.present", "kernel/../../etc", value=1, config=str(path))
    assert res["status"] == "failed" and "is not a sysctl name" in res["comment"]
    assert not path.exists()


# ---------------------------------------------------------------------------------------------
# cmd.run

def test_cmd_run_with_creates_captures_output(run, tmp):
    marker = tmp / "built"
    command = f"echo building; echo warn >&2; touch '{marker}'"
    would, done = assert_cycle(run, "cmd.run", command, lambda: not marker.exists() or pytest.fail("ran"),
                               lambda: marker.exists() or pytest.fail("did not run"), creates=str(marker))
    assert would["changes"] == {"command": command}
    assert done["changes"] == {"retcode": 0, "stdout": "building\n", "stderr": "warn\n"}


def test_cmd_run_env_cwd_shell_and_failure(run, tmp):
    res = run("cmd.run", 'echo "$GREETING from $(pwd) in $0"', env={"GREETING": "hi"}, cwd=str(tmp), shell="/bin/bash")
    assert res["changes"]["stdout"] == f"hi from {tmp} in /bin/bash\n"
    res = run("cmd.run", "echo out; exit 3")
    assert res["status"] == "failed" and res["changes"]["retcode"] == 3 and "exit status 3" in res["comment"]
    assert run("cmd.run", "exit 3", success_retcodes=[3])["result"] is True
    res = run("cmd.run", "sleep 5", timeout=0.5)
    assert res["status"] == "failed" and "timed out" in res["comment"]


@pytest.mark.skipif(not IS_ROOT, reason="runas needs root")
def test_cmd_run_as_another_user(run):
    assert run("cmd.run", "id -un", runas="nobody")["changes"]["stdout"] == "nobody\n"


@pytest.mark.parametrize("args, message", [
    ({"cwd": "/no/such/dir"}, "cwd /no/such/dir is not a directory"),
    ({"runas": "no-such-user-pm"}, "no user 'no-such-user-pm'"),
    ({"env": ["A=1"]}, "env must be a mapping"),
    ({"creates": "relative"}, "creates must be absolute"),
    ({"shell": "/bin/no-such-shell"}, "is not an executable"),
])
def test_cmd_run_bad_input_runs_nothing(run, tmp, args, message):
    marker = tmp / "ran"
    res = run("cmd.run", f"touch {marker}", **args)
    assert res["status"] == "failed" and message in res["comment"] and not marker.exists()


# ---------------------------------------------------------------------------------------------
# The text editing of the longest states, without files: text in, text out

def test_file_line_text_editing():
    from piagent.states.file import edit_line, line_spec

    text = "a=1\n#b=0\nc=3\nb=2\nb=9"
    assert edit_line(text, line_spec(key="b", value=5), "f") == ("a=1\n#b=0\nc=3\nb=5\n",
                                                                ("set b in f", "set b in f"))
    assert edit_line("a=1\n#b=0\n", line_spec(key="b", value=5))[0] == "a=1\nb=5\n"
    assert edit_line("x\r\ny", line_spec(content="z", before="^y")) == ("x\r\nz\ny", ("add the line to the file",
                                                                               "added the line to the file"))
    assert edit_line("x\n", line_spec(content="x")) == ("x\n", ("", ""))
    assert edit_line("b=1\nb=2\n", line_spec(key="b", value=2, mode="delete"), "f") == (
        "b=1\n", ("delete 1 line from f", "deleted 1 line from f"))
    assert edit_line("PermitRootLogin yes\n", line_spec(key="PermitRootLogin", value="no", separator=" "))[0] == \
        "PermitRootLogin no\n"
    with pytest.raises(Exception, match="no line of f matches after"):
        edit_line("x\n", line_spec(content="y", after="^nothing"), "f")


def test_blockreplace_text_editing():
    from piagent.states.file import replace_block

    assert replace_block("a\n# S\nold\n# E\nb\n", "# S", "# E", "new\n")[0] == "a\n# S\nnew\n# E\nb\n"
    assert replace_block("a", "# S", "# E", "x\n", append=True)[0] == "a\n# S\nx\n# E\n"
    assert replace_block("a\n", "# S", "# E", "x\n", prepend=True)[0] == "# S\nx\n# E\na\n"
    with pytest.raises(Exception, match="without '# E' after it"):
        replace_block("# S\nx\n", "# S", "# E", "")


def test_boot_text_editing():
    from piagent.states.boot import edit_cmdline, set_config

    assert edit_cmdline("console=tty1  root=/dev/x quiet\n", ["splash", "root=/dev/y"], ["quiet"]) == (
        "console=tty1  root=/dev/y splash\n", ["splash", "root=/dev/y"], ["quiet", "root=/dev/x"])
    assert set_config("#dtparam=i2c_arm=on\n[pi4]\nx=1\n", "dtparam=i2c_arm=on", None) == \
        "dtparam=i2c_arm=on\n[pi4]\nx=1\n"
    assert set_config("[pi4]\nx=1\n\n[all]\n", "y=2", "pi4") == "[pi4]\nx=1\ny=2\n\n[all]\n"
    assert set_config("", "gpu_mem=16", "pi0") == "[pi0]\ngpu_mem=16\n[all]\n"


def test_fstab_sysctl_modules_swap_and_hosts_text_editing():
    from piagent.states.host import _HostsLine, hosts_with
    from piagent.states.kmod import list_module
    from piagent.states.mount import FstabEntry, fstab_with, fstab_without
    from piagent.states.swap import comment_out_swap
    from piagent.states.sysctl import set_line

    entry = FstabEntry("tmpfs", "/mnt/t", "tmpfs", ["size=1m"], 0, 0)
    text = "# c\ntmpfs /mnt/t tmpfs defaults 0 0\n/dev/sda1 /mnt/t ext4 defaults 0 2\n"
    assert fstab_with(text, entry) == "# c\ntmpfs /mnt/t tmpfs size=1m 0 0\n"
    assert fstab_with("proc /proc proc defaults 0 0", entry) == "proc /proc proc defaults 0 0\n" + entry.line()
    assert fstab_without(text, "/mnt/t", "/dev/sda1") == "# c\ntmpfs /mnt/t tmpfs defaults 0 0\n"
    assert fstab_without(text, "/mnt/t") == "# c\n"
    assert comment_out_swap("/dev/sda2 none swap sw 0 0\n# /x none swap\n") == \
        "#/dev/sda2 none swap sw 0 0\n# /x none swap\n"
    assert set_line("# h\nvm.x=1\n vm.x = 2\n", "vm.x", "3") == "# h\nvm.x = 3\n"
    assert list_module("overlay", "br_netfilter") == "overlay\nbr_netfilter\n"
    assert list_module("br-netfilter  # for k8s\n", "br_netfilter") == "br-netfilter  # for k8s\n"
    lines = [_HostsLine(t) for t in "127.0.0.1 localhost\n10.0.0.2   old n2  # moved\n".splitlines(keepends=True)]
    assert hosts_with(lines, "n2", ["10.0.0.12"], clean=True) == "127.0.0.1 localhost\n10.0.0.2   old  # moved\n" \
                                                                 "10.0.0.12\tn2\n"
