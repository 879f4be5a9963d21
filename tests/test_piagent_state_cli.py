"""`piagent state FUNCTION ARG=VALUE…`: one state run by hand on a node, as a person types it.

Values are JSON where they parse (`makedirs=true`, `mode=420`), text otherwise; the name is always
the text typed. A value of the wrong type is refused before anything runs, naming the argument.
"""

from __future__ import annotations

import json
import subprocess
import sys


def piagent_state(tmp_path, *argv: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "piagent", "state", *argv, "--json", "--state-dir",
                           str(tmp_path / "state")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {"stderr": proc.stderr}


def test_the_name_is_the_text_typed_even_when_it_looks_like_json(tmp_path):
    # `name=false` used to become the YAML/JSON boolean and run `False`.
    code, res = piagent_state(tmp_path, "cmd.run", "name=false")
    assert res["status"] == "failed" and res["name"] == "false", res
    code, res = piagent_state(tmp_path, "cmd.run", "name=true")
    assert res["status"] == "changed" and res["name"] == "true", res


def test_a_value_of_the_wrong_type_is_refused_before_anything_runs(tmp_path):
    target = tmp_path / "motd"
    code, res = piagent_state(tmp_path, "file.managed", f"name={target}", "contents=hello", 'makedirs="yes"')
    assert res["status"] == "failed" and "makedirs" in res["comment"], res
    assert not target.exists()
    code, res = piagent_state(tmp_path, "file.managed", f"name={target}", "contents=hello", "makedirs=true")
    assert res["status"] == "changed" and target.read_text() == "hello\n", res
