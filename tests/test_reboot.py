"""`pimaster reboot` and `pimaster shutdown` on loopback, with real master and agents whose reboot
is FAKED: a loopback agent is a process on this host, which the test may not reboot. Each agent
runs with the agent's test-only hooks: PIAGENT_TEST_REBOOT_COMMAND (a command run instead of
`systemctl reboot|poweroff`: here it leaves a marker file) and PIAGENT_TEST_BOOT_ID (the boot id
it reports). A watcher plays the node: on a marker it stops the agent, keeps it down a while, and
(for a reboot) starts it again with a new boot id. What is real: the request, the agent's answer
and its delayed action, the master's order, batches, waiting and timeout.

The lab tier (tests/e2e/test_reboot_lab.py) reboots real nspawn nodes.
"""

from __future__ import annotations

import json
import textwrap
import threading
import time

import pytest

from harness import Agent, start_apply, unique_sleep, wait_for
from test_events import Stream

DOWN_S = 2.0  # how long a faked node stays down


class FakeNodes:
    """Agents whose reboots the test fakes (see the module docstring), and what happened when."""

    def __init__(self, tmp, master, processes, names, own: str | None = None) -> None:
        self.tmp, self.master, self.processes = tmp, master, processes
        self.config = master.token_config(uses=10)
        self.boots = {name: 1 for name in names}
        self.own = own
        self.agents: dict[str, Agent] = {}
        self.timeline: list[tuple[float, str, str]] = []  # (time, node, what)
        self.stay_down: set[str] = set()
        self._stop = threading.Event()
        for name in names:
            self.start(name)
        wait_for(lambda: master.up_nodes() == set(names), 30, what="agents up")
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def marker(self, name: str):
        return self.tmp / f"{name}.power"

    def start(self, name: str) -> None:
        agent = Agent(self.tmp, name, self.config)
        agent.env["PIAGENT_TEST_REBOOT_COMMAND"] = f"sh -c 'echo \"$0\" > {self.marker(name)}'"
        if name != self.own:  # the master's own node reports the host's real boot id, as node01 does in the lab
            agent.env["PIAGENT_TEST_BOOT_ID"] = f"{name}-boot{self.boots[name]}"
        self.agents[name] = agent.start()
        self.processes.append(agent)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for name in list(self.agents):
                marker = self.marker(name)
                if not marker.exists():
                    continue
                action = marker.read_text().strip()
                marker.unlink()
                self.timeline.append((time.monotonic(), name, action))
                self.agents[name].stop()
                self.timeline.append((time.monotonic(), name, "down"))
                if action == "reboot" and name not in self.stay_down:
                    time.sleep(DOWN_S)
                    self.boots[name] += 1
                    self.start(name)
                    self.timeline.append((time.monotonic(), name, "booted"))
            time.sleep(0.05)

    def when(self, name: str, what: str) -> float:
        return next(t for t, n, w in self.timeline if n == name and w == what)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def fake_nodes(tmp, master, processes):
    made = []

    def make(names, own=None) -> FakeNodes:
        nodes = FakeNodes(tmp, master, processes, names, own)
        made.append(nodes)
        return nodes
    yield make
    for nodes in made:
        nodes.close()


def reboot(master, *args, timeout=120):
    result = master.cli("reboot", *args, "--json", check=False, timeout=timeout)
    return result.returncode, (json.loads(result.stdout) if result.stdout.strip() else None), result


def test_rolling_reboot_batch_1_waits_for_each_node_back_from_a_new_boot_faking_the_reboot(master, fake_nodes):
    nodes = fake_nodes(["n1", "n2", "n3"])
    rc, report, result = reboot(master, "n*", "--batch", "1")
    assert rc == 0, result.stdout + result.stderr
    assert report["order"] == ["n1", "n2", "n3"] and report["stopped"] is None and report["master_node"] is None
    for name in ("n1", "n2", "n3"):
        row = report["nodes"][name]
        assert row["state"] == "back" and row["boot_id"] == f"{name}-boot2", row
    # One at a time: the next node was asked only after the previous one had booted again.
    assert nodes.when("n1", "booted") < nodes.when("n2", "reboot")
    assert nodes.when("n2", "booted") < nodes.when("n3", "reboot")


def test_pimaster_events_follows_the_roll_from_started_to_finished_and_every_node_goes_down_faking_the_reboot(
        master, fake_nodes):
    fake_nodes(["n1", "n2", "n3"])
    stream = Stream(master, "--json")
    stream.wait("the stream to start", type="subscribed")
    result = master.cli("reboot", "*", "--batch", "1", check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # The command's own view: each node seen down, then back.
    for name in ("n1", "n2", "n3"):
        lines = result.stdout.splitlines()
        assert any(line.startswith(f"{name}: down after ") for line in lines), result.stdout
        assert any(line.startswith(f"{name}: back after ") for line in lines), result.stdout
    # `pimaster events`: the whole roll, in order, as someone who pressed Ctrl-C would follow it.
    stream.wait("the roll to finish", type="reboot", state="finished")
    rolled = [e for e in stream.events if e["type"] == "reboot"]
    assert [(e.get("node"), e["state"]) for e in rolled] == [
        (None, "started"),
        (None, "batch"), ("n1", "rebooting"), ("n1", "down"), ("n1", "back"),
        (None, "batch"), ("n2", "rebooting"), ("n2", "down"), ("n2", "back"),
        (None, "batch"), ("n3", "rebooting"), ("n3", "down"), ("n3", "back"),
        (None, "finished")], rolled
    started, finished = rolled[0], rolled[-1]
    assert (started["action"], started["order"], started["batches"], started["master_node"]) == \
        ("reboot", ["n1", "n2", "n3"], 3, None)
    assert [(e["index"], e["of"], e["nodes"]) for e in rolled if e["state"] == "batch"] == \
        [(1, 3, ["n1"]), (2, 3, ["n2"]), (3, 3, ["n3"])]
    assert finished["ok"] is True and finished["summary"] == {"back": 3}
    assert next(e for e in rolled if e.get("node") == "n2" and e["state"] == "back")["boot_id"] == "n2-boot2"
    stream.stop()


def test_progress_lines_name_each_node_and_its_new_boot_faking_the_reboot(master, fake_nodes):
    fake_nodes(["n1", "n2"])
    result = master.cli("reboot", "*", "--batch", "50%", check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "n1: rebooting" in lines and "n2: rebooting" in lines
    assert any(line.startswith("n1: back after") and "new boot n1-boot2" in line for line in lines), lines
    assert lines.index("n1: rebooting") < lines.index("batch 2/2: n2")


def test_a_node_not_back_within_the_timeout_stops_the_roll_and_is_named_faking_the_reboot(master, fake_nodes):
    nodes = fake_nodes(["n1", "n2"])
    nodes.stay_down.add("n1")
    stream = Stream(master, "--json")
    stream.wait("the stream to start", type="subscribed")
    rc, report, result = reboot(master, "*", "--batch", "1", "--timeout", "6s")
    assert rc == 1
    assert report["nodes"]["n1"]["state"] == "not_back" and report["stopped"].startswith("n1 not back")
    assert report["nodes"]["n2"] == {"ok": False, "state": "not_started", "error": "the roll stopped before it"}
    # Who follows `pimaster events` is told too: n2 not started, then the roll stopped, and why.
    stopped = stream.wait("the roll to stop", type="reboot", state="stopped")
    assert stopped["reason"] == report["stopped"] and stopped["not_started"] == ["n2"]
    assert stream.index(type="reboot", node="n2", state="not_started") < stream.index(type="reboot", state="stopped")
    assert not any(e["type"] == "reboot" and e["state"] == "finished" for e in stream.events)
    stream.stop()
    time.sleep(1)
    assert not any(n == "n2" for _, n, _ in nodes.timeline)  # n2 was never asked
    # n1 is down now: a roll that includes it is refused, and told how to leave it out.
    refused = master.cli("reboot", "n[12]", check=False, timeout=60)
    assert refused.returncode == 2
    assert "n1 not answering (bring it up, or leave it out: pimaster reboot 'n[12] !n1')" in refused.stderr, refused
    human = master.cli("reboot", "n2", "--batch", "1", "--timeout", "30s", check=False, timeout=120)
    assert human.returncode == 0  # the rest of the cluster is still usable


def test_the_masters_own_node_goes_last_and_is_not_waited_for_faking_the_reboot(master, fake_nodes):
    # "n0" runs on this host with its real boot id and machine id: to the master, its own node.
    nodes = fake_nodes(["n0", "n1", "n2"], own="n0")
    # TARGET is required (a forgotten one must not mean the whole cluster); '*' is every node.
    for command in ("reboot", "shutdown"):
        forgot = master.cli(command, "--batch", "1", check=False, timeout=60) if command == "reboot" else \
            master.cli(command, "--yes", check=False, timeout=60)
        assert forgot.returncode == 2 and "the following arguments are required: TARGET" in forgot.stderr, forgot
        assert f"usage: pimaster {command} [options] TARGET" in forgot.stderr
    time.sleep(1)
    assert nodes.timeline == []
    result = master.cli("reboot", "*", "--batch", "1", check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "note: n0 runs this master: it goes last" in result.stdout
    wait_for(lambda: any(n == "n0" and w == "booted" for _, n, w in nodes.timeline), 30, what="n0 rebooted")
    assert nodes.when("n2", "booted") < nodes.when("n0", "reboot")
    wait_for(lambda: master.up_nodes() == {"n0", "n1", "n2"}, 30, what="n0 back")
    rc, report, _ = reboot(master, "n[01]", "--no-wait")
    assert report["master_node"] == "n0" and report["order"][-1] == "n0"
    assert report["nodes"]["n0"]["state"] == "rebooting"


def test_only_required_picks_the_nodes_an_apply_said_need_a_reboot_and_not_since_booted_faking_the_reboot(
        tmp, master, fake_nodes):
    nodes = fake_nodes(["n1", "n2", "n3"])
    for name in ("n1", "n2", "n3"):
        (tmp / "boot" / name).mkdir(parents=True)
        (tmp / "boot" / name / "cmdline.txt").write_text("console=tty1 root=/dev/mmcblk0p2 rootwait\n")
    state = tmp / "states" / "cgroups.yaml"
    state.parent.mkdir()
    state.write_text(textwrap.dedent(f"""
        cgroups:
          boot.cmdline:
            - present: [cgroup_enable=memory]
            - boot_dir: {tmp}/boot/{{{{ node.id }}}}
        """))
    applied = master.cli("apply", str(state), "--target", "n[12]", "--json", check=False, timeout=120)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert {n: r["reboot_required"] for n, r in json.loads(applied.stdout)["nodes"].items()} == {"n1": True, "n2": True}
    # n3, which needs no reboot, is down: it cannot hold the roll of those that do.
    nodes.agents["n3"].stop()
    wait_for(lambda: "n3" not in master.up_nodes(), 30, what="n3 down")
    rc, report, result = reboot(master, "*", "--only-required", "--batch", "1")
    assert rc == 0, result.stdout + result.stderr
    assert report["order"] == ["n1", "n2"] and "n3" in report["skipped"]
    assert not any(n == "n3" for _, n, _ in nodes.timeline)
    # Booted since: nothing needs a reboot any more. Each skipped node is told once.
    nodes.start("n3")
    wait_for(lambda: "n3" in master.up_nodes(), 30, what="n3 back")
    rc, report, _ = reboot(master, "*", "--only-required")
    assert rc == 0 and report["order"] == [] and set(report["skipped"]) == {"n1", "n2", "n3"}
    human = master.cli("reboot", "*", "--only-required", check=False, timeout=60)
    assert human.returncode == 0, human.stdout + human.stderr
    for name in ("n1", "n2", "n3"):
        assert len([line for line in human.stdout.splitlines() if line.startswith(f"{name}: skipped: ")]) == 1, \
            human.stdout


def test_many_skipped_nodes_are_one_line_per_reason():
    from pimaster.commands.reboot import skipped_lines
    from pimaster.reboots import SKIP_BOOTED_SINCE, SKIP_NOT_REQUIRED

    skipped = {f"node{i:03}": SKIP_NOT_REQUIRED for i in range(97)} | {"pi1": SKIP_BOOTED_SINCE}
    assert skipped_lines(skipped) == [
        f"skipped 97 nodes: {SKIP_NOT_REQUIRED} (node000, node001, node002, node003, node004 and 92 more)",
        f"pi1: skipped: {SKIP_BOOTED_SINCE}"]


def test_shutdown_asks_off_a_terminal_unless_yes_and_powers_off_faking_the_poweroff(master, fake_nodes):
    nodes = fake_nodes(["n1", "n2"])
    refused = master.cli("shutdown", "n1", "--json", check=False)
    assert refused.returncode == 2 and json.loads(refused.stdout)["code"] == "confirmation_needed"
    assert "this would power off 1 node (n1)" in refused.stderr and "add --yes to power it off" in refused.stderr
    time.sleep(1)
    assert nodes.timeline == []  # nothing was powered off
    stream = Stream(master, "--json")
    stream.wait("the stream to start", type="subscribed")
    result = master.cli("shutdown", "n1", "--yes", "--json", check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["action"] == "poweroff" and report["nodes"]["n1"]["state"] == "off"
    stream.wait("the shutdown to finish", type="reboot", state="finished")
    assert [(e.get("node"), e["state"]) for e in stream.events if e["type"] == "reboot"] == [
        (None, "started"), ("n1", "powering_off"), ("n1", "off"), (None, "finished")]  # no batch: it does not batch
    stream.stop()
    assert [(n, w) for _, n, w in nodes.timeline] == [("n1", "poweroff"), ("n1", "down")]
    assert master.up_nodes() == {"n2"}


def test_a_node_running_a_job_refuses_the_reboot_and_the_roll_stops_faking_the_reboot(tmp, master, fake_nodes):
    nodes = fake_nodes(["n1", "n2"])
    sleep = unique_sleep(60)
    state = tmp / "slow.yaml"
    state.write_text(f"slow:\n  cmd.run:\n    - name: {' '.join(sleep)}\n")
    apply = start_apply(master, state, "--target", "n1", "--json")
    try:
        wait_for(lambda: _running(master), 30, what="the job running on n1")
        rc, report, _ = reboot(master, "*", "--batch", "1")
        assert rc == 1
        job = master.json("job", "last", check=False)["job"]
        # The refusal names the job, and how to cancel it.
        assert report["nodes"]["n1"]["state"] == "failed"
        assert f"job {job} is running on this node" in report["nodes"]["n1"]["error"]
        assert f"pimaster job cancel {job}" in report["nodes"]["n1"]["error"]
        assert report["nodes"]["n2"]["state"] == "not_started" and "n1" in report["stopped"]
        assert nodes.timeline == []
    finally:
        master.cli("job", "cancel", "last", check=False)
        apply.communicate(timeout=60)


def _running(master) -> bool:
    job = master.json("job", "last", check=False)
    return job.get("nodes", {}).get("n1", {}).get("status") == "running"


def test_an_agent_that_reports_no_boot_identity_is_refused_by_name_with_upgrade_piagent(tmp, master, fake_nodes,
                                                                                         processes):
    # tests/hostile_agent.py answers ping as an agent older than the reboot request does: no boot
    # identity, and it drops the request it does not know.
    import test_hostile

    nodes = fake_nodes(["n1"])
    old = test_hostile.Hostile(tmp, master, "old01", token=test_hostile.token_of(nodes.config)).start()
    processes.append(old)
    assert old.wait_answer() == "accepted"
    rc, report, result = reboot(master, "*")
    assert rc == 2 and report["code"] == "refused"
    assert "old01" in report["error"] and "upgrade piagent" in report["error"]
    time.sleep(1)
    assert nodes.timeline == [] and not any(m["type"] == "reboot" for m in old.received())
