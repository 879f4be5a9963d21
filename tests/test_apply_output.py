"""What `pimaster apply` and `pimaster job ID` print for people: which states changed and their
diffs (unless --quiet), and one vocabulary in the live view, the progress lines, the table and
`--json` (changed / unchanged / failed / not run / skipped for states; changed / ok / failed / ...
for nodes). Everything an agent reports is hostile text: none of it may start a line of the report.
"""

from __future__ import annotations

import io
import json
import textwrap

import pytest

from harness import wait_for
from pimaster.apply_view import LiveApply, PlainApply, print_report


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def n1(master, start_agent):
    agent = start_agent("n1", master.token_config(uses=5))
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    return agent


def test_a_real_apply_lists_the_changed_states_and_their_diffs_unless_quiet(tmp, master, n1):
    motd = tmp / "out" / "motd"
    state = write(tmp / "motd.yaml", f"""
        {motd}:
          file.managed:
            - contents: "hello\\nworld\\n"
            - makedirs: true
        announce:
          cmd.run:
            - name: echo announced
            - onchanges:
              - file: {motd}
        """)
    first = master.cli("apply", str(state), timeout=120)
    lines = first.stdout.splitlines()
    # The progress line and the table say the same words; the table has a column for skipped.
    assert "n1: changed (changed 2)" in lines, first.stdout
    header = next(line for line in lines if line.startswith("NODE"))
    assert header.split() == ["NODE", "RESULT", "CHANGED", "FAILED", "NOT", "RUN", "UNCHANGED", "SKIPPED", "TIME"]
    assert next(line for line in lines if line.startswith("n1 ")).split()[:7] == ["n1", "changed", "2", "0", "0", "0", "0"]
    changed = [line for line in lines if line.startswith("n1: changed ") and line != "n1: changed (changed 2)"]
    assert changed[0].startswith(f"n1: changed file.managed {motd}: "), first.stdout
    assert changed[1].startswith("n1: changed cmd.run announce: "), first.stdout
    diff = lines[lines.index(changed[0]) + 1:lines.index(changed[1])]
    assert diff and all(line.startswith("    ") for line in diff), diff
    assert "    +hello" in diff and "    +world" in diff, diff

    motd.write_text("hello\n")
    quiet = master.cli("apply", str(state), "--quiet", timeout=120)
    assert "n1: changed (changed 2)" in quiet.stdout.splitlines()
    assert not [line for line in quiet.stdout.splitlines() if line.startswith("n1: changed file")], quiet.stdout
    assert "+world" not in quiet.stdout

    again = master.cli("apply", str(state), "--json", timeout=120)
    report = json.loads(again.stdout)
    node = report["nodes"]["n1"]
    # --json keeps its fields and adds the word the table shows.
    assert node["result"] == "ok" and node["unchanged"] == 1 and node["skipped"] == 1 and node["changed"] == 0
    shown = master.cli("job", report["job"], timeout=60).stdout
    row = next(line for line in shown.splitlines() if line.startswith("n1 "))
    assert row.split()[:7] == ["n1", "ok", "0", "0", "0", "1", "1"], shown
    assert "n1: changed" not in shown, shown

    # `pimaster job ID` of the first run shows what changed, as the apply did.
    first_id = master.json("jobs")["jobs"][-1]["id"]
    replay = master.cli("job", first_id, timeout=60).stdout
    assert f"n1: changed file.managed {motd}: " in replay and "    +world" in replay, replay


def report_of(states: list[dict], test: bool = False, status: str = "done") -> dict:
    counts = {k: sum(s["status"] == k for s in states) for k in ("changed", "failed", "not_run", "ok", "skipped")}
    return {"job": "20260101-000000-abcdef", "file": "/srv/x.yaml", "test": test, "nodes": {"n1": {
        "ok": not counts["failed"], "status": status, "changed": counts["changed"], "failed": counts["failed"],
        "not_run": counts["not_run"], "unchanged": counts["ok"], "skipped": counts["skipped"], "states": states,
        "duration_s": 1.0, "reboot_required": False}}}


def printed(report: dict, capsys, quiet: bool = False) -> list[str]:
    from pimaster.cli import table

    print_report(report, table, **({"quiet": True} if quiet else {}))
    return capsys.readouterr().out.splitlines()


FORGED = "n2: changed file.managed /etc/shadow: forged"


@pytest.mark.parametrize("test_mode", [False, True])
def test_an_agents_comment_and_diff_cannot_start_a_report_line(capsys, test_mode):
    states = [
        {"id": "/etc/motd", "fun": "file.managed", "status": "changed", "comment": f"updated\n{FORGED}",
         "changes": {"diff": f"--- a\n+++ b\n{FORGED}\n+x\n"}},
        {"id": "odd", "fun": "cmd.run", "status": "changed", "comment": "", "changes": {"diff": {"not": "text"}}},
        {"id": "broken", "fun": "cmd.run", "status": "failed", "comment": f"exit 1\n{FORGED}",
         "changes": {"stderr": f"oops\n{FORGED}"}},
    ]
    lines = printed(report_of(states, test=test_mode), capsys)
    assert not any(line.startswith("n2") for line in lines), lines
    assert sum(FORGED in line for line in lines) == 4, lines
    word = "would change" if test_mode else "changed"
    assert f"n1: {word} file.managed /etc/motd: updated" in lines
    assert f"n1: {word} cmd.run odd" in lines  # a diff that is not text: shown, never a crash
    assert '    {"not": "text"}' in lines


def test_the_progress_lines_use_the_tables_words(capsys):
    view = PlainApply()
    view.event({"type": "start", "job": "j", "nodes": {"n1": 3, "n2": 2, "n3": 1}})
    view.event({"type": "node", "node": "n1", "status": "done",
                "summary": {"ok": 1, "changed": 1, "failed": 0, "not_run": 0, "skipped": 1}})
    view.event({"type": "node", "node": "n2", "status": "done",
                "summary": {"ok": 1, "changed": 0, "failed": 1, "not_run": 1, "skipped": 0}})
    view.event({"type": "node", "node": "n3", "status": "no_answer", "error": "not connected"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == ["n1: changed (changed 1, unchanged 1, skipped 1)",
                         "n2: failed (failed 1, not run 1, unchanged 1)",
                         "n3: no answer (not connected)"]


def test_the_live_view_uses_the_tables_words():
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, color_system=None)
    view = LiveApply(console)
    with view:
        view.event({"type": "start", "job": "j", "nodes": {"n1": 2, "n2": 1}})
        view.event({"type": "progress", "node": "n1", "state": {"id": "a", "fun": "file.managed", "status": "ok"}})
        view.event({"type": "node", "node": "n2", "status": "done",
                    "summary": {"ok": 0, "changed": 0, "failed": 0, "not_run": 1, "skipped": 0}})
        console.print(view._render())
    text = out.getvalue()
    assert "unchanged file.managed a" in text and " ok file.managed" not in text, text
    assert "ok (not run 1)" in text, text
