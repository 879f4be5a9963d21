"""A root-compromised Pi against the master's output and bookkeeping: what its text and its
catalogue can do to other nodes' applies, to the person's terminal, and to the master's time.

Real master, real agents, and tests/hostile_agent.py processes (see test_hostile.py) on 127.0.0.1.
"""

from __future__ import annotations

import json

from piagent.states import catalog
from pimaster.facts import MAX_CATALOG_FUNCTIONS, MAX_FUNCTION_ARGS, check_catalog
from test_hostile import apply_json, hostile, honest_up, pi_facts, token_of, write  # noqa: F401 (hostile: a fixture)

ESC = "\x1b"
FORGED = "good01: changed (changed 1)"  # good01's own progress line


def test_a_catalogue_too_big_to_check_cheaply_is_refused():
    # A typed catalogue of one function with 8,250 arguments took the master's router loop a second
    # to check, on every enrollment of an accepted key: a few a second froze the master.
    args = [f"a{i}" for i in range(8250)]
    huge = {"file.managed": {"args": args, "required": [], "summary": "", "types": {a: ["str"] for a in args}}}
    checked, why = check_catalog(huge)
    assert checked is None and "file.managed" in why
    many = {f"m{i}.f": {"args": ["name"], "required": [], "summary": ""} for i in range(MAX_CATALOG_FUNCTIONS + 1)}
    checked, why = check_catalog(many)
    assert checked is None and str(MAX_CATALOG_FUNCTIONS) in why
    widest = {"cmd.run": {"args": [f"a{i}" for i in range(MAX_FUNCTION_ARGS)], "required": [], "summary": ""}}
    assert check_catalog(widest)[0] is not None
    real, why = check_catalog(catalog())
    assert why is None and real["file.managed"]["types"]["mode"]


def test_a_nodes_text_cannot_end_an_apply_nor_forge_lines(tmp, master, start_agent, hostile):
    config = master.token_config(uses=5)
    token = token_of(config)
    good = start_agent("good01", config)
    bytes_error = hostile("evil01", facts=pi_facts("evil01", "dc:a6:32:66:66:01", "10.0.0.61"), token=token,
                          results={"ack": {"accepted": False, "error": {"$b64": "eA=="}}})
    lines_error = hostile("evil02", facts=pi_facts("evil02", "dc:a6:32:66:66:02", "10.0.0.62"), token=token,
                          results={"ack": {"accepted": False, "error": f"x{ESC}[2J{ESC}]0;owned\a\n{FORGED}"},
                                   "ping_refused": f"busy\ngood01  up  0.3 ms{ESC}[2J"})
    for node in (bytes_error, lines_error):
        assert node.wait_answer(10) == "accepted", node.output()
    honest_up(master)
    site = tmp / "site"
    write(site / "cluster.yaml", """
        nodes:
          - id: evil01
            roles: [first]
          - id: evil02
            roles: [first]
          - id: good01
            roles: [second]
        """)
    state = write(site / "hello.yaml", f"""
        pimaster:
          stages: [first, second]
        {tmp}/hello-{{{{ node.id }}}}:
          file.managed:
            - contents: hi
        """)
    # A first-stage node answering with bytes used to end the whole apply ("bad arguments"): the
    # second stage was never sent.
    result, report = apply_json(master, str(state))
    assert report is not None, result.stderr
    assert report["nodes"]["good01"]["status"] == "done" and report["nodes"]["good01"]["ok"], report["nodes"]
    assert (tmp / "hello-good01").read_text() == "hi\n"
    assert {report["nodes"][n]["status"] for n in ("evil01", "evil02")} == {"no_answer"}

    (tmp / "hello-good01").unlink()
    plain = master.cli("apply", str(state), "--timeout", "30s", check=False, timeout=120)
    out = plain.stdout + plain.stderr
    assert (tmp / "hello-good01").read_text() == "hi\n", out
    assert ESC not in out and "\a" not in out
    # evil02's error holds "\ngood01: changed (changed 1)": good01's progress line must stay the only
    # one (the other good01 line lists its changed state).
    assert sum(line.startswith("good01: changed (") for line in out.splitlines()) == 1, out
    assert sum(line.startswith("good01:") for line in out.splitlines()) == 2, out

    ping = master.cli("ping", check=False)
    assert ESC not in ping.stdout
    assert sum(line.startswith("good01") for line in ping.stdout.splitlines()) == 1, ping.stdout
    assert good.alive()


def test_only_states_the_file_marks_sensitive_hide_output_from_other_nodes(tmp, master, start_agent, hostile):
    # Output of a sensitive state is redacted from the later stages' results (a join token). A
    # first-stage node calling its ordinary output "sensitive" could thus censor what later nodes
    # report: any 6+ character string of their jobs.
    config = master.token_config(uses=5)
    token = token_of(config)
    start_agent("good01", config)
    honest_up(master)
    path = str(tmp / "reported-by-good01")
    evil = hostile("evil01", facts=pi_facts("evil01", "dc:a6:32:66:66:01", "10.0.0.61"), token=token, results={
        "states": {"probe": {"status": "changed", "sensitive": True, "changes": {"stdout": path}}}})
    assert evil.wait_answer(10) == "accepted", evil.output()
    site = tmp / "site"
    write(site / "cluster.yaml", """
        nodes:
          - id: evil01
            roles: [first]
          - id: good01
            roles: [second]
        """)
    state = write(site / "probe.yaml", f"""
        pimaster:
          stages: [first]
        {{% if node.id == 'evil01' %}}
        probe:
          cmd.run:
            - name: "true"
        {{% else %}}
        {path}:
          file.managed:
            - contents: hi
        {{% endif %}}
        """)
    result, report = apply_json(master, str(state))
    assert report is not None and report["nodes"]["good01"]["ok"], result.stderr
    stored = master.json("job", report["job"])
    good_states = json.dumps(stored["nodes"]["good01"]["states"])
    assert path in good_states and "[secret" not in good_states, good_states
