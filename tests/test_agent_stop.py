"""Stopping an agent (SIGTERM: `systemctl stop`, shutdown, reboot) while a job runs.

The agent ends the running state's command with everything it started, starts no other state,
exits promptly, and reports exactly what ran: the states that finished as they finished, the one
cut short as failed ("interrupted"), the rest not run. The result is kept on disk and delivered
when the agent is back; the job does not run again. Real master and agent processes on loopback.
"""

from __future__ import annotations

import json
import os
import random
import signal
import textwrap
import time

from harness import processes_running, start_apply, unique_sleep, wait_for



def test_a_stopped_agent_ends_the_running_command_and_reports_what_ran(tmp, master, start_agent):
    agent = start_agent("n1", master.token_config())
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    # A length of sleep no other process on this machine has: how the test finds it afterwards.
    sleep = unique_sleep()
    state = tmp / "three.yaml"
    state.write_text(textwrap.dedent(f"""
        first:
          cmd.run:
            - name: echo ran >> {tmp}/A
        slow:
          cmd.run:
            - name: touch {tmp}/slow-started; {' '.join(sleep)}; touch {tmp}/B
        last:
          cmd.run:
            - name: touch {tmp}/C
        """).lstrip())
    running = start_apply(master, state, "--json")
    try:
        wait_for(lambda: (tmp / "slow-started").exists() and processes_running(sleep), what="the slow state's sleep")

        asked = time.monotonic()
        returncode = agent.stop(signal.SIGTERM, timeout=40)
        assert time.monotonic() - asked < 15, "the agent ran on after SIGTERM"
        assert returncode == 0, agent.output()[-3000:]
        time.sleep(2)  # what a job running on would do next
        assert not processes_running(sleep), "the running command was left behind"
        assert (tmp / "A").read_text() == "ran\n"
        assert not (tmp / "B").exists() and not (tmp / "C").exists()

        agent.start()  # delivers the kept result; the job must not run again
        out, err = running.communicate(timeout=90)
    finally:
        if running.poll() is None:
            running.kill()
    report = json.loads(out)
    node = report["nodes"]["n1"]
    assert node["status"] == "interrupted" and not node["ok"], err
    assert [s["status"] for s in node["states"]] == ["changed", "failed", "not_run"], node["states"]
    assert node["changed"] == 1 and node["failed"] == 1 and node["not_run"] == 1
    assert node["states"][1]["comment"].startswith("interrupted: the agent was stopped"), node["states"][1]
    assert "stopped before this state" in node["states"][2]["comment"]
    stored = json.loads(master.cli("job", report["job"], "--json", check=False).stdout)  # exits 1: n1 failed
    assert stored["nodes"]["n1"]["states"] == node["states"]
    time.sleep(2)
    assert (tmp / "A").read_text() == "ran\n" and not (tmp / "B").exists() and not (tmp / "C").exists()
    assert not list((agent.state_dir / "jobs").iterdir())  # no "running" marker left to report again


def test_a_stopped_agent_delivers_its_result_before_it_leaves_even_for_a_command_ignoring_sigterm(
        tmp, master, start_agent):
    # `systemctl stop piagent` during apt: the command ignores SIGTERM and is SIGKILLed 5 s later.
    # The result used to be ready only after the connection was closed: the master, up all along,
    # heard nothing until the agent's next start.
    agent = start_agent("n1", master.token_config())
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    sleep = unique_sleep()
    state = tmp / "stubborn.yaml"
    state.write_text(textwrap.dedent(f"""
        stubborn:
          cmd.run:
            - name: trap '' TERM; touch {tmp}/started; {' '.join(sleep)}
        after:
          cmd.run:
            - name: touch {tmp}/after
        """).lstrip())
    running = start_apply(master, state, "--json")
    try:
        wait_for(lambda: (tmp / "started").exists() and processes_running(sleep), what="the stubborn command")
        assert agent.stop(signal.SIGTERM, timeout=40) == 0, agent.output()[-3000:]
        out, err = running.communicate(timeout=60)  # the agent is NOT started again
    finally:
        if running.poll() is None:
            running.kill()
    node = json.loads(out)["nodes"]["n1"]
    assert node["status"] == "interrupted", (node, err)
    assert [s["status"] for s in node["states"]] == ["failed", "not_run"], node["states"]
    assert not (tmp / "after").exists() and not processes_running(sleep)


def test_a_guard_cut_short_by_the_stop_does_not_let_its_state_run(tmp):
    # An `unless` killed by the stop exits non-zero, which reads as "condition false": the state it
    # guards used to run on that (here: write the file the guard was there to protect).
    import threading

    from piagent.engine import run_states
    from piagent.states.base import StopSwitch

    stop = StopSwitch()
    target = tmp / "guarded"
    threading.Timer(0.5, stop.trip).start()
    (res,) = run_states([{"id": str(target), "fun": "file.managed", "name": str(target),
                          "args": {"contents": "x"}, "unless": "sleep 3; true"}],
                        state_dir=str(tmp / "state"), stop=stop)
    assert not target.exists()
    assert res["status"] in ("failed", "not_run") and res["result"] is not True, res


def test_a_command_returns_when_it_ends_even_if_a_process_it_started_holds_its_output(tmp):
    # `setsid daemon &` keeps the command's stdout open for as long as the daemon runs: the state
    # used to wait for it (past its timeout), and the job with it.
    import threading

    from piagent.states.base import StateContext

    marker = f"sleep 300.{random.randint(1000, 9999)}"
    done = {}
    worker = threading.Thread(target=lambda: done.update(
        result=StateContext().run(f"setsid {marker} & echo started", shell=True, timeout=5)))
    worker.start()
    worker.join(60)
    try:
        assert not worker.is_alive(), "the command's result waited for the process it left running"
        assert done["result"].stdout == "started\n"
    finally:
        for pid in processes_running(marker.split()):
            os.kill(pid, signal.SIGKILL)
