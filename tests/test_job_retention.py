"""Job retention: the job store keeps the newest N jobs and the last D days (`serve --keep-jobs`,
`--keep-days`), never a running job, and its file stops growing (pages of deleted jobs reused).

The store directly (ageing rows by hand), then a real master and agent on loopback.
"""

import json
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from harness import Master, wait_for


def _store(tmp):
    from pimaster.store import Store

    return Store(str(tmp / "pimaster.db"))


def _add_job(store, job_id, created=None, results_size=0, nodes=("n1", "n2")):
    store.create_job(job_id, "/srv/states/x.yaml", None, False, {n: 1 for n in nodes})
    for node in nodes:
        store.record_result(job_id, node, "done", {"ok": 1}, [{"id": "s", "comment": "x" * results_size}], None, None)
    if created is not None:
        store.db.execute("UPDATE jobs SET created = ? WHERE id = ?", (created, job_id))


def _ids(store):
    return [j["id"] for j in store.jobs(limit=10_000)]


def test_prune_keeps_the_newest_jobs_and_spares_running_ones(tmp):
    store = _store(tmp)
    now = time.time()
    for i in range(30):
        _add_job(store, f"job{i:02d}", created=now - 1000 + i)
    # job03 runs still: it stays although it is past the newest 10.
    assert store.prune_jobs(keep=10, spare={"job03"}, chunk=7) == 19
    assert _ids(store) == [f"job{i:02d}" for i in range(29, 19, -1)] + ["job03"]
    # Its nodes' results went with each pruned job; the kept ones are whole.
    assert store.db.execute("SELECT COUNT(*) FROM job_nodes").fetchone()[0] == 22
    assert store.job("job05") is None and store.job("job03")["nodes"]["n1"]["status"] == "done"
    assert store.prune_jobs(keep=10) == 1 and "job03" not in _ids(store)
    assert store.prune_jobs() == 0 and len(_ids(store)) == 10  # no bound: nothing goes


def test_prune_drops_jobs_older_than_the_cutoff(tmp):
    store = _store(tmp)
    day = 86400
    now = time.time()
    for age_days in (200, 91, 89, 1):
        _add_job(store, f"aged{age_days}", created=now - age_days * day)
    assert store.prune_jobs(created_before=now - 90 * day, spare={"aged200"}) == 1
    assert _ids(store) == ["aged1", "aged89", "aged200"]
    # Both bounds: past either one goes.
    assert store.prune_jobs(keep=1, created_before=now - 90 * day) == 2 and _ids(store) == ["aged1"]


def test_pruning_bounds_the_file(tmp):
    """A job store past its bound stays the same size: the pages of pruned jobs hold new ones."""
    store = _store(tmp)
    path = tmp / "pimaster.db"

    def run_jobs(start, count):
        for i in range(start, start + count):
            _add_job(store, f"{i:05d}", results_size=8000)
            store.prune_jobs(keep=20)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return path.stat().st_size

    size_at_bound = run_jobs(0, 60)
    size_later = run_jobs(60, 200)
    assert len(_ids(store)) == 20
    assert size_later <= size_at_bound * 1.1, (size_at_bound, size_later)


def test_an_existing_job_store_opens_and_prunes(tmp):
    """A database made before retention (no index on jobs.created) is used as it is."""
    path = tmp / "pimaster.db"
    from pimaster.store import SCHEMA

    old = sqlite3.connect(path)
    old.executescript(SCHEMA.replace("CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);", ""))
    old.executemany("INSERT INTO jobs (id, file, target, test, created) VALUES (?, 'x.yaml', NULL, 0, ?)", [(f"old{i}", i) for i in range(5)])
    old.commit()
    old.close()
    store = _store(tmp)
    assert store.prune_jobs(keep=2) == 3 and _ids(store) == ["old4", "old3"]
    assert store.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs_created'").fetchone()


def test_serve_states_the_defaults_and_refuses_negative_bounds(tmp):
    from pimaster.commands.serve import DEFAULT_KEEP_DAYS, DEFAULT_KEEP_JOBS

    assert (DEFAULT_KEEP_JOBS, DEFAULT_KEEP_DAYS) == (500, 90)
    run = [sys.executable, "-m", "pimaster", "serve", "--state-dir", str(tmp / "m")]
    env = Master(tmp).env
    usage = subprocess.run(run + ["--help"], capture_output=True, text=True, env=env, timeout=60).stdout
    flat = " ".join(usage.split())
    assert "--keep-jobs N" in flat and "(default 500)" in flat and "--keep-days D" in flat and "(default 90)" in flat
    for bad in (["--keep-jobs", "-1"], ["--keep-days", "-2"]):
        result = subprocess.run(run + bad, capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 2 and "--keep-jobs and --keep-days" in result.stderr


# ---------------------------------------------------------------------- loopback


@pytest.fixture
def small_master(tmp, processes):
    master = Master(tmp)
    master.argv += ["--keep-jobs", "2"]
    processes.append(master.start())
    return master


def _apply(master, path, *args, check=True):
    result = master.cli("apply", str(path), "--json", *args, check=check, timeout=120)
    return json.loads(result.stdout)


def test_a_master_keeps_the_newest_jobs_and_never_prunes_a_running_one(tmp, small_master, start_agent):
    master = small_master
    config = master.token_config()
    for node in ("n1", "n2"):  # an agent runs one job at a time: n2 the slow one, n1 the others
        start_agent(node, config)
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")
    quick = tmp / "quick.yaml"
    quick.write_text("hello:\n  cmd.run:\n    - name: 'true'\n")
    slow = tmp / "slow.yaml"
    slow.write_text(textwrap.dedent(f"""
        wait:
          cmd.run:
            - name: "while [ ! -e {tmp}/go ]; do sleep 0.1; done"
        """).lstrip())

    done = [_apply(master, quick, "--target", "n1")["job"] for _ in range(4)]
    assert [j["id"] for j in master.json("jobs")["jobs"]] == done[:1:-1]  # the newest 2 of 4

    running = subprocess.Popen([sys.executable, "-m", "pimaster", "apply", str(slow), "--json", "--target", "n2",
                                "--state-dir", str(master.state_dir)], stdout=subprocess.PIPE, text=True, env=master.env)
    try:
        slow_id = wait_for(lambda: next((j["id"] for j in master.json("jobs")["jobs"] if j["file"] == str(slow)), None),
                           what="the slow job recorded")
        later = [_apply(master, quick, "--target", "n1")["job"] for _ in range(3)]
        # Past the newest 2, but running: kept.
        assert [j["id"] for j in master.json("jobs")["jobs"]] == [later[2], later[1], slow_id]
        (tmp / "go").touch()
        report = json.loads(running.communicate(timeout=120)[0])
    finally:
        running.kill() if running.poll() is None else None
    assert report["job"] == slow_id and report["nodes"]["n2"]["ok"]
    assert master.json("job", slow_id)["nodes"]["n2"]["ok"]  # its result was stored
    newest = _apply(master, quick, "--target", "n1")["job"]
    assert [j["id"] for j in master.json("jobs")["jobs"]] == [newest, later[-1]]
    assert "pruned" in master.output()


def test_a_master_prunes_at_start_by_count_and_age(tmp, master, start_agent):
    """Jobs kept by an earlier master (or before retention) go at the next start: past --keep-jobs,
    or older than --keep-days (default 90)."""
    start_agent("n1", master.token_config())
    wait_for(lambda: master.up_nodes() == {"n1"}, what="agent up")
    state = tmp / "quick.yaml"
    state.write_text("hello:\n  cmd.run:\n    - name: 'true'\n")
    ids = [_apply(master, state)["job"] for _ in range(4)]
    master.stop()
    db = sqlite3.connect(master.state_dir / "pimaster.db")
    with db:
        db.execute("UPDATE jobs SET created = created - 91 * 86400 WHERE id = ?", (ids[3],))  # the newest, aged
    db.close()

    again = Master(tmp)
    again.argv += ["--keep-jobs", "2"]
    again.start()
    try:
        assert [j["id"] for j in again.json("jobs")["jobs"]] == [ids[2], ids[1]]
        none = again.cli("job", ids[3], check=False)
        assert none.returncode != 0 and "no job" in none.stderr
    finally:
        again.stop()
