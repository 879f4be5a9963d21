"""Salt's test states (agent/states/test.py): test.nop, test.succeed_without_changes,
test.succeed_with_changes, test.fail_without_changes, test.fail_with_changes,
test.show_notification and test.configurable_test_state.

They change nothing on the node: each is run through the engine, as the agent runs a job, in a
real run and in test mode, and shown to give Salt's result (True/False/None), Salt's pretended
change and the comment; requisites see them as they see any state. A state file using them is
compiled by the master (pimaster.render.compile_for_node, with this agent's catalogue) and the job
run, and every Example:: in their references compiles.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from piagent.engine import run_states
from piagent.states import catalog, registry
from pimaster.render import StateFileErrors, compile_for_node, to_attrdict

CHANGE = {"testing": {"old": "Unchanged", "new": "Something pretended to change"}}  # Salt's
FUNCTIONS = ("test.nop", "test.succeed_without_changes", "test.succeed_with_changes", "test.fail_without_changes",
             "test.fail_with_changes", "test.show_notification", "test.configurable_test_state")


@pytest.fixture
def run(tmp):
    """run(fun, test=False, id="t", name=None, **args) -> the state's result, as the engine reports
    it (no name: the engine takes the id, as for a state file without one)."""
    def run_one(fun: str, test: bool = False, id: str = "t", name: str | None = None, **args) -> dict:
        state = {"id": id, "fun": fun, "args": args} | ({"name": name} if name is not None else {})
        (res,) = run_states([state], test=test, state_dir=str(tmp / "agent-state"))
        return res
    return run_one


def outcome(res: dict) -> tuple:
    return res["result"], res["status"], res["changes"], res["comment"]


def test_the_test_states_are_in_the_catalogue_with_their_arguments():
    entries = catalog()
    assert set(FUNCTIONS) == {name for name in registry() if name.startswith("test.")}
    assert entries["test.nop"]["args"] == ["name"]
    for fun in ("succeed_without_changes", "succeed_with_changes", "fail_without_changes", "fail_with_changes"):
        assert entries[f"test.{fun}"]["args"] == ["name", "comment"] and entries[f"test.{fun}"]["required"] == []
    assert entries["test.show_notification"]["required"] == ["text"]
    assert entries["test.configurable_test_state"]["args"] == [
        "name", "changes", "result", "comment", "warnings", "allow_test_mode_failure"]
    assert entries["test.configurable_test_state"]["types"]["changes"] == ["str", "bool"]


def test_nop_does_nothing_and_the_name_defaults_to_the_id(run):
    for test in (False, True):
        res = run("test.nop", test=test, id="anchor")
        assert outcome(res) == (True, "ok", {}, "Success!") and res["name"] == "anchor"


def test_succeed_without_changes(run):
    assert outcome(run("test.succeed_without_changes")) == (True, "ok", {}, "Success!")
    assert outcome(run("test.succeed_without_changes", test=True)) == (True, "ok", {}, "Success!")
    assert outcome(run("test.succeed_without_changes", comment="base applied")) == (True, "ok", {}, "base applied")
    assert run("test.succeed_without_changes", comment=42)["comment"] == "42"  # YAML's number, as text


def test_succeed_with_changes_reports_salts_pretended_change(run):
    assert outcome(run("test.succeed_with_changes")) == (True, "changed", CHANGE, "Success!")
    assert outcome(run("test.succeed_with_changes", test=True)) == (None, "changed", CHANGE,
                                                                    "would succeed with changes")
    assert run("test.succeed_with_changes", comment="done")["comment"] == "done"
    assert run("test.succeed_with_changes", test=True, comment="done")["comment"] == "would succeed with changes; done"


def test_fail_without_changes_fails_in_test_mode_too(run):
    assert outcome(run("test.fail_without_changes")) == (False, "failed", {}, "Failure!")
    assert outcome(run("test.fail_without_changes", test=True)) == (False, "failed", {}, "would fail")
    res = run("test.fail_without_changes", id="unsupported", name="Only bookworm is supported")
    assert res["name"] == "Only bookworm is supported" and res["id"] == "unsupported"
    assert run("test.fail_without_changes", test=True, comment="no")["comment"] == "would fail; no"


def test_fail_with_changes_fails_with_the_change_and_is_none_in_test_mode(run):
    assert outcome(run("test.fail_with_changes")) == (False, "failed", CHANGE, "Failure!")
    assert outcome(run("test.fail_with_changes", test=True)) == (None, "changed", CHANGE, "would fail with changes")


def test_show_notification_shows_its_text(run):
    for test in (False, True):
        assert outcome(run("test.show_notification", test=test, text="Reboot n1")) == (True, "ok", {}, "Reboot n1")
    assert outcome(run("test.show_notification", text="  ")) == (
        False, "failed", {}, "text must be the message to show, not empty")


def test_configurable_test_state_follows_salts_rules(run):
    fun = "test.configurable_test_state"
    assert outcome(run(fun)) == (True, "changed", CHANGE, "Success!")
    assert outcome(run(fun, test=True)) == (None, "changed", CHANGE, "would succeed with changes")
    assert outcome(run(fun, changes=False, result=False, comment="bar.baz")) == (False, "failed", {}, "bar.baz")
    assert outcome(run(fun, changes=True, result=False)) == (False, "failed", CHANGE, "Failure!")
    # Test mode: None with changes, True without -- a configured failure does not fail it ...
    assert outcome(run(fun, test=True, changes=True, result=False)) == (None, "changed", CHANGE,
                                                                        "would fail with changes")
    assert outcome(run(fun, test=True, changes=False, result=False)) == (
        True, "ok", {}, "would fail; test mode does not fail: allow_test_mode_failure is false")
    # ... unless allow_test_mode_failure says so.
    assert outcome(run(fun, test=True, changes=False, result=False, allow_test_mode_failure=True)) == (
        False, "failed", {}, "would fail")
    assert outcome(run(fun, test=True, result=False, allow_test_mode_failure=True)) == (
        False, "failed", CHANGE, "would fail with changes")
    assert run(fun, changes=False, warnings="A warning")["comment"] == "Success!; warning: A warning"
    assert run(fun, changes=False, warnings=["a", "b"])["comment"] == "Success!; warning: a; warning: b"


def test_configurable_test_state_refuses_random_and_other_words(run):
    for args in ({"changes": "Random"}, {"result": "random"}):
        for test in (False, True):
            res = run("test.configurable_test_state", test=test, **args)
            (what,) = args
            assert res["result"] is False and res["changes"] == {}, res
            assert res["comment"] == (f"{what}: 'Random' is not supported here: a state reports the same on every "
                                      f"run (write {what}: true or {what}: false)")
    res = run("test.configurable_test_state", result="yes")
    assert res["result"] is False and res["comment"] == "result must be true or false, not 'yes'"
    res = run("test.configurable_test_state", result=1)  # a type the catalogue does not take: the engine says so
    assert res["result"] is False and "result must be" in res["comment"]


def test_requisites_see_the_test_states_as_any_state(run, tmp):
    states = [
        {"id": "changed", "fun": "test.succeed_with_changes"},
        {"id": "quiet", "fun": "test.succeed_without_changes"},
        {"id": "broken", "fun": "test.fail_without_changes"},
        {"id": "on-change", "fun": "test.nop", "onchanges": [0]},
        {"id": "on-no-change", "fun": "test.nop", "onchanges": [1]},
        {"id": "needs-broken", "fun": "test.nop", "require": [2]},
        {"id": "on-failure", "fun": "test.show_notification", "args": {"text": "broken failed"}, "onfail": [2]},
    ]
    results = {r["id"]: r for r in run_states(states, state_dir=str(tmp / "agent-state"))}
    assert results["on-change"]["status"] == "ok"
    assert results["on-no-change"]["status"] == "skipped"
    assert results["needs-broken"]["status"] == "not_run"
    assert results["on-failure"]["status"] == "ok" and results["on-failure"]["comment"] == "broken failed"


CONTEXT = {"node": {"id": "n1", "hostname": "n1"}, "nodes": {}, "cluster": {},
           "grains": {"id": "n1", "oscodename": "bullseye"}}  # fail_without_changes' example: unsupported


def compile_text(tmp: Path, text: str, name: str = "init.sls") -> list[dict]:
    path = tmp / name
    path.write_text(text)
    return compile_for_node(str(path), {k: to_attrdict(v) for k, v in CONTEXT.items()}, catalog(), str(tmp))


def test_a_state_file_with_test_nop_and_a_require_compiles_on_the_master_and_runs(tmp):
    job = compile_text(tmp, (
        "/etc/pimaster-test.conf:\n"
        "  test.succeed_with_changes: []\n"
        "everything-ready:\n"
        "  test.nop:\n"
        "    - require:\n"
        "      - test: /etc/pimaster-test.conf\n"
        "bare: test.nop\n"))
    assert [(s["id"], s["fun"], s["name"], s["args"], s["require"]) for s in job] == [
        ("/etc/pimaster-test.conf", "test.succeed_with_changes", "/etc/pimaster-test.conf", {}, []),
        ("everything-ready", "test.nop", "everything-ready", {}, [0]),
        ("bare", "test.nop", "bare", {}, [])]
    results = run_states(job, state_dir=str(tmp / "agent-state"))
    assert [(r["id"], r["status"]) for r in results] == [
        ("/etc/pimaster-test.conf", "changed"), ("everything-ready", "ok"), ("bare", "ok")]
    # The master refuses what the agent would: an argument test.nop does not take, a missing text.
    with pytest.raises(StateFileErrors) as caught:
        compile_text(tmp, "a:\n  test.nop:\n    - something: else\nb:\n  test.show_notification: []\n", "bad.sls")
    problems = str(caught.value)
    assert "something" in problems and "text" in problems, problems


def test_every_example_in_the_references_compiles(tmp):
    for fun in FUNCTIONS:
        doc = inspect.getdoc(registry()[fun])
        example = doc.split("Example::", 1)[1]
        assert re.search(rf"\b{fun}:", example), f"{fun}: its example uses another function"
        try:
            job = compile_text(tmp, inspect.cleandoc(example) + "\n", fun.replace(".", "-") + ".sls")
        except StateFileErrors as exc:
            # States the example points at (mounts, services) are not in it: only those may be missing.
            assert all("which is not a state of this apply" in str(e) for e in exc.errors), f"{fun}: {exc}"
            continue
        assert any(s["fun"] == fun for s in job), fun
