"""What happens in the master, as events: keys pending and accepted, nodes up and down, jobs started
and finished, network rollbacks, reboot progress. `pimaster events` streams them (one JSON object a
line with --json).

Rooms publish with ``master.events.publish(TYPE, node=NODE, **fields)`` (the roster, enrollment,
the job board; `pimaster reboot` for its progress). The bus bounds what it passes on, whoever sent
it: strings one line (no control characters) and at most 300 characters, numbers finite, lists at
most 64 items, objects 32 keys, two levels deep; ``node`` a node id (piagent's syntax) or left out.
Publishing never raises: an event that cannot be made is logged and dropped, never a failed enrollment.

Each subscriber (one per `pimaster events`) has a queue of at most QUEUE_LIMIT events. One that
reads slower than events come loses the events that do not fit, and is told how many (a ``lost``
event, before the next one it gets): a subscriber never costs the master unbounded memory. At most
MAX_SUBSCRIBERS streams at a time.

The shape (a contract: scripts read these names)::

    {"time": 1764658436.5, "type": TYPE, "node": NODE, ...}

``time`` is the master's clock (seconds since the epoch) when it happened; ``node`` is absent for
events of no one node. The types and their fields:

- ``subscribed``: the first event of every stream; what follows is live. ``subscribers``: streams open now.
- ``key``: ``node``, ``fingerprint``, ``state``: ``pending`` (a new key waits for a person;
  ``address`` it enrolled from), ``denied`` (a new key claims the id of another accepted key),
  ``accepted`` (``by``: ``token`` or ``person``), ``rejected``, ``deleted``, ``replaced`` (the node's
  old key, when `keys accept --replace` accepted a new one).
- ``node``: ``node``, ``state``: ``up`` or ``down``, ``reason``: for up ``connected`` (its agent
  connected and enrolled), ``reconnected`` (on a new connection while the old one still counted),
  ``accepted`` (its waiting agent's key was just accepted); for down ``disconnected`` (its connection
  closed: the agent stopped, the node went down, or libzmq's heartbeats gave up on the link),
  ``heartbeat_timeout`` (nothing heard from it for 35 s), ``key_deleted``, ``key_rejected``,
  ``key_replaced``. ``address``: where it connected from (up, when known). A node's up/down
  events are bounded (10 at once, then one every 6 s: an agent reconnecting in a loop must not
  drown the others' events); past that its latest state comes when it may, with ``suppressed``:
  how many up/down changes were not told in between.
- ``job``: ``job`` (its id), ``state``: ``started`` (``file``: the state file's name, ``target``,
  ``test``, ``nodes``: the targeted node ids, at most 64, ``node_count``: all of them; ``reason``:
  why the master started it by itself, e.g. ``enrolled node05``, absent for a person's) or
  ``finished``, one per node as its result is recorded (``node``, ``status``: done, interrupted,
  no_answer, not_sent (held back by --fail-stop or a cancel); ``result``: the word `pimaster
  apply` shows: ok, changed, failed, interrupted, no answer, not sent; ``summary``: the counts of
  its states).
- ``network_rollback``: ``node`` undid a network change that cut it off (its health said so; the
  master learns it when it asks for health, as `pimaster ping` does, and publishes each note once):
  ``reason``, ``changes`` [{``interface``, ``address``}], ``noted`` (the agent's time of it).
- ``reboot``: the progress of `pimaster reboot` and `pimaster shutdown` (`pimaster.reboots`), which
  goes on when the command's client goes. Every one has ``action`` (``reboot`` or ``poweroff``) and
  ``state``: ``started`` (``order``: the node ids in the order acted on, at most 64, the master's own
  node last; ``node_count``: all of them; ``master_node``: that node or null; ``batches``: how many,
  reboot only), ``batch`` (reboot only: ``index`` from 1, ``of``, ``nodes``), ``skipped`` (``node``,
  ``reason``), then per ``node``: ``rebooting`` or ``powering_off`` (it took the request), ``down``
  (``after_s``: from the request's answer to when the master saw its connection go or its ping
  fail), ``back`` (``after_s``, ``boot_id``, ``boot_init``, ``boot``: its new boot), ``off``
  (``after_s``), ``failed``, ``not_back``, ``still_up``, ``not_started`` (each with ``error``: a
  failure's may be its agent's words); and last ``finished`` (``ok``, ``elapsed_s``, ``summary``:
  nodes per state, ``skipped``: how many) or ``stopped`` (``reason``, ``elapsed_s``,
  ``not_started``: the node ids the roll did not reach).
- ``health``: what the health collector (`pimaster.healthwatch`, every health interval) saw change
  in ``node``'s health, ``state``: ``not_answering`` (``error``: not connected, no answer in time,
  refused), ``answering`` again (``rtt_ms``); from the firmware's throttled word (what `vcgencmd
  get_throttled` says), each with ``throttled`` (the word, hex), ``flags`` (its set bits by name:
  ``under-voltage``, ``arm-frequency-capped``, ``throttled``, ``soft-temperature-limit`` and the
  ``*-occurred`` ones, sticky since the node's boot: the names `ping` shows) and ``temp_c`` (or null): ``throttling_began`` /
  ``throttling_ended`` (any of frequency capped, throttled, soft temperature limit, now),
  ``throttling_occurred`` (it throttled between two samples: a sticky bit rose, no current one
  set), ``under_voltage_began`` / ``under_voltage_ended``, ``under_voltage_occurred`` (a dip
  between two samples). The first sample a master takes of a node tells what is on now, not the
  sticky bits of before. Bounded per node as the ``node`` events are (its own allowance:
  FLAP_BURST, then one every FLAP_EVERY_S, the latest with ``suppressed``).
- ``lost``: ``count`` events this stream did not get because it read too slowly.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import re
import time

from piagent.config import NODE_ID_RE

from .errors import ControlError

log = logging.getLogger("pimaster")

# Events one subscriber may have waiting; past that, new ones are counted as lost for it.
QUEUE_LIMIT = 1000
# `pimaster events` streams at a time.
MAX_SUBSCRIBERS = 32
# The bounds of every event field (whoever published it).
MAX_TEXT = 300
MAX_ITEMS = 64
MAX_KEYS = 32
MAX_DEPTH = 2
# Nodes whose last network rollback note is remembered (so that each is published once).
MAX_NOTES = 4096
# Up/down events of one node: FLAP_BURST at once, then one every FLAP_EVERY_S (`Flaps`).
FLAP_BURST = 10
FLAP_EVERY_S = 6.0

TYPES = ("subscribed", "key", "node", "job", "network_rollback", "reboot", "health", "lost")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
FIELD_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


def bounded(value, depth: int = 0):
    """``value`` as an event may carry it: one-line strings of at most MAX_TEXT characters, finite
    numbers, booleans, None, and lists and objects of those (bounded in length and depth);
    anything else as its (bounded) text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2 ** 63 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple, set, frozenset)) and depth < MAX_DEPTH:
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [bounded(v, depth + 1) for v in list(items)[:MAX_ITEMS]]
    if isinstance(value, dict) and depth < MAX_DEPTH:
        return {one_line(k, 64): bounded(v, depth + 1) for k, v in list(value.items())[:MAX_KEYS]}
    return one_line(value)


def one_line(value, limit: int = MAX_TEXT) -> str:
    return CONTROL_RE.sub("?", str(value)[:limit])


class Subscription:
    """One stream's queue: at most QUEUE_LIMIT events; those that do not fit are counted, and a
    ``lost`` event with their count takes their place in the stream (after the events before them,
    before those after them)."""

    def __init__(self, limit: int = QUEUE_LIMIT) -> None:
        self.limit = limit
        self.queue: collections.deque = collections.deque()
        self.lost = 0
        self.closed = False
        self.ready = asyncio.Event()

    def put(self, event: dict) -> None:
        if len(self.queue) >= self.limit:
            self.lost += 1
            return
        if self.lost:  # room again: the count of those lost goes first (one over the limit at most)
            self.queue.append(self._lost())
        self.queue.append(event)
        self.ready.set()

    def _lost(self) -> dict:
        lost, self.lost = self.lost, 0
        return {"time": time.time(), "type": "lost", "count": lost}

    def close(self) -> None:
        self.closed = True
        self.ready.set()

    async def next(self) -> dict | None:
        """The next event (a ``lost`` one first if events were lost), or None once the bus closed."""
        while True:
            if self.queue:
                return self.queue.popleft()
            if self.lost:
                return self._lost()
            if self.closed:
                return None
            self.ready.clear()
            await self.ready.wait()


class Flaps:
    """Each node's up/down events, bounded: an agent (root on its Pi) that reconnects in a loop
    must not drown the other nodes' events. A node may have FLAP_BURST of them at once and one
    each FLAP_EVERY_S after; those past that are not passed on, and once the node may have one
    again its latest state is, with ``suppressed``: how many up/down changes were not told."""

    def __init__(self) -> None:
        self.nodes: collections.OrderedDict[str, list] = collections.OrderedDict()  # node -> [tokens, at, held, latest, timer]

    def allows(self, node: str, event: dict, deliver) -> bool:
        now = time.monotonic()
        state = self.nodes.get(node)
        if state is None:
            if len(self.nodes) >= MAX_NOTES:
                _node, oldest = self.nodes.popitem(last=False)
                if oldest[4] is not None:
                    oldest[4].cancel()
            state = self.nodes[node] = [float(FLAP_BURST), now, 0, None, None]
        tokens = min(FLAP_BURST, state[0] + (now - state[1]) / FLAP_EVERY_S)
        state[1] = now
        if tokens >= 1 and state[4] is None:
            state[0] = tokens - 1
            if state[2]:
                event["suppressed"], state[2] = state[2], 0
            return True
        state[0] = tokens
        state[2] += 1
        state[3] = event
        if state[4] is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return False
            state[4] = loop.call_later((1 - tokens) * FLAP_EVERY_S, self._release, node, deliver)
        return False

    def _release(self, node: str, deliver) -> None:
        """The node may have an event again: its latest state, and how many changes were held."""
        state = self.nodes.get(node)
        if state is None or state[3] is None:
            return
        event, state[3], state[4] = state[3], None, None
        state[0], state[1] = max(0.0, state[0] + (time.monotonic() - state[1]) / FLAP_EVERY_S - 1), time.monotonic()
        event = dict(event, time=time.time(), suppressed=state[2] - 1)
        state[2] = 0
        deliver(event)


class EventBus:
    def __init__(self, queue_limit: int = QUEUE_LIMIT, max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        self.queue_limit = queue_limit
        self.max_subscribers = max_subscribers
        self.subscribers: set[Subscription] = set()
        self.published = 0
        self._notes: dict[str, tuple] = {}  # node -> its last network rollback note (time, reason)
        self._flaps = Flaps()
        # Rooms of the master that act on events (`autoapply`): called with every event as it is
        # published, before any subscriber's bound; they must not block (they schedule work).
        self.listeners: list = []
        self._health_flaps = Flaps()  # a node's health changes have their own allowance

    def publish(self, type_: str, node: str | None = None, **fields) -> None:
        """Passes ``{"time", "type", "node", **fields}`` (bounded) to every subscriber. ``node``
        must be a node id; an event naming something else is dropped (and logged)."""
        try:
            if type_ not in TYPES:
                raise ValueError(f"unknown event type {type_!r}")
            if not self.subscribers and not self.listeners:
                return  # nobody listens: nothing to build
            event = {"time": time.time(), "type": type_}
            if node is not None:
                if not isinstance(node, str) or not NODE_ID_RE.fullmatch(node):
                    raise ValueError(f"not a node id: {one_line(node, 70)!r}")
                event["node"] = node
            for name, value in list(fields.items())[:MAX_KEYS]:
                if not FIELD_NAME_RE.fullmatch(name) or name in event:
                    raise ValueError(f"field name {one_line(name, 40)!r}")
                event[name] = bounded(value)
        except Exception as exc:  # an event must never fail what it reports
            log.error("event %r not published: %s", one_line(type_, 40), exc)
            return
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not fail what the event reports
                log.exception("an event listener failed on a %s event", type_)
        flaps = self._flaps if type_ == "node" else self._health_flaps if type_ == "health" else None
        if flaps is not None and node is not None and not flaps.allows(node, event, self._deliver):
            return
        self._deliver(event)

    def _deliver(self, event: dict) -> None:
        self.published += 1
        for subscription in list(self.subscribers):
            subscription.put(event)

    def subscribe(self) -> Subscription:
        """A new stream's subscription (ControlError when MAX_SUBSCRIBERS are open); its first
        event is ``subscribed``."""
        if len(self.subscribers) >= self.max_subscribers:
            raise ControlError(f"too many event streams ({self.max_subscribers} `pimaster events` are open); "
                               "stop one first")
        subscription = Subscription(self.queue_limit)
        self.subscribers.add(subscription)
        subscription.put({"time": time.time(), "type": "subscribed", "subscribers": len(self.subscribers)})
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self.subscribers.discard(subscription)
        subscription.close()

    def close(self) -> None:
        """The master stops: every stream ends after the events it has waiting."""
        for subscription in list(self.subscribers):
            subscription.close()
        self.subscribers.clear()

    def network_rollback(self, node: str, note: dict) -> None:
        """A node's health carried ``note`` (`rpc.rollback_note`, checked and bounded): published
        the first time the master sees it, not at every `ping`."""
        if not isinstance(note, dict):
            return
        seen = (note.get("time"), note.get("reason"))
        if self._notes.get(node) == seen:
            return
        if len(self._notes) >= MAX_NOTES:
            self._notes.clear()  # bounded; at worst a note is published once more
        self._notes[node] = seen
        self.publish("network_rollback", node=node, reason=note.get("reason"), changes=note.get("changes") or [],
                     noted=note.get("time"))
