"""The agent: connects to the master over CURVE, enrolls, answers requests, reconnects by itself.

One asyncio task per agent. Connection life cycle::

    resolve master name -> fetch the master's public key from the key-announce port
    -> check it against the pinned fingerprint (piagent.conf or `piagent trust`), or with no pin
       against the key seen first (trust on first use, logged as a WARNING) -> CURVE DEALER connect
    -> wait for the handshake -> send `enroll` -> serve requests until the link drops
    -> back off (exponential, jittered, capped at 30 s) -> start over, re-resolving the name.

The backoff is ours, not libzmq's, so that the name is re-resolved and the master key re-checked
on every attempt, and so that several hundred Pis booting together do not reconnect in lock step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import facts as facts_mod
from . import protocol as proto
from . import keys
from . import fileio
from .config import MASTER_KEY_CACHE
from .jobs import JobRunner
from .netchange import NetworkGuard
from .power import PowerAction
from .protocol import Message

log = logging.getLogger("piagent")

BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 30.0
CONNECT_TIMEOUT_S = 5.0
KEY_FETCH_TIMEOUT_S = 3.0
HEARTBEAT_INTERVAL_S = 15.0
PENDING_RETRY_S = 10.0
MISSED_ACKS_BEFORE_RECONNECT = 2

_LINK_LOST = {
    zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_CLOSED: "connection closed",
    zmq.EVENT_CONNECT_RETRIED: "connection refused or unreachable",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed (protocol error; wrong master key?)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the master refused this agent's key (rejected or denied)",
}


_CATALOG_MEMO: dict[str, dict] = {}
_CATALOG_LOCK = asyncio.Lock()


class MasterKeyMismatch(Exception):
    """The master presents a key other than the pinned one: never connect to it."""


class LinkFailed(Exception):
    pass


@dataclass
class AgentSettings:
    node_id: str
    master_host: str
    master_port: int
    state_dir: str
    public_key: bytes
    secret_key: bytes
    fingerprint: str | None = None  # pinned master fingerprint
    token: str | None = None
    fingerprint_source: str | None = None  # what pinned it, for messages: the config's path or `piagent trust`

    @property
    def key_port(self) -> int:
        return self.master_port + 1


def backoff_delay(attempt: int) -> float:
    """Exponential backoff with jitter: 0.25 s, 0.5 s, 1 s ... capped at 30 s, each scaled by 0.5-1."""
    delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2 ** min(attempt, 16)))
    return delay * random.uniform(0.5, 1.0)


class Agent:
    """One agent's connection to its master, for as long as the daemon runs: connect, check the
    master's key against the pin, enroll, answer requests (ping, facts, apply, cancel, reboot), deliver job results
    until acknowledged, heartbeat, reconnect.

    Over 300 lines on purpose: these steps share one socket, one enrollment status and one view of
    the master's clock, and each reacts to the others (a reconnect re-enrolls and re-sends kept
    results); split across classes they would pass that state back and forth. Jobs themselves run in
    ``jobs.JobRunner``, facts in ``facts``, the wire in ``protocol``.
    """

    def __init__(self, settings: AgentSettings, *, context: zmq.asyncio.Context | None = None,
                 facts_source: Callable[[], Awaitable[dict]] = facts_mod.gather_facts,
                 health_source: Callable[[], Awaitable[dict]] = facts_mod.health,
                 logger: logging.Logger | None = None,
                 on_accepted: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.ctx = context or zmq.asyncio.Context.instance()
        self.facts_source = facts_source
        self.health_source = health_source
        self.log = logger or log
        # Called each time the master (again) accepts this agent, e.g. to drop the spent join token.
        self.on_accepted = on_accepted
        self.replay_guard = proto.ReplayGuard()
        self.master_clock = proto.MasterClock()
        self.status = "starting"          # starting, connecting, pending, accepted
        self._token_refused: str | None = None  # why the master refused the join token, if it did
        self.accepted = asyncio.Event()   # set while accepted and connected
        self._stop = asyncio.Event()
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._sent_at: dict[str, float] = {}
        self._unacked = 0
        self._warned_once: set[str] = set()
        self.jobs = JobRunner(settings.state_dir, self._send_if_accepted, self.log)
        self.network = NetworkGuard(settings.state_dir, self.log, self.reconnect)
        self._reconnect = asyncio.Event()
        self._session_started = 0.0       # monotonic, when the current connection was made
        self._catalog: dict | None = None
        self.power = PowerAction(self.log)  # a reboot or poweroff the master asked for

    # ------------------------------------------------------------------ life cycle
    def stop(self) -> None:
        """Asked to stop (SIGTERM, SIGINT): end the running job's command at once, start no other
        state, and leave `run` once the job has recorded what ran (see JobRunner.wind_down)."""
        if not self._stop.is_set():
            self.log.info("stopping%s", ": ending the running job" if self.jobs.running else "")
        self.jobs.stop()
        self._stop.set()

    def reconnect(self) -> None:
        """Drop the connection and connect afresh (after the node's address changed)."""
        self._reconnect.set()

    async def health(self) -> dict:
        body = await self.health_source()
        note = self.network.note()
        if note:
            body["network_rollback"] = note
        return body

    async def run(self) -> None:
        self.jobs.recover_interrupted()
        self.network.at_start()
        attempt = 0
        while not self._stop.is_set():
            established = False
            try:
                address = await self._resolve()
                master_key = await self._fetch_master_key(address)
                self._check_master_key(master_key, address)
                established = await self._session(address, master_key)
            except MasterKeyMismatch as exc:
                # Loud on purpose: this is either an attack or a reinstalled master.
                self.log.critical("REFUSING the master: %s", exc)
                attempt = max(attempt, 8)
            except (LinkFailed, OSError, zmq.ZMQError) as exc:
                self._note_failure(str(exc), attempt)
            self.status = "connecting"
            self.accepted.clear()
            if established:
                attempt = 0
            if self._reconnect.is_set():  # the network setting changed: try again at once
                self._reconnect.clear()
                attempt = 0
            delay = backoff_delay(attempt)
            attempt += 1
            waits = [asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(self._reconnect.wait())]
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
        await self.jobs.wind_down()

    def _note_failure(self, reason: str, attempt: int) -> None:
        level = logging.WARNING if attempt == 0 or reason not in self._warned_once else logging.INFO
        self._warned_once.add(reason)
        self.log.log(level, "cannot reach the master at %s:%d: %s (retrying with backoff)",
                     self.settings.master_host, self.settings.master_port, reason)

    async def _resolve(self) -> str:
        """Resolve the master's name afresh on every attempt (DHCP, mDNS and DNS change)."""
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(
                self.settings.master_host, self.settings.master_port, type=socket.SOCK_STREAM), 10)
        except (socket.gaierror, asyncio.TimeoutError) as exc:
            raise LinkFailed(f"cannot resolve {self.settings.master_host!r}: {exc}") from None
        family, _, _, _, sockaddr = infos[0]
        return f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]

    def _new_socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.maxmsgsize = proto.MAX_MESSAGE_BYTES
        sock.ipv6 = True
        return sock

    async def _fetch_master_key(self, address: str) -> bytes:
        sock = self._new_socket(zmq.DEALER)
        # Plaintext and unauthenticated: whoever answers here gets no more than an enrollment's worth.
        sock.maxmsgsize = proto.MAX_UNAUTHENTICATED_BYTES
        try:
            sock.connect(f"tcp://{address}:{self.settings.key_port}")
            await sock.send(proto.encode(Message(type=proto.MASTER_KEY)))
            if not await sock.poll(KEY_FETCH_TIMEOUT_S * 1000, zmq.POLLIN):
                raise LinkFailed("no answer from the key-announce port")
            frames = await sock.recv_multipart()
        finally:
            sock.close(0)
        try:
            msg = proto.decode(frames[-1], frozenset({proto.MASTER_KEY}), max_bytes=proto.MAX_UNAUTHENTICATED_BYTES)
        except proto.ProtocolError as exc:
            raise LinkFailed(f"malformed key announcement: {exc}") from None
        key = msg.body.get("key")
        if not keys.is_public_key(key):
            raise LinkFailed("key announcement without a valid key")
        return key.encode() if isinstance(key, str) else key

    def _check_master_key(self, key: bytes, address: str | None = None) -> None:
        """Raise MasterKeyMismatch unless ``key`` is the master's: the pinned one, or with no pin the
        one seen first (cached in master.pub; the first time, trusted with a WARNING)."""
        seen = keys.fingerprint(key)
        cache = os.path.join(self.settings.state_dir, MASTER_KEY_CACHE)
        where = f"{self.settings.master_host}:{self.settings.master_port}"
        if address and address.strip("[]") != self.settings.master_host:
            where += f" ({address})"
        try:
            with open(cache, "rb") as fh:
                known = fh.read().strip()
        except FileNotFoundError:
            known = b""
        pinned = self.settings.fingerprint
        if pinned:
            if seen != pinned:
                source = self.settings.fingerprint_source or "its config"
                fix = ("run `piagent trust` with the fingerprint that `pimaster keys fingerprint` prints on it"
                       if source.startswith("`piagent trust`") else
                       f"put the fingerprint that `pimaster keys fingerprint` prints on it into {source}")
                raise MasterKeyMismatch(f"the master at {where} presents key {seen}, but this agent is pinned "
                                        f"to {pinned} by {source}. If the master was reinstalled on purpose, "
                                        f"{fix} and restart the agent")
        elif known and known != key:
            raise MasterKeyMismatch(f"the master's key changed from {keys.fingerprint(known)} (trusted at first "
                                    f"contact) to {seen}, at {where}. If the master was reinstalled on purpose, "
                                    "run `piagent trust` with the fingerprint that `pimaster keys fingerprint` "
                                    "prints on it and restart the agent")
        elif not known:
            self.log.warning("TRUSTING the master at %s on first contact: nothing pins it (no fingerprint in "
                             "piagent.conf, no `piagent trust`), so its key %s is now this agent's master key. "
                             "Whoever answered first at %s now controls this node; pin the master with "
                             "`piagent trust FINGERPRINT` or a fingerprint in piagent.conf (compare with "
                             "`pimaster keys fingerprint` on the master).", where, seen, where)
        if known != key:
            fileio.write_atomic(cache, key + b"\n", 0o644)

    # ------------------------------------------------------------------ one connection
    async def _session(self, address: str, master_key: bytes) -> bool:
        """Run one connection until it drops. Returns True if the handshake succeeded."""
        sock = self._new_socket(zmq.DEALER)
        sock.curve_secretkey = self.settings.secret_key
        sock.curve_publickey = self.settings.public_key
        sock.curve_serverkey = master_key
        # libzmq heartbeats notice a dead link (cut cable, powered-off master) within ~15 s.
        sock.heartbeat_ivl = 5000
        sock.heartbeat_timeout = 15000
        sock.reconnect_ivl = 1000
        monitor = sock.get_monitor_socket()
        established = False
        self._sock = sock
        self._reconnect.clear()
        self._session_started = time.monotonic()
        try:
            sock.connect(f"tcp://{address}:{self.settings.master_port}")
            await self._wait_handshake(monitor)
            established = True
            self.status = "connected"
            self._unacked = 0
            await self._send_enroll()
            await self._serve(sock, monitor)
        finally:
            self._sock = None
            for task in list(self._tasks):
                task.cancel()
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(0)
            # Stopping: what is queued (a job's result) may still leave, for up to 2 s.
            sock.close(2000 if self._stop.is_set() else 0)
        return established

    async def _wait_handshake(self, monitor: zmq.asyncio.Socket) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await monitor.poll(remaining * 1000, zmq.POLLIN):
                raise LinkFailed("no CURVE handshake within "
                                 f"{CONNECT_TIMEOUT_S:.0f} s (wrong port or master key?)")
            event = parse_monitor_message(await monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return
            if event in _LINK_LOST:
                raise LinkFailed(_LINK_LOST[event])

    async def _serve(self, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        stop_wait = asyncio.ensure_future(self._stop.wait())
        reconnect_wait = asyncio.ensure_future(self._reconnect.wait())
        next_beat = time.monotonic() + self._beat_interval()
        try:
            while not self._stop.is_set():
                timeout_ms = max(0.0, next_beat - time.monotonic()) * 1000
                polling = asyncio.ensure_future(poller.poll(timeout_ms))
                await asyncio.wait({polling, stop_wait, reconnect_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not polling.done():  # asked to stop, or to reconnect
                    polling.cancel()
                    if reconnect_wait.done():
                        self.log.info("reconnecting to the master (the network setting changed)")
                    elif self.jobs.running:
                        # Stopped mid-job: the job records what ran (bounded) and its result goes
                        # out on this connection, so the master hears it now, not at the next start.
                        await self.jobs.wind_down()
                    return
                events = dict(polling.result())
                if monitor in events:
                    event = parse_monitor_message(await monitor.recv_multipart())["event"]
                    if event in _LINK_LOST:
                        self.log.warning("lost the master: %s", _LINK_LOST[event])
                        return
                if sock in events:
                    for _ in range(100):  # drain what is queued, then look at the monitor again
                        try:
                            frames = await sock.recv_multipart(flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frame(frames[-1])
                if time.monotonic() >= next_beat:
                    if self._unacked >= MISSED_ACKS_BEFORE_RECONNECT:
                        self.log.warning("the master stopped answering heartbeats; reconnecting")
                        return
                    await self._beat()
                    next_beat = time.monotonic() + self._beat_interval()
        finally:
            stop_wait.cancel()
            reconnect_wait.cancel()

    def _beat_interval(self) -> float:
        return HEARTBEAT_INTERVAL_S if self.status == "accepted" else PENDING_RETRY_S

    async def _beat(self) -> None:
        if self.status == "accepted":
            msg = Message(type=proto.HEARTBEAT)
            self._unacked += 1
            await self._send(msg)
        else:
            await self._send_enroll()

    async def _send(self, msg: Message) -> None:
        sock = self._sock
        if sock is None:
            return
        self._sent_at = {k: v for k, v in self._sent_at.items() if time.monotonic() - v < 60}
        self._sent_at[msg.id] = time.monotonic()
        try:
            # Never block: with the link down a DEALER send would wait for a peer forever.
            await sock.send(proto.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            self.log.warning("could not send %s: no link to the master", msg.type)

    async def _send_if_accepted(self, msg: Message) -> bool:
        if self._sock is None or self.status != "accepted":
            return False
        await self._send(msg)
        return True

    async def catalog(self) -> dict:
        """This agent's state functions and their arguments, for the master's validation.

        Computed in a child process and cached in the state dir (keyed by the modules' version and
        mtimes), so that the idle agent never imports the state modules themselves.
        """
        if self._catalog is not None:
            return self._catalog
        from .states import catalog_signature

        signature = catalog_signature()
        async with _CATALOG_LOCK:  # many agents in one process (bench swarm) compute it once
            if signature in _CATALOG_MEMO:
                self._catalog = _CATALOG_MEMO[signature]
                return self._catalog
            self._catalog = await self._load_catalog(signature)
            _CATALOG_MEMO[signature] = self._catalog
            return self._catalog

    async def _load_catalog(self, signature: str) -> dict:
        import json

        cache = os.path.join(self.settings.state_dir, "catalog.json")
        try:
            with open(cache) as fh:
                cached = json.load(fh)
            if cached.get("signature") == signature:
                return cached["catalog"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "piagent.states",
                                                    stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        try:
            catalog = json.loads(out)
        except ValueError:
            self.log.error("could not list this agent's state functions (python3 -m piagent.states failed)")
            return {}
        fileio.write_atomic(cache, json.dumps({"signature": signature, "catalog": catalog}).encode(), 0o644)
        return catalog

    async def _send_enroll(self) -> None:
        try:
            facts = await self.facts_source()
        except Exception:  # facts are best effort: never let one broken reader stop enrollment
            self.log.exception("gathering facts failed")
            facts = {}
        body = {"id": self.settings.node_id, "facts": facts, "catalog": await self.catalog()}
        if self.settings.token and self.status != "accepted":
            body["token"] = self.settings.token
        await self._send(Message(type=proto.ENROLL, body=body))

    # ------------------------------------------------------------------ messages from the master
    def _on_frame(self, frame: bytes) -> None:
        try:
            msg = proto.decode(frame, proto.MASTER_TO_AGENT)
        except proto.ProtocolError as exc:
            self.log.warning("dropped a malformed message from the master: %s", exc)
            return
        if msg.type in (proto.ENROLLED, proto.HEARTBEAT_ACK):
            self._on_status(msg)
            return
        if msg.type == proto.JOB_RESULT_ACK:
            self.jobs.acknowledged(msg.body.get("job"))
            self.network.maybe_activate(self.jobs.has_pending())
            return
        if self.status != "accepted":
            self.log.warning("dropped a %s request: not accepted yet", msg.type)
            return
        refusal = self.replay_guard.check(msg, self.master_clock.now())
        if refusal:
            self.log.warning("refused %s request %s: %s", msg.type, msg.id[:12], refusal)
            self._spawn(self._send(proto.reply(msg, proto.REFUSED, {"reason": refusal})))
            return
        self._spawn(self._handle_request(msg))

    def _on_status(self, msg: Message) -> None:
        master_time = msg.body.get("time")
        sent = self._sent_at.pop(msg.reply_to or "", None)
        # Only a real clock reading: NaN or infinity would make every request look fresh or expired.
        if proto.is_number(master_time) and math.isfinite(master_time) and sent is not None:
            self.master_clock.update(float(master_time), time.monotonic() - sent)
        if msg.type == proto.HEARTBEAT_ACK:
            self._unacked = 0
            return
        status = msg.body.get("status")
        if status == proto.ACCEPTED:
            newly_accepted = self.status != "accepted"
            if newly_accepted:
                self.log.info("enrolled: the master accepted this agent as %r", self.settings.node_id)
            self.status = "accepted"
            self._unacked = 0
            self.accepted.set()
            self.network.on_accepted(self._session_started)
            if newly_accepted:
                self.network.maybe_activate(self.jobs.has_pending())
                # Results that could not be delivered before (link lost, master restarted).
                asyncio.ensure_future(self.jobs.deliver_pending())
            if newly_accepted and self.on_accepted is not None:
                try:
                    self.on_accepted()
                except Exception:  # a hook's failure must not cost the agent its session
                    self.log.exception("the on-accepted hook failed")
        elif status == "deleted":
            self.log.warning("the master deleted this agent's key; enrolling again")
            self.status = "connecting"
            self.accepted.clear()
            self._spawn(self._send_enroll())
        elif status == proto.PENDING:
            refused = msg.body.get("token_refused")
            refused = refused[:200] if isinstance(refused, str) else None
            if self.status != "pending" or refused != self._token_refused:
                self.log.warning("waiting for a person to accept this agent's key on the master "
                                 "(pimaster keys accept %s)%s; this agent's fingerprint is %s",
                                 self.settings.node_id,
                                 f": the master refused the join token ({refused})" if refused else "",
                                 keys.fingerprint(self.settings.public_key))
            self._token_refused = refused
            self.status = "pending"
            self.accepted.clear()

    def _spawn(self, coro: Awaitable) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle_request(self, msg: Message) -> None:
        try:
            if msg.type == proto.PING:
                body = await self.health()
            elif msg.type == proto.FACTS:
                body = await self.facts_source()
            elif msg.type == proto.APPLY:
                body = self.jobs.accept(msg.body)
            elif msg.type == proto.CANCEL:
                body = self.jobs.cancel(msg.body)
            elif msg.type == proto.REBOOT:
                body = self.power.accept(msg.body, self.jobs.running_job)
            else:  # decode() only lets request types through that are listed above
                body = {}
            await self._send(proto.reply(msg, proto.RESULT, body))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.exception("request %s failed", msg.type)
            await self._send(proto.reply(msg, proto.RESULT, {"error": f"{type(exc).__name__}: {exc}"}))
