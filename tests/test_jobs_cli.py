"""`pimaster jobs --limit/--target/--since` and `pimaster job last|PREFIX` on loopback; times with
their zone and `test` a JSON boolean, as in `apply --json`."""

import json
import sqlite3
import textwrap

import pytest

from harness import wait_for


@pytest.fixture
def three_jobs(tmp, master, start_agent):
    """Jobs, oldest first: on n1, on n2 in test mode, on both."""
    config = master.token_config()
    for node in ("n1", "n2"):
        start_agent(node, config)
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")
    (tmp / "cluster.yaml").write_text(textwrap.dedent("""
        cluster:
          name: test
        nodes:
          - id: n1
            roles: [compute]
          - id: n2
            roles: [controller]
        """))
    state = tmp / "hello.yaml"
    state.write_text("hello:\n  cmd.run:\n    - name: 'true'\n")
    ids = []
    for args in (["--target", "n1"], ["--target", "n2", "--test"], []):
        result = master.cli("apply", str(state), "--json", *args, timeout=120)
        ids.append(json.loads(result.stdout)["job"])
    return master, ids


def _listed(master, *args):
    return [j["id"] for j in master.json("jobs", *args)["jobs"]]


def test_jobs_filters_and_json_types(three_jobs):
    master, (on_n1, on_n2, on_both) = three_jobs
    jobs = master.json("jobs")["jobs"]
    assert [j["id"] for j in jobs] == [on_both, on_n2, on_n1]
    # Booleans, as `apply --json` says (not 0 and 1, which Python would take for them).
    assert [j["test"] for j in jobs] == [False, True, False] and all(type(j["test"]) is bool for j in jobs)

    assert _listed(master, "--limit", "1") == [on_both]
    assert _listed(master, "--target", "n1") == [on_both, on_n1]  # the jobs that ran on n1
    assert _listed(master, "--target", "n[2-9]") == [on_both, on_n2]
    assert _listed(master, "--target", "nomatch*") == []
    # role:NAME as `ping` reads it (the inventory next to the last applied file): the nodes that have it.
    assert _listed(master, "--target", "role:controller") == [on_both, on_n2]
    assert _listed(master, "--target", "role:nobody") == []

    # The first job is made two days old: --since leaves it out.
    db = sqlite3.connect(master.state_dir / "pimaster.db", timeout=10)
    with db:
        db.execute("UPDATE jobs SET created = created - 2 * 86400 WHERE id = ?", (on_n1,))
    db.close()
    assert _listed(master, "--since", "24h") == [on_both, on_n2]
    assert _listed(master, "--since", "3d", "--target", "n1") == [on_both, on_n1]

    for bad in (["--limit", "0"], ["--since", "soon"], ["--target", "rol:x"]):
        result = master.cli("jobs", *bad, check=False)
        assert result.returncode == 2, result


def test_jobs_table_names_the_zone(three_jobs):
    master, ids = three_jobs
    master.env["TZ"] = "UTC"
    lines = master.cli("jobs").stdout.splitlines()
    assert "STARTED" in lines[0]
    row = next(line for line in lines if line.startswith(ids[-1]))
    assert " UTC " in row, row


def test_job_last_and_prefixes(three_jobs):
    master, (on_n1, on_n2, on_both) = three_jobs
    assert master.json("job", "last")["job"] == on_both
    assert master.json("job", on_n2)["job"] == on_n2  # a whole id, as before
    # A unique prefix names its job; the date-and-time part of an id is one when one job started then.
    for job_id in (on_n1, on_n2):
        prefix = job_id[:-2]
        assert master.json("job", prefix, check=False)["job"] == job_id
    several = master.cli("job", "2026", check=False)
    assert several.returncode != 0 and several.stdout == ""
    assert "several jobs" in several.stderr and all(i in several.stderr for i in (on_n1, on_n2, on_both))
    none = master.cli("job", "19990101", check=False)
    assert none.returncode != 0 and "no job '19990101'" in none.stderr
    extra = master.cli("job", on_n1, "more", check=False)
    assert extra.returncode == 2 and "unexpected 'more'" in extra.stderr


def test_job_last_before_any_job(master):
    result = master.cli("job", "last", check=False)
    assert result.returncode != 0 and "no job yet" in result.stderr
    assert master.json("jobs")["jobs"] == []
