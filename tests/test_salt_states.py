"""Salt's names for state functions: user.present/absent, group.present/absent, timezone.system,
kmod.present, file.append, file.replace, file.symlink and cmd.wait.

Each function is shown to report a change in test mode and make none, make it in a real run, and
change nothing in a second run (test mode then reports nothing either).

Where each runs, and what is not real:

- file.append, file.replace, file.symlink and cmd.wait: real files and commands in temp dirs,
  through the engine, as tests/test_state_modules.py does.
- user, group and timezone (without systemd): the real functions running the system's real
  useradd/usermod/userdel/chpasswd/groupadd/groupmod/gpasswd/groupdel, in a child process in a
  throwaway mount namespace (``unshare --mount``) where /etc is a private copy on a tmpfs and
  /home, /var/log, /var/mail (and /run/systemd, if systemd runs here) are empty tmpfs mounts. Each
  test checks that this machine's account files, time zone, /home and mount table are as before
  and that the namespace is gone afterwards (``private_etc``). Needs root and util-linux' unshare.
- timezone through timedatectl and kmod.present: timedatectl's and modprobe's output replayed
  from a recording (tests/test_state_replay.py's ``replay``): no systemd-timedated runs here and
  this machine's kernel modules are left alone. Their names say ``replayed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from harness import source_path
from piagent.engine import run_states
from piagent.states import catalog, registry
from piagent.states import timezone as timezone_module
from piagent.states.file import append_text, regex_flags, replace_text
from piagent.states.timezone import rtc_is_local, set_rtc_mode
import test_state_replay
from test_state_replay import replay

real_commands = test_state_replay.real_commands  # the fixture: every attempt to start a real process

IS_ROOT = os.geteuid() == 0
SALT_FUNCTIONS = ("user.present", "user.absent", "group.present", "group.absent", "timezone.system",
                  "kmod.present", "file.append", "file.replace", "file.symlink", "cmd.wait")


def cycle(run, fun: str, name: str, before, after, **args) -> tuple[dict, dict]:
    """Test mode reports a change and makes none; a real run makes it; a second run (and a second
    test-mode run) changes nothing. ``before()``/``after()``: whether the system looks as it should."""
    would = run(fun, name, test=True, **args)
    assert would["status"] == "changed" and would["result"] is None and would["changes"], would
    assert before(), f"test mode changed the system: {would}"
    done = run(fun, name, **args)
    assert done["status"] == "changed" and done["result"] is True, done
    assert after(), f"the real run did not make the change: {done}"
    again = run(fun, name, **args)
    assert again["status"] == "ok" and again["result"] is True and again["changes"] == {}, again
    again_test = run(fun, name, test=True, **args)
    assert again_test["status"] == "ok" and again_test["result"] is True and again_test["changes"] == {}, again_test
    assert after(), "the second run undid the change"
    return would, done


def test_salts_names_are_in_the_catalogue_with_a_documented_example():
    functions, entries = registry(), catalog()
    for full_name in SALT_FUNCTIONS:
        doc = functions[full_name].__doc__
        assert "Example::" in doc and full_name.split(".")[1] in doc, full_name
        assert entries[full_name]["summary"], full_name
    assert entries["file.replace"]["required"] == ["pattern", "repl"]
    assert entries["file.symlink"]["required"] == ["target"]
    assert entries["file.append"]["required"] == ["text"]
    assert entries["kmod.present"]["types"]["mods"] == ["list", "null"]
    assert entries["user.present"]["types"]["gid"] == ["str", "int", "null"]
    # cmd.wait takes exactly cmd.run's arguments: a Salt file switches between them unchanged.
    assert entries["cmd.wait"]["args"] == entries["cmd.run"]["args"]
    assert entries["cmd.wait"]["types"] == entries["cmd.run"]["types"]


# ---------------------------------------------------------------------------------------------
# file.append

def test_append_adds_each_missing_piece_once(run, tmp, state_dir):
    path = tmp / "modules"
    path.write_text("# /etc/modules\ni2c-dev")  # no newline at the end
    would, done = cycle(run, "file.append", str(path), text=["i2c-dev", "w1-gpio", "spi-dev"],
                        before=lambda: path.read_text() == "# /etc/modules\ni2c-dev",
                        after=lambda: path.read_text() == "# /etc/modules\ni2c-dev\nw1-gpio\nspi-dev\n")
    assert would["comment"] == f"would append 2 lines to {path}"
    assert done["comment"] == f"appended 2 lines to {path}"
    assert done["changes"]["diff"].endswith("+w1-gpio\n+spi-dev\n")
    assert len(list((state_dir / "backup" / str(tmp).lstrip("/")).glob("modules.*"))) == 1


def test_append_a_multi_line_text_is_one_piece_and_whitespace_is_ignored_by_default(run, tmp):
    path = tmp / "motd"
    path.write_text("Welcome\n\nThis   node is\tmanaged.\n")
    res = run("file.append", str(path), text="This node is managed.")
    assert res["status"] == "ok" and path.read_text() == "Welcome\n\nThis   node is\tmanaged.\n"
    res = run("file.append", str(path), text="This node is managed.", ignore_whitespace=False)
    assert res["status"] == "changed" and path.read_text().endswith("managed.\nThis node is managed.\n")
    block = "Rules:\n  no reboots\n"
    assert run("file.append", str(path), text=block)["status"] == "changed"
    assert run("file.append", str(path), text=block)["status"] == "ok"
    assert run("file.append", str(path), text="Rules:\n  no reboots\n  ever")["status"] == "changed"
    assert path.read_text().endswith("Rules:\n  no reboots\nRules:\n  no reboots\n  ever\n")


def test_append_creates_a_missing_file_and_its_directories_with_makedirs(run, tmp):
    path = tmp / "new" / "dir" / "list"
    failed = run("file.append", str(path), text="one")
    assert failed["status"] == "failed" and "makedirs: true" in failed["comment"] and not path.parent.exists()
    cycle(run, "file.append", str(path), text=["one", 2], makedirs=True,
          before=lambda: not path.exists(),
          after=lambda: path.read_text() == "one\n2\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_append_text_editing():
    assert append_text("", ["a"]) == ("a\n", ["a"])
    assert append_text("a\nb\n", ["b", "c", "c"]) == ("a\nb\nc\n", ["c"])
    assert append_text("x  y\n", ["x y"]) == ("x  y\n", [])
    assert append_text("x  y\n", ["x y"], ignore_whitespace=False) == ("x  y\nx y\n", ["x y"])
    assert append_text("a\r\nb\r\n", ["b"], ignore_whitespace=False)[1] == []
    # A piece is found as whole lines only, not inside a longer one.
    assert append_text("PermitRootLogin no\n", ["Login no"])[1] == ["Login no"]


# ---------------------------------------------------------------------------------------------
# file.replace

def test_replace_substitutes_over_the_whole_file_and_is_idempotent(run, tmp):
    path = tmp / "sshd_config"
    path.write_text("Port 22\n#PermitRootLogin prohibit-password\nUsePAM yes\n")
    would, done = cycle(run, "file.replace", str(path), pattern=r"^#?PermitRootLogin .*$", repl="PermitRootLogin no",
                        before=lambda: "#PermitRootLogin" in path.read_text(),
                        after=lambda: path.read_text() == "Port 22\nPermitRootLogin no\nUsePAM yes\n")
    assert would["comment"] == f"would replace 1 match in {path}"
    assert "-#PermitRootLogin prohibit-password" in done["changes"]["diff"]


def test_replace_groups_count_flags_and_backslash_literal(run, tmp):
    path = tmp / "config.txt"
    path.write_text("gpu_mem=64\nGPU_MEM=128\ndtparam=audio=on\n")
    res = run("file.replace", str(path), pattern=r"^gpu_mem=(\d+)$", repl=r"gpu_mem=16 # was \1",
              flags=["IGNORECASE", "MULTILINE"], count=1)
    assert res["status"] == "changed", res
    assert path.read_text() == "gpu_mem=16 # was 64\nGPU_MEM=128\ndtparam=audio=on\n"
    run("file.replace", str(path), pattern="audio=on", repl=r"audio=\1", backslash_literal=True)
    assert path.read_text().endswith("dtparam=audio=\\1\n")
    # Salt's default flags are MULTILINE (8); without it ^ is the start of the file only.
    assert run("file.replace", str(path), pattern="^GPU_MEM", repl="x", flags=0)["changes"] == {}
    assert run("file.replace", str(path), pattern="^GPU_MEM", repl="gpu", flags=8)["status"] == "changed"
    # A pattern spanning lines: the whole file is one text.
    run("file.replace", str(path), pattern=r"gpu=128\ndtparam", repl="dtparam")
    assert path.read_text() == "gpu_mem=16 # was 64\ndtparam=audio=\\1\n"


def test_replace_appends_or_prepends_when_not_found_once(run, tmp):
    path = tmp / "dhcpcd.conf"
    path.write_text("hostname\nclientid")
    _, done = cycle(run, "file.replace", str(path), pattern=r"^noipv6rs.*$", repl="noipv6rs",
                    append_if_not_found=True,
                    before=lambda: "noipv6rs" not in path.read_text(),
                    after=lambda: path.read_text() == "hostname\nclientid\nnoipv6rs\n")
    assert done["comment"] == f"appended the content (the pattern is not found) in {path}"
    # repl with a group reference: not_found_content is what is added; found as a line next time.
    args = dict(pattern=r"^static ip_address=(\S+)$", repl=r"static ip_address=\1",
                not_found_content="static ip_address=10.0.0.5/24", prepend_if_not_found=True)
    cycle(run, "file.replace", str(path), **args,
          before=lambda: "static" not in path.read_text(),
          after=lambda: path.read_text().startswith("static ip_address=10.0.0.5/24\nhostname\n"))


def test_replace_missing_file_bad_input_and_hidden_changes(run, tmp):
    path = tmp / "missing"
    res = run("file.replace", str(path), pattern="a", repl="b")
    assert res["status"] == "failed" and "does not exist" in res["comment"]
    assert run("file.replace", str(path), pattern="a", repl="b", test=True)["status"] == "changed"
    res = run("file.replace", str(path), pattern="a", repl="b", ignore_if_missing=True)
    assert res["status"] == "ok" and not path.exists()
    path.write_text("secret=1\n")
    for args, message in ((dict(pattern="(", repl="x"), "not a valid regular expression"),
                          (dict(pattern="s", repl="x", flags=["NOPE"]), "flags: 'NOPE' is not one of"),
                          (dict(pattern="s", repl="x", count=-1), "count must be"),
                          (dict(pattern="s", repl=r"\2"), "does not fit the pattern"),
                          (dict(pattern="s", repl="x", append_if_not_found=True, prepend_if_not_found=True),
                           "not both"),
                          (dict(pattern="", repl="x"), "must not be empty")):
        res = run("file.replace", str(path), **args)
        assert res["status"] == "failed" and message in res["comment"], (args, res)
        assert path.read_text() == "secret=1\n"
    res = run("file.replace", str(path), pattern="secret=1", repl="secret=2", show_changes=False, backup=False)
    assert res["status"] == "changed" and "secret" not in json.dumps(res["changes"])
    assert path.read_text() == "secret=2\n"


def test_replace_text_editing():
    import re
    assert replace_text("a\nb\n", re.compile("^b$", re.M), "c")[0] == "a\nc\n"
    assert replace_text("a\nb\n", re.compile("x"), "c")[0] == "a\nb\n"
    assert replace_text("a", re.compile("x"), "c", append=True)[0] == "a\nc\n"
    assert replace_text("c\r\na\r\n", re.compile("x"), "c", append=True)[0] == "c\r\na\r\n"
    assert replace_text("xc\n", re.compile("x$"), "c", append=True)[0] == "xc\nc\n"  # a line, not a part of one
    assert regex_flags(["i", "re.MULTILINE"]) == re.I | re.M and regex_flags(8) == re.M


# ---------------------------------------------------------------------------------------------
# file.symlink

def test_symlink_creates_repoints_and_is_idempotent(run, tmp):
    link = tmp / "bin" / "python"
    failed = run("file.symlink", str(link), target="/usr/bin/python3")
    assert failed["status"] == "failed" and "makedirs: true" in failed["comment"]
    _, done = cycle(run, "file.symlink", str(link), target="/usr/bin/python3", makedirs=True,
                    before=lambda: not os.path.lexists(link),
                    after=lambda: os.readlink(link) == "/usr/bin/python3")
    assert done["comment"] == f"made the symlink {link} -> /usr/bin/python3"
    would, _ = cycle(run, "file.symlink", str(link), target="python3.11",
                     before=lambda: os.readlink(link) == "/usr/bin/python3",
                     after=lambda: os.readlink(link) == "python3.11")
    assert would["changes"] == {"old": "/usr/bin/python3", "new": "python3.11"}
    assert [p.name for p in link.parent.iterdir()] == ["python"]  # no temp link left


def test_symlink_leaves_a_file_alone_unless_force_or_backupname(run, tmp, state_dir):
    path = tmp / "default"
    path.write_text("old site\n")
    res = run("file.symlink", str(path), target="../available/cluster")
    assert res["status"] == "failed" and "force: true" in res["comment"] and path.read_text() == "old site\n"
    cycle(run, "file.symlink", str(path), target="../available/cluster", backupname="default.orig",
          before=lambda: path.is_file() and not path.is_symlink(),
          after=lambda: (os.readlink(path) == "../available/cluster"
                         and (tmp / "default.orig").read_text() == "old site\n"))
    other = tmp / "other"
    other.write_text("a file\n")
    cycle(run, "file.symlink", str(other), target="/etc/hostname", force=True,
          before=lambda: other.is_file() and not other.is_symlink(),
          after=lambda: os.readlink(other) == "/etc/hostname")
    kept = list((state_dir / "backup" / str(tmp).lstrip("/")).glob("other.*"))
    assert len(kept) == 1 and kept[0].read_text() == "a file\n"
    directory = tmp / "adir"
    (directory / "sub").mkdir(parents=True)
    assert run("file.symlink", str(directory), target="/srv")["status"] == "failed" and directory.is_dir()
    assert run("file.symlink", str(directory), target="/srv", force=True)["status"] == "changed"
    assert os.readlink(directory) == "/srv"
    assert "refusing" in run("file.symlink", "/etc", target="/srv", force=True)["comment"]


@pytest.mark.skipif(not IS_ROOT, reason="lchown to another user needs root")
def test_symlink_owner(run, tmp):
    link = tmp / "owned"
    cycle(run, "file.symlink", str(link), target="/nowhere", user="nobody", group="nogroup",
          before=lambda: not os.path.lexists(link),
          after=lambda: os.lstat(link).st_uid == 65534)
    os.lchown(link, 0, 0)
    res = run("file.symlink", str(link), target="/nowhere", user="nobody")
    assert res["changes"] == {"user": "nobody"} and os.lstat(link).st_uid == 65534


# ---------------------------------------------------------------------------------------------
# cmd.wait: the command runs only when a watched state changed (the engine's watch, as for
# service.running's restart)

def wait_job(tmp: Path, contents: str, requisite: str = "watch") -> list[dict]:
    conf, ran = tmp / "exports", tmp / "ran"
    return [{"id": str(conf), "fun": "file.managed", "name": str(conf), "args": {"contents": contents}},
            {"id": "exportfs", "fun": "cmd.wait", "name": f"echo ran >> {ran}", "args": {},
             requisite: [0]}]


def test_cmd_wait_runs_only_when_a_watched_state_changed(tmp, state_dir):
    ran = tmp / "ran"
    runs = lambda: ran.read_text().count("ran") if ran.exists() else 0  # noqa: E731

    would = run_states(wait_job(tmp, "one"), test=True, state_dir=str(state_dir))
    assert would[1]["status"] == "changed" and would[1]["result"] is None, would[1]
    assert would[1]["comment"] == f"would run: echo ran >> {ran}" and runs() == 0
    first = run_states(wait_job(tmp, "one"), state_dir=str(state_dir))
    assert first[1]["status"] == "changed" and first[1]["changes"]["retcode"] == 0 and runs() == 1
    again = run_states(wait_job(tmp, "one"), state_dir=str(state_dir))
    assert again[0]["status"] == "ok" and again[1]["status"] == "ok" and again[1]["changes"] == {}
    assert again[1]["comment"] == "nothing to run: no state it watches changed" and runs() == 1
    assert run_states(wait_job(tmp, "one"), test=True, state_dir=str(state_dir))[1]["changes"] == {}
    assert run_states(wait_job(tmp, "two"), state_dir=str(state_dir))[1]["status"] == "changed" and runs() == 2


def test_cmd_wait_without_watch_or_with_only_onchanges_runs_nothing_as_in_salt(run, tmp, state_dir):
    marker = tmp / "marker"
    res = run("cmd.wait", f"touch {marker}")
    assert res["status"] == "ok" and res["changes"] == {} and not marker.exists()
    changed = run_states(wait_job(tmp, "x", requisite="onchanges"), state_dir=str(state_dir))
    assert changed[0]["status"] == "changed" and changed[1]["status"] == "ok" and not (tmp / "ran").exists()
    # a watched state that failed: the command is not run (as for every requisite)
    failing = [{"id": "bad", "fun": "file.managed", "name": "relative", "args": {}},
               {"id": "w", "fun": "cmd.wait", "name": f"touch {marker}", "args": {}, "watch": [0]}]
    res = run_states(failing, state_dir=str(state_dir))
    assert res[1]["status"] == "not_run" and not marker.exists()


def test_cmd_wait_with_watch_in_from_a_state_file_through_the_master(tmp, state_dir):
    """The master resolves Salt's `watch_in` and `- file: ID` forms for cmd.wait like any state."""
    from pimaster.render import compile_for_node

    conf, ran = tmp / "exports", tmp / "ran"
    (tmp / "tree").mkdir()
    state_file = tmp / "tree" / "nfs.sls"
    state_file.write_text(f"""
{conf}:
  file.managed:
    - contents: "/srv 10.0.0.0/24(rw)"
    - watch_in:
      - cmd: exportfs
exportfs:
  cmd.wait:
    - name: echo ran >> {ran}
""")
    job = compile_for_node(str(state_file), {"node": {"id": "node01"}}, catalog(), str(tmp / "tree"))
    assert [s["fun"] for s in job] == ["file.managed", "cmd.wait"] and job[1]["watch"] == [0]
    assert run_states(job, state_dir=str(state_dir))[1]["status"] == "changed" and ran.read_text() == "ran\n"
    assert run_states(job, state_dir=str(state_dir))[1]["changes"] == {} and ran.read_text() == "ran\n"


# ---------------------------------------------------------------------------------------------
# kmod.present: modprobe replayed (this machine's kernel is left alone)

def kmod_case(args: dict, loaded: list[str], commands: list[dict], test: bool = False) -> dict:
    return {"function": "kmod.present", "args": args, "facts": {"loaded": loaded}, "commands": commands,
            "test": test}


def modprobe(module: str, loaded_after: list[str], returncode: int = 0, stderr: str = "") -> dict:
    return {"argv": ["modprobe", "--", module], "facts": {"loaded": loaded_after}, "returncode": returncode,
            "stderr": stderr}


def test_kmod_present_replayed_loads_only_missing_modules_and_persists_only_when_asked(tmp_path, monkeypatch,
                                                                                       real_commands):
    conf = tmp_path / "root" / "etc" / "modules-load.d" / "pimaster.conf"
    res, ctx = replay(kmod_case({"name": "br_netfilter"}, [], [modprobe("br_netfilter", ["br_netfilter"])]),
                      tmp_path / "root", monkeypatch)
    assert res["status"] == "changed" and res["changes"] == {"loaded": ["br_netfilter"]}, res
    assert res["comment"] == "loaded br_netfilter" and not conf.exists()  # Salt's default: persist false
    assert real_commands == []


@pytest.mark.parametrize("loaded, test, ran, status", [
    ([], True, [], "changed"),                                    # test mode: nothing loaded, nothing written
    (["overlay"], False, ["br_netfilter"], "changed"),            # only the missing one
    (["overlay", "br_netfilter"], False, [], "changed"),          # loaded, but not listed for boot yet
])
def test_kmod_present_replayed_mods_persist(tmp_path, monkeypatch, real_commands, loaded, test, ran, status):
    root = tmp_path / "root"
    commands = [modprobe(m, ["overlay", "br_netfilter"]) for m in ran]
    case = kmod_case({"name": "k8s", "mods": ["overlay", "br_netfilter"], "persist": True}, loaded, commands, test)
    res, ctx = replay(case, root, monkeypatch)
    assert ctx.ran == [c["argv"] for c in commands] and res["status"] == status, res
    conf = root / "etc" / "modules-load.d" / "pimaster.conf"
    if test:
        assert res["result"] is None and not conf.exists()
        assert res["comment"].startswith("would load overlay, br_netfilter and list overlay, br_netfilter in ")
    else:
        assert res["result"] is True and conf.read_text().splitlines()[1:] == ["overlay", "br_netfilter"]
    assert real_commands == []


def test_kmod_present_replayed_second_run_changes_nothing_and_a_failure_says_what_loaded(tmp_path, monkeypatch,
                                                                                          real_commands):
    root = tmp_path / "root"
    conf = root / "etc" / "modules-load.d" / "pimaster.conf"
    args = {"name": "k8s", "mods": ["overlay", "br_netfilter"], "persist": True}
    case = kmod_case(args, ["overlay", "br_netfilter"], [])
    case["files"] = {"etc/modules-load.d/pimaster.conf": "# header\noverlay\nbr_netfilter\n"}
    res, ctx = replay(case, root, monkeypatch)
    assert res["status"] == "ok" and res["changes"] == {} and ctx.ran == [], res
    assert res["comment"] == f"overlay, br_netfilter are loaded and listed in {conf}"
    failing = kmod_case(args, [], [modprobe("overlay", ["overlay"]),
                                   modprobe("br_netfilter", ["overlay"], 1, "modprobe: FATAL: Module not found")])
    res, ctx = replay(failing, tmp_path / "fail", monkeypatch)
    assert res["status"] == "failed" and res["changes"] == {"loaded": ["overlay"]}, res
    assert "modprobe br_netfilter failed: modprobe: FATAL: Module not found" in res["comment"]
    res, _ = replay(kmod_case({"name": "x", "mods": ["ok", "bad name"]}, [], []), tmp_path / "bad", monkeypatch)
    assert res["status"] == "failed" and "'bad name' is not a kernel module name" in res["comment"]
    assert real_commands == []


# ---------------------------------------------------------------------------------------------
# timezone.system through timedatectl: replayed (no systemd-timedated here)

def timedatectl_case(commands: list[dict], test: bool = False, utc: bool = True, tz_file: str | None = "Etc/UTC\n"):
    return {"function": "timezone.system", "args": {"name": "Europe/Berlin", "utc": utc}, "test": test,
            "files": {} if tz_file is None else {"etc/timezone": tz_file}, "commands": commands}


def show(zone: str, local_rtc: str = "no") -> dict:
    return {"argv": ["timedatectl", "show", "--property=Timezone", "--property=LocalRTC"],
            "stdout": f"Timezone={zone}\nLocalRTC={local_rtc}\n"}


SET_BERLIN = {"argv": ["timedatectl", "set-timezone", "Europe/Berlin"]}


def tz_replay(case: dict, root: Path, monkeypatch) -> tuple[dict, object]:
    """replay() with systemd running and /etc/timezone under the replay's root."""
    monkeypatch.setattr(timezone_module, "systemd_running", lambda: True)
    monkeypatch.setattr(timezone_module, "TIMEZONE_FILE", str(root / "etc" / "timezone"))
    # Never this machine's: the state also reads (and may repair) the link timedated keeps.
    monkeypatch.setattr(timezone_module, "LOCALTIME", str(root / "etc" / "localtime"))
    return replay(case, root, monkeypatch)


def test_timezone_system_replayed_timedatectl_sets_the_zone_once(tmp_path, monkeypatch, real_commands):
    would, ctx = tz_replay(timedatectl_case([show("Etc/UTC")], test=True), tmp_path / "test", monkeypatch)
    assert would["result"] is None and would["status"] == "changed", would
    assert ctx.ran == [show("Etc/UTC")["argv"]]  # read only
    assert (tmp_path / "test" / "etc" / "timezone").read_text() == "Etc/UTC\n"
    assert would["comment"].startswith("would set the time zone to Europe/Berlin (from Etc/UTC)")
    done, ctx = tz_replay(timedatectl_case([show("Etc/UTC"), SET_BERLIN]), tmp_path / "run", monkeypatch)
    assert done["status"] == "changed" and done["result"] is True, done
    assert ctx.ran == [show("Etc/UTC")["argv"], SET_BERLIN["argv"]]
    # Debian's /etc/timezone kept agreeing (the replayed timedatectl did not write it)
    assert (tmp_path / "run" / "etc" / "timezone").read_text() == "Europe/Berlin\n"
    for tz_file in ("Europe/Berlin\n", None):  # the second run; a system without /etc/timezone
        again, ctx = tz_replay(timedatectl_case([show("Europe/Berlin")], tz_file=tz_file),
                               tmp_path / f"again-{tz_file is None}", monkeypatch)
        assert again["status"] == "ok" and again["changes"] == {}, again
        assert ctx.ran == [show("Europe/Berlin")["argv"]]
        assert again["comment"] == "the time zone is Europe/Berlin"
    assert real_commands == []


def test_timezone_system_replayed_timedatectl_rtc_and_failure(tmp_path, monkeypatch, real_commands):
    rtc = {"argv": ["timedatectl", "set-local-rtc", "0"]}
    res, ctx = tz_replay(timedatectl_case([show("Europe/Berlin", "yes"), rtc], tz_file="Europe/Berlin\n"),
                         tmp_path / "rtc", monkeypatch)
    assert res["changes"] == {"utc": True} and ctx.ran == [c["argv"] for c in (show("Europe/Berlin"), rtc)], res
    failing = dict(SET_BERLIN, returncode=1, stderr="Failed to set time zone: Access denied")
    res, ctx = tz_replay(timedatectl_case([show("Etc/UTC"), failing]), tmp_path / "fail", monkeypatch)
    assert res["status"] == "failed" and res["changes"] == {}, res
    assert "timedatectl set-timezone Europe/Berlin failed: Failed to set time zone: Access denied" in res["comment"]
    bad = timedatectl_case([])
    bad["args"]["name"] = "Europe/Nowhere"
    res, ctx = tz_replay(bad, tmp_path / "bad", monkeypatch)
    assert res["status"] == "failed" and "unknown time zone 'Europe/Nowhere'" in res["comment"] and ctx.ran == []
    assert real_commands == []


def test_adjtime_text_editing():
    assert not rtc_is_local(None) and not rtc_is_local("0.0 0 0.0\n0\nUTC\n")
    assert rtc_is_local("0.0 0 0.0\n0\nLOCAL\n")
    assert set_rtc_mode(None, True) == "0.0 0 0.0\n0\nLOCAL\n"
    assert set_rtc_mode("0.1 5 0.0\n123\nLOCAL\n", False) == "0.1 5 0.0\n123\nUTC\n"
    assert set_rtc_mode("0.1 5 0.0\n", True) == "0.1 5 0.0\n0\nLOCAL\n"


# ---------------------------------------------------------------------------------------------
# user, group and timezone without systemd: real commands on a private copy of /etc

# Runs in the namespace: makes /etc a private copy on a tmpfs, empties the other places the tools
# write, then runs the server below. `set -e`: no server unless every mount worked.
NAMESPACE_SETUP = r"""
set -e
stage="$1"; shift
mount -t tmpfs -o mode=0755 pimaster-test-etc "$stage"
mkdir "$stage/etc"
cp -a /etc/. "$stage/etc/"
mount --bind "$stage/etc" /etc
for dir in /home /var/log /var/mail; do
    mount -t tmpfs -o mode=0755 pimaster-test "$dir"
done
# With systemd running here, hide it: the states then take their no-systemd path, and nothing can
# reach this machine's systemd-timedated.
if [ -d /run/systemd/system ]; then mount -t tmpfs pimaster-test /run/systemd; fi
exec "$@"
"""

# Answers JSON requests, one a line: run states through the engine, or a shell command.
NAMESPACE_SERVER = r"""
import json, subprocess, sys
from piagent.engine import run_states
state_dir = sys.argv[1]
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "states":
        answer = run_states(request["states"], test=request["test"], state_dir=state_dir)
    else:
        done = subprocess.run(request["command"], shell=True, capture_output=True, text=True)
        answer = {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
    print(json.dumps(answer, default=str), flush=True)
"""

# What must be as it was on this machine after each namespace test.
WATCHED_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow", "/etc/subuid", "/etc/subgid",
                 "/etc/timezone", "/etc/localtime", "/etc/adjtime", "/etc/login.defs")
WATCHED_DIRS = ("/home", "/var/mail")
WATCHED_MOUNTS = ("/etc", "/home", "/var/log", "/var/mail", "/run/systemd")


def host_state(stage: Path) -> dict:
    files = {}
    for path in WATCHED_FILES:
        try:
            files[path] = (os.readlink(path) if os.path.islink(path)
                           else hashlib.sha256(Path(path).read_bytes()).hexdigest())
        except FileNotFoundError:
            files[path] = None
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return {"files": files, "dirs": {d: sorted(os.listdir(d)) for d in WATCHED_DIRS if os.path.isdir(d)},
            "mounts": sorted(m for m in mounts if m in WATCHED_MOUNTS or m.startswith(str(stage))),
            "stage": sorted(os.listdir(stage))}


def namespace_alive(namespace: str, stage: Path) -> bool:
    """Whether a process is still in that mount namespace with the test's mounts. (A namespace's
    number may be given to a new one once it is gone: the mounts tell ours apart.)"""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{pid}/ns/mnt") == namespace and \
                        str(stage) in Path(f"/proc/{pid}/mountinfo").read_text():
                    return True
            except OSError:
                pass
    return False


class PrivateEtc:
    """A child process in its own mount namespace with a private /etc, running state functions."""

    def __init__(self, tmp: Path) -> None:
        self.stage = tmp / "private-etc"
        self.stage.mkdir()
        env = dict(os.environ, PYTHONPATH=source_path(tmp), LANG="C.UTF-8")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", NAMESPACE_SETUP, "sh",
             str(self.stage), sys.executable, "-c", NAMESPACE_SERVER, str(self.stage / "agent-state")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.namespace = None

    def _ask(self, request: dict):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise AssertionError(f"the namespace's server ended: {self.proc.stderr.read()}")
        return json.loads(line)

    def sh(self, command: str, check: bool = True) -> str:
        done = self._ask({"op": "sh", "command": command})
        assert not check or done["returncode"] == 0, (command, done)
        return done["stdout"]

    def run(self, fun: str, name: str, test: bool = False, **args) -> dict:
        (res,) = self._ask({"op": "states", "test": test,
                            "states": [{"id": name, "fun": fun, "name": name, "args": args}]})
        return res

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def private_etc(tmp):
    """A PrivateEtc; afterwards this machine's /etc, /home, /var/mail and mount table are asserted
    unchanged and the namespace gone."""
    if not IS_ROOT or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (util-linux) for a private /etc in a mount namespace")
    ns = PrivateEtc(tmp)
    try:
        # Proof of the isolation before any state runs: a file made in the namespace's /etc is not here.
        canary = "/etc/pimaster-private-etc-canary"
        ns.sh(f"touch {canary}")
        assert not os.path.exists(canary), "the namespace's /etc is this machine's: stopping"
        ns.namespace = os.readlink(f"/proc/{ns.proc.pid}/ns/mnt")
        assert ns.namespace != os.readlink("/proc/self/ns/mnt")
        before = host_state(ns.stage)
        yield ns
    finally:
        if ns.proc.poll() is None:
            ns.close()
    assert ns.proc.returncode == 0, ns.proc.returncode
    assert host_state(ns.stage) == before, "this machine's account files, /home or mounts changed"
    assert not namespace_alive(ns.namespace, ns.stage), "the test's mount namespace is still there"


def passwd(ns: PrivateEtc, name: str) -> list[str] | None:
    out = ns.sh(f"getent passwd {name}", check=False).strip()
    return out.split(":") if out else None


def group_line(ns: PrivateEtc, name: str) -> list[str] | None:
    out = ns.sh(f"getent group {name}", check=False).strip()
    return out.split(":") if out else None


def groups_of(ns: PrivateEtc, name: str) -> set[str]:
    return set(ns.sh(f"id -Gn {name}").split()) - {ns.sh(f"id -gn {name}").strip()}


def test_group_present_and_absent_on_a_private_copy_of_etc(private_etc):
    ns = private_etc
    run = ns.run
    cycle(run, "group.present", "pmt-team", gid=23456,
          before=lambda: group_line(ns, "pmt-team") is None,
          after=lambda: group_line(ns, "pmt-team") == ["pmt-team", "x", "23456", ""])
    assert "pmt-team:!::" in ns.sh("grep ^pmt-team: /etc/gshadow")
    cycle(run, "group.present", "pmt-team", gid=23457,
          before=lambda: group_line(ns, "pmt-team")[2] == "23456",
          after=lambda: group_line(ns, "pmt-team")[2] == "23457")
    would, _ = cycle(run, "group.present", "pmt-team", members=["daemon", "bin"],
                     before=lambda: group_line(ns, "pmt-team")[3] == "",
                     after=lambda: group_line(ns, "pmt-team")[3] == "daemon,bin")
    assert would["comment"] == "would change the members of group pmt-team (add daemon, bin)"
    cycle(run, "group.present", "pmt-team", addusers=["sys"], delusers=["bin"],
          before=lambda: group_line(ns, "pmt-team")[3] == "daemon,bin",
          after=lambda: group_line(ns, "pmt-team")[3] == "daemon,sys")
    cycle(run, "group.present", "pmt-team", members=[],
          before=lambda: group_line(ns, "pmt-team")[3] == "daemon,sys",
          after=lambda: group_line(ns, "pmt-team")[3] == "")

    unknown = run("group.present", "pmt-team", addusers=["pmt-nobody"])
    assert unknown["status"] == "failed" and "no user pmt-nobody on this node" in unknown["comment"]
    forecast = run("group.present", "pmt-new", members=["pmt-nobody"], test=True)
    assert forecast["status"] == "changed" and "user pmt-nobody does not exist yet" in forecast["comment"]
    bad = run("group.present", "pmt-team", members=["daemon"], addusers=["bin"])
    assert bad["status"] == "failed" and "not both" in bad["comment"]
    assert run("group.present", "-rf", test=True)["status"] == "failed"

    cycle(run, "group.absent", "pmt-team",
          before=lambda: group_line(ns, "pmt-team") is not None,
          after=lambda: group_line(ns, "pmt-team") is None)
    primary = run("group.absent", "daemon")  # the primary group of user daemon: groupdel refuses
    assert primary["status"] == "failed" and "groupdel failed" in primary["comment"], primary
    assert primary["changes"] == {} and group_line(ns, "daemon") is not None


HASH = "$6$pmtestsalt$HvQ9E4mE0jHZlqR6Fj1v0wJf3m0c3p8o0Yq2Q3WZbqQ7c3nEw6m5x9l6f0n8ZJ2h0Zp2yQ3bqf1z1nJkq7S0a."


def test_user_present_creates_then_changes_only_what_differs_on_a_private_copy_of_etc(private_etc):
    ns = private_etc
    run = ns.run
    assert run("group.present", "pmt-extra", gid=23600)["status"] == "changed"
    args = dict(uid=23500, shell="/bin/bash", fullname="Alice Test", groups=["pmt-extra"], password=HASH)
    would, done = cycle(run, "user.present", "pmt-alice", **args,
                        before=lambda: passwd(ns, "pmt-alice") is None,
                        after=lambda: [passwd(ns, "pmt-alice")[i] for i in (2, 4, 5, 6)]
                        == ["23500", "Alice Test", "/home/pmt-alice", "/bin/bash"])
    assert would["comment"] == "would create user pmt-alice and set the password of pmt-alice"
    assert done["changes"]["groups"] == ["pmt-extra"] and done["changes"]["password"] == "changed"
    assert HASH not in json.dumps([would, done])  # a hash is never shown
    assert groups_of(ns, "pmt-alice") == {"pmt-extra"}
    assert ns.sh("grep ^pmt-alice: /etc/shadow").split(":")[1] == HASH
    assert ns.sh("stat -c '%U %a' /home/pmt-alice").split()[0] == "pmt-alice"
    assert ns.sh("id -gn pmt-alice").strip() == "pmt-alice"  # Debian's useradd: a group of the user's name

    # An existing user: only what differs, with usermod; supplementary groups replaced (remove_groups).
    would, _ = cycle(run, "user.present", "pmt-alice", shell="/bin/sh", groups=["video", "pmt-extra"],
                     before=lambda: passwd(ns, "pmt-alice")[6] == "/bin/bash",
                     after=lambda: (passwd(ns, "pmt-alice")[6] == "/bin/sh"
                                    and groups_of(ns, "pmt-alice") == {"video", "pmt-extra"}))
    assert would["comment"] == "would change shell and groups (add video) of user pmt-alice"
    cycle(run, "user.present", "pmt-alice", groups=["audio"], remove_groups=False,
          before=lambda: groups_of(ns, "pmt-alice") == {"video", "pmt-extra"},
          after=lambda: groups_of(ns, "pmt-alice") == {"video", "pmt-extra", "audio"})
    cycle(run, "user.present", "pmt-alice", groups=[],
          before=lambda: groups_of(ns, "pmt-alice") == {"video", "pmt-extra", "audio"},
          after=lambda: groups_of(ns, "pmt-alice") == set())
    assert run("user.present", "pmt-alice", optional_groups=["pmt-no-such-group"])["changes"] == {}
    # Not given: memberships, shell, home and password are left as they are.
    assert run("user.present", "pmt-alice")["changes"] == {}

    refused = run("user.present", "pmt-alice", uid=23501, shell="/bin/bash")
    assert refused["status"] == "failed" and "allow_uid_change: true" in refused["comment"]
    assert passwd(ns, "pmt-alice")[2] == "23500" and passwd(ns, "pmt-alice")[6] == "/bin/sh"  # nothing changed
    cycle(run, "user.present", "pmt-alice", uid=23501, allow_uid_change=True,
          before=lambda: passwd(ns, "pmt-alice")[2] == "23500", after=lambda: passwd(ns, "pmt-alice")[2] == "23501")
    cycle(run, "user.present", "pmt-alice", gid="pmt-extra", allow_gid_change=True,
          before=lambda: ns.sh("id -gn pmt-alice").strip() == "pmt-alice",
          after=lambda: ns.sh("id -gn pmt-alice").strip() == "pmt-extra")
    cycle(run, "user.present", "pmt-alice", home="/home/alice2",
          before=lambda: ns.sh("test -e /home/alice2 || echo none").strip() == "none",
          after=lambda: (passwd(ns, "pmt-alice")[5] == "/home/alice2"
                         and ns.sh("stat -c %U:%G /home/alice2").strip() == "pmt-alice:pmt-extra"))

    other = HASH.replace("pmtestsalt", "othersalt")
    kept = run("user.present", "pmt-alice", password=other, enforce_password=False)
    assert kept["changes"] == {} and "enforce_password is false" in kept["comment"]
    assert run("user.present", "pmt-alice", password=other)["changes"] == {"password": "changed"}
    assert ns.sh("grep ^pmt-alice: /etc/shadow").split(":")[1] == other

    missing = run("user.present", "pmt-bob", groups=["pmt-no-such-group"])
    assert missing["status"] == "failed" and "no group pmt-no-such-group" in missing["comment"]
    assert passwd(ns, "pmt-bob") is None
    forecast = run("user.present", "pmt-bob", groups=["pmt-no-such-group"], test=True)
    assert forecast["status"] == "changed" and "group pmt-no-such-group does not exist yet" in forecast["comment"]
    for args, message in ((dict(shell="bash"), "absolute path"), (dict(fullname="a:b"), "':'"),
                          (dict(password="x\ny"), "line break"), (dict(uid=-1), "negative")):
        res = run("user.present", "pmt-carol", **args)
        assert res["status"] == "failed" and message in res["comment"] and passwd(ns, "pmt-carol") is None, res
    assert run("user.present", "--help")["status"] == "failed"


def test_user_system_account_and_absent_on_a_private_copy_of_etc(private_etc):
    ns = private_etc
    run = ns.run
    # The user's own group (useradd makes it its primary group) may be listed in groups, as Salt allows.
    cycle(run, "user.present", "pmt-erin", groups=["pmt-erin", "video"],
          before=lambda: passwd(ns, "pmt-erin") is None,
          after=lambda: ns.sh("id -gn pmt-erin").strip() == "pmt-erin" and groups_of(ns, "pmt-erin") == {"video"})
    cycle(run, "user.present", "pmt-slurm", system=True, createhome=False, home="/var/lib/pmt-slurm",
          shell="/usr/sbin/nologin",
          before=lambda: passwd(ns, "pmt-slurm") is None,
          after=lambda: (int(passwd(ns, "pmt-slurm")[2]) < 1000
                         and ns.sh("test -e /var/lib/pmt-slurm || echo none").strip() == "none"))
    cycle(run, "user.absent", "pmt-slurm",
          before=lambda: passwd(ns, "pmt-slurm") is not None,
          after=lambda: passwd(ns, "pmt-slurm") is None)
    assert run("user.present", "pmt-dave")["status"] == "changed"
    ns.sh("touch /home/pmt-dave/notes")
    would, done = cycle(run, "user.absent", "pmt-dave", purge=True,
                        before=lambda: ns.sh("ls /home/pmt-dave").strip() == "notes",
                        after=lambda: ns.sh("ls /home").split() == ["pmt-erin"])
    assert would["comment"] == "would remove user pmt-dave and its home directory"
    assert group_line(ns, "pmt-dave") is None  # userdel removed the user's own group too


def test_timezone_system_without_systemd_on_a_private_copy_of_etc(private_etc):
    ns = private_etc
    run = ns.run
    ns.sh("ln -sfn /usr/share/zoneinfo/Etc/UTC /etc/localtime && echo Etc/UTC > /etc/timezone && rm -f /etc/adjtime")
    would, done = cycle(run, "timezone.system", "Europe/Berlin",
                        before=lambda: ns.sh("readlink /etc/localtime").strip() == "/usr/share/zoneinfo/Etc/UTC",
                        after=lambda: (ns.sh("readlink /etc/localtime").strip() == "/usr/share/zoneinfo/Europe/Berlin"
                                       and ns.sh("cat /etc/timezone") == "Europe/Berlin\n"
                                       and ns.sh("date -d '2024-01-15 12:00Z' +%Z").strip() == "CET"))
    assert would["comment"] == ("would set the time zone to Europe/Berlin (from Etc/UTC) and write Europe/Berlin "
                                "to /etc/timezone")
    # A relative link (as timedatectl makes it) to the same zone is the same zone.
    ns.sh("ln -sfn ../usr/share/zoneinfo/Europe/Berlin /etc/localtime")
    assert run("timezone.system", "Europe/Berlin")["changes"] == {}
    cycle(run, "timezone.system", "Europe/Berlin", utc=False,
          before=lambda: ns.sh("test -e /etc/adjtime || echo none").strip() == "none",
          after=lambda: ns.sh("sed -n 3p /etc/adjtime").strip() == "LOCAL")
    cycle(run, "timezone.system", "UTC",
          before=lambda: ns.sh("readlink /etc/localtime").strip() == "../usr/share/zoneinfo/Europe/Berlin",
          after=lambda: (ns.sh("sed -n 3p /etc/adjtime").strip() == "UTC"
                         and ns.sh("readlink /etc/localtime").strip() == "/usr/share/zoneinfo/UTC"))
    for zone, message in (("Europe/Nowhere", "unknown time zone"), ("../../etc/passwd", "not a time zone name"),
                          ("-u", "not a time zone name")):
        res = run("timezone.system", zone)
        assert res["status"] == "failed" and message in res["comment"], res
    assert ns.sh("readlink /etc/localtime").strip() == "/usr/share/zoneinfo/UTC"


def test_timezone_system_replayed_repairs_a_localtime_that_timedated_does_not_know_of(tmp_path, monkeypatch,
                                                                                          real_commands):
    """timedated still remembers Europe/Berlin, but /etc/localtime was changed behind it (by hand, a
    package): the link decides, and is repaired even though `set-timezone` thought nothing to do."""
    root = tmp_path / "behind"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/Etc/UTC")
    res, ctx = tz_replay(timedatectl_case([show("Europe/Berlin"), SET_BERLIN], tz_file="Europe/Berlin\n"), root,
                         monkeypatch)
    assert res["status"] == "changed" and "(from Etc/UTC)" in res["comment"], res
    assert ctx.ran == [show("Europe/Berlin")["argv"], SET_BERLIN["argv"]]
    assert os.readlink(root / "etc" / "localtime") == "/usr/share/zoneinfo/Europe/Berlin"
    assert real_commands == []
