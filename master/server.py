"""`pimaster serve`: the master daemon.

Sockets (one asyncio loop, one process):

- control port (default 4510): ZeroMQ ROUTER with CURVE. Every agent has its own key pair and so its
  own encrypted session. A ZAP handler admits every key except rejected and denied ones (an
  unknown key must be able to enroll) and tags each message with the sender's public key, which is
  how the master knows who sent what. Unaccepted keys may send only `enroll`.
- key-announce port (control port + 1): plaintext ROUTER that answers anything with the master's
  public key, so agents can check it against their pinned fingerprint before connecting.
- control socket (state dir/control.sock): a Unix socket, mode 0600 in a 0700 directory, and the
  peer's uid checked with SO_PEERCRED. The `pimaster` commands talk JSON lines over it.
"""

from __future__ import annotations

import asyncio
import fcntl
import fnmatch
import json
import logging
import math
import re
import os
import secrets
import socket
import struct
import time

import zmq
import zmq.asyncio
from zmq.utils import z85

from piagent import protocol as proto

from piagent import keys

from piagent import config as pconfig
from piagent import sd
from piagent.protocol import Message

from . import __version__
from .facts import check_catalog, check_facts
from .results import CONTROL_RE, check_health, check_job_result, check_progress
from .secrets import SecretStore, redact
from .sessions import RateBudget, SessionGuard
from .store import Store, identity_of

log = logging.getLogger("pimaster")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"pimaster"
CONTROL_LINE_LIMIT = 1024 * 1024
LAST_SEEN_FLUSH_S = 30.0
# An agent seen this recently and not connected now is probably reconnecting (its address just
# changed): an apply waits for it instead of reporting it down at once.
RECONNECT_GRACE_S = 30.0
FOLLOW_POLL_S = 0.25
# Keys waiting for a person: beyond this many, new keys are not even stored (an enrollment flood).
MAX_PENDING_KEYS = 256
# The longest a token may live (`token create --ttl`): a leaked piagent.conf expires.
MAX_TOKEN_TTL_S = 30 * 86400
SESSION_SWEEP_S = 5.0
ROUTER_YIELD_EVERY = 32
# `token create --ids`: one glob over what node ids may hold (a comma list would match nothing).
TOKEN_IDS_RE = re.compile(r"[A-Za-z0-9._*?\[\]!-]{1,128}")


def _rollback_note(note) -> dict | None:
    """An agent's note that it rolled a network change back, checked and bounded for `ping`."""
    if not isinstance(note, dict):
        return None
    changes = [{"interface": CONTROL_RE.sub("?", str(c.get("interface"))[:32]),
                "address": CONTROL_RE.sub("?", str(c.get("address"))[:64])}
               for c in (note.get("changes") or [])[:8] if isinstance(c, dict)] \
        if isinstance(note.get("changes"), list) else []
    when = note.get("time")
    return {"time": when if isinstance(when, (int, float)) and math.isfinite(when) else None,
            "reason": CONTROL_RE.sub("?", str(note.get("reason", ""))[:300]), "changes": changes}


class ControlError(Exception):
    """A control request that cannot be done: the message goes back to the user as is."""


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


class Master:
    def __init__(self, state_dir: str, listen_host: str = "0.0.0.0", port: int = proto.DEFAULT_PORT,
                 key_port: int | None = None, max_pending: int = MAX_PENDING_KEYS) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.listen_host = listen_host
        self.port = port
        self.key_port = key_port or port + 1
        self.max_pending = max_pending
        self.control_path = os.path.join(self.state_dir, "control.sock")
        self.drops = DropLog()
        self.sessions = SessionGuard()
        # Messages a second: an agent sends a few (more while a job runs: one per state); a key
        # not accepted sends an enrollment every 10 s; a boot storm enrolls a whole cluster at once.
        self.agent_budget = RateBudget(rate=200, burst=2000)
        self.stranger_budget = RateBudget(rate=2, burst=10)
        self.address_budget = RateBudget(rate=100, burst=1000)
        self.refused_keys = 0  # new keys not stored because too many wait already
        # In memory, rebuilt from the store at start; the store stays the truth.
        self.key_states: dict[str, str] = {}            # public key -> state
        self.node_of_key: dict[str, str] = {}           # accepted public key -> node id
        self.routes: dict[str, tuple[bytes, str]] = {} # node id -> (routing id, public key)
        self.pending_routes: dict[str, bytes] = {}      # pending public key -> routing id
        self.last_seen: dict[str, float] = {}
        self._dirty_seen: dict[str, float] = {}
        self.requests: dict[str, tuple[str, asyncio.Future]] = {}
        self.job_watchers: dict = {}                     # job id -> jobs.JobWatch of a running apply
        self.job_redactions: dict[str, dict[str, list[str]]] = {}  # job -> node -> sensitive output its job carries
        self.started = time.time()
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ start / stop
    def _prepare_state_dir(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self._lock_fd = os.open(os.path.join(self.state_dir, "master.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"pimaster: another master is already running on {self.state_dir}") from None
        if len(self.control_path.encode()) > 107:
            raise SystemExit(f"pimaster: state dir path too long for a Unix socket: {self.control_path}")

    async def start(self) -> None:
        self._prepare_state_dir()
        self.public_key, self.secret_key = keys.load_or_create_keypair(self.state_dir, "master")
        self.fingerprint = keys.fingerprint(self.public_key)
        self.store = Store(os.path.join(self.state_dir, "pimaster.db"))
        self.secrets = SecretStore(self.state_dir)
        for key in self.store.keys():
            self.key_states[key["public_key"]] = key["state"]
            if key["state"] == proto.ACCEPTED:
                self.node_of_key[key["public_key"]] = key["node_id"]
        for node in self.store.nodes():
            if node["last_seen"]:
                self.last_seen[node["node_id"]] = node["last_seen"]

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
        self.router.bind(f"tcp://{self._bind_host()}:{self.port}")

        self.monitor = self.router.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)

        self.announce = self.ctx.socket(zmq.ROUTER)
        self.announce.linger = 0
        self.announce.maxmsgsize = 64 * 1024
        self.announce.ipv6 = self.router.ipv6
        self.announce.bind(f"tcp://{self._bind_host()}:{self.key_port}")

        if os.path.exists(self.control_path):
            os.unlink(self.control_path)  # stale: we hold the state-dir lock, so no master owns it
        old_umask = os.umask(0o177)
        try:
            self.control = await asyncio.start_unix_server(self._control_client, path=self.control_path,
                                                           limit=CONTROL_LINE_LIMIT)
        finally:
            os.umask(old_umask)
        os.chmod(self.control_path, 0o600)

        for coro in (self._zap_loop(), self._router_loop(), self._announce_loop(), self._flush_loop(),
                     self._monitor_loop(), self._sweep_loop()):
            self._tasks.append(asyncio.ensure_future(coro))
        watchdog = sd.watchdog_interval_s()
        if watchdog:
            self._tasks.append(asyncio.ensure_future(self._watchdog_loop(watchdog)))
        log.info("pimaster %s listening on %s:%d (key announce :%d), key %s, state %s", __version__,
                 self.listen_host, self.port, self.key_port, self.fingerprint, self.state_dir)
        sd.notify("READY=1")

    def _bind_host(self) -> str:
        host = self.listen_host
        if host in ("", "0.0.0.0"):
            return "*"
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    async def stop(self) -> None:
        sd.notify("STOPPING=1")
        self.control.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._flush_last_seen()
        self.router.disable_monitor()
        for sock in (self.monitor, self.router, self.announce, self.zap):
            sock.close(0)
        self.ctx.term()
        self.store.close()
        try:
            os.unlink(self.control_path)
        except FileNotFoundError:
            pass
        log.info("pimaster stopped")

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            sd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

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
                if self.key_states.get(key) == proto.REJECTED:
                    self.drops.drop("connection from %s refused: key %s is rejected",
                                    address.decode(errors="replace"), keys.fingerprint(key))
                else:
                    status, text, user = b"200", b"OK", key.encode()
            await self.zap.send_multipart([version, request_id, status, text, user, b""])

    # ------------------------------------------------------------------ key announce
    async def _announce_loop(self) -> None:
        reply = proto.encode(Message(type=proto.MASTER_KEY, body={
            "key": self.public_key.decode(), "fingerprint": self.fingerprint}))
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
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.sessions.opened(int(event["value"]))
            else:
                self.sessions.gone(int(event["value"]))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SESSION_SWEEP_S)
            self.sessions.sweep()

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
                self._on_agent_frames(frames)
            except Exception as exc:  # one bad message must never take the daemon down
                # One line, no traceback: what a peer sent must not be able to fill the journal.
                if self.drops.allowed("internal"):
                    log.error("error while handling an agent message: %s: %s", type(exc).__name__, str(exc)[:200])
                log.debug("error while handling an agent message", exc_info=True)

    def _on_agent_frames(self, frames: list) -> None:
        if len(frames) != 2:
            self.drops.drop("%d frames instead of 2", len(frames))
            return
        ident, payload = frames[0].bytes, frames[1]
        try:
            key = payload.get("User-Id")
        except zmq.ZMQError:
            key = ""
        try:
            source_fd = payload.get(zmq.SRCFD)
        except zmq.ZMQError:
            source_fd = None
        state = self.key_states.get(key)
        accepted = state == proto.ACCEPTED
        # Within its budget, or dropped before anything is decoded (see sessions.RateBudget).
        # The peer's address is looked up once, and only where it is used: not for the hot path of
        # accepted agents' replies.
        address = None if accepted else self._peer_address(payload)
        if accepted:
            within = self.agent_budget.take(key)
        else:
            within = self.stranger_budget.take(key or "?") and self.address_budget.take(address)
        if not within:
            self.drops.total += 1
            return
        if state in (proto.REJECTED, proto.DENIED):
            if state == proto.DENIED:
                self.pending_routes[key] = ident
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
            who = self.node_of_key.get(key) or (keys.fingerprint(key) if key else "unknown peer")
            self.drops.drop("from %s (%s): %s", who, address or self._peer_address(payload), exc, peer=key or "?")
            if not accepted:  # a stranger sending what it may not: its connection goes
                self.sessions.cut(source_fd)
            return
        if msg.type == proto.ENROLL:
            self._on_enroll(ident, key, msg, address or self._peer_address(payload))
            self.sessions.message(source_fd, self.key_states.get(key) == proto.ACCEPTED, key)
            return
        self.sessions.message(source_fd, True, key)
        node_id = self.node_of_key[key]
        self._seen(node_id)
        if self.routes.get(node_id, (None,))[0] != ident:
            self.routes[node_id] = (ident, key)  # reconnected on a new connection
        if msg.type == proto.HEARTBEAT:
            self._send(ident, Message(type=proto.HEARTBEAT_ACK, reply_to=msg.id, body={"time": time.time()}))
        elif msg.type == proto.JOB_PROGRESS:
            watcher = self.job_watchers.get(str(msg.body.get("job"))[:proto.MAX_ID_LENGTH])
            progress = check_progress(msg.body)
            if watcher is None or progress is None or not watcher.progress(node_id, progress):
                self.drops.drop("progress from %s for a job it is not running", node_id, peer=key)
        elif msg.type == proto.JOB_RESULT:
            self._on_job_result(ident, node_id, msg)
        elif msg.type in (proto.RESULT, proto.REFUSED):
            waiting = self.requests.get(msg.reply_to or "")
            if waiting is None or waiting[0] != node_id:
                self.drops.drop("unexpected reply from %s", node_id, peer=key)
                return
            future = waiting[1]
            if not future.done():
                future.set_result((msg, time.monotonic()))

    def _on_job_result(self, ident: bytes, node_id: str, msg: Message) -> None:
        job_id = msg.body.get("job")
        states = self.store.job_node_states(job_id, node_id) if isinstance(job_id, str) else None
        result = check_job_result(msg.body, states) if states is not None else None
        if result is None:
            if isinstance(job_id, str) and states is None:
                self.drops.drop("result from %s for job %r, which is not its: acknowledged and dropped",
                                node_id, job_id[:40], peer=node_id)
            else:
                self.drops.drop("malformed job result from %s", node_id, peer=node_id)
            if isinstance(job_id, str) and len(job_id) <= proto.MAX_ID_LENGTH:
                # So that the agent forgets it: it can never be recorded.
                self._send(ident, Message(type=proto.JOB_RESULT_ACK, reply_to=msg.id, body={"job": job_id}))
            return
        results = result["results"]
        # Stored and shown: no secret value, and no output of a sensitive state. The raw result
        # goes only to a running apply, for rendering its later stages.
        kept = [dict(r, changes={"redacted": "sensitive state"} if r.get("changes") else {})
                if r.get("sensitive") else r for r in results]
        self.store.record_result(job_id, node_id, result["status"], result["summary"], self.redact(kept, job_id, node_id),
                                 result["started"], result["finished"])
        self._send(ident, Message(type=proto.JOB_RESULT_ACK, reply_to=msg.id, body={"job": job_id}))
        watcher = self.job_watchers.get(job_id)
        if watcher is not None:
            watcher.result(node_id, result)

    def redact(self, value, job_id: str | None = None, node_id: str | None = None):
        """``value`` without any secret, nor the sensitive output of earlier stages that this
        node's job carried (the strings it was told to redact)."""
        secrets = self.secrets.values()
        carried = self.job_redactions.get(job_id, {}).get(node_id, ())
        for i, output in enumerate(sorted(carried, key=len, reverse=True)):
            secrets[f"output-{i + 1}"] = output
        return redact(value, secrets)

    def _seen(self, node_id: str) -> None:
        now = time.time()
        self.last_seen[node_id] = now
        self._dirty_seen[node_id] = now

    def _send(self, ident: bytes, msg: Message) -> bool:
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

    @staticmethod
    def _peer_address(payload) -> str:
        try:
            return payload.get("Peer-Address") or "?"
        except zmq.ZMQError:
            return "?"

    def _on_enroll(self, ident: bytes, key: str, msg: Message, address: str = "?") -> None:
        node_id = msg.body.get("id")
        token = msg.body.get("token")
        fp = keys.fingerprint(key)
        if not isinstance(node_id, str) or not pconfig.NODE_ID_RE.fullmatch(node_id):
            self.drops.drop("enroll from %s (key %s) with a malformed node id %r", address, fp,
                            str(node_id)[:70], peer=key)
            return
        facts, problems = check_facts(msg.body.get("facts"))
        if problems and self.drops.allowed(key):
            log.warning("node %r (key %s, from %s): refused facts: %s", node_id, fp, address,
                        "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
        if token is not None and not isinstance(token, str):
            token = None
        record = self.store.key_by_public(key)
        if record is not None and record["node_id"] != node_id:
            self.drops.drop("key %s is enrolled as %r but claims to be %r", fp, record["node_id"], node_id, peer=key)
            return
        if record is None:
            holder = self.store.accepted_key(node_id)
            if holder is not None:
                state = proto.DENIED
                if self.drops.allowed(key):
                    log.warning("node %r: a second key %s, from %s, claims an id held by accepted key %s: "
                                "denied. If the Pi was re-flashed: pimaster keys accept --replace %s "
                                "--fingerprint %s", node_id, fp, address, holder["fingerprint"], node_id, fp)
            else:
                state = proto.PENDING
            if self.store.count_keys(state) >= self.max_pending:
                # An enrollment flood: a new key is not even stored. Keys already waiting, and
                # every accepted node, are untouched.
                self.refused_keys += 1
                self.drops.drop("new key %s from %s (%r) not stored: %d keys wait already (the limit)",
                                fp, address, node_id, self.max_pending, peer=address)
                return
            record = self.store.add_key(node_id, key, fp, state, facts)
            self.key_states[key] = state
            if state == proto.DENIED:
                self.pending_routes[key] = ident
                return
        if record["state"] == proto.PENDING and token:
            ok, why = self.store.consume_token(token, node_id)
            if ok:
                self._accept(record, facts)
                log.info("node %r enrolled by token, key %s, from %s", node_id, fp, address)
            elif self.drops.allowed(key):
                log.warning("node %r (key %s, from %s) presented a token that does not enroll: %s; it waits "
                            "as pending", node_id, fp, address, why)
        record = self.store.key_by_public(key)
        if record["state"] == proto.ACCEPTED:
            self.routes[node_id] = (ident, key)
            self.pending_routes.pop(key, None)
            self.store.upsert_node(node_id, facts, time.time())
            catalog, problem = check_catalog(msg.body.get("catalog"))
            if catalog is not None:
                self.store.set_catalog(node_id, catalog)
            elif self.drops.allowed(key):
                log.warning("node %r: catalogue refused: %s", node_id, problem)
            self._seen(node_id)
            self._send(ident, Message(type=proto.ENROLLED, reply_to=msg.id,
                                      body={"status": proto.ACCEPTED, "time": time.time(), "id": node_id}))
        elif record["state"] == proto.PENDING:
            if key not in self.pending_routes and self.drops.allowed(address):
                log.info("node %r waits as pending with key %s, from %s (pimaster keys accept %s)",
                         node_id, fp, address, node_id)
            self.pending_routes[key] = ident
            self.store.update_key_facts(record["id"], facts)
            self._send(ident, Message(type=proto.ENROLLED, reply_to=msg.id,
                                      body={"status": proto.PENDING, "time": time.time(), "id": node_id}))

    def _accept(self, record: dict, facts: dict | None = None, replace: bool = False) -> None:
        node_id, key = record["node_id"], record["public_key"]
        if replace:
            old = self.store.accepted_key(node_id)
            if old is not None and old["public_key"] != key:
                self._forget_key(old["public_key"])
        facts = facts if facts is not None else record["facts"]
        self.store.set_key_state(record["id"], proto.ACCEPTED, replace_accepted=replace,
                                 identity=identity_of(facts))
        self.key_states[key] = proto.ACCEPTED
        self.node_of_key[key] = node_id
        # Other keys still waiting for this id now claim an id another key holds: denied, which
        # `keys list` explains, rather than pending keys that can never be accepted as such.
        for other in self.store.deny_pending(node_id):
            self.key_states[other] = proto.DENIED
        self.store.upsert_node(node_id, facts, time.time())

    def _forget_key(self, key: str) -> None:
        self.key_states.pop(key, None)
        node_id = self.node_of_key.pop(key, None)
        self.pending_routes.pop(key, None)
        if node_id and self.routes.get(node_id, (None, None))[1] == key:
            del self.routes[node_id]

    # ------------------------------------------------------------------ requests to agents
    async def ask(self, bodies: dict[str, dict], type_: str, timeout: float,
                  request_ttl: float | None = None) -> dict[str, dict]:
        """Send one request to each node (its own body) and collect answers until ``timeout``."""
        loop = asyncio.get_running_loop()
        sent: dict[str, tuple[str, float, float, asyncio.Future]] = {}
        results: dict[str, dict] = {}
        for node_id, body in bodies.items():
            route = self.routes.get(node_id)
            if route is None:
                results[node_id] = {"ok": False, "error": "not connected"}
                continue
            msg = proto.request(type_, body, ttl_s=request_ttl or timeout)
            future = loop.create_future()
            self.requests[msg.id] = (node_id, future)
            wall, mono = time.time(), time.monotonic()
            if not self._send(route[0], msg):
                results[node_id] = {"ok": False, "error": "not connected"}
                del self.requests[msg.id]
                continue
            sent[node_id] = (msg.id, wall, mono, future)
        if sent:
            await asyncio.wait([s[3] for s in sent.values()], timeout=timeout)
        for node_id, (msg_id, wall, mono, future) in sent.items():
            self.requests.pop(msg_id, None)
            if not future.done():
                future.cancel()
                results[node_id] = {"ok": False, "error": f"no answer within {timeout:g} s"}
                continue
            answer, received = future.result()
            results[node_id] = self._answer_row(answer, received - mono, wall)
        return results

    @staticmethod
    def _answer_row(answer: Message, rtt: float, sent_wall: float) -> dict:
        if answer.type == proto.REFUSED:
            return {"ok": False, "error": f"refused: {CONTROL_RE.sub('?', str(answer.body.get('reason'))[:200])}",
                    "rtt_ms": round(rtt * 1000, 2)}
        return {"ok": "error" not in answer.body, "rtt_ms": round(rtt * 1000, 2),
                "body": answer.body, "sent_wall": sent_wall, "rtt_s": rtt}

    async def ask_following(self, bodies: dict[str, dict], type_: str, timeout: float) -> dict[str, dict]:
        """Like ``ask``, for requests an agent takes once however often it gets them (an apply: the
        agent remembers the job id). A node that reconnects meanwhile -- its address just changed,
        its link flapped -- gets the request again on its new connection; a node not connected
        now but seen within RECONNECT_GRACE_S is waited for, up to ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        sent: dict[str, tuple[bytes, str, float, float, asyncio.Future]] = {}
        tried: dict[str, bytes] = {}      # the connection each node was last sent to (or tried)
        results: dict[str, dict] = {}

        def gone(node_id: str) -> bool:
            return time.time() - self.last_seen.get(node_id, 0) > RECONNECT_GRACE_S

        try:
            while True:
                # Answers first: one that came back on the old connection still counts.
                for node_id, (_, msg_id, wall, mono, future) in sent.items():
                    if node_id not in results and future.done() and not future.cancelled():
                        answer, received = future.result()
                        results[node_id] = self._answer_row(answer, received - mono, wall)
                for node_id, body in bodies.items():
                    route = self.routes.get(node_id)
                    if node_id in results:
                        continue
                    if route is None or tried.get(node_id) == route[0]:
                        if node_id not in sent and gone(node_id):
                            results[node_id] = {"ok": False, "error": "not connected"}
                        continue
                    tried[node_id] = route[0]
                    msg = proto.request(type_, body, ttl_s=timeout)
                    future = loop.create_future()
                    self.requests[msg.id] = (node_id, future)
                    if self._send(route[0], msg):
                        prior = sent.get(node_id)
                        if prior:  # that connection is gone, and the request with it
                            self.requests.pop(prior[1], None)
                            prior[4].cancel()
                        sent[node_id] = (route[0], msg.id, time.time(), time.monotonic(), future)
                    else:
                        del self.requests[msg.id]
                        if node_id not in sent and gone(node_id):
                            results[node_id] = {"ok": False, "error": "not connected"}
                remaining = deadline - time.monotonic()
                if len(results) == len(bodies) or remaining <= 0:
                    break
                open_ = [s[4] for n, s in sent.items() if n not in results and not s[4].done()]
                if open_:
                    await asyncio.wait(open_, timeout=min(FOLLOW_POLL_S, remaining))
                else:
                    await asyncio.sleep(min(FOLLOW_POLL_S, remaining))
        finally:
            for node_id, (_, msg_id, _, _, future) in sent.items():
                self.requests.pop(msg_id, None)
                if not future.done():
                    future.cancel()
        for node_id in bodies:
            if node_id not in results:
                results[node_id] = {"ok": False, "error": f"no answer within {timeout:g} s" if node_id in sent
                                    else f"not connected within {timeout:g} s"}
        return results

    def _targets(self, target: str | None) -> list[str]:
        accepted = sorted(set(self.node_of_key.values()))
        if not target or target == "*":
            return accepted
        return [n for n in accepted if fnmatch.fnmatchcase(n, target)]

    async def ping(self, target: str | None, timeout: float) -> list[dict]:
        answers = await self.ask({n: {} for n in self._targets(target)}, proto.PING, timeout)
        rows = []
        for node_id in sorted(answers):
            answer = answers[node_id]
            row = {"id": node_id, "ok": answer["ok"], "rtt_ms": answer.get("rtt_ms")}
            body = answer.get("body") or {}
            if answer.get("error"):
                row["error"] = answer["error"]
            health = check_health(body)
            agent_time = health.pop("time", None)
            row.update(health)
            rollback = _rollback_note(body.get("network_rollback"))
            if rollback:
                row["network_rollback"] = rollback
            if agent_time is not None and "sent_wall" in answer:
                midpoint = answer["sent_wall"] + answer["rtt_s"] / 2
                row["clock_offset_ms"] = round((agent_time - midpoint) * 1000, 2)
            row["last_seen"] = self.last_seen.get(node_id)
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ persistence
    def _flush_last_seen(self) -> None:
        if self._dirty_seen:
            seen, self._dirty_seen = self._dirty_seen, {}
            self.store.touch_nodes(seen)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(LAST_SEEN_FLUSH_S)
            self._flush_last_seen()

    # ------------------------------------------------------------------ control socket
    async def _control_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.getuid():
                log.warning("control socket: refused a client with uid %d", uid)
                writer.write(b'{"error": "permission denied"}\n')
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"error": "request too large"}\n')
                    return
                if not line:
                    return
                def emit(event: dict) -> None:
                    if not writer.is_closing():
                        writer.write(json.dumps({"event": event}).encode() + b"\n")

                response = await self._control_request(line, emit)
                writer.write(json.dumps(response).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _control_request(self, line: bytes, emit=None) -> dict:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ControlError("malformed request")
            handler = CONTROL_COMMANDS.get(request["cmd"])
            if handler is None:
                raise ControlError(f"unknown command {request['cmd']!r}")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise ControlError("malformed arguments")
            if request["cmd"] in STREAMING_COMMANDS:
                args["emit"] = emit or (lambda event: None)
            return {"result": await handler(self, **args)}
        except ControlError as exc:
            return {"error": str(exc)}
        except TypeError as exc:
            return {"error": f"bad arguments: {exc}"}
        except ValueError as exc:
            return {"error": f"bad request: {exc}"}
        except Exception as exc:  # never let a client take the master down
            log.exception("control request failed")
            return {"error": f"internal error: {type(exc).__name__}: {exc}"}

    # The commands (each gets the master and keyword arguments from the request).
    ControlError = ControlError  # for the command modules (jobs.py)

    async def cmd_apply(self, emit, file: str, target: str | None = None, test: bool = False,
                        timeout: float = 3600.0, cwd: str | None = None) -> dict:
        from .jobs import apply

        if not isinstance(file, str) or not file:
            raise ControlError("name a state file")
        return await apply(self, emit, file, target, bool(test), float(timeout), cwd=cwd)

    async def cmd_jobs(self, limit: int = 50) -> dict:
        return {"jobs": self.store.jobs(int(limit))}

    async def cmd_job(self, job_id: str) -> dict:
        from .jobs import job_report

        job = self.store.job(str(job_id))
        if job is None:
            raise ControlError(f"no job {job_id!r} (see `pimaster jobs`)")
        return job_report(job)

    async def cmd_status(self) -> dict:
        return {"version": __version__, "fingerprint": self.fingerprint, "port": self.port,
                "key_port": self.key_port, "listen": self.listen_host, "pid": os.getpid(),
                "started": self.started, "connected": len(self.routes),
                "accepted": len(self.node_of_key), "pending": len(self.pending_routes),
                "dropped_messages": self.drops.total, "hostname": socket.gethostname(),
                "unauthenticated_connections": self.sessions.untrusted(),
                "closed_connections": self.sessions.closed, "refused_keys": self.refused_keys,
                "rate_limited_messages": self.agent_budget.refused + self.stranger_budget.refused
                + self.address_budget.refused,
                "max_pending": self.max_pending}

    async def cmd_ping(self, target: str | None = None, timeout: float = 5.0) -> dict:
        timeout = float(timeout)
        if not 0 < timeout <= 600:
            raise ControlError("--timeout must be between 0 and 600 seconds")
        return {"nodes": await self.ping(target, timeout)}

    async def cmd_nodes(self) -> dict:
        nodes = []
        for node in self.store.nodes():
            node_id = node["node_id"]
            if node_id not in self.node_of_key.values():
                continue
            node["last_seen"] = self.last_seen.get(node_id, node["last_seen"])
            node["connected"] = node_id in self.routes
            node["id"] = node.pop("node_id")
            nodes.append(node)
        return {"nodes": nodes}

    async def cmd_keys_list(self) -> dict:
        keys = []
        for key in self.store.keys():
            facts = key["facts"]
            keys.append({"id": key["node_id"], "state": key["state"], "fingerprint": key["fingerprint"],
                         "created": key["created"], "updated": key["updated"],
                         "hostname": facts.get("hostname"), "ips": facts.get("ips", []),
                         "connected": key["node_id"] in self.routes and
                         self.routes[key["node_id"]][1] == key["public_key"]
                         or key["public_key"] in self.pending_routes})
        return {"master": self.fingerprint, "keys": keys}

    def _pick_keys(self, node: str | None, fingerprint: str | None, states: set[str], all_: bool = False) -> list[dict]:
        """Keys in ``states`` matching the node glob and the fingerprint, each when given; --all
        says that more than one may match, never that the others are ignored."""
        keys = [k for k in self.store.keys() if k["state"] in states]
        if not node and not all_:
            raise ControlError("name a node (or use --all)")
        if node:
            keys = [k for k in keys if fnmatch.fnmatchcase(k["node_id"], node)]
        if fingerprint:
            keys = [k for k in keys if k["fingerprint"] == fingerprint.lower()]
        return keys

    async def cmd_keys_accept(self, node: str | None = None, fingerprint: str | None = None,
                              replace: bool = False, include_rejected: bool = False,
                              all: bool = False) -> dict:
        states = {proto.PENDING}
        if replace and not fingerprint:
            # Replacing hands the node's id, roles and secrets to another key: say which one.
            raise ControlError("--replace needs --fingerprint: compare it with `piagent fingerprint` on the "
                               "node (`pimaster keys list` shows the waiting key's)")
        if replace:
            states.add(proto.DENIED)
        if include_rejected:
            states.add(proto.REJECTED)
        candidates = self._pick_keys(node, fingerprint, states, all)
        if not candidates:
            hint = ""
            if fingerprint and node and self._pick_keys(node, None, states, all):
                hint = f" (none with the fingerprint {fingerprint}: `pimaster keys list` shows the waiting keys')"
            elif node and any(k["state"] == proto.DENIED for k in self.store.keys(node)):
                hint = (f" ({node} has a denied key: `pimaster keys accept --replace {node} --fingerprint FP` "
                        "replaces its accepted key)")
            elif node and any(k["state"] == proto.REJECTED for k in self.store.keys(node)):
                hint = f" ({node} has a rejected key: add --include-rejected)"
            raise ControlError(f"no key to accept for {node or 'any node'}{hint}")
        by_node: dict[str, list[dict]] = {}
        for key in candidates:
            by_node.setdefault(key["node_id"], []).append(key)
        ambiguous = {n: ks for n, ks in by_node.items() if len(ks) > 1}
        if ambiguous:
            lines = [f"{n}: {', '.join(k['fingerprint'] for k in ks)}" for n, ks in ambiguous.items()]
            raise ControlError("more than one key waits for " + "; ".join(lines) + ": choose with --fingerprint")
        # Checked for every key before any is accepted: `--all` does all or nothing.
        for node_id, (key,) in by_node.items():
            holder = self.store.accepted_key(node_id)
            if holder is not None and holder["id"] != key["id"] and not replace:
                raise ControlError(f"{node_id} already has an accepted key ({holder['fingerprint']}); the waiting "
                                   f"one is {key['fingerprint']}: `pimaster keys accept --replace {node_id} "
                                   f"--fingerprint {key['fingerprint']}` replaces it, `pimaster keys reject "
                                   f"{node_id} --fingerprint {key['fingerprint']}` refuses it")
        accepted = []
        for node_id, (key,) in by_node.items():
            self._accept(key, replace=replace)
            ident = self.pending_routes.pop(key["public_key"], None)
            if ident is not None:  # the agent is connected and waiting: tell it now
                self.routes[node_id] = (ident, key["public_key"])
                self._send(ident, Message(type=proto.ENROLLED, body={
                    "status": proto.ACCEPTED, "time": time.time(), "id": node_id}))
            log.info("key %s of %r accepted by a person", key["fingerprint"], node_id)
            accepted.append({"id": node_id, "fingerprint": key["fingerprint"]})
        return {"accepted": accepted}

    async def cmd_keys_reject(self, node: str | None = None, fingerprint: str | None = None,
                              all: bool = False) -> dict:
        candidates = self._pick_keys(node, fingerprint, {proto.PENDING, proto.ACCEPTED, proto.DENIED}, all)
        if not all and not fingerprint:
            candidates = [k for k in candidates if k["state"] != proto.ACCEPTED] or candidates
        if not candidates:
            raise ControlError(f"no key to reject for {node or 'any node'}")
        for key in candidates:
            self._forget_key(key["public_key"])
            self.store.set_key_state(key["id"], proto.REJECTED)
            self.key_states[key["public_key"]] = proto.REJECTED
            log.info("key %s of %r rejected", key["fingerprint"], key["node_id"])
        return {"rejected": [{"id": k["node_id"], "fingerprint": k["fingerprint"]} for k in candidates]}

    async def cmd_keys_delete(self, node: str | None = None, fingerprint: str | None = None,
                              all: bool = False) -> dict:
        candidates = self._pick_keys(node, fingerprint, set(proto.KEY_STATES), all)
        if not candidates:
            raise ControlError(f"no key to delete for {node or 'any node'}")
        for key in candidates:
            route = self.routes.get(key["node_id"])
            if route is not None and route[1] == key["public_key"]:
                # Tell a connected agent at once, so it enrolls again (and waits as pending) now
                # rather than after its heartbeats go unanswered.
                self._send(route[0], Message(type=proto.ENROLLED, body={"status": "deleted", "time": time.time(),
                                                                        "id": key["node_id"]}))
            self._forget_key(key["public_key"])
            self.store.delete_key(key["id"])
            if not self.store.keys(key["node_id"]):
                self.store.delete_node(key["node_id"])
            log.info("key %s of %r deleted", key["fingerprint"], key["node_id"])
        return {"deleted": [{"id": k["node_id"], "fingerprint": k["fingerprint"]} for k in candidates]}

    async def cmd_keys_fingerprint(self, node: str | None = None) -> dict:
        if not node:
            return {"master": self.fingerprint}
        keys = self.store.keys(node)
        if not keys:
            raise ControlError(f"no key for {node}")
        return {"keys": [{"id": k["node_id"], "state": k["state"], "fingerprint": k["fingerprint"]} for k in keys]}

    async def cmd_token_create(self, ttl_s: float = 86400, uses: int = 1, address: str | None = None,
                               ids: str | None = None) -> dict:
        ttl_s, uses = float(ttl_s), int(uses)
        if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
            raise ControlError(f"--ttl must be between 1 second and {MAX_TOKEN_TTL_S // 86400} days")
        if not 0 < uses <= 100000:
            raise ControlError("--uses must be between 1 and 100000")
        if ids is not None and (not isinstance(ids, str) or not TOKEN_IDS_RE.fullmatch(ids)):
            raise ControlError("--ids takes one glob on node ids, e.g. 'node*' or 'node0[1-4]' (node ids are "
                               "letters, digits, '.', '_' and '-')")
        if address:
            try:
                host, port = pconfig.parse_address(address, self.port)
            except pconfig.ConfigError as exc:
                raise ControlError(str(exc)) from None
        else:
            host, port = socket.gethostname(), self.port
        master = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        token = secrets.token_urlsafe(24)
        record = self.store.add_token(token, ttl_s, uses, master, ids)
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(record["expires"]))
        bound = f" with ids matching {ids}" if ids else ""
        config = pconfig.render_config(master, self.fingerprint, token, comment=(
            "piagent.conf: put this file on each SD card's boot partition.\n"
            f"The token enrolls up to {uses} node(s){bound} until {stamp}; keep it secret.\n"
            f"Its id is {record['id']} (pimaster token list, pimaster token revoke {record['id']})."))
        log.info("enrollment token %s created: %d use(s)%s, expires %s", record["id"], uses, bound, stamp)
        return {"config": config, "address": master, "token": token, "fingerprint": self.fingerprint,
                "expires": record["expires"], "uses": uses, "id": record["id"], "ids": ids}

    async def cmd_token_list(self) -> dict:
        return {"tokens": self.store.tokens()}

    async def cmd_token_revoke(self, token_id: str) -> dict:
        if not isinstance(token_id, str) or not self.store.revoke_token(token_id):
            raise ControlError(f"no token {str(token_id)[:40]!r} (see `pimaster token list`)")
        log.info("enrollment token %s revoked", token_id)
        return {"revoked": token_id}


STREAMING_COMMANDS = {"apply"}
CONTROL_COMMANDS = {
    "apply": Master.cmd_apply,
    "jobs": Master.cmd_jobs,
    "job": Master.cmd_job,
    "status": Master.cmd_status,
    "ping": Master.cmd_ping,
    "nodes": Master.cmd_nodes,
    "keys.list": Master.cmd_keys_list,
    "keys.accept": Master.cmd_keys_accept,
    "keys.reject": Master.cmd_keys_reject,
    "keys.delete": Master.cmd_keys_delete,
    "keys.fingerprint": Master.cmd_keys_fingerprint,
    "token.create": Master.cmd_token_create,
    "token.list": Master.cmd_token_list,
    "token.revoke": Master.cmd_token_revoke,
}


def serve(state_dir: str, listen_host: str, port: int, key_port: int | None,
          max_pending: int = MAX_PENDING_KEYS) -> int:
    import signal

    import resource

    if not zmq.has("curve"):
        raise SystemExit("pimaster: this libzmq was built without CURVE support")
    # One descriptor per connected agent: a large cluster needs more than the default soft limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def main() -> None:
        master = Master(state_dir, listen_host, port, key_port, max_pending)
        await master.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await master.stop()

    try:
        asyncio.run(main())
    except zmq.ZMQError as exc:
        raise SystemExit(f"pimaster: cannot listen on {listen_host}:{port}: {exc}") from None
    return 0
