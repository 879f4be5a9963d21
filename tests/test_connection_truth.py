"""One truth about which agents are connected: `nodes`, `status` and `keys list` say the same, and
say it within a heartbeat or two of an agent going away (issue 17, item 3); an apply does not wait
for its timeout on a node that went away mid-job (item 5).

The Roster's own rules (a closed connection, a silent one, a descriptor reused by a newer
connection) without processes; the commands on loopback with real master and agent processes.
"""

import json
import os
import signal
import subprocess
import textwrap
import time

from harness import wait_for


# ---------------------------------------------------------------------------------- the roster alone
KEY = "k" * 40
OTHER = "o" * 40


def roster_with(node_id="n1", key=KEY, ident=b"c1", fd=7, peer=("127.0.0.1", 50001)):
    from pimaster.enrollment import Roster

    roster = Roster()
    roster.key_states[key] = "accepted"
    roster.node_of_key[key] = node_id
    roster.routes[node_id] = (ident, key)
    roster.heard(key, ident, fd, peer_of=lambda _fd: peer)
    return roster


def test_a_closed_connection_drops_the_route_and_a_new_message_restores_it():
    roster = roster_with()
    assert roster.connected("n1") and roster.connected_nodes() == {"n1"} and roster.key_connected(KEY)
    roster.connection_closed(7, ("127.0.0.1", 50001))
    assert not roster.connected("n1") and roster.connected_nodes() == set() and not roster.key_connected(KEY)
    # The agent comes back on a new connection: connected again with its first message.
    roster.routes["n1"] = (b"c2", KEY)
    roster.heard(KEY, b"c2", 8, peer_of=lambda _fd: ("127.0.0.1", 50002))
    assert roster.connected("n1")


def test_a_descriptor_reused_by_a_newer_connection_keeps_its_route():
    # The agent reconnected and its new connection got the old one's descriptor; the old one's
    # close is processed only after the new connection's first message.
    roster = roster_with(ident=b"new", peer=("127.0.0.1", 50002))
    roster.connection_closed(7, ("127.0.0.1", 50001))
    assert roster.connected("n1")
    roster.connection_closed(9, None)  # another connection altogether
    assert roster.connected("n1")


def test_a_late_close_of_a_strangers_connection_on_a_reused_descriptor_keeps_the_route():
    # A stranger's short connection on descriptor 7 closed; the agent reconnected on descriptor 7
    # before the close was handled, so the stale close carries no peer (or the agent's, looked up
    # late). The descriptor leads to the agent right now: the agent stays connected.
    roster = roster_with(ident=b"new", peer=("127.0.0.1", 50002))
    roster.connection_closed(7, None, open_now_to=("127.0.0.1", 50002))
    assert roster.connected("n1")
    roster.connection_closed(7, ("127.0.0.1", 50002), open_now_to=("127.0.0.1", 50002))
    assert roster.connected("n1")
    roster.connection_closed(7, None, open_now_to=None)  # really closed: gone
    assert not roster.connected("n1")


def test_a_silent_agent_counts_as_gone_after_two_heartbeats():
    from pimaster.enrollment import SILENT_LINK_S

    roster = roster_with()
    now = time.monotonic()
    assert roster.drop_silent(now + SILENT_LINK_S - 1) == [] and roster.connected("n1")
    assert roster.drop_silent(now + SILENT_LINK_S + 1) == [KEY] and not roster.connected("n1")


def test_a_waiting_key_counts_as_connected_while_its_connection_lasts():
    from pimaster.enrollment import Roster

    roster = Roster()
    roster.key_states[OTHER] = "pending"
    roster.pending_routes[OTHER] = b"p1"
    roster.heard(OTHER, b"p1", 5, peer_of=lambda _fd: ("127.0.0.1", 40000))
    assert roster.key_connected(OTHER)
    roster.connection_closed(5, ("127.0.0.1", 40000))
    assert not roster.key_connected(OTHER) and OTHER not in roster.pending_routes
    # Forgetting a key forgets its connection too (nothing is left to grow).
    roster.heard(OTHER, b"p2", 6, peer_of=lambda _fd: None)
    roster.forget_key(OTHER)
    assert roster.links == {} and roster.key_on_fd == {}


# ---------------------------------------------------------------------------------- loopback
def connected_everywhere(master) -> dict[str, tuple]:
    """Per node: what `nodes`, `keys list` say about its connection; and `status`'s count."""
    nodes = {n["id"]: n["connected"] for n in master.json("nodes")["nodes"]}
    keys = {k["id"]: k["connected"] for k in master.json("keys", "list")["keys"] if k["state"] == "accepted"}
    count = master.json("status")["connected"]
    return {node: (nodes.get(node), keys.get(node)) for node in sorted(set(nodes) | set(keys))}, count


def test_nodes_status_and_keys_say_the_same_about_a_stopped_agent(master, start_agent):
    config = master.token_config(uses=5)
    agents = {n: start_agent(n, config) for n in ("n1", "n2", "n3")}
    wait_for(lambda: master.up_nodes() == {"n1", "n2", "n3"}, what="agents up")
    assert connected_everywhere(master) == ({n: (True, True) for n in agents}, 3)

    agents["n1"].kill()                  # SIGKILL: no goodbye, the kernel closes the connection
    agents["n2"].stop(signal.SIGTERM)    # a clean stop
    # Within a heartbeat or two (usually at once: the master sees the connection close; at worst
    # the 35 s silence backstop), not at the next master restart.
    wait_for(lambda: connected_everywhere(master) == ({"n1": (False, False), "n2": (False, False),
                                                     "n3": (True, True)}, 1),
             timeout=45, what="nodes, keys list and status to say n1 and n2 are gone")
    table = master.cli("nodes").stdout
    row = next(line for line in table.splitlines() if line.startswith("n1 "))
    assert " no " in row, table

    # An agent that comes back shows connected again at once (its enrollment).
    agents["n1"].start()
    wait_for(lambda: connected_everywhere(master)[0]["n1"] == (True, True), timeout=30, what="n1 back")
    assert connected_everywhere(master)[1] == 2
    assert master.up_nodes() == {"n1", "n3"}


def test_an_apply_ends_for_a_node_that_disconnects_mid_job(tmp, master, start_agent):
    """A node whose agent dies mid-job: the apply says so at once, waits the reconnect window,
    then finishes that node as no_answer; the other nodes' results are recorded as usual."""
    config = master.token_config(uses=5)
    agents = {n: start_agent(n, config) for n in ("n1", "n2")}
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")
    pid_file = tmp / "n1-sleep.pid"
    state = tmp / "slow.yaml"
    state.write_text(textwrap.dedent(f"""
        step1:
          cmd.run:
            - name: "true"
        step2:
          cmd.run:
            - name: "{{{{ 'echo $$ > {pid_file}; exec sleep 600' if node.id == 'n1' else 'true' }}}}"
        step3:
          cmd.run:
            - name: "true"
        """).lstrip())
    # Plain output (not a terminal): one line per event; the default timeout of one hour.
    running = subprocess.Popen([master.python, "-m", "pimaster", "apply", str(state), "--state-dir",
                                str(master.state_dir)], env=master.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=60, what="n1 to run step2")
        started = time.monotonic()
        agents["n1"].kill()
        try:
            out, err = running.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            running.kill()
            out, err = running.communicate()
            raise AssertionError(f"the apply still waits for n1 two minutes after it died:\n{out}\n{err}")
        # The reconnect window, not the apply's timeout (one hour).
        assert time.monotonic() - started < 110
    finally:
        if running.poll() is None:
            running.kill()
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    assert running.returncode != 0
    assert "n1: disconnected" in out, out
    assert "n1: no answer" in out and "n2: changed (changed 3)" in out, out
    job_id = master.json("jobs")["jobs"][0]["id"]
    report = master.json("job", job_id, check=False)  # exits 1: a node has no result
    assert report["nodes"]["n1"]["status"] == "no_answer" and not report["nodes"]["n1"]["ok"]
    assert report["nodes"]["n2"]["status"] == "done" and report["nodes"]["n2"]["ok"]
    assert report["nodes"]["n2"]["changed"] == 3
    # The report's fields are those of any node without a result.
    assert set(report["nodes"]["n1"]) == set(report["nodes"]["n2"])
    json.dumps(report)


def test_a_node_back_within_the_reconnect_window_is_recorded_as_usual(tmp, master, start_agent):
    """Disconnected mid-job and back (restarted) within the window: the apply shows both, and
    records the result the agent delivers (its job was cut short: interrupted), not no_answer."""
    config = master.token_config(uses=5)
    agent = start_agent("n1", config)
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    pid_file = tmp / "n1-sleep.pid"
    state = tmp / "slow.yaml"
    state.write_text(f'slow:\n  cmd.run:\n    - name: "echo $$ > {pid_file}; exec sleep 600"\n')
    # (--timeout: should the apply never say "disconnected", it still ends, and the test fails.)
    running = subprocess.Popen([master.python, "-m", "pimaster", "apply", str(state), "--timeout", "90s",
                                "--state-dir", str(master.state_dir)], env=master.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=60, what="n1 to run the job")
        os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)  # (the agent's child: not left behind)
        agent.kill()
        seen = []
        for line in running.stdout:  # plain output, a line per event (it ends by itself at worst)
            seen.append(line)
            if line.startswith("n1: disconnected"):
                break
        agent.start()
        out, err = running.communicate(timeout=120)
        out = "".join(seen) + out
    finally:
        if running.poll() is None:
            running.kill()
    assert "n1: disconnected" in out and "n1: reconnected" in out, out
    assert "n1: interrupted" in out and "no_answer" not in out, out
    report = master.json("job", master.json("jobs")["jobs"][0]["id"], check=False)
    assert report["nodes"]["n1"]["status"] == "interrupted"


# ---------------------------------------------------------------------------------- a stage alone
class StageBoard:
    """What `_run_stage` uses of a JobBoard: agents that take the job, a roster that says who is
    connected, a store that records statuses."""

    def __init__(self, connected: set[str], grace: float) -> None:
        self.redactions = {"j": {}}
        self.up = connected
        self.disconnect_grace = grace
        self.statuses: dict[str, str] = {}
        self.store = self

    def set_job_node_status(self, job_id, node_id, status):
        self.statuses[node_id] = status

    def connected(self, node_id):
        return node_id in self.up

    def job_finished(self, job_id, node_id, status, summary):  # the `job` event: not what this checks
        pass

    def redact(self, value, job_id=None, node_id=None):
        return value

    async def ask_following(self, bodies, type_, timeout):
        return {n: {"ok": True, "body": {"accepted": True}} for n in bodies}


def run_stage(board, watch, script, deadline_s=60.0):
    """Runs one stage of nodes a and b; ``script(events)`` plays the agents' side meanwhile."""
    import asyncio

    from pimaster import jobs

    events = []

    async def main():
        player = asyncio.ensure_future(script(events))
        raw = await jobs._run_stage(board, events.append, "j", False, ["a", "b"], {"a": [], "b": []},
                                    {"a": [], "b": []}, watch, 5.0, time.monotonic() + deadline_s, set())
        player.cancel()
        return raw

    return asyncio.run(main()), events


def test_a_stage_gives_up_on_a_node_gone_past_the_grace(monkeypatch):
    import asyncio

    from pimaster import jobs

    monkeypatch.setattr(jobs, "CONNECTION_CHECK_S", 0.05, raising=False)
    board = StageBoard({"a", "b"}, grace=0.3)
    watch = jobs.JobWatch(["a", "b"])

    async def agents(events):
        watch.result("a", {"status": "done", "summary": {"changed": 1}, "results": []})
        await asyncio.sleep(0.2)
        board.up.discard("b")      # b's connection closes and b never comes back

    started = time.monotonic()
    raw, events = run_stage(board, watch, agents)
    assert time.monotonic() - started < 10    # the grace, not the deadline (60 s)
    assert set(raw) == {"a"} and board.statuses["b"] == "no_answer"
    kinds = [(e["type"], e["node"], e.get("state") or e.get("status")) for e in events]
    assert kinds == [("node", "a", "done"), ("connection", "b", "disconnected"), ("node", "b", "no_answer")]
    assert "not back within 0.3 s" in events[-1]["error"]


def test_a_stage_records_a_node_back_within_the_grace(monkeypatch):
    import asyncio

    from pimaster import jobs

    monkeypatch.setattr(jobs, "CONNECTION_CHECK_S", 0.05, raising=False)
    board = StageBoard({"a", "b"}, grace=5.0)
    watch = jobs.JobWatch(["a", "b"])

    async def agents(events):
        watch.result("a", {"status": "done", "summary": {}, "results": []})
        board.up.discard("b")
        while not any(e["type"] == "connection" for e in events):
            await asyncio.sleep(0.02)
        board.up.add("b")          # b's agent restarted and delivers the result it kept
        watch.result("b", {"status": "interrupted", "summary": {}, "results": []})

    raw, events = run_stage(board, watch, agents)
    assert set(raw) == {"a", "b"} and board.statuses["b"] == "running"  # never no_answer
    assert [e.get("state") for e in events if e["type"] == "connection"] == ["disconnected", "reconnected"]
    assert events[-1] == {"type": "node", "node": "b", "status": "interrupted", "summary": {}}
