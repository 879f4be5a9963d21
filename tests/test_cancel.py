"""Ctrl-C on `pimaster apply`, and cancelling a job (`pimaster job cancel ID`, the control request
`job.cancel`).

Ctrl-C ends the person's command, not the job: it says which job goes on and how to follow or
stop it. A cancel stops the job on its nodes as an agent's stop would (the running command's
process group ended, no further state started, the result saying exactly what ran, the job
interrupted), but the agents run on; a running apply of the job ends, its later stages unsent.
Real master and agent processes on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import textwrap
import time

import pytest

from harness import agent_with_standin_master, processes_running, start_apply, unique_sleep, wait_for
from piagent import protocol as proto
from pimaster.client import ControlClient


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path






def current_job(master) -> str:
    return wait_for(lambda: (master.json("jobs")["jobs"] or [{}])[0].get("id"), what="the job to start")


def job_done(master, job_id: str) -> dict | None:
    report = master.json("job", job_id, check=False)
    return report if all(n["status"] in ("done", "interrupted") for n in report["nodes"].values()) else None


def cancel(master, job_id: str) -> dict:
    return ControlClient(str(master.state_dir)).call("job.cancel", job_id=job_id)


@pytest.fixture
def n1(master, start_agent):
    agent = start_agent("n1", master.token_config(uses=5))
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    return agent


def slow_state(tmp, seconds: int = 4):
    return write(tmp / "slow.yaml", f"""
        slow:
          cmd.run:
            - name: touch {tmp}/started; sleep {seconds}; touch {tmp}/finished
        """)


# ---------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_on_apply_names_the_job_that_runs_on(tmp, master, n1):
    running = start_apply(master, slow_state(tmp))
    try:
        wait_for(lambda: (tmp / "started").exists(), what="the job to run on n1")
        job_id = current_job(master)
        running.send_signal(signal.SIGINT)
        out, err = running.communicate(timeout=30)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 130, (out, err)
    assert (f"job {job_id} continues on the nodes; `pimaster job {job_id}` to follow, "
            f"`pimaster job cancel {job_id}` to stop it") in err, (out, err)
    assert "Traceback" not in err
    # ...and it does run on, and its result is recorded.
    report = wait_for(lambda: job_done(master, job_id), timeout=30, what="the job to finish")
    assert report["nodes"]["n1"]["status"] == "done" and report["nodes"]["n1"]["ok"]
    assert (tmp / "finished").exists()


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_on_the_live_view_restores_the_cursor_before_the_note(tmp, master, n1, sig, status):
    """On a terminal (rich's live view, which hides the cursor): the cursor comes back, and the
    note is written after it, where the person sees it; SIGTERM as Ctrl-C (it left the cursor off)."""
    leader, follower = pty.openpty()
    running = start_apply(master, slow_state(tmp), stdout=follower, stderr=follower,
                          env=dict(master.env, TERM="xterm-256color", COLUMNS="120", LINES="40"))
    os.close(follower)
    screen = b""

    def read_some(timeout: float = 0.2) -> None:
        """What the terminal got within ``timeout`` (the live view writes 8 times a second)."""
        nonlocal screen
        until = time.monotonic() + timeout
        while select.select([leader], [], [], max(0.0, until - time.monotonic()))[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other side closed
                return
            if not chunk:
                return
            screen += chunk

    try:
        wait_for(lambda: read_some() or (tmp / "started").exists(), what="the job to run on n1")
        wait_for(lambda: read_some() or b"\x1b[?25l" in screen, what="the live view (cursor hidden)")
        job_id = current_job(master)
        running.send_signal(sig)
        deadline = time.monotonic() + 30
        while running.poll() is None and time.monotonic() < deadline:
            read_some()
        read_some()
    finally:
        if running.poll() is None:
            running.kill()
        os.close(leader)
    text = screen.decode(errors="replace")
    assert running.returncode == status, text
    note = f"job {job_id} continues on the nodes"
    assert note in text, text
    assert text.rfind("\x1b[?25h") != -1 and text.rfind("\x1b[?25h") < text.index(note), text
    assert "Traceback" not in text


# ---------------------------------------------------------------------------------------- cancel
def test_cancel_stops_the_running_job_reports_what_ran_and_the_agent_runs_on(tmp, master, n1):
    sleep = unique_sleep()
    state = write(tmp / "three.yaml", f"""
        first:
          cmd.run:
            - name: echo ran >> {tmp}/A
        slow:
          cmd.run:
            - name: touch {tmp}/slow-started; {' '.join(sleep)}; touch {tmp}/B
        last:
          cmd.run:
            - name: touch {tmp}/C
        """)
    running = start_apply(master, state, "--json")
    try:
        wait_for(lambda: (tmp / "slow-started").exists() and processes_running(sleep), what="the slow state's sleep")
        job_id = current_job(master)
        asked = time.monotonic()
        answer = cancel(master, job_id)
        assert answer["job"] == job_id
        assert answer["nodes"]["n1"]["ok"] and answer["nodes"]["n1"]["result"] == "cancelled", answer
        # The apply that runs the job ends: the node reports it interrupted.
        out, err = running.communicate(timeout=30)
        assert time.monotonic() - asked < 15, "the job ran on after the cancel"
    finally:
        if running.poll() is None:
            running.kill()
    report = json.loads(out)
    node = report["nodes"]["n1"]
    assert running.returncode != 0 and node["status"] == "interrupted" and not node["ok"], err
    assert [s["status"] for s in node["states"]] == ["changed", "failed", "not_run"], node["states"]
    assert node["states"][1]["comment"].startswith("interrupted: the job was cancelled while this state ran"), \
        node["states"][1]
    assert node["states"][2]["comment"].startswith("not run: the job was cancelled before this state")
    time.sleep(2)  # what a job running on would do next
    assert not processes_running(sleep), "the running command was left behind"
    assert (tmp / "A").read_text() == "ran\n" and not (tmp / "B").exists() and not (tmp / "C").exists()

    # The agent runs on: it takes the next job.
    assert n1.alive()
    again = cancel(master, job_id)  # and the job is over: nothing left to cancel
    assert again["nodes"]["n1"] == {"ok": True, "result": "finished", "detail": "already finished (interrupted)"}
    result = master.cli("apply", str(slow_state(tmp, seconds=0)), "--json", check=False, timeout=120)
    assert json.loads(result.stdout)["nodes"]["n1"]["ok"], result.stderr
    assert (tmp / "finished").exists()


def test_cancel_ends_a_staged_apply_without_sending_its_later_stages(tmp, master, start_agent):
    config = master.token_config(uses=5)
    for node_id in ("n1", "n2"):
        start_agent(node_id, config)
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")
    site = tmp / "site"
    write(site / "cluster.yaml", """
        nodes:
          - id: n1
            roles: [first]
          - id: n2
            roles: [second]
        """)
    state = write(site / "staged.yaml", f"""
        pimaster:
          stages: [first, second]
        step:
          cmd.run:
            - name: touch {tmp}/ran-{{{{ node.id }}}}; sleep {{{{ 30 if node.id == 'n1' else 0 }}}}
        """)
    running = start_apply(master, state, "--json")
    try:
        wait_for(lambda: (tmp / "ran-n1").exists(), what="the first stage to run")
        job_id = current_job(master)
        answer = cancel(master, job_id)
        assert answer["nodes"]["n1"]["result"] == "cancelled", answer
        assert answer["nodes"]["n2"]["result"] == "not_sent" and answer["nodes"]["n2"]["ok"], answer
        out, err = running.communicate(timeout=30)
    finally:
        if running.poll() is None:
            running.kill()
    report = json.loads(out)
    assert {n: i["status"] for n, i in report["nodes"].items()} == {"n1": "interrupted", "n2": "interrupted"}, err
    assert report["nodes"]["n2"]["states"][0]["comment"] == "not sent: the job was cancelled before this node's stage"
    time.sleep(1)
    assert not (tmp / "ran-n2").exists()


def test_cancel_of_an_unknown_job_is_refused(tmp, master, n1):
    from pimaster.errors import ControlError

    with pytest.raises(ControlError, match="no job"):
        cancel(master, "20250101-000000-abcdef")


def test_an_agent_answers_a_cancel_of_a_job_it_is_not_running_and_never_starts_it(tmp):
    """The cancel may overtake its job (sent to a node whose apply is still on its way): the agent
    says it is not running it, and when the job comes it runs none of its states."""
    from test_job_once import receive, send_apply

    with agent_with_standin_master(tmp) as (agent, router, ident):
        request = proto.request(proto.CANCEL, {"job": "job-later"})
        router.send_multipart([ident, proto.encode(request)])
        answer = receive(router, lambda m: m.reply_to == request.id).body
        assert answer == {"job": "job-later", "cancelled": False, "was": "unknown"}

        states = [{"id": "never", "fun": "cmd.run", "name": f"touch {tmp}/never", "args": {}}]
        assert send_apply(router, ident, "job-later", states).get("accepted")
        result = receive(router, lambda m: m.type == proto.JOB_RESULT).body
        assert result["interrupted"] is True and [r["status"] for r in result["results"]] == ["not_run"]
        assert result["results"][0]["comment"].startswith("not run: the job was cancelled")
        assert not (tmp / "never").exists()

        request = proto.request(proto.CANCEL, {"job": "../etc"})
        router.send_multipart([ident, proto.encode(request)])
        assert receive(router, lambda m: m.reply_to == request.id).body == {"error": "malformed job id"}
        assert agent.alive()


def test_a_node_that_does_not_answer_a_cancel_is_reported_unable_to():
    from pimaster.board import cancel_answer

    old = cancel_answer({"ok": False, "error": "no answer within 10 s"}, 10)
    assert not old["ok"] and old["result"] == "failed" and "cannot cancel" in old["detail"]
    gone = cancel_answer({"ok": False, "error": "not connected"}, 10)
    assert gone == {"ok": False, "result": "failed", "detail": "not connected"}
    hostile = cancel_answer({"ok": False, "error": "x\n\x1b[2Jn2: cancelled"}, 10)
    assert "\n" not in hostile["detail"] and "\x1b" not in hostile["detail"]


def test_job_cancel_on_the_command_line(tmp, master, n1):
    running = start_apply(master, slow_state(tmp, seconds=30), "--json")
    try:
        wait_for(lambda: (tmp / "started").exists(), what="the job to run on n1")
        job_id = current_job(master)
        shown = master.cli("job", "cancel", job_id[:15])  # a unique prefix will do
        row = next(line for line in shown.stdout.splitlines() if line.startswith("n1 "))
        assert row.split()[1] == "cancelled", shown.stdout
        out, err = running.communicate(timeout=30)
    finally:
        if running.poll() is None:
            running.kill()
    assert json.loads(out)["nodes"]["n1"]["status"] == "interrupted", err
    answer = master.json("job", "cancel", "last")
    assert answer["nodes"]["n1"]["result"] == "finished", answer
    assert master.cli("job", "cancel", check=False).returncode == 2
