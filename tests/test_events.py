"""`pimaster events` on loopback: a real master and agents, the command as a subprocess reading the
stream as a script or a person would. What it must show (keys, nodes up and down with the reason,
jobs started and each node's result, network rollbacks), in the order they happened; what it costs
the master (a stream that does not read loses events and is told so; a stream whose client went is
gone; a cap on streams); how it ends (SIGTERM, the pipe's reader gone: exit 0, no traceback).
"""

import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

from harness import Master, wait_for

from pimaster.events import EventBus, MAX_SUBSCRIBERS


class Stream:
    """`pimaster events [--json]` running, its stdout lines collected as they come."""

    def __init__(self, master, *args: str) -> None:
        self.proc = subprocess.Popen([master.python, "-m", "pimaster", "events", *args, "--state-dir",
                                      str(master.state_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=master.env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def events(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines)]

    def wait(self, what: str, timeout: float = 30, **fields) -> dict:
        """The first event with all of ``fields``."""
        def found():
            return next((e for e in self.events if all(e.get(k) == v for k, v in fields.items())), None)
        return wait_for(found, timeout, what=f"{what}; the stream so far: {self.lines[-20:]}")

    def index(self, **fields) -> int:
        return next(i for i, e in enumerate(self.events) if all(e.get(k) == v for k, v in fields.items()))

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self.proc.stderr.read()


def raw_stream(master) -> socket.socket:
    """An events request on the control socket by hand: a client that reads only when the test says."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(master.state_dir / "control.sock"))
    sock.sendall(b'{"cmd": "events", "args": {}}\n')
    return sock


def read_lines(sock: socket.socket, until, timeout: float = 60) -> list[dict]:
    """Events read from ``sock`` until ``until(events)`` (or nothing came for 5 s past ``timeout``)."""
    sock.settimeout(5)
    buffer, events = b"", []
    deadline = time.monotonic() + timeout
    while not until(events) and time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except socket.timeout:
            continue
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        events += [json.loads(line)["event"] for line in lines if line.startswith(b'{"event"')]
    return events


def test_the_stream_shows_keys_nodes_and_jobs_in_the_order_they_happened(tmp, master, start_agent):
    stream = Stream(master, "--json")
    first = stream.wait("the stream to start", type="subscribed")
    assert first["subscribers"] == 1 and isinstance(first["time"], float)

    # Enrolled by token: accepted by token (it never waited: no pending), then up.
    one = start_agent("ev01", master.token_config())
    stream.wait("ev01 up", type="node", node="ev01", state="up")
    accepted = stream.wait("ev01 accepted", type="key", node="ev01", state="accepted")
    assert accepted["by"] == "token" and accepted["fingerprint"] == one.fingerprint()
    assert stream.index(type="key", node="ev01", state="accepted") < stream.index(type="node", node="ev01", state="up")
    assert stream.wait("ev01 up", type="node", node="ev01")["reason"] == "connected"

    # Waiting for a person (told once, however often it enrolls again), then accepted by one: up at once.
    two = start_agent("ev02", master.token_config(token=False))
    pending = stream.wait("ev02 pending", type="key", node="ev02", state="pending")
    assert pending["fingerprint"] == two.fingerprint() and pending["address"].startswith("127.0.0.1")
    master.cli("keys", "accept", "ev02")
    assert stream.wait("ev02 accepted", type="key", node="ev02", state="accepted")["by"] == "person"
    assert stream.wait("ev02 up", type="node", node="ev02", state="up")["reason"] == "accepted"

    # An agent stopped: down, and why.
    one.stop()
    assert stream.wait("ev01 down", type="node", node="ev01", state="down")["reason"] == "disconnected"

    # A job: started, then the node's result in the word `apply` shows.
    state = tmp / "states" / "hello.yaml"
    state.parent.mkdir()
    state.write_text("hello:\n  cmd.run:\n    - name: 'true'\n")
    report = json.loads(master.cli("apply", str(state), "--target", "ev02", "--json", timeout=300).stdout)
    started = stream.wait("the job to start", type="job", job=report["job"], state="started")
    assert started["nodes"] == ["ev02"] and started["node_count"] == 1 and started["file"] == "hello.yaml"
    assert started["target"] == "ev02" and started["test"] is False and "node" not in started
    finished = stream.wait("ev02's result", type="job", job=report["job"], state="finished", node="ev02")
    assert (finished["status"], finished["result"]) == ("done", report["nodes"]["ev02"]["result"]) == ("done", "changed")
    assert finished["summary"]["changed"] == 1
    assert stream.index(type="job", state="started") < stream.index(type="job", state="finished")
    # A run is a job too; a node that does not take a job is finished as no_answer, told as well.
    argv = [master.python, "-m", "pimaster", "--state-dir", str(master.state_dir), "--json", "run", "ev02", "--", "true"]
    ran = json.loads(subprocess.run(argv, capture_output=True, text=True, env=master.env, timeout=120).stdout)
    assert stream.wait("the run to start", type="job", job=ran["job"], state="started")["file"] == "run: true"
    assert stream.wait("the run's result", type="job", job=ran["job"], state="finished", node="ev02")["status"] == "done"
    gone = json.loads(master.cli("apply", str(state), "--target", "ev01", "--json", timeout=300, check=False).stdout)
    assert stream.wait("ev01 given up", type="job", job=gone["job"], state="finished", node="ev01")["status"] == "no_answer"

    # Deleted: the key event, and the node is down with that reason.
    master.cli("keys", "delete", "ev02")
    assert stream.wait("ev02 down", type="node", node="ev02", state="down")["reason"] == "key_deleted"
    stream.wait("ev02's key deleted", type="key", node="ev02", state="deleted")
    # Each thing once: a result an agent resends, a node heard from again, publish nothing more.
    assert len([e for e in stream.events if e["type"] == "job" and e["state"] == "finished"]) == 3
    assert len([e for e in stream.events if e["type"] == "node" and e["node"] == "ev01" and e["state"] == "up"]) == 1
    before_delete = stream.events[:stream.index(type="key", node="ev02", state="deleted")]
    assert [e["node"] for e in before_delete if e.get("state") == "pending"] == ["ev02"]
    # Told it was deleted, the agent enrolls again: a new key waits.
    wait_for(lambda: [e.get("fingerprint") for e in stream.events[len(before_delete):] if e.get("state") == "pending"]
             == [two.fingerprint()], 30, what="ev02's key waiting again")

    status, stderr = stream.stop()
    assert status == 0 and "Traceback" not in stderr, stderr


def test_a_person_reads_one_line_per_event_and_a_rollback_is_told_once(tmp, master, start_agent):
    text = Stream(master)
    script = Stream(master, "--json")
    script.wait("the stream to start", type="subscribed")
    wait_for(lambda: text.lines, 30, what="the text stream to start")
    agent = start_agent("ev03", master.token_config())
    script.wait("ev03 up", type="node", node="ev03", state="up")
    wait_for(lambda: any(" node " in line and "ev03" in line for line in text.lines), 30, what="ev03 in the text stream")
    line = next(line for line in text.lines if " node " in line and "ev03" in line)
    assert "up: connected from 127.0.0.1" in line and line.startswith(time.strftime("%Y-%m-%d")), line
    assert any("accepted by token (fingerprint sha256:" in line and "ev03" in line for line in text.lines), text.lines

    # A network rollback the node noted (faked: this machine cannot cut a node off its network), with
    # text that tries to forge a line of its own.
    (agent.state_dir / "network-rollback.json").write_text(json.dumps({
        "time": time.time(), "reason": "eth0 lost the master\nFORGED 2026-01-01 node ev99 up",
        "changes": [{"interface": "eth0", "address": "10.9.9.9/24\r\nFORGED"}]}))
    assert master.ping()[0] == 0 and master.ping()[0] == 0   # seen twice, told once
    rollback = script.wait("the rollback", type="network_rollback", node="ev03")
    assert rollback["reason"].startswith("eth0 lost the master") and "\n" not in rollback["reason"]
    assert rollback["changes"][0]["interface"] == "eth0" and "\n" not in rollback["changes"][0]["address"]
    wait_for(lambda: any("rolled back" in line for line in text.lines), 30, what="the rollback in the text stream")
    time.sleep(1)
    assert len([e for e in script.events if e["type"] == "network_rollback"]) == 1
    assert not any(line.startswith("FORGED") for line in text.lines), text.lines
    assert len([line for line in text.lines if "rolled back" in line]) == 1
    # An agent's words in a reboot event's error cannot spell out fields of their own.
    from pimaster.commands.events import text_line
    line = text_line({"time": time.time(), "type": "reboot", "node": "ev03", "action": "reboot",
                      "error": "x state=back after_s=41.0", "state": "failed"})
    assert line.endswith(' ev03             failed: "x state=back after_s=41.0"'), line
    for stream in (text, script):
        status, stderr = stream.stop(signal.SIGINT)   # Ctrl-C
        assert status == 0 and "Traceback" not in stderr, stderr


def test_a_stream_that_does_not_read_loses_events_and_is_told_how_many(tmp, processes):
    master = Master(tmp)
    master.argv += ["--max-pending", "2000"]
    master.start()
    processes.append(master)
    slow = raw_stream(master)   # reads nothing until the end
    assert read_lines(slow, lambda events: events)[0]["type"] == "subscribed"
    fast = Stream(master, "--json")
    fast.wait("the stream to start", type="subscribed")

    # Many real events: keys enrolled (pending), rejected, accepted and deleted, 4 events a key.
    from test_hostile import flood

    flood(master, tmp, "--mode", "enroll", "--keys", "700", "--facts-bytes", "100", "--id-prefix", "slow")
    wait_for(lambda: len(master.json("keys", "list")["keys"]) == 700, 60, what="the flood's keys")
    master.cli("keys", "reject", "--all", "--yes")
    master.cli("keys", "accept", "--all", "--include-rejected", "--yes")
    master.cli("keys", "delete", "--all", "--yes")
    wait_for(lambda: len([e for e in fast.events if e.get("state") == "deleted"]) == 700, 60,
             what="the reading stream to see every key deleted")
    published = [e for e in fast.events if e["type"] != "subscribed"]
    assert not any(e["type"] == "lost" for e in fast.events), "the stream that reads lost events"
    assert len(published) >= 4 * 700

    # The one that did not read: bounded (its queue), told how many it lost, and nothing else amiss.
    def complete(events):
        return sum(1 for e in events if e["type"] != "lost") + sum(e["count"] for e in events if e["type"] == "lost") \
            >= len(published)
    events = read_lines(slow, complete)
    lost = [e for e in events if e["type"] == "lost"]
    assert lost and all(e["count"] > 0 for e in lost), "a stream that did not read lost no event"
    got = [e for e in events if e["type"] != "lost"]
    assert len(got) + sum(e["count"] for e in lost) == len(published)
    assert len(got) < len(published)
    # What it got is what happened, in order, each loss counted where it happened.
    def seen(event):
        return json.dumps(event, sort_keys=True)
    kept = {seen(e) for e in got}
    assert [seen(e) for e in published if seen(e) in kept] == [seen(e) for e in got]
    slow.close()
    status, stderr = fast.stop()
    assert status == 0 and "Traceback" not in stderr


def test_streams_are_capped_and_one_whose_client_went_is_removed(tmp, master):
    streams = [raw_stream(master) for _ in range(MAX_SUBSCRIBERS)]
    for sock in streams:
        assert read_lines(sock, lambda events: events)[0]["type"] == "subscribed"
    refused = master.cli("events", "--json", check=False, timeout=30)
    assert refused.returncode == 2 and "too many event streams" in refused.stderr, refused
    assert json.loads(refused.stdout)["code"] == "refused"

    # A client that went: its stream is gone, and another may take its place.
    streams.pop().close()

    def subscribers_after_start():
        stream = Stream(master, "--json")
        try:
            return stream.wait("the stream to start", type="subscribed")["subscribers"], stream
        except AssertionError:
            stream.stop()
            raise
    count, killed = wait_for(lambda: _or_none(subscribers_after_start), 30, what="a stream slot freed")
    assert count == MAX_SUBSCRIBERS
    killed.proc.kill()   # SIGKILL: no goodbye at all
    killed.proc.wait()
    count, other = wait_for(lambda: _or_none(subscribers_after_start), 30, what="the killed client's slot")
    assert count == MAX_SUBSCRIBERS
    other.stop()

    # The pipe's reader goes (`pimaster events | head -1`): the command ends at once, cleanly, and
    # its stream with it.
    piped = subprocess.Popen([master.python, "-m", "pimaster", "events", "--json", "--state-dir", str(master.state_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=master.env)
    first = json.loads(piped.stdout.readline())
    assert first["type"] == "subscribed" and first["subscribers"] == MAX_SUBSCRIBERS
    piped.stdout.close()
    assert piped.wait(20) == 0
    assert "Traceback" not in piped.stderr.read()
    count, last = wait_for(lambda: _or_none(subscribers_after_start), 30, what="the piped client's slot")
    assert count == MAX_SUBSCRIBERS
    last.stop()
    for sock in streams:
        sock.close()


def test_the_master_stopping_ends_the_stream(tmp, master):
    stream = Stream(master, "--json")
    stream.wait("the stream to start", type="subscribed")
    master.stop()
    assert stream.proc.wait(20) == 3
    stderr = stream.proc.stderr.read()
    assert "the event stream ended: the master is stopping" in stderr and "Traceback" not in stderr, stderr


def _or_none(function):
    try:
        return function()
    except AssertionError:
        return None


def test_events_carry_only_bounded_one_line_fields():
    import asyncio

    async def scenario():
        bus = EventBus(queue_limit=3)
        subscription = bus.subscribe()
        bus.publish("key", node="n1", fingerprint="x" * 10_000, state="pending\nFORGED", address=["a"] * 1000,
                    nested={"a": {"b": {"c": {"d": 1}}}}, number=float("nan"))
        bus.publish("node", node="../../etc", state="up")        # not a node id: dropped
        bus.publish("nonsense", node="n1")                       # not a type: dropped
        for i in range(5):
            bus.publish("node", node="n1", state="up", reason=str(i))
        got = [await subscription.next() for _ in range(4)]
        bus.publish("node", node="n1", state="down")   # room again: after the count of those lost
        bus.publish("node", node="n1", state="up", reason="again")
        got += [await subscription.next() for _ in range(2)]
        return bus, subscription, got

    bus, subscription, got = asyncio.run(scenario())
    subscribed, key, node, lost, down, up = got
    assert subscribed["type"] == "subscribed"
    assert len(key["fingerprint"]) == 300 and key["state"] == "pending?FORGED" and len(key["address"]) == 64
    assert key["nested"] == {"a": {"b": "{'c': {'d': 1}}"}} and key["number"] is None
    # Queue of 3: subscribed, key, the first node event; the other four are counted, in their place.
    assert node["reason"] == "0"
    assert lost == {"time": lost["time"], "type": "lost", "count": 4}
    assert (down["state"], up["reason"]) == ("down", "again")
    bus.unsubscribe(subscription)
    assert not bus.subscribers


def test_a_node_flapping_in_a_loop_cannot_drown_the_other_nodes_events(monkeypatch):
    """An agent (root on its Pi) reconnecting in a loop: its up/down events are bounded, another
    node's key event still arrives, and the flapping node's latest state comes later, with how
    many changes were not told."""
    import asyncio

    import pimaster.events as events

    monkeypatch.setattr(events, "FLAP_EVERY_S", 0.2)

    async def scenario():
        bus = EventBus()
        subscription = bus.subscribe()
        for i in range(2000):
            bus.publish("node", node="evil01", state="up" if i % 2 == 0 else "down", reason=str(i))
            if i == 1000:
                bus.publish("key", node="honest02", state="pending", fingerprint="sha256:ab")
        bus.publish("node", node="honest03", state="up", reason="connected")
        await asyncio.sleep(0.6)
        got = []
        while subscription.queue:
            got.append(await subscription.next())
        return got

    got = asyncio.run(scenario())
    evil = [e for e in got if e.get("node") == "evil01"]
    assert not [e for e in got if e["type"] == "lost"]
    assert [e["node"] for e in got if e["type"] == "key"] == ["honest02"]
    assert [e["reason"] for e in got if e.get("node") == "honest03"] == ["connected"]
    # Ten at once, then the latest state (the 2000th: down) with the count of those held back.
    assert len(evil) == events.FLAP_BURST + 1, evil
    assert [e["reason"] for e in evil[:events.FLAP_BURST]] == [str(i) for i in range(events.FLAP_BURST)]
    assert (evil[-1]["state"], evil[-1]["reason"], evil[-1]["suppressed"]) == ("down", "1999", 2000 - events.FLAP_BURST - 1)


def test_the_roster_tells_each_change_of_connected_once_with_its_reason():
    import time as clock

    from pimaster.enrollment import SILENT_LINK_S, Roster

    bus = EventBus()
    subscription = bus.subscribe()
    roster = Roster(bus)
    key, peer = "k" * 40, ("10.0.0.5", 40000)
    roster.key_states[key], roster.node_of_key[key] = "accepted", "n1"
    roster.route("n1", b"c1", key, "connected", "10.0.0.5")
    roster.heard(key, b"c1", 7, peer_of=lambda fd: peer)
    roster.route("n1", b"c1", key)   # another message on the same connection: nothing to tell
    # libzmq reports a close before it closes the descriptor: still open to the agent, asked again...
    assert roster.connection_closed(7, peer, open_now_to=peer) is True and roster.connected("n1")
    # ... and once it is closed, the node is down.
    assert roster.connection_closed(7, peer, open_now_to=None) is False and not roster.connected("n1")
    roster.route("n1", b"c2", key)
    roster.heard(key, b"c2", 8, peer_of=lambda fd: ("10.0.0.5", 40001))
    roster.route("n1", b"c3", key)   # a new connection while the old one still counts
    roster.drop_silent(clock.monotonic() + SILENT_LINK_S + 1)
    nodes = [(e["state"], e["reason"]) for e in subscription.queue if e["type"] == "node"]
    assert nodes == [("up", "connected"), ("down", "disconnected"), ("up", "connected"), ("up", "reconnected"),
                     ("down", "heartbeat_timeout")]
    assert next(e for e in subscription.queue if e["type"] == "node")["address"] == "10.0.0.5"
