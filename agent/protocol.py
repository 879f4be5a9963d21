"""The pimaster wire protocol: one small, versioned envelope, shared by master and agent.

Every message on the wire is one ZeroMQ frame holding a msgpack map::

    {"v": 1, "type": "ping", "id": "9f2c…", "ts": 1764085000.12, "exp": 1764085005.12,
     "reply_to": None, "body": {...}}

- ``v``: protocol version. A peer refuses a version it does not speak.
- ``type``: the message type. Each side decodes against an explicit allow-list of types.
- ``id``: random request id (hex). The agent refuses an id it has already seen (replay).
- ``ts`` / ``exp``: sender's wall clock at sending, and the time after which a request must not
  run. The agent judges ``exp`` against its estimate of the master's clock, so a Pi without a
  clock battery is not locked out by its own wrong time.
- ``reply_to``: the request id a reply answers.
- ``body``: a map whose fields depend on ``type``.

Keys and fingerprints live in ``keys.py``; the piagent.conf format (node ids, master addresses)
in ``config.py``.

Transport: CURVE on the control port (default 4510) and a plaintext "key announce" endpoint on
the port after it (4511) that returns only the master's public key, so an agent can check it
against the fingerprint it was given before any key exchange.

The master may import this module; this module and the rest of the agent never import the master.
Only the standard library, pyzmq and msgpack are used here (bookworm: pyzmq 24, msgpack 1.0.3).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

VERSION = 1
DEFAULT_PORT = 4510
# Large enough for a state file with a few big files in it, small enough that a hostile peer
# cannot make a Pi Zero allocate its whole memory for one frame.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# What the master decodes from a key it has not accepted (an enrollment is a few KiB): anyone on
# the LAN can send these, so each costs the master at most this much before it is refused.
MAX_UNAUTHENTICATED_BYTES = 64 * 1024
# What the master takes from an accepted agent in one message (a job's results are the largest:
# the agent sends them without their changes when they would not fit). A frame of short strings
# unpacks to ~20 times its size, so this, not MAX_MESSAGE_BYTES, bounds what a compromised Pi can
# make the master allocate per message.
MAX_AGENT_MESSAGE_BYTES = 4 * 1024 * 1024
# Bounds on what one frame may unpack into, enforced by msgpack while it unpacks. A byte of
# msgpack can be a whole empty map (~64 bytes of Python objects, plus a pointer in its parent),
# so the frame size alone does not bound memory: 16 MiB of empty maps would be ~1.1 GB.
MAX_CONTAINER_LEN = 16384     # elements of one array, entries of one map (a header claiming
                              # that many makes msgpack reserve room at once, even in a tiny frame)
MAX_CONTAINERS = 200_000      # arrays and maps in one message, all levels together
MAX_ID_LENGTH = 64
# A request may not claim to stay valid for longer than this: it bounds the replay cache.
MAX_REQUEST_TTL_S = 24 * 3600

# Message types, by direction.
ENROLL = "enroll"                # agent -> master: "I am node X" (+ token, facts). Allowed from unknown keys.
HEARTBEAT = "heartbeat"          # agent -> master: liveness, carries nothing
RESULT = "result"                # agent -> master: answer to a request (reply_to set)
REFUSED = "refused"              # agent -> master: a request was refused (replay, expired, unknown)
ENROLLED = "enrolled"            # master -> agent: enrollment status (accepted/pending)
HEARTBEAT_ACK = "heartbeat_ack"  # master -> agent: carries the master's clock
PING = "ping"                    # master -> agent request: health
FACTS = "facts"                  # master -> agent request: facts
APPLY = "apply"                  # master -> agent request: run a job's states (acknowledged at once)
CANCEL = "cancel"                # master -> agent request: stop a job (its commands ended, no further state);
                                 # an agent older than this type drops it as unknown, and does not answer
REBOOT = "reboot"                # master -> agent request: {"action": "reboot"|"poweroff", "delay_s": N}; the
                                 # agent answers, then reboots or powers off after the delay. Added without a
                                 # new version (as CANCEL): an older agent drops it unanswered, which the
                                 # master reports as "upgrade piagent"
JOB_PROGRESS = "job_progress"    # agent -> master: one state of a job finished
JOB_RESULT = "job_result"        # agent -> master: a job's results (kept on disk until acknowledged)
JOB_RESULT_ACK = "job_result_ack"  # master -> agent: the result is recorded; the agent may forget it
MASTER_KEY = "master_key"        # key announce endpoint -> agent

AGENT_TO_MASTER = frozenset({ENROLL, HEARTBEAT, RESULT, REFUSED, JOB_PROGRESS, JOB_RESULT})
# What a key that the master has not accepted may send: enrollment and nothing else.
UNAUTHENTICATED_ALLOWED = frozenset({ENROLL})
REQUEST_TYPES = frozenset({PING, FACTS, APPLY, CANCEL, REBOOT})
MASTER_TO_AGENT = frozenset({ENROLLED, HEARTBEAT_ACK, JOB_RESULT_ACK}) | REQUEST_TYPES

# The `reboot` request's actions, and the bounds of its delay (the answer must leave first; a
# request may not park a reboot for long).
REBOOT_ACTIONS = ("reboot", "poweroff")
MAX_REBOOT_DELAY_S = 60.0

# Key states on the master.
PENDING, ACCEPTED, REJECTED, DENIED = "pending", "accepted", "rejected", "denied"
KEY_STATES = (PENDING, ACCEPTED, REJECTED, DENIED)


class ProtocolError(ValueError):
    """A frame that is not a valid message: the receiver drops it and logs the reason."""


@dataclass
class Message:
    type: str
    body: dict = field(default_factory=dict)
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    ts: float = field(default_factory=time.time)
    exp: float | None = None
    reply_to: str | None = None
    v: int = VERSION


def request(type_: str, body: dict | None = None, ttl_s: float = 30.0) -> Message:
    """A master -> agent request that expires ``ttl_s`` seconds from now."""
    now = time.time()
    return Message(type=type_, body=body or {}, ts=now, exp=now + ttl_s)


def reply(to: Message, type_: str = RESULT, body: dict | None = None) -> Message:
    return Message(type=type_, body=body or {}, reply_to=to.id)


def encode(msg: Message) -> bytes:
    data = msgpack.packb(
        {"v": msg.v, "type": msg.type, "id": msg.id, "ts": msg.ts, "exp": msg.exp,
         "reply_to": msg.reply_to, "body": msg.body},
        use_bin_type=True,
    )
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    return data


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def _container_budget(limit: int):
    """A msgpack object_hook/list_hook that refuses the message at its ``limit``+1-th container.

    msgpack calls the hook as each array or map is completed, innermost first, so at any moment
    at most the containers still open (msgpack nests at most 1024 deep) have not been counted.
    """
    left = limit

    def spend(container):
        nonlocal left
        left -= 1
        if left < 0:
            raise ProtocolError(f"more than {limit} arrays and maps in one message")
        return container

    return spend


def decode(data: bytes, allowed: frozenset[str], *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode one frame. Raises ProtocolError (never anything else) for any malformed input.

    ``max_bytes``: a larger frame is refused before anything is unpacked (for keys it has not
    accepted, the master is to pass MAX_UNAUTHENTICATED_BYTES). Within it, no string or binary may be
    longer, no array or map have more than MAX_CONTAINER_LEN entries, and the message may hold
    no more than MAX_CONTAINERS arrays and maps; msgpack extension types (timestamps included) are
    refused.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("frame is not bytes")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise ProtocolError(f"frame of {size} bytes exceeds the {max_bytes}-byte limit")
    budget = _container_budget(MAX_CONTAINERS)
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext, max_ext_len=0,
                              max_bin_len=max_bytes, max_str_len=max_bytes,
                              max_array_len=MAX_CONTAINER_LEN, max_map_len=MAX_CONTAINER_LEN,
                              object_hook=budget, list_hook=budget)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types (ExtraData, ValueError, StackError, MemoryError, ...)
        raise ProtocolError(f"not a msgpack message: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("envelope is not a map")
    version = raw.get("v")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {_brief(version)} (this side speaks {VERSION})")
    type_ = raw.get("type")
    if not isinstance(type_, str) or type_ not in allowed:
        raise ProtocolError(f"message type {_brief(type_)} is not accepted here")
    msg_id = raw.get("id")
    if not isinstance(msg_id, str) or not 0 < len(msg_id) <= MAX_ID_LENGTH:
        raise ProtocolError("missing or malformed message id")
    ts = raw.get("ts")
    if not is_number(ts):
        raise ProtocolError("missing or malformed timestamp")
    exp = raw.get("exp")
    if exp is not None and not is_number(exp):
        raise ProtocolError("malformed expiry")
    reply_to = raw.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str) or len(reply_to) > MAX_ID_LENGTH):
        raise ProtocolError("malformed reply_to")
    body = raw.get("body")
    if not isinstance(body, dict):
        raise ProtocolError("body is not a map")
    if type_ in REQUEST_TYPES and exp is None:
        raise ProtocolError("a request must carry an expiry")
    return Message(type=type_, body=body, id=msg_id, ts=float(ts),
                   exp=None if exp is None else float(exp), reply_to=reply_to, v=version)


def _brief(value: Any) -> str:
    """A peer's value for a log line: a short repr, whatever its size (a str may be 16 MiB long)."""
    if isinstance(value, (str, bytes)):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return f"<{type(value).__name__}>"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


class ReplayGuard:
    """Refuses requests seen before or past their expiry.

    Expiry is judged against the master's clock as the agent estimates it (see MasterClock), so
    the cache can drop every id whose request has expired: a replay of it is refused as expired.
    """

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._next_prune = 0.0

    def check(self, msg: Message, master_now: float) -> str | None:
        """Return None if the request may run, else the reason it is refused."""
        if msg.exp is None:
            return "request without expiry"
        if msg.exp < master_now:
            return "expired"
        if msg.exp > master_now + MAX_REQUEST_TTL_S:
            return "expiry too far in the future"
        if msg.id in self._seen:
            return "replay"
        self._seen[msg.id] = msg.exp
        if master_now >= self._next_prune:
            self._seen = {k: e for k, e in self._seen.items() if e >= master_now}
            self._next_prune = master_now + 60
        return None


class MasterClock:
    """The agent's estimate of the master's wall clock, anchored on the monotonic clock.

    Anchored from each reply that carries the master's time, so a local clock that jumps
    (NTP sync at boot on a Pi without RTC) does not change the estimate.
    """

    def __init__(self) -> None:
        self._master_time: float | None = None
        self._anchor = 0.0

    def update(self, master_time: float, rtt_s: float = 0.0) -> None:
        self._master_time = master_time + rtt_s / 2
        self._anchor = time.monotonic()

    def now(self) -> float:
        if self._master_time is None:
            return time.time()
        return self._master_time + (time.monotonic() - self._anchor)
