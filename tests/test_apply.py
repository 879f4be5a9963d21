"""`pimaster apply` on loopback: render, validate, push, converge, report, keep results.

Real master and agent processes; the states touch only files under the test's temp dir.
"""

import json
import os
import re
import signal
import textwrap
import time

import pytest

from harness import wait_for


@pytest.fixture
def cluster(master, start_agent):
    config = master.token_config(uses=5)
    agents = [start_agent(n, config) for n in ("n1", "n2")]
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")
    return master, agents


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def apply(master, path, *args, check=False):
    result = master.cli("apply", str(path), "--json", *args, check=check, timeout=300)
    return result.returncode, (json.loads(result.stdout) if result.stdout.strip() else None), result


def test_apply_converges_and_a_second_run_changes_nothing(tmp, cluster):
    master, _ = cluster
    out = tmp / "out"
    state = write(tmp / "states" / "motd.yaml", f"""
        {out}/{{{{ node.id }}}}/motd:
          file.managed:
            - contents: "hello {{{{ node.id }}}}, one of {{{{ nodes | length }}}}\\n"
            - makedirs: true
            - mode: "0640"
        announce:
          cmd.run:
            - name: echo converged > {out}/{{{{ node.id }}}}/announced
            - onchanges:
              - file: {out}/{{{{ node.id }}}}/motd
        """)
    rc, report, _ = apply(master, state, "--test")
    assert rc == 0 and report["nodes"]["n1"]["changed"] == 2  # test mode counts what would change
    assert not (out / "n1").exists()  # ...and changes nothing
    diff = report["nodes"]["n1"]["states"][0]["changes"].get("diff", "")
    assert "+hello n1, one of 2" in diff

    rc, report, _ = apply(master, state)
    assert rc == 0, report
    for node in ("n1", "n2"):
        assert report["nodes"][node]["ok"] and report["nodes"][node]["changed"] == 2
        assert (out / node / "motd").read_text() == f"hello {node}, one of 2\n"
        assert oct((out / node / "motd").stat().st_mode & 0o777) == "0o640"
        assert (out / node / "announced").read_text() == "converged\n"
    (out / "n1" / "announced").unlink()

    rc, report, _ = apply(master, state)
    assert rc == 0
    for node in ("n1", "n2"):
        assert report["nodes"][node]["changed"] == 0, report["nodes"][node]["states"]
        assert [s["status"] for s in report["nodes"][node]["states"]] == ["ok", "skipped"]
    assert not (out / "n1" / "announced").exists()  # onchanges: nothing changed, so it did not run

    # The jobs are kept: `pimaster jobs` lists them, `pimaster job ID` shows one again.
    jobs = master.json("jobs")["jobs"]
    assert len(jobs) == 3 and jobs[0]["id"] == report["job"]
    again = master.json("job", report["job"])
    assert again["nodes"]["n2"]["states"] == report["nodes"]["n2"]["states"]


def test_a_failed_state_marks_its_dependants_not_run(tmp, cluster):
    master, _ = cluster
    state = write(tmp / "fail.yaml", f"""
        broken:
          cmd.run:
            - name: "echo about to fail; exit 3"
        depends:
          cmd.run:
            - name: touch {tmp}/should-not-exist
            - require:
              - cmd: broken
        independent:
          cmd.run:
            - name: touch {tmp}/independent-{{{{ node.id }}}}
        rescue:
          cmd.run:
            - name: touch {tmp}/rescued-{{{{ node.id }}}}
            - onfail:
              - cmd: broken
        """)
    rc, report, _ = apply(master, state, "--target", "n1")
    assert rc != 0
    node = report["nodes"]["n1"]
    assert list(report["nodes"]) == ["n1"]
    statuses = {s["id"]: s["status"] for s in node["states"]}
    assert statuses == {"broken": "failed", "depends": "not_run", "independent": "changed", "rescue": "changed"}
    assert node["failed"] == 1 and node["not_run"] == 1
    broken = next(s for s in node["states"] if s["id"] == "broken")
    assert "about to fail" in json.dumps(broken["changes"])  # output captured in the result
    assert not (tmp / "should-not-exist").exists() and (tmp / "independent-n1").exists()
    # The human view names the failure in full.
    table = master.cli("apply", str(state), "--target", "n1", check=False)
    assert table.returncode != 0 and "FAILED cmd.run broken" in table.stdout and "fail.yaml:2" in table.stdout


BROKEN_FILES = {
    "yaml-syntax.yaml": ("a:\n  file.managed:\n    - contents: [unclosed\n", "yaml-syntax.yaml:4", "YAML syntax error"),
    "jinja-syntax.yaml": ("{% if node.id %}\na:\n  cmd.run: []\n", "jinja-syntax.yaml", "template syntax error"),
    "jinja-undefined.yaml": ("a:\n  cmd.run:\n    - name: echo {{ node.no_such_fact }}\n", "jinja-undefined.yaml:3",
                             "no_such_fact"),
    "unknown-function.yaml": ("a:\n  file.manged:\n    - contents: x\n", "unknown-function.yaml:2",
                              "did you mean 'file.managed'"),
    "unknown-argument.yaml": ("/tmp/x:\n  file.managed:\n    - contents: x\n    - mdoe: '0644'\n",
                              "unknown-argument.yaml:2", "did you mean 'mode'"),
    "missing-argument.yaml": ("pi.example:\n  host.present:\n    - clean: true\n", "missing-argument.yaml:2",
                              "needs the argument 'ip'"),
    "bad-requisite.yaml": ("a:\n  cmd.run:\n    - name: 'true'\n    - require:\n      - cmd: b\n",
                           "bad-requisite.yaml:5", "not a state of this apply"),
    "cycle.yaml": ("a:\n  cmd.run:\n    - require:\n      - cmd: b\nb:\n  cmd.run:\n    - require:\n      - cmd: a\n",
                   "cycle.yaml", "requisite cycle"),
    "missing-include.yaml": ("include:\n  - not-there\na:\n  cmd.run: []\n", "missing-include.yaml:2",
                             "no state file 'not-there'"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_a_broken_state_file_is_refused_with_file_line_and_reason(tmp, cluster, name):
    master, agents = cluster
    text, where, reason = BROKEN_FILES[name]
    path = write(tmp / "states" / name, text)
    result = master.cli("apply", str(path), check=False)
    assert result.returncode != 0
    assert "nothing was sent" in result.stderr and where in result.stderr and reason in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    # Nothing reached a node: no job recorded, no job on any agent.
    assert master.json("jobs")["jobs"] == []
    for agent in agents:
        assert not (agent.state_dir / "jobs").exists() and "job " not in agent.output()


def test_results_survive_a_master_restart_mid_job(tmp, cluster):
    master, _ = cluster
    state = write(tmp / "slow.yaml", f"""
        slow:
          cmd.run:
            - name: sleep 3; touch {tmp}/slow-done-{{{{ node.id }}}}
        """)
    proc = master.cli  # noqa: F841 (readability)
    import subprocess
    import sys

    running = subprocess.Popen([master.python, "-m", "pimaster", "apply", str(state), "--json", "--state-dir",
                                str(master.state_dir)], env=master.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: master.json("jobs")["jobs"], what="the job to start")
    job_id = master.json("jobs")["jobs"][0]["id"]
    master.stop(signal.SIGKILL)
    running.wait(30)
    assert running.returncode != 0  # the person's command lost its master...
    master.start()
    # ...but every node's result still ends up recorded against the job.
    wait_for(lambda: all(n["status"] == "done" for n in master.json("job", job_id, check=False)["nodes"].values()),
             timeout=60, what="both results recorded after the restart")
    report = master.json("job", job_id)
    assert sorted(report["nodes"]) == ["n1", "n2"] and all(n["ok"] for n in report["nodes"].values())
    assert (tmp / "slow-done-n1").exists() and (tmp / "slow-done-n2").exists()


def test_an_agent_killed_mid_job_reports_it_interrupted(tmp, cluster):
    master, agents = cluster
    state = write(tmp / "slow.yaml", """
        slow:
          cmd.run:
            - name: sleep 30
        """)
    import subprocess

    running = subprocess.Popen([master.python, "-m", "pimaster", "apply", str(state), "--target", "n1", "--json",
                                "--state-dir", str(master.state_dir)], env=master.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (agents[0].state_dir / "jobs").exists() and list((agents[0].state_dir / "jobs").iterdir()),
             what="the job to run on n1")
    agents[0].kill()
    agents[0].start()
    out, _ = running.communicate(timeout=60)
    report = json.loads(out)
    assert running.returncode != 0
    assert report["nodes"]["n1"]["status"] == "interrupted" and not report["nodes"]["n1"]["ok"]


def test_inventory_roles_names_and_targets(tmp, cluster):
    master, _ = cluster
    write(tmp / "site" / "cluster.yaml", """
        cluster:
          name: testcluster
          subnet: 10.99.0.0/24
          name_pattern: "pi{:02d}"
          first_host: 101
        nodes:
          - id: n1
            hostname: head
            ip: 10.99.0.10
            roles: [controller]
        """)
    state = write(tmp / "site" / "roles.yaml", f"""
        {tmp}/roles-{{{{ node.id }}}}:
          file.managed:
            - contents: |
                {{{{ node.hostname }}}} {{{{ node.ip }}}} {{{{ node.roles | join(',') }}}} {{{{ cluster.name }}}}
                {{% for n in nodes %}}{{{{ n.hostname }}}}={{{{ n.ip }}}} {{% endfor %}}
        """)
    rc, report, _ = apply(master, state)
    assert rc == 0, report
    assert (tmp / "roles-n1").read_text() == "head 10.99.0.10 controller testcluster\nhead=10.99.0.10 pi01=10.99.0.101 \n"
    assert (tmp / "roles-n2").read_text().startswith("pi01 10.99.0.101  testcluster")
    rc, report, _ = apply(master, state, "--target", "role:controller")
    assert rc == 0 and list(report["nodes"]) == ["n1"]
    # An unlisted node keeps the name and address it was given.
    rc, _, _ = apply(master, state)
    assert (tmp / "roles-n2").read_text().startswith("pi01 10.99.0.101")


def test_an_apply_reaches_an_agent_that_is_reconnecting_right_then(tmp, cluster):
    """A node whose connection is being replaced (its address just changed, its link flapped, its
    agent restarted) gets the job on its new connection instead of being reported without answer."""
    master, agents = cluster
    state = write(tmp / "touch.yaml", f"""
        {tmp}/{{{{ node.id }}}}.touched:
          file.managed:
            - contents: here
        """)
    agents[0].kill()   # the master still has the old connection's route: a request sent there is lost
    import subprocess

    running = subprocess.Popen([master.python, "-m", "pimaster", "apply", str(state), "--json",
                                "--state-dir", str(master.state_dir)], env=master.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    agents[0].start()
    out, err = running.communicate(timeout=60)
    report = json.loads(out)
    assert {n: i["status"] for n, i in report["nodes"].items()} == {"n1": "done", "n2": "done"}, err
    assert (tmp / "n1.touched").read_text().strip() == "here"


def test_a_bare_name_means_the_file_in_the_current_directory_before_a_shipped_one(tmp, cluster):
    # A person copies the shipped states to edit their inventory, and runs `pimaster apply network`
    # there: it must apply their copy, never the shipped example (the lab's addresses on real Pis).
    import subprocess

    master, _ = cluster
    mine = tmp / "cluster"
    out = tmp / "out-mine"
    write(mine / "network.yaml", f"""
        {out}/{{{{ node.id }}}}:
          file.managed:
            - contents: mine
            - makedirs: true
        """)
    write(mine / "site.yml", f"""
        {out}/site-{{{{ node.id }}}}:
          file.managed:
            - contents: site
            - makedirs: true
        """)
    # (`network` in test mode: should this ever regress, the shipped network.yaml changes nothing here.)
    for name, extra in (("network", ["--test"]), ("site", [])):
        result = subprocess.run([master.python, "-m", "pimaster", "apply", name, "--json", *extra, "--state-dir",
                                 str(master.state_dir)], capture_output=True, text=True, env=master.env, cwd=mine,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["file"] == str(mine / f"{name}.{'yaml' if name == 'network' else 'yml'}")
    assert (out / "site-n1").read_text() == "site\n"


def test_a_directory_named_like_a_shipped_state_hides_nothing_and_a_gone_directory_is_named(tmp, cluster):
    import subprocess

    master, _ = cluster
    here = tmp / "work"
    (here / "time").mkdir(parents=True)  # a directory, not a state file: the shipped `time` is meant
    run = lambda *args, cwd=here: subprocess.run([master.python, "-m", "pimaster", *args, "--json", "--state-dir",
                                                  str(master.state_dir)], capture_output=True, text=True,
                                                 env=master.env, cwd=cwd, timeout=120)
    result = run("apply", "time", "--test", "--target", "n1")
    assert json.loads(result.stdout).get("file", "").endswith("states/time.yaml"), result.stdout + result.stderr
    result = run("apply", "time/")
    assert result.returncode == 2 and json.loads(result.stdout)["error"].endswith("time/: is a directory, not a state file (nor one holding an init.sls)")
    gone = tmp / "gone"
    gone.mkdir()
    proc = subprocess.run(["sh", "-c", f'cd {gone} && rmdir {gone} && exec "$@"', "sh", master.python, "-m",
                           "pimaster", "apply", "x.yaml", "--state-dir", str(master.state_dir)],
                          capture_output=True, text=True, env=master.env, timeout=120)
    assert proc.returncode == 2 and "this shell's directory no longer exists" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_role_targets_say_which_apply_their_roles_come_from(tmp, cluster):
    import sqlite3

    master, _ = cluster
    write(tmp / "site" / "cluster.yaml", "nodes:\n  - id: n1\n    roles: [web]\n")
    state = write(tmp / "site" / "hello.yaml", "hello:\n  cmd.run:\n    - name: 'true'\n")
    assert apply(master, state)[0] == 0
    write(tmp / "site" / "cluster.yaml", "nodes:\n  - id: n1\n    roles: [web, db]\n")  # edited, not applied
    code, data = master.ping("--target", "role:db")
    assert code == 2 and re.search(rf"no accepted node matches role:db \(roles as the apply of {tmp}/site/hello.yaml "
                                   r"read them \d+s ago: apply again to use an edited cluster.yaml\)", data["error"]), data
    assert apply(master, state)[0] == 0
    assert [n["id"] for n in master.ping("--target", "role:db")[1]["nodes"]] == ["n1"]
    # A master upgraded from a version that kept no inventory: jobs exist, the inventory does not.
    with sqlite3.connect(master.state_dir / "pimaster.db") as db:
        db.execute("DELETE FROM last_inventory")
    code, data = master.ping("--target", "role:db")
    assert code == 2 and "no apply has run since this master was upgraded" in data["error"], data


def test_an_empty_state_file_warns(tmp, cluster):
    master, _ = cluster
    for text in ("", "# only a comment\n", "{% if node.id == 'nobody' %}\nx:\n  cmd.run: []\n{% endif %}\n"):
        path = write(tmp / "empty.yaml", text)
        rc, report, result = apply(master, path)
        assert rc == 0 and report["nodes"]["n1"]["ok"], result.stderr
        assert "warning: empty.yaml has no state for any of the 2 node(s)" in result.stderr, result.stderr
    plain = master.cli("apply", str(path), check=False)  # the plain view (not on a terminal) too
    assert plain.returncode == 0 and "warning: empty.yaml has no state" in plain.stderr, plain.stderr
