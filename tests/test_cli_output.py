"""The CLI's shared output helpers (pimaster.cli): tables print the same characters with or
without rich, and the two time formats."""

from __future__ import annotations

import contextlib
import io
import os
import time
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pimaster import cli

# Printable text, wide and combining characters included, and now and then what rich would change
# (tabs, control codes, line breaks): there the table must go through rich.
CELL = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12) | \
    st.text(st.sampled_from("ab -_.:/°%é漢字\u0301"), max_size=30)
STYLE = st.sampled_from(["", "red", "green", "bold"])


def printed(function, *args) -> str:
    """What ``function(*args)`` prints to a pipe (rich's own settings for colour taken away)."""
    with mock.patch.dict(os.environ), contextlib.redirect_stdout(io.StringIO()) as out:
        os.environ.pop("FORCE_COLOR", None)
        os.environ.pop("TTY_COMPATIBLE", None)
        function(*args)
    return out.getvalue()


def rich_table(title, columns, rows) -> None:
    cells = [[c if isinstance(c, tuple) else (str(c), "") for c in row] for row in rows]
    widths = [max([len(name)] + [len(row[i][0]) for row in cells]) for i, name in enumerate(columns)]
    header = "  ".join(name.ljust(widths[i]) for i, name in enumerate(columns)).rstrip()
    cli._rich_table(title, columns, header, widths, cells)


@settings(max_examples=300, deadline=None)
@given(title=st.none() | CELL, width=st.integers(1, 5), data=st.data())
def test_a_table_prints_what_rich_prints(title, width, data):
    columns = data.draw(st.lists(CELL.filter(bool), min_size=width, max_size=width))
    rows = data.draw(st.lists(st.lists(CELL | st.tuples(CELL, STYLE), min_size=width, max_size=width), max_size=6))
    assert printed(cli.table, title, columns, rows) == printed(rich_table, title, columns, rows)


def test_a_table_not_on_a_terminal_needs_no_rich_console(capsys, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    rows = [["node01", ("up", "green"), ""], ["node02-long", ("down", "red"), "no answer within 5 s"]]
    if not cli._rich_would_print_as_is(["x"]):
        pytest.skip("this rich trims soft-wrapped lines: tables go through it")
    cli.table("title", ["NODE", "STATE", "NOTE"], rows)
    assert capsys.readouterr().out == ("title\nNODE         STATE  NOTE\nnode01       up     \n"
                                       "node02-long  down   no answer within 5 s\n")
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then styles even a pipe: it must print
    assert not cli._rich_would_print_as_is(["x"])


def test_ago_and_local_time():
    now = time.time()
    assert cli.ago(None) == "never" and cli.ago(0) == "never"
    assert cli.ago(now - 5) == "5s ago"
    assert cli.ago(now - 300) == "5m ago"
    assert cli.ago(now - 3 * 3600) == "3h ago"
    assert cli.ago(now - 2 * 86400) == "2d ago"
    assert cli.ago(now + 100) == "0s ago"  # a clock ahead: never "in the future"
    assert cli.local_time(None) == "-"
    assert cli.local_time(now) == time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now))  # with its zone


def test_a_command_imports_only_its_own_module(tmp_path):
    """`pimaster ping` on a large cluster must start fast: no other command's module, and none of
    asyncio, zmq, rich (not on a pipe), msgpack, yaml, jinja2."""
    import json
    import subprocess
    import sys

    from harness import source_path

    code = ("import sys\nfrom pimaster.cli import main\nmain(sys.argv[1:])\nimport json\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pimaster', 'piagent', 'asyncio', 'zmq', 'rich', 'msgpack', 'yaml', 'jinja2'))))")
    result = subprocess.run([sys.executable, "-c", code, "ping", "--state-dir", str(tmp_path)], capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, PYTHONPATH=source_path(tmp_path)))
    assert "no master running" in result.stderr
    assert set(json.loads(result.stdout)) == {"pimaster", "pimaster.cli", "pimaster.client", "pimaster.commands",
                                              "pimaster.commands.ping", "pimaster.errors", "pimaster.targets"}


def test_a_table_wider_than_the_terminal_folds_its_last_column_and_loses_nothing():
    # `pimaster ping` with a long NOTE on an 100-column terminal used to run past the edge.
    import pty
    import re
    import subprocess
    import sys

    code = ("from pimaster import cli\n"
            "cli.table('t', ['NODE', 'STATE', 'RTT', 'UPTIME', 'LOAD', 'TEMP', 'THROTTLING', 'CLOCK', 'DISK /', 'NOTE'],"
            " [['node01', ('up', 'green'), '0.3 ms', '3d04h', '0.01', '42.0C', 'ok', '+0.1 ms', '12%',"
            " 'network change (eth0 10.0.0.1) rolled back 5m ago: the master did not answer']])\n")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=follower, stderr=follower,
                            env=dict(os.environ, COLUMNS="100", LINES="20", TERM="xterm"))
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=30)
    os.close(leader)
    lines = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.decode()).replace("\r", "").splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 100, lines
    note_at = lines[1].index("NOTE")
    words = " ".join(line[note_at:].strip() for line in lines[2:])
    assert "rolled back 5m ago: the master did not answer" in " ".join(words.split()), lines
    assert lines[2].startswith("node01  up     0.3 ms"), lines
