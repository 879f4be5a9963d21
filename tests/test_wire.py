"""The wire, attacked from outside: unknown keys, replays, expired requests, garbage on the ports.

Each test talks raw ZeroMQ (pyzmq) to a real master or a real agent, using the project's own
protocol module to build messages, the way an attacker with a copy of the code would.
"""

import asyncio
import os
import random
import socket
import time

import msgpack
import pytest
import zmq
import zmq.asyncio

from harness import wait_for
from piagent import protocol as proto
from piagent import keys
from piagent import config as pconfig
from piagent.protocol import Message


def curve_dealer(ctx, master_state_dir, port, keypair=None):
    public, secret = keypair or zmq.curve_keypair()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = (master_state_dir / "master.pub").read_bytes().strip()
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


async def recv_or_none(sock, timeout=1.5):
    if await sock.poll(timeout * 1000, zmq.POLLIN):
        return await sock.recv()
    return None


async def test_a_fresh_key_can_do_nothing_but_enroll(master, start_agent):
    ctx = zmq.asyncio.Context()
    try:
        sock = curve_dealer(ctx, master.state_dir, master.port)
        dropped_before = master.json("status")["dropped_messages"]
        attempts = [Message(type=t, body={"id": "intruder"}) for t in sorted(proto.AGENT_TO_MASTER - {proto.ENROLL})]
        attempts += [Message(type=t) for t in sorted(proto.MASTER_TO_AGENT)]
        attempts += [proto.request(proto.PING), Message(type="apply", body={"cmd": "rm -rf /"})]
        answers = 0
        for msg in attempts:
            await sock.send(proto.encode(msg))
            if await recv_or_none(sock, 0.5) is not None:
                answers += 1
        assert answers == 0
        refused = master.json("status")["dropped_messages"] - dropped_before
        assert refused == len(attempts)
        print(f"{len(attempts)} message types tried by an unknown key, {refused} refused, {answers} answered")
        # ...while enrollment is answered (and leaves the key pending).
        await sock.send(proto.encode(Message(type=proto.ENROLL, body={"id": "intruder", "facts": {}})))
        reply = proto.decode(await recv_or_none(sock, 5), proto.MASTER_TO_AGENT)
        assert reply.type == proto.ENROLLED and reply.body["status"] == proto.PENDING
        assert master.key_state("intruder") == ["pending"]
        sock.close()
    finally:
        ctx.destroy(linger=0)


async def test_rejected_key_cannot_connect_and_gets_no_answer(master):
    ctx = zmq.asyncio.Context()
    try:
        keypair = zmq.curve_keypair()
        sock = curve_dealer(ctx, master.state_dir, master.port, keypair)
        await sock.send(proto.encode(Message(type=proto.ENROLL, body={"id": "bad", "facts": {}})))
        assert await recv_or_none(sock, 5) is not None  # pending
        master.cli("keys", "reject", "bad")
        sock.close()
        sock = curve_dealer(ctx, master.state_dir, master.port, keypair)
        answers = 0
        for _ in range(3):
            try:  # with the handshake refused there is no link, so the send may not even queue
                await sock.send(proto.encode(Message(type=proto.ENROLL, body={"id": "bad", "facts": {}})),
                                zmq.NOBLOCK)
            except zmq.Again:
                pass
            if await recv_or_none(sock, 1) is not None:
                answers += 1
        assert answers == 0
        sock.close()
    finally:
        ctx.destroy(linger=0)


class FakeMaster:
    """A CURVE ROUTER + key-announce endpoint that replays what it sent: the attacker's view."""

    def __init__(self, ctx, port):
        self.public, self.secret = zmq.curve_keypair()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.curve_server = True
        self.router.curve_publickey, self.router.curve_secretkey = self.public, self.secret
        self.router.bind(f"tcp://127.0.0.1:{port}")
        self.announce = ctx.socket(zmq.ROUTER)
        self.announce.linger = 0
        self.announce.bind(f"tcp://127.0.0.1:{port + 1}")
        self.fingerprint = keys.fingerprint(self.public)

    async def serve_announce(self):
        reply = proto.encode(Message(type=proto.MASTER_KEY, body={"key": self.public.decode()}))
        while True:
            ident, *_ = await self.announce.recv_multipart()
            await self.announce.send_multipart([ident, reply])

    async def recv(self, timeout=10):
        if not await self.router.poll(timeout * 1000, zmq.POLLIN):
            return None, None
        ident, data = await self.router.recv_multipart()
        return ident, proto.decode(data, proto.AGENT_TO_MASTER)


async def test_agent_refuses_replayed_and_expired_requests(tmp, start_agent):
    from harness import free_port_pair

    ctx = zmq.asyncio.Context()
    port = free_port_pair()
    fake = FakeMaster(ctx, port)
    announcer = asyncio.ensure_future(fake.serve_announce())
    try:
        config = pconfig.render_config(f"127.0.0.1:{port}", fake.fingerprint, None)
        agent = start_agent("n1", config)
        ident, enroll = await fake.recv()
        assert enroll is not None and enroll.type == proto.ENROLL, agent.output()
        await fake.router.send_multipart([ident, proto.encode(Message(
            type=proto.ENROLLED, reply_to=enroll.id, body={"status": "accepted", "time": time.time()}))])
        ping = proto.encode(proto.request(proto.PING, ttl_s=30))
        replies = []
        for frame in (ping, ping, ping):  # the original, then two replays of the same bytes
            await fake.router.send_multipart([ident, frame])
            while True:
                _, msg = await fake.recv()
                assert msg is not None, agent.output()
                if msg.type in (proto.RESULT, proto.REFUSED):
                    replies.append(msg)
                    break
        assert [r.type for r in replies] == [proto.RESULT, proto.REFUSED, proto.REFUSED]
        assert all(r.body["reason"] == "replay" for r in replies[1:])
        assert "uptime_s" in replies[0].body
        expired = proto.request(proto.PING, ttl_s=30)
        expired.exp = time.time() - 5
        await fake.router.send_multipart([ident, proto.encode(expired)])
        while True:
            _, msg = await fake.recv()
            if msg.type in (proto.RESULT, proto.REFUSED):
                break
        assert msg.type == proto.REFUSED and msg.body["reason"] == "expired"
        wait_for(lambda: agent.output().count("refused ping request") == 3, what="refusals logged")
        executed = 1
        print(f"3 replays/expired sent, {executed} executed (the original)")
    finally:
        announcer.cancel()
        fake.router.close()
        fake.announce.close()
        ctx.destroy(linger=0)


def test_garbage_on_the_ports_crashes_nothing(master, start_agent):
    start_agent("n1", master.token_config())
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    rng = random.Random(4510)
    sent = 0
    for port in (master.port, master.port + 1):
        for size in (0, 1, 10, 64, 1000, 100_000):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                try:
                    s.sendall(bytes(rng.getrandbits(8) for _ in range(size)))
                    sent += 1
                except OSError:
                    pass
        # A ZMTP greeting announcing an absurd frame length.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00NULL" + b"\x00" * 16 + b"\x00" * 32
                          + b"\x06" + (2**62).to_bytes(8, "big"))
            except OSError:
                pass
    ctx = zmq.Context()
    try:
        # Well-formed ZeroMQ but garbage content, and an oversized frame, on the plaintext port.
        plain = ctx.socket(zmq.DEALER)
        plain.linger = 0
        plain.connect(f"tcp://127.0.0.1:{master.port + 1}")
        for payload in (b"", b"\xc1", msgpack.packb({"v": 99}), os.urandom(70_000)):
            plain.send(payload)
        # A NULL-mechanism client on the CURVE port: its handshake fails.
        null = ctx.socket(zmq.DEALER)
        null.linger = 0
        null.connect(f"tcp://127.0.0.1:{master.port}")
        null.send(proto.encode(Message(type=proto.ENROLL, body={"id": "x"})))
        assert not null.poll(1000)
        plain.close()
        null.close()
    finally:
        ctx.destroy(linger=0)
    assert master.alive()
    assert master.up_nodes() == {"n1"}
    print(f"{sent} garbage connections; master alive and n1 still answers")
