"""Reference docs for state functions where a person looks for them (issue 17, item 14):
`pimaster doc file.managed`, `piagent state file.managed --help`, and "did you mean" for typos.
No master or agent needs to run.
"""

from __future__ import annotations

import json
import subprocess
import sys


def run(program: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", program, *argv], capture_output=True, text=True, timeout=60)


def test_pimaster_doc_prints_a_functions_reference_with_its_argument_types():
    result = run("pimaster", "doc", "file.managed")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("file.managed\n") and "Example::" in out  # the docstring, the user reference
    assert "  mode: str or int or null (optional)" in out and "  makedirs: bool (optional)" in out
    as_json = json.loads(run("pimaster", "doc", "file.managed", "--json").stdout)
    assert as_json["types"]["makedirs"] == ["bool"] and "Example::" in as_json["reference"]


def test_pimaster_doc_lists_all_functions_or_one_modules():
    every = run("pimaster", "doc").stdout.splitlines()
    assert any(line.startswith("file.managed ") for line in every) and any(line.startswith("pkg.installed ") for line in every)
    files = run("pimaster", "doc", "file").stdout.splitlines()
    assert files and all(line.startswith("file.") for line in files)


def test_a_typo_gets_did_you_mean_from_both_commands():
    result = run("pimaster", "doc", "file.manged")
    assert result.returncode == 2 and "did you mean file.managed" in result.stderr, result.stderr
    result = run("piagent", "state", "file.manged", "name=/nonexistent/x")
    assert result.returncode == 2 and "did you mean file.managed" in result.stderr, result.stderr
    result = run("piagent", "state", "file.managed", "name=/nonexistent/x", "contnts=hi")
    assert result.returncode == 2 and "did you mean 'contents'" in result.stderr, result.stderr


def test_piagent_state_function_help_prints_its_reference():
    result = run("piagent", "state", "cmd.run", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("cmd.run\n") and "  timeout: float or null (optional)" in result.stdout
    general = run("piagent", "state", "--help")
    assert general.returncode == 0 and "FUNCTION --help" in general.stdout
