"""A corpus of broken state files (tests/corpus/broken): each is refused at the master, before
anything reaches a node, with the file, the line and the reason, and never a Python traceback."""

import re
import shutil
import tempfile
from pathlib import Path

import pytest

from harness import Agent, Master, wait_for

CORPUS = Path(__file__).parent / "corpus" / "broken"
FILES = sorted(p.name for p in CORPUS.iterdir() if p.suffix == ".yaml")


@pytest.fixture(scope="module")
def target():
    tmp = Path(tempfile.mkdtemp(prefix="pm-corpus-", dir="/tmp"))
    master = Master(tmp).start()
    agent = Agent(tmp, "n1", master.token_config()).start()
    try:
        wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
        yield master, agent
    finally:
        agent.stop()
        master.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_corpus_is_large_enough():
    assert len(FILES) >= 30


@pytest.mark.parametrize("name", FILES)
def test_broken_file_is_refused_with_file_and_line(target, name):
    master, agent = target
    jobs_before = len(master.json("jobs")["jobs"])
    result = master.cli("apply", str(CORPUS / name), check=False)
    assert result.returncode != 0
    message = result.stderr
    assert "nothing was sent" in message, message
    assert re.search(re.escape(name) + r":\d+: \S", message), message
    assert "Traceback" not in message + result.stdout
    assert len(master.json("jobs")["jobs"]) == jobs_before  # nothing reached a node
    assert not (agent.state_dir / "jobs").exists()


# ---------------------------------------------------------------------------------------------
# Argument types: the catalogue's `types`, checked at the master once the values are in

TYPED = """\
web:
  file.managed:
    - name: /etc/web.conf
    - contents: {{ contents }}
    - mode: {{ mode }}
    - makedirs: {{ makedirs }}
probe:
  cmd.run:
    - name: {{ 8080 }}
    - timeout: {{ timeout }}
"""
# A hand-made catalogue, as an agent with typed arguments sends it.
CATALOG = {
    "file.managed": {"args": ["name", "contents", "mode", "makedirs"], "required": [], "summary": "",
                     "types": {"name": ["str"], "contents": ["str", "list", "null"], "mode": ["str", "int"],
                               "makedirs": ["bool"]}},
    "cmd.run": {"args": ["name", "timeout"], "required": [], "summary": "",
                "types": {"name": ["str"], "timeout": ["float", "null"]}},
}
FITTING = {"contents": "x", "mode": "0644", "makedirs": True, "timeout": 5}


def compile_typed(tmp_path: Path, values: dict, catalog: dict = CATALOG, text: str = TYPED) -> list[dict]:
    from pimaster.render import compile_for_node

    path = tmp_path / "typed.yaml"
    path.write_text(text)
    return compile_for_node(str(path), values, catalog, str(tmp_path))


def typed_errors(tmp_path: Path, values: dict) -> list[str]:
    from pimaster.render import StateFileErrors

    with pytest.raises(StateFileErrors) as caught:
        compile_typed(tmp_path, values)
    return [str(e) for e in caught.value.errors]


def test_values_of_the_types_the_catalogue_gives_pass(tmp_path):
    for values in (FITTING, dict(FITTING, contents=["a", "b"], mode=420, timeout=1.5),
                   dict(FITTING, contents=None, makedirs=False, timeout=None)):
        job = compile_typed(tmp_path, values)
        # (a mode's digits are sent as text: `mode: 644` means what `mode: "644"` does)
        assert job[0]["args"]["mode"] == str(values["mode"]) and job[1]["args"]["timeout"] == values["timeout"]
    assert compile_typed(tmp_path, FITTING)[1]["name"] == "8080"  # the name is sent as text, whatever it was


def test_a_value_of_another_type_is_refused_with_the_file_the_line_and_the_types_expected(tmp_path):
    assert typed_errors(tmp_path, dict(FITTING, mode=["0644"])) == [
        "typed.yaml:5: web: file.managed: mode must be text or a whole number, not a list"]
    assert typed_errors(tmp_path, dict(FITTING, makedirs="yes", timeout=True, contents={"a": 1})) == [
        "typed.yaml:4: web: file.managed: contents must be text or a list, not a mapping",
        "typed.yaml:6: web: file.managed: makedirs must be true or false, not text",
        "typed.yaml:10: probe: cmd.run: timeout must be a number, not true"]
    assert typed_errors(tmp_path, dict(FITTING, mode=None)) == [
        "typed.yaml:5: web: file.managed: mode must be text or a whole number, not null"]


def test_a_name_that_is_not_text_nor_a_number_is_refused_not_run_as_its_python_text(tmp_path):
    from pimaster.render import StateFileErrors

    # `name: false` for cmd.run used to run `False`; a list ran "['echo', 'hi']".
    for value, words in (("false", "false"), ("", "null"), ("[echo, hi]", "a list"), ("{echo: hi}", "a mapping")):
        text = TYPED.replace("{{ 8080 }}", value)
        with pytest.raises(StateFileErrors) as caught:
            compile_typed(tmp_path, FITTING, text=text)
        assert str(caught.value) == f"typed.yaml:9: probe: cmd.run: name must be text, not {words}"


def test_a_result_not_known_yet_is_not_refused_for_its_type(tmp_path):
    from pimaster.render import Pending, StateFileErrors, to_attrdict

    text = TYPED.replace("{{ timeout }}", "{{ results.n1.probe.changes.timeout }}")
    job = compile_typed(tmp_path, dict(FITTING, results=Pending()), text=text)  # the first rendering
    assert job[1]["args"]["timeout"] == ""
    results = to_attrdict({"n1": {"probe": {"changes": {"timeout": 30}}}})
    assert compile_typed(tmp_path, dict(FITTING, results=results), text=text)[1]["args"]["timeout"] == 30
    results = to_attrdict({"n1": {"probe": {"changes": {"timeout": "soon"}}}})
    with pytest.raises(StateFileErrors) as caught:                     # the later stage's rendering
        compile_typed(tmp_path, dict(FITTING, results=results), text=text)
    assert str(caught.value) == "typed.yaml:10: probe: cmd.run: timeout must be a number, not text"


def test_a_catalogue_without_types_takes_any_value_as_before(tmp_path):
    untyped = {fun: {k: v for k, v in spec.items() if k != "types"} for fun, spec in CATALOG.items()}
    job = compile_typed(tmp_path, dict(FITTING, mode=["0644"], makedirs="yes", timeout=True), untyped)
    assert job[0]["args"]["mode"] == ["0644"] and job[1]["args"]["timeout"] is True


def test_a_wrong_type_through_pimaster_apply_is_refused_before_anything_is_sent(target, tmp_path):
    master, agent = target
    jobs_before = len(master.json("jobs")["jobs"])
    path = tmp_path / "wrong-type.yaml"
    path.write_text("web:\n  file.managed:\n    - name: /tmp/pm-never\n    - contents: x\n    - makedirs: \"yes\"\n")
    result = master.cli("apply", str(path), check=False)
    assert result.returncode != 0
    assert "wrong-type.yaml:5: web: file.managed: makedirs must be true or false, not text" in result.stderr, result.stderr
    assert "nothing was sent" in result.stderr
    assert len(master.json("jobs")["jobs"]) == jobs_before
    assert not (agent.state_dir / "jobs").exists()


def test_an_undefined_fact_is_named_in_a_persons_words(tmp_path):
    # It used to say "'pimaster.render.AttrDict object' has no attribute 'hostnam'".
    from pimaster.render import StateFileErrors, compile_for_node, to_attrdict

    path = tmp_path / "typo.yaml"
    path.write_text("/tmp/pm-never:\n  file.managed:\n    - contents: \"{{ node.hostnam }}\"\n")
    with pytest.raises(StateFileErrors) as caught:
        compile_for_node(str(path), {"node": to_attrdict({"id": "n1", "hostname": "n1"}), "nodes": {}, "cluster": {}},
                         CATALOG, str(tmp_path))
    assert str(caught.value) == ("typo.yaml:3: undefined in template: n1 has no fact or inventory key 'hostnam' "
                                 "(did you mean 'hostname'?)")
