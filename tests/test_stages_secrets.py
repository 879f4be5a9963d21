"""Secrets made on the master and data handed between nodes in stages, on loopback.

A secret (like the munge key) reaches the nodes' files but never job output, --json, the job
history, or either daemon's logs. A state file can ask for stages by role; a later stage renders
with the earlier stages' results (like a kubeadm join command), and output marked `sensitive` is
redacted wherever it is shown or stored.
"""

import json
import os
import stat
import textwrap

from harness import wait_for


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def everything_shown_or_stored(master, agents, outputs) -> dict[str, bytes]:
    data = {"outputs": "".join(outputs).encode(), "master log": master.log_path.read_bytes()}
    for agent in agents:
        data[f"{agent.node_id} log"] = agent.log_path.read_bytes()
        for sub in ("results", "jobs"):
            folder = agent.state_dir / sub
            if folder.exists():
                data[f"{agent.node_id} {sub}"] = b"".join(p.read_bytes() for p in folder.iterdir())
    for name in ("pimaster.db", "pimaster.db-wal"):
        path = master.state_dir / name
        if path.exists():
            data[name] = path.read_bytes()
    return data


def test_a_secret_reaches_the_file_and_nothing_else(tmp, master, start_agent):
    config = master.token_config(uses=2)
    agents = [start_agent(n, config) for n in ("n1", "n2")]
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")
    state = write(tmp / "key.yaml", f"""
        {tmp}/{{{{ node.id }}}}.key:
          file.managed:
            - contents: "{{{{ secret('test.key', 128) }}}}"
            - mode: "0400"
        """)
    outputs = [master.cli("apply", str(state), "--test", "--json").stdout]
    outputs.append(master.cli("apply", str(state), "--json").stdout)
    secret_file = master.state_dir / "secrets" / "test.key"
    value = secret_file.read_text().strip()
    assert len(value) == 128 and stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    for node in ("n1", "n2"):
        assert (tmp / f"{node}.key").read_text().strip() == value  # the same key on every node
        assert stat.S_IMODE((tmp / f"{node}.key").stat().st_mode) == 0o400
    second = json.loads(master.cli("apply", str(state), "--json").stdout)
    outputs.append(json.dumps(second))
    assert all(n["changed"] == 0 for n in second["nodes"].values())  # made once, not again
    outputs += [master.cli("jobs", "--json").stdout] + [master.cli("job", j["id"], "--json").stdout
                                                         for j in master.json("jobs")["jobs"]]
    assert "[secret test.key]" in outputs[0] or "[secret]" in outputs[0]  # the test-mode diff, redacted
    found = {where: data.count(value.encode()) for where, data in everything_shown_or_stored(master, agents, outputs).items()}
    print("secret occurrences:", found)
    assert sum(found.values()) == 0


def test_stages_hand_sensitive_results_to_later_nodes(tmp, master, start_agent):
    config = master.token_config(uses=3)
    agents = [start_agent(n, config) for n in ("n1", "n2", "n3")]
    wait_for(lambda: master.up_nodes() == {"n1", "n2", "n3"}, what="agents up")
    write(tmp / "site" / "cluster.yaml", """
        nodes:
          - id: n1
            roles: [control-plane]
        """)
    state = write(tmp / "site" / "join.yaml", f"""
        pimaster:
          stages: [control-plane]
        {{% if 'control-plane' in node.roles %}}
        make-token:
          cmd.run:
            - name: echo "join --token $(od -An -N8 -tx1 /dev/urandom | tr -d ' \\n')"
            - sensitive: true
        {{% else %}}
        {tmp}/joined-{{{{ node.id }}}}:
          file.managed:
            - contents: "{{{{ results.n1['make-token'].changes.stdout | trim }}}} at {{{{ node.id }}}}"
        {{% endif %}}
        """)
    result = master.cli("apply", str(state), "--json")
    report = json.loads(result.stdout)
    assert all(n["ok"] for n in report["nodes"].values()), report
    joined = (tmp / "joined-n2").read_text().strip()
    assert joined.startswith("join --token ") and joined.endswith(" at n2")
    token_line = joined.rsplit(" at ", 1)[0]
    assert (tmp / "joined-n3").read_text().strip() == f"{token_line} at n3"  # one token, handed to both
    n1 = report["nodes"]["n1"]
    assert n1["states"][0]["changes"] == {"redacted": "sensitive state"}
    # The control plane ran first: the workers started only after it finished.
    job = master.json("job", report["job"])
    assert all(job["nodes"][w]["duration_s"] is not None for w in ("n2", "n3"))
    outputs = [result.stdout, master.cli("job", report["job"], "--json").stdout]
    token = token_line.split("--token ")[1]
    found = {where: data.count(token.encode()) for where, data in everything_shown_or_stored(master, agents, outputs).items()}
    print("join token occurrences:", found)
    assert sum(found.values()) == 0


def test_a_later_stage_whose_results_add_states_is_recorded_not_dropped(tmp, master, start_agent):
    """Rendered first with `results` unknown, the worker's file has one state; rendered again with
    the control plane's results, it has two: the worker's result (two states) is the job's."""
    config = master.token_config(uses=2)
    for node_id in ("n1", "n2"):
        start_agent(node_id, config)
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")
    write(tmp / "site" / "cluster.yaml", "nodes:\n  - id: n1\n    roles: [control-plane]\n")
    state = write(tmp / "site" / "grow.yaml", f"""
        pimaster:
          stages: [control-plane]
        {tmp}/first-{{{{ node.id }}}}:
          file.managed:
            - contents: first
        {{% if results.n1 is defined and results.n1 %}}
        {tmp}/second-{{{{ node.id }}}}:
          file.managed:
            - contents: added once n1 had run
        {{% endif %}}
        """)
    result = master.cli("apply", str(state), "--json", "--timeout", "60s", timeout=120)
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    assert report["nodes"]["n2"]["status"] == "done" and report["nodes"]["n2"]["changed"] == 2, report
    assert (tmp / "second-n2").read_text().strip() == "added once n1 had run"
    assert "malformed job result" not in master.output()
