"""Scratch attack tests (delete when done)."""
import asyncio, json, os, re, sys, time
from pathlib import Path
import pytest
import zmq
from harness import wait_for
sys.path.insert(0, str(Path(__file__).parent))
import hostile_agent as ha
from piagent import protocol as proto
from piagent.protocol import Message


def _token(config: str) -> str:
    for line in config.splitlines():
        if line.strip().startswith("token"):
            return line.split("=", 1)[1].strip().strip('"')
    raise AssertionError(config)


def _enroll(ctx, mkey, keypair, port, token=None, node="evil01", facts=None):
    sock = ha.curve_dealer(ctx, mkey, keypair, "127.0.0.1", port)
    body = {"id": node, "facts": facts or {"hostname": node}, "catalog": ha.default_catalog()}
    if token:
        body["token"] = token
    sock.send(proto.encode(Message(type=proto.ENROLL, body=body)))
    assert sock.poll(10000)
    msg = proto.decode(sock.recv_multipart()[-1], proto.MASTER_TO_AGENT)
    return sock, msg


def test_reconnect_flood_drowns_events(tmp, master):
    from test_events import Stream
    stream = Stream(master, "--json")
    wait_for(lambda: stream.lines, 20, what="subscribed")
    ctx = zmq.Context()
    mkey = ha.fetch_master_key(ctx, "127.0.0.1", master.port + 1)
    keypair = zmq.curve_keypair()
    token = _token(master.token_config())
    sock, msg = _enroll(ctx, mkey, keypair, master.port, token)
    assert msg.body.get("status") == "accepted", msg.body
    sock.close(0)
    log_before = len(master.output().splitlines())
    t0 = time.monotonic(); n = 0
    while time.monotonic() - t0 < 10:
        s, m = _enroll(ctx, mkey, keypair, master.port)
        s.close(0); n += 1
    time.sleep(2)
    ev = stream.events
    nodes = [e for e in ev if e.get("type") == "node" and e.get("node") == "evil01"]
    log_after = len(master.output().splitlines())
    print(f"\nRECONNECTS {n} in 10 s; node events for evil01: {len(nodes)}; lost: "
          f"{sum(e.get('count',0) for e in ev if e['type']=='lost')}; master log lines added: {log_after-log_before}")
    print(nodes[:4])
    stream.stop()
    ctx.destroy(linger=0)


def test_slow_reader_loses_honest_event_under_flood(tmp, master):
    import socket as so
    c = so.socket(so.AF_UNIX); c.connect(str(master.state_dir / "control.sock"))
    c.sendall(json.dumps({"cmd": "events", "args": {}}).encode() + b"\n")
    time.sleep(1)
    ctx = zmq.Context()
    mkey = ha.fetch_master_key(ctx, "127.0.0.1", master.port + 1)
    keypair = zmq.curve_keypair()
    token = _token(master.token_config())
    sock, msg = _enroll(ctx, mkey, keypair, master.port, token)
    sock.close(0)
    t0 = time.monotonic(); n = 0
    while time.monotonic() - t0 < 8:
        s, m = _enroll(ctx, mkey, keypair, master.port); s.close(0); n += 1
    # an honest event while the flood is queued: a new node's key pending
    s2, m2 = _enroll(ctx, mkey, zmq.curve_keypair(), master.port, None, node="honest02")
    print("\nhonest02 enroll answer:", m2.body.get("status"))
    s2.close(0)
    time.sleep(1)
    c.settimeout(3); buf = b""
    try:
        while True:
            d = c.recv(1 << 20)
            if not d: break
            buf += d
    except so.timeout:
        pass
    evs = [json.loads(l)["event"] for l in buf.splitlines() if l.startswith(b'{"event"')]
    lost = sum(e.get("count", 0) for e in evs if e["type"] == "lost")
    honest = [e for e in evs if e.get("node") == "honest02"]
    print(f"reconnects {n}; events read {len(evs)}; lost {lost}; honest02 events seen: {honest}")
    c.close(); ctx.destroy(linger=0)


def test_reboot_event_text_fields_forgeable():
    from pimaster.events import EventBus
    from pimaster.reboots import Roll
    from pimaster.commands.events import text_line

    class FakeRpc:
        async def ask(self, bodies, type_, timeout):
            return {n: {"ok": False, "body": {"error": "x state=back after_s=41.0 boot=1a2b3c4d/777"}} for n in bodies}

    class FakeRoster:
        def connected(self, n): return True

    class FakeMaster:
        rpc = FakeRpc(); roster = FakeRoster(); events = EventBus()

    m = FakeMaster(); sub = m.events.subscribe()
    emitted = []
    run = Roll(m, emitted.append, "reboot", 60)
    asyncio.run(run.request(["node05"], 2.0))
    sub.queue.popleft()
    ev = sub.queue.popleft()
    print("\nHUMAN:", text_line(ev))
    from pimaster.commands.reboot import _state_text
    print("REBOOT CMD:", "node05:", _state_text(emitted[0]))


def test_label_truncated_before_redaction():
    from pimaster.runjob import command_line
    from pimaster.secrets import redact
    secret = "S3cr3tMungeKeyValue-0123456789abcdef"
    shell = "echo " + "x" * 170 + " " + secret + " > /etc/munge/key"
    text, label = command_line(shell=shell)
    redacted = redact(label, {"munge_key": secret})
    print("\nLABEL:", redacted[-60:])
    leaked = next(i for i in range(len(secret), 0, -1) if secret[:i] in redacted)
    print("leaked prefix chars:", leaked, repr(secret[:leaked]))
    # the full command line as the node's result 'name' (MAX_FIELD 4096) is cut before redaction too
    from pimaster.results import check_state_result
    name = "y" * 4080 + secret
    r = redact(check_state_result({"id": "run", "fun": "cmd.run", "name": name, "result": True})["name"], {"k": secret})
    print("name tail:", r[-20:])


def test_clean_before_redact_multiline_secret():
    from pimaster.results import check_job_result
    from pimaster.secrets import redact
    pem = "-----BEGIN KEY-----\r\nAAAABBBBCCCCDDDD\r\n-----END KEY-----\r\n"
    ml = "line-one-secret\nline-two-secret"
    body = {"results": [{"id": "run", "fun": "cmd.run", "name": "printf '%s' '" + ml + "' > /x", "result": True,
                         "changes": {"retcode": 0, "stdout": pem, "stderr": ""}, "comment": "ok"}]}
    res = check_job_result(body, 1)
    out = redact(res["results"], {"pem": pem, "ml": ml})
    print("\nstdout kept:", repr(out[0]["changes"]["stdout"]))
    print("name kept:", repr(out[0]["name"]))


def test_fact_target_on_identity_facts_matches_the_impostor(tmp, master):
    ctx = zmq.Context()
    mkey = ha.fetch_master_key(ctx, "127.0.0.1", master.port + 1)
    token = _token(master.token_config())
    base = {"ips": ["10.0.0.2"], "macs": ["dc:a6:32:00:00:02"], "interfaces": ["eth0"], "cpu_count": 4,
            "memory_mb": 4096}
    good = dict(base, hostname="node02", pi_serial="10000000abcdef02", machine_id="0123456789abcdef0123456789abcdef")
    evil = dict(base, hostname="node02", macs=["dc:a6:32:00:00:05"], pi_serial="10000000abcdef02",
                machine_id="0123456789abcdef0123456789abcdef")
    socks = []
    for node, facts in (("node02", good), ("node05", evil)):
        s, m = _enroll(ctx, mkey, zmq.curve_keypair(), master.port, token, node=node, facts=facts)
        assert m.body.get("status") == "accepted", m.body
        socks.append(s)
    for target in ("pi_serial=10000000abcdef02", "hostname=node02", "machine_id=0123456789abcdef0123456789abcdef"):
        r = master.cli("nodes", target, "--json", check=False)
        d = json.loads(r.stdout) if r.stdout.strip() else {}; print("\n", target, "->", r.returncode, sorted(n.get("id") for n in d.get("nodes", [])) if isinstance(d.get("nodes"), list) else list((d.get("nodes") or {}).keys()), r.stderr[:200])
    for s in socks: s.close(0)
    ctx.destroy(linger=0)


def test_run_output_forgery_and_not_sent_claim(tmp, master, processes):
    import test_hostile as th
    token = _token(master.token_config())
    evil_out = ("hi\x1b[2J\x1b]0;title\x07\rnode02: FORGED-CR\u2028node02: FORGED-LS\x85node02: FORGED-NEL"
                "\u202enode02\x0bnode02: FORGED-VT\x0cnode02: FORGED-FF\x1cnode02: FORGED-FS\n\tnode02: tabbed")
    results = {"results": [{"id": "fail-stop", "fun": "pimaster.fail_stop", "name": "node05", "result": None,
                            "changes": {"retcode": 0, "stdout": evil_out, "stderr": "e\x1b[31mred"},
                            "comment": "not sent: --fail-stop: node02 failed, so no further batch was started",
                            "status": "not_run", "made_by": "pimaster"}],
               "body": {"interrupted": True}}
    facts = dict(getattr(th, "GOOD_FACTS", {}) or {}, hostname="node05")
    h = th.Hostile(tmp, master, "node05", token=token, results=results,
                   facts=facts if facts.get("ips") else None).start()
    processes.append(h)
    assert h.wait_answer() == "accepted", h.output()
    import subprocess
    def cli(*a):
        return subprocess.run([master.python, "-m", "pimaster", "run", "--state-dir", str(master.state_dir), *a],
                              capture_output=True, text=True, env=master.env, timeout=120)
    r = cli("*", "--", "true")
    print("\nRC", r.returncode, "\nSTDOUT:", repr(r.stdout), "\nSTDERR:", repr(r.stderr))
    j = cli("*", "--json", "--", "true")
    jl = master.cli("job", d0 := "", check=False) if False else None
    d = json.loads(j.stdout)
    print("JSON node05:", d["nodes"]["node05"]["status"], d.get("stopped"))
