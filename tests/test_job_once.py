"""A job id runs once on an agent, however often the master sends it.

The master sends an apply again when the agent reconnects while the job is handed out (a moved
address, a flapping link), and the first copy may have arrived after all. Here the test plays the
master (a CURVE ROUTER with its own keys, as the real one) to a real agent process, and sends the
same job while it is queued, while it runs and after its result was acknowledged: the command
runs once.
"""

from __future__ import annotations

import time

import pytest

from harness import agent_with_standin_master
from piagent import protocol as proto
from piagent.protocol import Message


@pytest.fixture
def agent_and_master(tmp):
    with agent_with_standin_master(tmp) as parts:
        yield parts


def receive(router, want, timeout: float = 30) -> Message:
    """The next message from the agent for which want(msg) holds (heartbeats and the rest skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if router.poll(500):
            _, data = router.recv_multipart()
            msg = proto.decode(data, proto.AGENT_TO_MASTER)
            if want(msg):
                return msg
    raise AssertionError("the agent did not send the message waited for")


def send_apply(router, ident, job_id: str, states: list[dict]) -> dict:
    request = proto.request(proto.APPLY, {"job": job_id, "states": states, "test": False, "redact": []})
    router.send_multipart([ident, proto.encode(request)])
    return receive(router, lambda m: m.reply_to == request.id).body


def test_a_job_sent_again_while_queued_running_or_done_runs_once(tmp, agent_and_master):
    agent, router, ident = agent_and_master
    runs = tmp / "runs"
    slow = [{"id": "slow", "fun": "cmd.run", "name": f"echo slow >> {runs}; sleep 2", "args": {}}]
    counted = [{"id": "count", "fun": "cmd.run", "name": f"echo counted >> {runs}", "args": {}}]

    assert send_apply(router, ident, "job-slow", slow).get("accepted")
    assert send_apply(router, ident, "job-count", counted) == {"accepted": True, "job": "job-count"}
    # Again, while job-slow runs and job-count waits its turn (no file of its own yet).
    assert send_apply(router, ident, "job-slow", slow).get("note") == "already known"
    assert send_apply(router, ident, "job-count", counted).get("note") == "already known"

    for _ in range(2):  # both results, each acknowledged as the master does
        result = receive(router, lambda m: m.type == proto.JOB_RESULT)
        router.send_multipart([ident, proto.encode(Message(type=proto.JOB_RESULT_ACK,
                                                           body={"job": result.body["job"]}))])
    time.sleep(0.5)
    # And after the acknowledgement removed every trace of it on disk.
    assert not any((agent.state_dir / "results").iterdir())
    assert send_apply(router, ident, "job-count", counted).get("note") == "already known"
    time.sleep(1)
    assert runs.read_text().splitlines() == ["slow", "counted"]


def test_a_stopped_agent_records_the_running_and_the_queued_job_and_starts_neither_again(tmp, agent_and_master):
    """SIGTERM while one job runs and another waits its turn: the running command is ended, the
    queued job never starts, and both are kept on disk as interrupted, saying what ran."""
    import json
    import signal

    agent, router, ident = agent_and_master
    runs = tmp / "runs"
    slow = [{"id": "slow", "fun": "cmd.run", "name": f"touch {tmp}/started; sleep 30; echo slow >> {runs}", "args": {}}]
    queued = [{"id": "queued", "fun": "cmd.run", "name": f"echo queued >> {runs}", "args": {}}]
    assert send_apply(router, ident, "job-slow", slow).get("accepted")
    assert send_apply(router, ident, "job-queued", queued).get("accepted")
    deadline = time.monotonic() + 30
    while not (tmp / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)

    asked = time.monotonic()
    assert agent.stop(signal.SIGTERM, timeout=40) == 0
    assert time.monotonic() - asked < 15
    time.sleep(1)
    assert not runs.exists()
    kept = {p.stem: json.loads(p.read_text()) for p in (agent.state_dir / "results").iterdir()}
    assert kept["job-slow"]["interrupted"] and kept["job-queued"]["interrupted"]
    assert [r["status"] for r in kept["job-slow"]["results"]] == ["failed"]
    assert kept["job-slow"]["results"][0]["comment"].startswith("interrupted:")
    assert [r["status"] for r in kept["job-queued"]["results"]] == ["not_run"]
    assert not list((agent.state_dir / "jobs").iterdir())  # nothing left to be "recovered" at the next start


def test_a_result_kept_just_before_a_kill_is_not_replaced_by_an_empty_one_at_start(tmp):
    """Killed between keeping the result and removing the job's "running" marker: at the next start
    the complete result stands (the marker alone would say "interrupted, nothing known")."""
    import json
    import logging

    from piagent.jobs import JobRunner

    async def no_send(msg) -> bool:
        return False

    (tmp / "jobs").mkdir()
    (tmp / "results").mkdir()
    (tmp / "jobs" / "job-1.json").write_text(json.dumps({"job": "job-1", "started": 1.0, "test": False}))
    kept = {"job": "job-1", "results": [{"id": "a", "status": "changed"}], "summary": {"changed": 1},
            "started": 1.0, "finished": 2.0, "test": False, "interrupted": False}
    (tmp / "results" / "job-1.json").write_text(json.dumps(kept))
    JobRunner(str(tmp), no_send, logging.getLogger("test")).recover_interrupted()
    assert json.loads((tmp / "results" / "job-1.json").read_text()) == kept
    assert not list((tmp / "jobs").iterdir())
