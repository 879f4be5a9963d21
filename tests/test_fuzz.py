"""Property-based fuzzing (hypothesis) of every decoder the daemons expose.

- the wire decoder (piagent.protocol.decode) with each side's allow-list, in process;
- the master's CURVE port, live, from an unknown key and from an accepted key;
- the agent, live, from a (fake) master it has accepted;
- the master's control socket (JSON lines), live.

Each live test ends by checking that the daemon still answers and logged no traceback. The number
of inputs tried is printed (pytest -s) and summed in test_zz_fuzz_totals.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import Agent, Master, agent_with_standin_master, wait_for
from piagent import protocol as proto
from piagent.protocol import Message

TRIED: dict[str, int] = {}
LIVE = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def count(name: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1


# ---------------------------------------------------------------------------------------------
# Strategies: random bytes, mutated valid frames, wrong types, huge lengths, truncated envelopes

leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
                 st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=40))
anything = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                     st.dictionaries(st.text(max_size=10), inner, max_size=5)),
                        max_leaves=20)
all_types = sorted(proto.AGENT_TO_MASTER | proto.MASTER_TO_AGENT | {proto.MASTER_KEY, "nonsense", ""})


@st.composite
def envelopes(draw):
    """Envelopes that look right but have the wrong type somewhere."""
    env = {"v": draw(st.one_of(st.just(proto.VERSION), leaf)), "type": draw(st.one_of(st.sampled_from(all_types), leaf)),
           "id": draw(st.one_of(st.text(min_size=1, max_size=80), leaf)), "ts": draw(st.one_of(st.floats(), leaf)),
           "exp": draw(st.one_of(st.just(time.time() + 30), st.floats(), leaf)),
           "reply_to": draw(st.one_of(st.none(), st.text(max_size=80), leaf)),
           "body": draw(st.one_of(st.dictionaries(st.text(max_size=12), anything, max_size=6), anything))}
    for key in draw(st.lists(st.sampled_from(sorted(env)), max_size=3)):
        env.pop(key, None)
    return msgpack.packb(env, use_bin_type=True)


def _valid(type_: str, body: dict) -> bytes:
    return proto.encode(Message(type=type_, body=body, exp=time.time() + 30))


@st.composite
def mutated(draw):
    base = draw(st.sampled_from([
        _valid(proto.ENROLL, {"id": "n9", "facts": {"hostname": "x"}}),
        _valid(proto.RESULT, {"uptime_s": 1.0}), _valid(proto.PING, {}),
        _valid(proto.APPLY, {"job": "j1", "test": True, "states": [{"fun": "cmd.run", "id": "x"}]}),
        _valid(proto.JOB_RESULT, {"job": "j1", "results": [], "summary": {}}),
    ]))
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif action == "truncate":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at]
    return bytes(data)


huge_lengths = st.sampled_from([
    b"\xdb\xff\xff\xff\xff" + b"x" * 10,            # str32 claiming 4 GiB
    b"\xc6\xff\xff\xff\xff" + b"x" * 10,            # bin32
    b"\xdd\xff\xff\xff\xff" + b"\x00" * 10,         # array32
    b"\xdf\xff\xff\xff\xff" + b"\x00" * 10,         # map32
    b"\x81\xa1v\x01" + b"\xdf\x7f\xff\xff\xff",     # nested map32
])
frames = st.one_of(st.binary(max_size=4096), mutated(), envelopes(), huge_lengths,
                   anything.map(lambda v: msgpack.packb(v, use_bin_type=True)))


# ---------------------------------------------------------------------------------------------
# In process: the decoder itself

@settings(max_examples=3000, deadline=None, database=None)
@given(frames, st.sampled_from([proto.AGENT_TO_MASTER, proto.UNAUTHENTICATED_ALLOWED, proto.MASTER_TO_AGENT]))
def test_decoder_raises_only_protocol_errors(frame, allowed):
    count("decoder")
    try:
        msg = proto.decode(frame, allowed)
    except proto.ProtocolError:
        return
    assert msg.type in allowed and isinstance(msg.body, dict) and isinstance(msg.id, str)


# ---------------------------------------------------------------------------------------------
# Live: a master with one real agent

@pytest.fixture(scope="module")
def live():
    tmp = Path(tempfile.mkdtemp(prefix="pm-fuzz-", dir="/tmp"))
    master = Master(tmp).start()
    config = master.token_config(uses=5)
    agent = Agent(tmp, "n1", config).start()
    ctx = zmq.Context()
    try:
        wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
        yield tmp, master, agent, ctx, config
    finally:
        ctx.destroy(linger=0)
        agent.stop()
        master.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def curve_socket(ctx, master, keypair=None):
    public, secret = keypair or zmq.curve_keypair()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndtimeo = 1000
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = (master.state_dir / "master.pub").read_bytes().strip()
    sock.connect(f"tcp://127.0.0.1:{master.port}")
    return sock


def drain(sock) -> list[str]:
    """The types of the answers waiting on ``sock``."""
    answers = []
    while sock.poll(0):
        answers.append(proto.decode(sock.recv(), proto.MASTER_TO_AGENT).type)
    return answers


def assert_master_healthy(master):
    assert master.alive()
    assert master.up_nodes() == {"n1"}
    assert "Traceback" not in master.output()


@pytest.fixture(scope="module")
def stranger(live):
    _, master, _, ctx, _ = live
    return curve_socket(ctx, master)


@pytest.fixture(scope="module")
def insider(live):
    """A key the master has accepted (enrolled with the token): it may send every agent message."""
    _, master, _, ctx, config = live
    sock = curve_socket(ctx, master)
    token = config.split("token = ")[1].split()[0]
    sock.send(proto.encode(Message(type=proto.ENROLL, body={"id": "fuzzer", "facts": {}, "token": token})))
    assert sock.poll(5000)
    reply = proto.decode(sock.recv(), proto.MASTER_TO_AGENT)
    assert reply.body["status"] == proto.ACCEPTED
    return sock


@LIVE
@given(frame=frames)
def test_master_survives_fuzz_from_an_unknown_key(live, stranger, frame):
    count("master, unknown key")
    stranger.send(frame)


@LIVE
@given(frame=st.one_of(frames, anything.map(lambda b: _valid(proto.JOB_RESULT, {"job": "x", "results": b, "summary": b})),
                       st.dictionaries(st.text(max_size=10), anything).map(lambda b: _valid(proto.RESULT, b))))
def test_master_survives_fuzz_from_an_accepted_key(live, insider, frame):
    count("master, accepted key")
    insider.send(frame)
    drain(insider)


def test_master_still_answers_after_the_wire_fuzz(live, stranger):
    _, master, _, _, _ = live
    time.sleep(0.5)
    # The unknown key got no answer to anything but an enrollment (a fuzzed frame may be a valid one)...
    assert set(drain(stranger)) <= {proto.ENROLLED}
    assert_master_healthy(master)  # ...and the master is up and answering


@LIVE
@given(request=st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ") + b"\n"),
    st.fixed_dictionaries({"cmd": st.one_of(st.sampled_from(["status", "ping", "nodes", "keys.list", "keys.accept",
                                                             "keys.fingerprint", "token.create", "jobs", "job",
                                                             "nope"]), leaf),
                           "args": st.one_of(st.dictionaries(st.sampled_from(
                               ["target", "timeout", "node", "fingerprint", "ttl_s", "uses", "address", "job_id",
                                "limit", "replace", "all", "x"]), st.one_of(leaf, st.just(1.0))), anything)})
    .map(lambda r: json.dumps(r, default=repr).encode() + b"\n"),
))
def test_control_socket_survives_fuzz(live, request):
    _, master, _, _, _ = live
    count("control socket")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(master.state_dir / "control.sock"))
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        return  # an empty line: the master waits for a request, then sees the end
    response = json.loads(data.splitlines()[-1])
    assert "result" in response or "error" in response
    assert "internal error" not in response.get("error", ""), response  # every failure is a handled one


def test_master_still_answers_after_the_control_fuzz(live):
    _, master, _, _, _ = live
    assert_master_healthy(master)


# ---------------------------------------------------------------------------------------------
# Live: an agent, from a master it trusts

@pytest.fixture(scope="module")
def agent_under_fuzz():
    tmp = Path(tempfile.mkdtemp(prefix="pm-fuzz-agent-", dir="/tmp"))
    try:
        with agent_with_standin_master(tmp) as parts:
            yield parts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drain_router(router) -> None:
    while router.poll(0):
        router.recv_multipart()


@LIVE
@given(frame=st.one_of(frames, st.dictionaries(st.text(max_size=10), anything).flatmap(
    lambda body: st.sampled_from(sorted(proto.REQUEST_TYPES)).map(lambda t: _valid(t, body)))))
def test_agent_survives_fuzz_from_its_master(agent_under_fuzz, frame):
    agent, router, ident = agent_under_fuzz
    count("agent")
    router.send_multipart([ident, frame])
    _drain_router(router)


def test_agent_still_answers_after_the_fuzz(agent_under_fuzz):
    agent, router, ident = agent_under_fuzz
    time.sleep(1)
    _drain_router(router)
    ping = proto.request(proto.PING)
    router.send_multipart([ident, proto.encode(ping)])
    deadline = time.monotonic() + 20
    answer = None
    while time.monotonic() < deadline and answer is None:
        if router.poll(1000):
            _, data = router.recv_multipart()
            msg = proto.decode(data, proto.AGENT_TO_MASTER)
            if msg.reply_to == ping.id:
                answer = msg
    assert answer is not None and answer.type == proto.RESULT and "uptime_s" in answer.body
    assert agent.alive() and "Traceback" not in agent.output(), agent.output()[-3000:]


def test_zz_fuzz_totals():
    print("fuzz inputs tried:", json.dumps(TRIED, sort_keys=True), "total", sum(TRIED.values()))
    assert sum(TRIED.values()) > 0
