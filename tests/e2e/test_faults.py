"""The fault tier: power cuts, kills, reboots and dropped links, on real processes and lab nodes.

Each test drives one fault the way it happens to a Pi cluster and counts what a user would notice:
results expected against results recorded, files that are old/new/partial, how long a node shows
down. The figures are printed (`pytest -s` shows them) and summed up in the README's fault table.

- the agent killed with SIGKILL while it replaces a large file: loopback (tests/harness.py), fast;
- the master killed mid-apply, a link cut mid-apply, a node rebooted mid-apply: on the lab
  (tests/e2e/lab_harness.py), each restoring what it broke before it ends.

Traffic stays on 127.0.0.1 or inside the lab's namespaces; every command in a node goes through the
lab's exec (CAP_SYS_TIME dropped).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import shutil
import string
import subprocess
import time
from pathlib import Path

import pytest

from harness import wait_for

pytestmark = pytest.mark.fault


def figures(test: str, **values) -> dict:
    """Print a test's figures on one line, so `pytest -s` (and CI's log) shows them."""
    print(f"\nFIGURES {test}: " + json.dumps(values, sort_keys=False), flush=True)
    return values


# ---------------------------------------------------------------------------------------------
# Agent killed (SIGKILL) while file.managed replaces a large file: loopback, real processes

KILL_ROUNDS = int(os.environ.get("PIMASTER_FAULT_KILL_ROUNDS", "60"))
BIG_FILE_MB = 8
TMP_TAG = ".pimaster-tmp"  # file.managed's temp files: ".NAME.<random>.pimaster-tmp" next to the target


def _big_text(seed: int, megabytes: int) -> str:
    """Text (file.managed manages text) of ~megabytes MB: 100-character lines, different per seed."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits
    line = "".join(rng.choice(alphabet) for _ in range(4096))
    lines = []
    for i in range(megabytes * 1024 * 1024 // 100):
        start = (i * 37) % 3990
        lines.append(f"{seed}:{i:08d}:{line[start:start + 88]}\n")
    return "".join(lines)


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def test_agent_killed_while_replacing_a_large_file_leaves_old_or_new(request, tmp, master, start_agent):
    states = tmp / "states"
    states.mkdir()
    target = tmp / "out" / "big.txt"
    for big in (states, target.parent, tmp / "agent-n1" / "backup"):  # ~8 MB a version, each backup too
        request.addfinalizer(lambda big=big: shutil.rmtree(big, ignore_errors=True))
    versions = {}
    for name, seed in (("A", 1), ("B", 2)):
        text = _big_text(seed, BIG_FILE_MB)
        (states / f"big-{name}.txt").write_text(text)
        versions[name] = hashlib.sha256(text.encode()).hexdigest()
        (states / f"write-{name}.yaml").write_text(
            f"{target}:\n  file.managed:\n    - source: big-{name}.txt\n    - makedirs: true\n")
    by_hash = {h: n for n, h in versions.items()}

    agent = start_agent("n1", master.token_config(uses=2))
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    jobs_dir = agent.state_dir / "jobs"

    def start_apply(version: str) -> subprocess.Popen:
        return subprocess.Popen([master.python, "-m", "pimaster", "apply", str(states / f"write-{version}.yaml"),
                                 "--json", "--timeout", "120", "--state-dir", str(master.state_dir)],
                                env=master.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def job_running() -> bool:
        return jobs_dir.is_dir() and any(jobs_dir.iterdir())

    def finish(proc: subprocess.Popen) -> dict:
        out, err = proc.communicate(timeout=150)
        assert out.strip(), f"apply printed no report (exit {proc.returncode}): {err}"
        return json.loads(out)

    def temp_files() -> list[Path]:
        return [p for p in target.parent.iterdir() if p.name.endswith(TMP_TAG)] if target.parent.is_dir() else []

    # Two undisturbed writes: A creates the file, B replaces it, timing a replacement on the agent
    # (from the job's marker to its end) so that the kills below land anywhere in one.
    report = finish(start_apply("A"))
    assert report["nodes"]["n1"]["status"] == "done" and _sha(target) == versions["A"], report
    agent.stop()  # every killed round runs on a freshly started agent: so does the timed one
    agent.start()
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up again")
    proc = start_apply("B")
    wait_for(job_running, timeout=60, interval=0.002, what="the job to start on n1")
    began = time.monotonic()
    wait_for(lambda: temp_files() or not job_running(), timeout=60, interval=0.002, what="the write to start")
    writing = time.monotonic()
    wait_for(lambda: not temp_files(), timeout=60, interval=0.002, what="the write to end")
    write_s = time.monotonic() - writing
    wait_for(lambda: not job_running(), timeout=60, interval=0.002, what="the job to finish")
    job_s = time.monotonic() - began
    report = finish(proc)
    assert report["nodes"]["n1"]["status"] == "done" and _sha(target) == versions["B"], report

    outcomes = {"old": 0, "new": 0, "partial": 0}
    statuses: dict[str, int] = {}
    temps_after_kill = []
    killed_mid_write = 0
    mismatch = []
    started = time.monotonic()
    rng = random.Random(0xF00D)
    for round_ in range(KILL_ROUNDS):
        old = by_hash[_sha(target)]
        new = "B" if old == "A" else "A"
        stale = set(temp_files())  # left by the last round's kill, until this round's write removes it
        proc = start_apply(new)
        wait_for(job_running, timeout=60, interval=0.002, what=f"round {round_}: the job to start on n1")
        if round_ % 3 == 0:
            # A random moment of the job (a few land just after it) ...
            time.sleep(rng.uniform(0, job_s * 1.1))
        else:
            # ... or of the write itself, once its temp file is there: the moment that matters most
            # (at once, or a random moment of a write's usual length later).
            wait_for(lambda: set(temp_files()) - stale or not job_running(), timeout=60, interval=0.001,
                     what=f"round {round_}: the write to start")
            if round_ % 3 == 1:
                time.sleep(rng.uniform(0, write_s * 1.1))
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait()
        agent.log.close()
        seen = _sha(target)
        outcome = "old" if seen == versions[old] else "new" if seen == versions[new] else "partial"
        outcomes[outcome] += 1
        assert outcome != "partial", f"round {round_}: killed mid-job, {target} is neither version ({outcomes})"
        temps_after_kill.append(len(temp_files()))
        killed_mid_write += bool(set(temp_files()) - stale)  # this round's write was cut short
        agent.start()  # the agent comes back (systemd would restart it) and reports what it knows
        report = finish(proc)
        status = report["nodes"]["n1"]["status"]
        if status not in ("done", "interrupted"):  # no ack before the kill: the result still arrives
            job_id = report["job"]
            wait_for(lambda: master.json("job", job_id, check=False)["nodes"]["n1"]["status"]
                     in ("done", "interrupted"), timeout=60, what=f"round {round_}: the job's result")
            status = master.json("job", job_id, check=False)["nodes"]["n1"]["status"]
        statuses[status] = statuses.get(status, 0) + 1
        # "done" means the agent finished the write: the file must then be the new version.
        if status == "done" and outcome != "new":
            mismatch.append((round_, status, outcome))
        wait_for(lambda: master.up_nodes() == {"n1"}, timeout=30, what="n1 back up")
    kill_loop_s = time.monotonic() - started

    # One more undisturbed write: stale temp files from killed writes are cleaned up by it.
    old = by_hash[_sha(target)]
    new = "B" if old == "A" else "A"
    report = finish(start_apply(new))
    assert report["nodes"]["n1"]["status"] == "done" and _sha(target) == versions[new], report
    temps_final = len(temp_files())
    backups = sorted((agent.state_dir / "backup").rglob("big.txt.*"))
    backup_mb = sum(p.stat().st_size for p in backups) / 2**20
    partial_backups = sum(1 for p in backups if _sha(p) not in by_hash)
    backup_temps = [p for p in (agent.state_dir / "backup").rglob("*") if p.name.endswith(TMP_TAG)]
    figures("agent SIGKILL during file replacement", rounds=KILL_ROUNDS, file_mb=BIG_FILE_MB,
            job_s=round(job_s, 2), write_s=round(write_s, 3), outcomes=outcomes, job_status=statuses,
            killed_mid_write=killed_mid_write, temp_files_after_kills_max=max(temps_after_kill),
            temp_files_after_next_write=temps_final, backups_kept=len(backups), backup_mb=round(backup_mb, 1),
            backups_partial=partial_backups, backup_temp_files_after_next_write=len(backup_temps),
            loop_s=round(kill_loop_s, 1))
    assert outcomes["partial"] == 0, outcomes
    assert killed_mid_write >= 5, "too few kills landed in the write itself to prove anything"
    assert sum(statuses.values()) == KILL_ROUNDS and set(statuses) <= {"done", "interrupted"}, statuses
    assert mismatch == [], f"jobs reported done without the new file: {mismatch}"
    assert max(temps_after_kill) <= 1 and temps_final == 0
    # The previous versions kept under the agent's state dir are whole too (never a truncated copy).
    assert partial_backups == 0 and backup_temps == []


# ---------------------------------------------------------------------------------------------
# The lab: the master killed, a link cut, a node rebooted, each in the middle of an apply

from lab_harness import Lab  # noqa: E402

MASTER = "node01"


def _start_apply(lab: Lab, name: str, text: str, target: str) -> tuple[subprocess.Popen, str]:
    """`pimaster apply` of TEXT in node01, in the background; returns the command and its job id."""
    path = f"/root/{name}.yaml"
    lab.write_file(MASTER, path, text)
    before = set(lab.job_ids())
    proc = lab.spawn(MASTER, "pimaster", "apply", path, "--target", target, "--json", "--timeout", "300")
    try:
        job_id = Lab.wait_for(lambda: next(iter(set(lab.job_ids()) - before), None) or proc.poll() is not None,
                              f"the job of {name} to be created", timeout=60, interval=0.2)
        assert proc.poll() is None, f"apply ended at once: {proc.returncode} {proc.stderr.read()}"
    except BaseException:
        lab.reap(proc)
        raise
    return proc, job_id


def _statuses(lab: Lab, job_id: str) -> dict[str, str]:
    report = lab.job(job_id)
    return {n: r["status"] for n, r in report["nodes"].items()} if report else {}


def _finish(lab: Lab, proc: subprocess.Popen, timeout: float) -> tuple[int, dict | None, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        lab.reap(proc)
        raise AssertionError(f"`pimaster apply` still waits after {timeout:.0f} s") from None
    finally:
        lab.reap(proc)
    try:
        report = json.loads(out) if out.strip() else None
    except ValueError:
        report = None
    return proc.returncode, report, err


def _settle(lab: Lab) -> None:
    """Every lab node back and answering, as the next test expects to find the lab."""
    Lab.wait_for(lambda: all(lab.booted(n) for n in lab.nodes), "every node booted", timeout=180, interval=1)
    Lab.wait_for(lambda: lab.all_up(), "every node answering ping", timeout=120, interval=1)


@pytest.mark.lab
def test_master_killed_mid_apply_every_result_is_recorded(lab: Lab):
    nodes = sorted(n for n in lab.nodes)
    done_file = "/root/faults-master-kill.done"
    for node in nodes:
        lab.exec(node, "rm", "-f", done_file)
    proc, job_id = _start_apply(lab, "faults-master-kill", f"""
slow:
  cmd.run:
    - name: sleep 8; echo converged > {done_file}
""", "node0*")
    try:
        Lab.wait_for(lambda: _statuses(lab, job_id) == {n: "running" for n in nodes},
                     "every node to take the job", timeout=60, interval=0.2)
        pid_before = lab.main_pid(MASTER, "pimaster")
        restarts_before = lab.exec(MASTER, "systemctl", "show", "-p", "NRestarts", "--value", "pimaster").stdout.strip()
        killed = time.monotonic()
        lab.exec(MASTER, "systemctl", "kill", "-s", "KILL", "pimaster")
        rc, report, err = _finish(lab, proc, timeout=60)
    finally:
        lab.reap(proc)
    # The person's command lost its master: it says so, and fails.
    assert rc != 0 and "Traceback" not in err, err
    # systemd starts the master again by itself (Restart=on-failure)...
    Lab.wait_for(lambda: lab.main_pid(MASTER, "pimaster") not in (0, pid_before) and lab.job(job_id),
                 "the master to be restarted by systemd and answer", timeout=60, interval=0.2)
    master_back_s = time.monotonic() - killed
    restarts_after = lab.exec(MASTER, "systemctl", "show", "-p", "NRestarts", "--value", "pimaster").stdout.strip()
    # ... and every node's result ends up recorded against the job.
    Lab.wait_for(lambda: all(s == "done" for s in _statuses(lab, job_id).values()),
                 "every node's result recorded after the restart", timeout=120, interval=0.5)
    recorded_s = time.monotonic() - killed
    report = lab.job(job_id)
    recorded = sorted(n for n, r in report["nodes"].items() if r["status"] == "done" and r["ok"])
    converged = sorted(n for n in nodes if lab.exec(n, "cat", done_file, check=False).stdout == "converged\n")
    figures("master SIGKILL mid-apply", nodes=len(nodes), results_expected=len(nodes), results_recorded=len(recorded),
            nodes_converged=len(converged), master_back_s=round(master_back_s, 1),
            all_recorded_s=round(recorded_s, 1), systemd_restarts=f"{restarts_before}->{restarts_after}")
    assert recorded == nodes and converged == nodes, report
    assert int(restarts_after) == int(restarts_before) + 1
    _settle(lab)


CUT_S = 20
BACK_WITHIN_S = 5


@pytest.mark.lab
def test_link_cut_mid_apply_the_result_arrives_and_ping_follows_the_link(lab: Lab):
    node = "node03"
    others = [n for n in lab.nodes if n != node]
    done_file = "/root/faults-link-cut.done"
    lab.exec(node, "rm", "-f", done_file)
    # The job ends while the link is down: its result must wait on the node and arrive afterwards.
    proc, job_id = _start_apply(lab, "faults-link-cut", f"""
slow:
  cmd.run:
    - name: sleep 5; echo converged > {done_file}
""", node)
    link_down = False
    try:
        Lab.wait_for(lambda: _statuses(lab, job_id) == {node: "running"}, f"{node} to take the job",
                     timeout=60, interval=0.2)
        cut = time.monotonic()
        lab.link(node, up=False)
        link_down = True
        seen_down_after = None
        pings_while_cut = []
        while time.monotonic() - cut < CUT_S:
            answers = lab.ping(timeout=2)
            pings_while_cut.append(answers)
            if answers.get(node) is False and seen_down_after is None:
                seen_down_after = time.monotonic() - cut
            time.sleep(max(0.0, min(1.0, CUT_S - (time.monotonic() - cut))))
        lab.link(node, up=True)
        link_down = False
        restored = time.monotonic()
        # Ping shows the node up again soon after its link returns (polled as fast as ping runs).
        while True:
            answers = lab.ping(timeout=1)
            if answers.get(node):
                up_after_s = time.monotonic() - restored
                break
            assert time.monotonic() - restored < 60, f"{node} never answered ping after its link came back"
        Lab.wait_for(lambda: lab.ip(node) in lab.addresses(node), f"{node}'s address back on eth0", timeout=30)
        rc, report, err = _finish(lab, proc, timeout=120)
        result_after_s = time.monotonic() - restored
    finally:
        if link_down:
            lab.link(node, up=True)
        lab.reap(proc)
    figures("link cut mid-apply", node=node, cut_s=CUT_S, pings_while_cut=len(pings_while_cut),
            pings_showing_it_down=sum(1 for a in pings_while_cut if a.get(node) is False),
            others_down_while_cut=sum(1 for a in pings_while_cut for n in others if not a.get(n)),
            shown_down_after_s=None if seen_down_after is None else round(seen_down_after, 1),
            up_after_link_s=round(up_after_s, 1), job_done_after_link_s=round(result_after_s, 1),
            job_status=(report or {}).get("nodes", {}).get(node, {}).get("status"))
    # While cut the node shows down (and only it), the others answer throughout.
    assert seen_down_after is not None, pings_while_cut
    assert all(a.get(n) for a in pings_while_cut for n in others), pings_while_cut
    assert up_after_s <= BACK_WITHIN_S + 1, f"{node} answered ping {up_after_s:.1f} s after its link came back"
    # The agent reconnected and delivered the result: the apply completes, nothing lost.
    assert rc == 0 and report and report["nodes"][node]["status"] == "done" and report["nodes"][node]["ok"], \
        f"exit {rc}: {report} {err}"
    assert lab.exec(node, "cat", done_file).stdout == "converged\n"
    _settle(lab)


REBOOT_ROUNDS = int(os.environ.get("PIMASTER_FAULT_REBOOTS", "5"))


@pytest.mark.lab
def test_node_rebooted_mid_apply_comes_back_and_reports_the_job_interrupted(lab: Lab):
    """A reboot's SIGTERM reaches the agent and the job's command together: the job must be reported
    interrupted, never "done" with a failed command; repeated at different moments of the job."""
    node = "node04"
    done_file = "/root/faults-reboot.done"
    lab.exec(node, "rm", "-f", done_file)
    rng = random.Random(0xB007)
    statuses, reported, answering = {}, [], []
    for round_ in range(REBOOT_ROUNDS):
        proc, job_id = _start_apply(lab, "faults-reboot", f"""
slow:
  cmd.run:
    - name: sleep 30; echo converged > {done_file}
""", node)
        try:
            Lab.wait_for(lambda: _statuses(lab, job_id) == {node: "running"}, f"{node} to take the job",
                         timeout=60, interval=0.2)
            time.sleep(rng.uniform(0, 2))
            leader_before = lab.leader(node)
            rebooted = time.monotonic()
            lab.exec(node, "systemctl", "reboot", check=False)
            # The node goes away and boots again by itself (the lab's supervisor restarts its container).
            Lab.wait_for(lambda: lab.leader(node) not in (None, leader_before), f"{node} to boot again",
                         timeout=120, interval=0.2)
            rc, report, err = _finish(lab, proc, timeout=180)
            reported.append(time.monotonic() - rebooted)
        finally:
            lab.reap(proc)
        Lab.wait_for(lambda: lab.ping(timeout=2).get(node), f"{node} answering ping after the reboot",
                     timeout=120, interval=0.5)
        answering.append(time.monotonic() - rebooted)
        status = (report or {}).get("nodes", {}).get(node, {}).get("status")
        statuses[status] = statuses.get(status, 0) + 1
        # The job does not hang: the node is reported interrupted (not ok) by the command...
        assert report is not None and status == "interrupted" and not report["nodes"][node]["ok"], \
            f"round {round_}: exit {rc}: {report} {err}"
        assert rc != 0
        # ... and recorded so, as `pimaster job` shows it later.
        assert _statuses(lab, job_id) == {node: "interrupted"}
    figures("node reboot mid-apply", node=node, reboots=REBOOT_ROUNDS, job_status=statuses,
            interrupted_reported_s_max=round(max(reported), 1), answering_again_s_max=round(max(answering), 1))
    # The agent came back by itself every time, and the command cut short did not run again.
    assert lab.exec(node, "systemctl", "is-active", "piagent").stdout.strip() == "active"
    assert lab.exec(node, "systemctl", "is-enabled", "piagent").stdout.strip() == "enabled"
    assert lab.exec(node, "test", "-e", done_file, check=False).returncode != 0
    _settle(lab)
