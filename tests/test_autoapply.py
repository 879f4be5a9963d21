"""Zero touch on loopback: the cluster directory's `apply:` list, applied by the master itself when a
node enrolls or leaves, by `pimaster apply` with no file, and in drift checks.

Real master and agent processes; the states write only under the test's temp dir. The cluster
directory is the master's `--cluster-dir` (tests/harness.Master makes one per master).
"""

import json
import textwrap

import pytest

from harness import wait_for


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def cluster_files(master, out, cluster_yaml: str) -> None:
    """A cluster directory: hosts.yaml (names every node: a newcomer changes it everywhere) and
    motd.yaml (a node's own: nobody else's changes with a newcomer)."""
    d = master.cluster_dir
    write(d / "cluster.yaml", cluster_yaml)
    write(d / "hosts.yaml", f"""
        {out}/{{{{ node.id }}}}/hosts:
          file.managed:
            - contents: "{{% for n in nodes %}}{{{{ n.id }}}} {{% endfor %}}\\n"
            - makedirs: true
        """)
    write(d / "motd.yaml", f"""
        {out}/{{{{ node.id }}}}/motd:
          file.managed:
            - contents: "hello {{{{ node.id }}}}\\n"
            - makedirs: true
        """)


def status(master) -> dict:
    return master.json("status")


def settled(master, reason: str) -> dict:
    """The status once the master's own run for ``reason`` has finished (and nothing else waits)."""
    def done():
        s = status(master)
        last = s.get("auto_apply_last") or {}
        return s if s["auto_apply_state"] == "idle" and last.get("reason") == reason else None
    return wait_for(done, 120, what=f"the automatic apply ({reason}) to finish")


def jobs(master) -> list[dict]:
    return master.json("jobs")["jobs"]


def test_enrolled_node_gets_the_list_and_the_others_only_what_its_arrival_changes(tmp, master, start_agent):
    out = tmp / "out"
    cluster_files(master, out, "apply: [hosts, motd]\n")
    config = master.token_config(uses=5)
    for node in ("n1", "n2"):
        start_agent(node, config)
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")
    first = settled(master, "enrolled n1, n2")
    assert first["auto_apply_last"]["ok"], first
    assert (out / "n1" / "hosts").read_text() == "n1 n2 \n"
    assert (out / "n2" / "motd").read_text() == "hello n2\n"
    listed = jobs(master)
    assert [j["reason"] for j in listed] == ["enrolled n1, n2"] * 2
    assert sorted(j["file"].rsplit("/", 1)[-1] for j in listed) == ["hosts.yaml", "motd.yaml"]

    # A third node: it gets both files; the others only hosts.yaml, whose rendering names it.
    third = start_agent("n3", config)
    settled(master, "enrolled n3")
    newest = {j["file"].rsplit("/", 1)[-1]: j for j in jobs(master)[:2]}
    assert newest["hosts.yaml"]["nodes"] == 3 and newest["motd.yaml"]["nodes"] == 1, newest
    assert all(j["reason"] == "enrolled n3" for j in newest.values())
    assert (out / "n1" / "hosts").read_text() == "n1 n2 n3 \n"
    assert (out / "n3" / "motd").read_text() == "hello n3\n"
    table = master.cli("jobs").stdout
    assert "WHY" in table.splitlines()[0] and "enrolled n3" in table

    # Its key deleted: the others' hosts no longer name it; nothing else is sent.
    before = len(jobs(master))
    third.stop()  # (its token has uses left: a running agent would enroll again at once)
    master.cli("keys", "delete", "n3")
    settled(master, "removed n3")
    assert len(jobs(master)) == before + 1
    assert (out / "n1" / "hosts").read_text() == "n1 n2 \n"

    # A person's full apply (no file) changes nothing now, and says so per file.
    result = master.cli("apply", "--json", check=False, timeout=300)
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stderr
    assert report["apply"] == ["hosts.yaml", "motd.yaml"] and len(report["jobs"]) == 2
    assert {n: v["changed"] for n, v in report["nodes"].items()} == {"n1": 0, "n2": 0}
    assert all(j["reason"] is None for j in report["jobs"])


def test_a_node_stops_at_its_first_failing_file(tmp, master, start_agent):
    out = tmp / "out"
    cluster_files(master, out, "apply: [check, motd]\nauto_apply: false\n")
    write(master.cluster_dir / "check.yaml", """
        disk-ok:
          cmd.run:
            - name: "{{ 'exit 3' if node.id == 'n2' else 'true' }}"
        """)
    config = master.token_config(uses=5)
    for node in ("n1", "n2"):
        start_agent(node, config)
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")
    result = master.cli("apply", "--json", check=False, timeout=300)
    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert report["stopped"] == {"n2": "check.yaml"}
    assert report["nodes"]["n2"] == {"ok": False, "changed": 0, "stopped_at": "check.yaml"}
    motd_job = report["jobs"][1]
    assert list(motd_job["nodes"]) == ["n1"]
    assert (out / "n1" / "motd").exists() and not (out / "n2" / "motd").exists()
    # auto_apply: false: enrolling started nothing by itself.
    assert all(j["reason"] is None for j in jobs(master))
    text = master.cli("apply", check=False, timeout=300).stdout
    assert "n2: stopped at check.yaml" in text and "== motd.yaml (2 of 2)" in text


def test_a_broken_list_is_refused_with_file_and_line_before_anything_is_sent(master, start_agent):
    write(master.cluster_dir / "cluster.yaml", "# the list\napply: [network, ../../etc/passwd]\n")
    start_agent("n1", master.token_config())
    wait_for(lambda: master.up_nodes() == {"n1"}, what="agent up")
    result = master.cli("apply", "--json", check=False)
    assert result.returncode == 2
    assert "cluster.yaml:2" in json.loads(result.stdout)["error"]
    write(master.cluster_dir / "cluster.yaml", "apply: [nosuchfile]\n")
    result = master.cli("apply", check=False)
    assert result.returncode == 2 and "nosuchfile" in result.stderr and "no such state file" in result.stderr
    assert jobs(master) == []
    assert status(master)["cluster_error"] is None or "nosuchfile" not in status(master)["cluster_error"]


def test_nodes_outside_the_inventorys_subnet_are_not_acted_on_by_the_master_itself(tmp, master, start_agent):
    # The shipped inventory describes the lab's subnet: Pis elsewhere are left alone until a person
    # edits it (these agents' addresses are this host's, none in 10.77.0.0/24).
    cluster_files(master, tmp / "out", "apply: [motd]\ncluster:\n  subnet: 10.77.0.0/24\n")
    start_agent("n1", master.token_config())
    wait_for(lambda: master.up_nodes() == {"n1"}, what="agent up")
    s = wait_for(lambda: (st := status(master))["auto_apply_skipped"] and st["auto_apply_state"] == "idle" and st,
                 60, what="the skip to be shown")
    assert "10.77.0.0/24" in s["auto_apply_skipped"]["n1"]
    assert jobs(master) == [] and not (tmp / "out").exists()


def test_drift_check_names_a_state_changed_by_hand_and_auto_correct_repairs_it(tmp, master, start_agent):
    out = tmp / "out"
    cluster_files(master, out, "apply: [motd]\n")
    start_agent("n1", master.token_config())
    settled(master, "enrolled n1")
    assert master.json("nodes")["nodes"][0]["drift"] is None  # never checked

    (out / "n1" / "motd").write_text("edited by hand\n")
    cluster = master.cluster_dir / "cluster.yaml"
    cluster.write_text("apply: [motd]\ncheck_interval: 10s\n")

    def drifted():
        result = master.cli("drift", "--json", check=False)
        answer = json.loads(result.stdout)
        return (result.returncode, answer) if answer["nodes"].get("n1", {}).get("drifted") else None
    rc, answer = wait_for(drifted, 60, what="the drift check to find the edit")
    assert rc == 1
    [file] = answer["nodes"]["n1"]["files"]
    assert file["file"] == "motd.yaml" and file["states"][0]["id"].endswith("/n1/motd")
    assert (out / "n1" / "motd").read_text() == "edited by hand\n"  # test mode: nothing changed
    assert master.json("nodes")["nodes"][0]["drift"] == 1
    assert "drift check" in [j["reason"] for j in jobs(master)]
    assert "would change" in master.cli("drift", check=False).stdout

    cluster.write_text("apply: [motd]\ncheck_interval: 10s\nauto_correct: true\n")
    wait_for(lambda: (out / "n1" / "motd").read_text() == "hello n1\n", 60, what="auto_correct to repair the file")
    answer = wait_for(lambda: (a := master.json("drift", check=False))["nodes"]["n1"]["files"][0]["states"]
                      and a["nodes"]["n1"]["files"][0]["states"][0]["corrected"] and a, 30, what="the correction recorded")
    assert answer["nodes"]["n1"]["drifted"] == 0

    # A new rendering (the state file changed) is not drift: auto_correct does not roll it out, and
    # the node is listed as outdated until a person applies.
    write(master.cluster_dir / "motd.yaml", f"""
        {out}/{{{{ node.id }}}}/motd:
          file.managed:
            - contents: "welcome {{{{ node.id }}}}\\n"
            - makedirs: true
        """)
    answer = wait_for(lambda: (a := master.json("drift", check=False))["nodes"]["n1"]["outdated"] and a, 60,
                      what="n1 listed as outdated")
    assert answer["nodes"]["n1"]["outdated"] == ["motd.yaml"] and answer["nodes"]["n1"]["drifted"] == 0
    assert (out / "n1" / "motd").read_text() == "hello n1\n"
    assert "outdated" in master.cli("nodes").stdout.splitlines()[1]


@pytest.mark.parametrize("text,line,words", [
    ("apply: [motd]\ncheck_interval: 2s\n", 2, "check_interval"),
    ("apply: [motd]\nauto_apply: yes please\n", 2, "true or false"),
    ("nodes: []\napply: {motd: 1}\n", 2, "a list of state file names"),
])
def test_settings_of_cluster_yaml_are_checked(tmp, text, line, words):
    from pimaster.inventory import parse_inventory
    from pimaster.statetree import StateFileError

    with pytest.raises(StateFileError) as caught:
        parse_inventory(text, str(tmp / "cluster.yaml"))
    assert caught.value.line == line and words in str(caught.value)


def test_a_node_that_never_reports_is_let_go_by_job_cancel_and_zero_touch_goes_on(tmp, master, start_agent, processes):
    """A node that takes every job and never reports (a hung command, a hostile agent) holds the
    master's own run only until a person cancels that job (or auto_timeout): its agent does not
    answer the cancel, so the run stops waiting for it, and the newcomer gets the whole list."""
    from test_hostile import Hostile, pi_facts, token_of

    out = tmp / "out"
    cluster_files(master, out, "apply: [hosts, motd]\n")
    config = master.token_config(uses=5)
    silent = Hostile(tmp, master, "h1", facts=pi_facts("h1", "dc:a6:32:00:00:01", "10.77.0.50"),
                     token=token_of(config), results={"skip": True}).start()
    processes.append(silent)
    wait_for(lambda: status(master)["auto_apply_running"] == "enrolled h1", 30, what="h1's run to start")
    start_agent("n1", config)
    cancelled = set()

    def cancel_and_look():
        for job in jobs(master):
            if job["reason"] and job["finished_nodes"] < job["nodes"] and job["id"] not in cancelled:
                answer = master.json("job", "cancel", job["id"], check=False)
                assert answer["nodes"]["h1"]["result"] == "failed", answer
                cancelled.add(job["id"])
        return (out / "n1" / "motd").exists() and (out / "n1" / "hosts").exists()
    wait_for(cancel_and_look, 120, interval=1, what="n1 to get the list past the silent node")
    assert (out / "n1" / "hosts").read_text() == "h1 n1 \n"
    for job_id in cancelled:
        assert master.json("job", job_id, check=False)["nodes"]["h1"]["status"] == "no_answer"
