"""The master's ZeroMQ side: who may connect, and what reaches the rest of the master.

- control port (default 4510): a ROUTER with CURVE. Every agent has its own key pair and so its
  own encrypted session. A ZAP handler admits every key except rejected ones (an unknown key must
  be able to enroll) and tags each message with the sender's public key, which is how the master
  knows who sent what. Unaccepted keys may send only `enroll`, and small.
- key-announce port (control port + 1): plaintext ROUTER that answers anything with the master's
  public key, so agents can check it against their pinned fingerprint before connecting.
- a monitor socket on the ROUTER, for `sessions.SessionGuard` (connections that never prove a key)
  and for the `Roster` (an agent whose connection closed is no longer connected: a ``node`` down
  event, reason ``disconnected``; one silent past SILENT_LINK_S, found by the sweep: reason
  ``heartbeat_timeout``).

The router loop keeps each peer within its budget, decodes (bounded), hands `enroll` to the
enrollment policy and every other message of an accepted key to the handler for its type.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import zmq
import zmq.asyncio
from zmq.utils import z85

from piagent import keys
from piagent import protocol as proto
from piagent.protocol import Message

from .enrollment import Roster
from .sessions import RateBudget, SessionGuard, peer_of

log = logging.getLogger("pimaster")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"pimaster"
SESSION_SWEEP_S = 5.0
CLOSE_RECHECK_S = 0.5
ROUTER_YIELD_EVERY = 32


class DropLog:
    """Logs dropped messages without letting a flood of garbage flood the journal: at most
    ``per_minute`` lines a minute in all, and ``per_peer`` about any one key or address."""

    MAX_PEERS = 4096  # remembered peers; past that the per-peer counts start again

    def __init__(self, per_minute: int = 20, per_peer: int = 3) -> None:
        self.per_minute = per_minute
        self.per_peer = per_peer
        self.window = 0.0
        self.logged = 0
        self.suppressed = 0
        self.total = 0
        self.by_peer: dict[str, int] = {}

    def drop(self, reason: str, *args, peer: str | None = None) -> None:
        self.total += 1
        if self.allowed(peer):
            log.warning("dropped message: " + reason, *args)

    def allowed(self, peer: str | None = None) -> bool:
        """Whether one more line may be logged now (about ``peer``); counts it if so."""
        now = time.monotonic()
        if now - self.window > 60:
            if self.suppressed:
                log.warning("%d more dropped messages were not logged in the last minute", self.suppressed)
            self.window, self.logged, self.suppressed = now, 0, 0
            self.by_peer.clear()
        if peer is not None:
            if len(self.by_peer) >= self.MAX_PEERS:
                self.by_peer.clear()
            seen = self.by_peer.get(peer, 0)
            self.by_peer[peer] = seen + 1
            if seen >= self.per_peer:
                self.suppressed += 1
                return False
        if self.logged < self.per_minute:
            self.logged += 1
            return True
        self.suppressed += 1
        return False


# What an accepted agent's message goes to: (routing id, node id, public key, message).
MessageHandler = Callable[[bytes, str, str, Message], None]
# An enrollment: (routing id, public key, message, peer address).
EnrollHandler = Callable[[bytes, str, Message, str], None]


class ListenError(Exception):
    """A port the master must listen on is taken or not allowed: which one, and why."""

    def __init__(self, host: str, port: int, why: str) -> None:
        super().__init__(f"cannot listen on {host}:{port}: {why}")


class Transport:
    """The sockets and their loops. ``handlers`` maps a message type (other than `enroll` and
    `heartbeat`, answered here) to what handles it; ``on_enroll`` gets every enrollment."""

    def __init__(self, listen_host: str, port: int, key_port: int, public_key: bytes, secret_key: bytes,
                 roster: Roster, drops: DropLog) -> None:
        self.listen_host = listen_host
        self.port = port
        self.key_port = key_port
        self.public_key = public_key
        self.secret_key = secret_key
        self.roster = roster
        self.drops = drops
        self.sessions = SessionGuard()
        # Messages a second: an agent sends a few (more while a job runs: one per state); a key
        # not accepted sends an enrollment every 10 s; a boot storm enrolls a whole cluster at once.
        self.agent_budget = RateBudget(rate=200, burst=2000)
        self.stranger_budget = RateBudget(rate=2, burst=10)
        self.address_budget = RateBudget(rate=100, burst=1000)
        self.on_enroll: EnrollHandler = lambda ident, key, msg, address: None
        self.handlers: dict[str, MessageHandler] = {}

    # ------------------------------------------------------------------ sockets
    def open(self) -> list:
        """Binds the sockets (raises zmq.ZMQError if it cannot); returns the loops to run."""
        self.ctx = zmq.asyncio.Context()
        self.ctx.max_sockets = 65536
        self.zap = self.ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind(ZAP_ENDPOINT)  # must exist before the CURVE socket accepts anyone

        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.router_mandatory = True   # sending to a vanished agent fails loudly, not silently
        # libzmq buffers a whole message per connection before the master sees who sent it.
        self.router.maxmsgsize = proto.MAX_AGENT_MESSAGE_BYTES
        self.router.heartbeat_ivl = 5000
        self.router.heartbeat_timeout = 15000
        self.router.sndhwm = 10000
        # Per connection: what libzmq may hold for the master to read (each up to maxmsgsize). More
        # only lets a fast sender cost memory; TCP holds back the rest.
        self.router.rcvhwm = 64
        self.router.curve_server = True
        self.router.curve_secretkey = self.secret_key
        self.router.curve_publickey = self.public_key
        self.router.zap_domain = ZAP_DOMAIN
        self.router.ipv6 = ":" in self.listen_host
        self.router.bind(f"tcp://{self.bind_host()}:{self.port}")

        self.monitor = self.router.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)

        self.announce = self.ctx.socket(zmq.ROUTER)
        self.announce.linger = 0
        self.announce.maxmsgsize = 64 * 1024
        self.announce.ipv6 = self.router.ipv6
        try:
            self.announce.bind(f"tcp://{self.bind_host()}:{self.key_port}")
        except zmq.ZMQError as exc:
            # Named as the key-announce port: "cannot listen on :4510" would send a person after
            # the wrong port.
            raise ListenError(self.listen_host, self.key_port, f"{exc.strerror} (the key-announce port, "
                              f"--key-port; the agents' port {self.port} was free)") from None
        return [self._zap_loop(), self._router_loop(), self._announce_loop(), self._monitor_loop(),
                self._sweep_loop()]

    def bind_host(self) -> str:
        host = self.listen_host
        if host in ("", "0.0.0.0"):
            return "*"
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    def close(self) -> None:
        self.router.disable_monitor()
        for sock in (self.monitor, self.router, self.announce, self.zap):
            sock.close(0)
        self.ctx.term()

    def send(self, ident: bytes, msg: Message) -> bool:
        """Queues ``msg`` for the agent on connection ``ident``; False if it cannot be (gone, full)."""
        try:
            # An asyncio socket reports a failed non-blocking send in the future it returns.
            sending = self.router.send_multipart([ident, proto.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            failure = exc
        else:
            failure = sending.exception() if sending.done() and not sending.cancelled() else None
            if not sending.done():
                sending.add_done_callback(lambda f: f.cancelled() or f.exception())
        if failure is not None:  # EHOSTUNREACH (gone) or EAGAIN (its queue is full)
            log.debug("cannot send %s: %s", msg.type, failure)
            return False
        return True

    # ------------------------------------------------------------------ ZAP: who may connect
    async def _zap_loop(self) -> None:
        while True:
            frames = await self.zap.recv_multipart()
            # version, request id, domain, address, identity, mechanism, credentials...
            if len(frames) < 6:
                continue
            version, request_id, _domain, address, _identity, mechanism = frames[:6]
            status, text, user = b"400", b"refused", b""
            if mechanism == b"CURVE" and len(frames) >= 7 and len(frames[6]) == 32:
                key = z85.encode(frames[6]).decode()
                # Rejected keys cannot even connect. Denied keys (a re-flashed Pi claiming an id
                # that another key holds) may connect but get no answer, so that a person's
                # `keys accept --replace` reaches the waiting agent at once.
                if self.roster.key_states.get(key) == proto.REJECTED:
                    self.drops.drop("connection from %s refused: key %s is rejected",
                                    address.decode(errors="replace"), keys.fingerprint(key))
                else:
                    status, text, user = b"200", b"OK", key.encode()
            await self.zap.send_multipart([version, request_id, status, text, user, b""])

    # ------------------------------------------------------------------ key announce
    async def _announce_loop(self) -> None:
        reply = proto.encode(Message(type=proto.MASTER_KEY, body={
            "key": self.public_key.decode(), "fingerprint": keys.fingerprint(self.public_key)}))
        while True:
            frames = await self.announce.recv_multipart()
            try:
                await self.announce.send_multipart([frames[0], reply], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the asker left; nothing to do

    # ------------------------------------------------------------------ unauthenticated connections
    async def _monitor_loop(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.sessions.opened(fd)
            else:
                # An agent's connection closed (it stopped, was killed, its link died and libzmq's
                # heartbeats gave up): it is no longer connected, whatever command asks.
                peer = self.sessions.gone(fd)
                if self.roster.connection_closed(fd, peer, peer_of(fd)):
                    # The descriptor still leads to the agent: libzmq reports a close before it
                    # closes the descriptor. Looked at again once it has (or the agent is there).
                    asyncio.get_running_loop().call_later(
                        CLOSE_RECHECK_S, lambda fd=fd, peer=peer: self.roster.connection_closed(fd, peer, peer_of(fd)))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SESSION_SWEEP_S)
            self.sessions.sweep()
            self.roster.drop_silent()

    # ------------------------------------------------------------------ agent messages
    async def _router_loop(self) -> None:
        handled = 0
        while True:
            frames = await self.router.recv_multipart(copy=False)
            handled += 1
            if handled % ROUTER_YIELD_EVERY == 0:
                # A receive that finds a message waiting does not give up the loop: without this,
                # a flood of messages would starve ping, applies and the control socket.
                await asyncio.sleep(0)
            try:
                self.on_frames(frames)
            except Exception as exc:  # one bad message must never take the daemon down
                # One line, no traceback: what a peer sent must not be able to fill the journal.
                if self.drops.allowed("internal"):
                    log.error("error while handling an agent message: %s: %s", type(exc).__name__, str(exc)[:200])
                log.debug("error while handling an agent message", exc_info=True)

    def on_frames(self, frames: list) -> None:
        """One message from the ROUTER: budget, key state, bounded decoding, then its handler."""
        if len(frames) != 2:
            self.drops.drop("%d frames instead of 2", len(frames))
            return
        roster = self.roster
        ident, payload = frames[0].bytes, frames[1]
        try:
            key = payload.get("User-Id")
        except zmq.ZMQError:
            key = ""
        try:
            source_fd = payload.get(zmq.SRCFD)
        except zmq.ZMQError:
            source_fd = None
        state = roster.key_states.get(key)
        accepted = state == proto.ACCEPTED
        # Within its budget, or dropped before anything is decoded (see sessions.RateBudget).
        # The peer's address is looked up once, and only where it is used: not for the hot path of
        # accepted agents' replies.
        address = None if accepted else self.peer_address(payload)
        if accepted:
            within = self.agent_budget.take(key)
        else:
            within = self.stranger_budget.take(key or "?") and self.address_budget.take(address)
        if not within:
            self.drops.total += 1
            return
        if state in (proto.REJECTED, proto.DENIED):
            if state == proto.DENIED:
                roster.pending_routes[key] = ident
                roster.heard(key, ident, source_fd, peer_of)
            else:
                self.sessions.cut(source_fd)
            self.drops.drop("from a %s key %s", state, keys.fingerprint(key) if key else "?", peer=key)
            return
        if accepted:
            allowed, limit = proto.AGENT_TO_MASTER, proto.MAX_AGENT_MESSAGE_BYTES
        else:  # not accepted: only an enrollment, and small, checked before anything is decoded
            allowed, limit = proto.UNAUTHENTICATED_ALLOWED, proto.MAX_UNAUTHENTICATED_BYTES
        try:
            msg = proto.decode(payload.bytes, allowed, max_bytes=limit)
        except proto.ProtocolError as exc:
            who = roster.node_of_key.get(key) or (keys.fingerprint(key) if key else "unknown peer")
            self.drops.drop("from %s (%s): %s", who, address or self.peer_address(payload), exc, peer=key or "?")
            if not accepted:  # a stranger sending what it may not: its connection goes
                self.sessions.cut(source_fd)
            return
        if msg.type == proto.ENROLL:
            self.on_enroll(ident, key, msg, address or self.peer_address(payload))
            self.sessions.message(source_fd, roster.key_states.get(key) == proto.ACCEPTED, key)
            if key in roster.key_states:  # stored (accepted, pending or denied): its connection counts
                roster.heard(key, ident, source_fd, peer_of)
            return
        self.sessions.message(source_fd, True, key)
        node_id = roster.node_of_key[key]
        roster.seen(node_id)
        if roster.routes.get(node_id, (None,))[0] != ident:
            # Reconnected on a new connection (or spoke first since the old one was seen to close).
            roster.route(node_id, ident, key, "connected", self.peer_address(payload))
        roster.heard(key, ident, source_fd, peer_of)
        if msg.type == proto.HEARTBEAT:
            self.send(ident, Message(type=proto.HEARTBEAT_ACK, reply_to=msg.id, body={"time": time.time()}))
            return
        handler = self.handlers.get(msg.type)
        if handler is not None:
            handler(ident, node_id, key, msg)

    @staticmethod
    def peer_address(payload) -> str:
        try:
            return payload.get("Peer-Address") or "?"
        except zmq.ZMQError:
            return "?"
