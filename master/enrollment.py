"""Enrollment and key policy: who an agent is, whether its key may act, and what a person's
`keys accept/reject/delete` does. No sockets here: replies go out through a ``send`` callable and
dropped messages through a ``drops`` log, so the policy is testable without ZeroMQ
(tests/test_enrollment.py).

- ``Roster``: who is who, in memory (key states, the node of each accepted key, each node's
  current connection, last contact). Rebuilt from the store at start; the store stays the truth.
  Its ``connected`` is the one answer to "is this agent connected now" for every command, and it
  publishes each change of that answer (``node`` up/down events, `pimaster.events`).
- ``Enrollment``: the decision on an `enroll` message (tokens, pending cap, denied keys, the
  identity recorded at accept) and the accept/reject/delete/replace policy over the store.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Collection

from piagent import config as pconfig
from piagent import keys as pkeys
from piagent import protocol as proto
from piagent.protocol import Message

from .errors import ControlError
from .events import EventBus
from .facts import check_catalog, check_facts
from .store import Store, identity_of
from .targets import compile_target

log = logging.getLogger("pimaster")

# Keys waiting for a person: beyond this many, new keys are not even stored (an enrollment flood).
MAX_PENDING_KEYS = 256
# An accepted agent sends a heartbeat every 15 s (piagent's HEARTBEAT_INTERVAL_S), a waiting one
# its enrollment every 10 s. Heard from for none of two heartbeats and a margin, its connection
# counts as gone even if no close was seen: a backstop, as libzmq's own heartbeats (the router's
# heartbeat_timeout) close a dead connection within 15 s and the master sees that close at once.
SILENT_LINK_S = 2 * 15.0 + 5.0


def _address(address: str | None) -> dict:
    """The ``address`` field of an event, when there is one to tell."""
    return {"address": address} if address and address != "?" else {}


@dataclass
class Link:
    """The connection a key spoke on last: its routing id, its descriptor and peer (to tell its
    close from that of a newer connection given the same descriptor), when it was last heard."""
    ident: bytes
    fd: int | None
    peer: tuple | None
    heard: float  # monotonic


class Roster:
    """Who is who right now: key states, accepted keys' nodes, connections, last contact.

    ``routes`` (how requests reach a node) and ``pending_routes`` hold only live connections:
    a route goes when its connection closes (``connection_closed``, from the transport's monitor)
    or is silent past SILENT_LINK_S (``drop_silent``), and comes back with the agent's next
    message. ``connected``, ``connected_nodes`` and ``key_connected`` read them, for every command.
    A node's route comes (``route``) and goes (``_unroute``) in one place each, which publish the
    ``node`` events (up/down, with the reason) on ``events``.
    """

    def __init__(self, events: EventBus | None = None) -> None:
        self.events = events if events is not None else EventBus()
        self.key_states: dict[str, str] = {}            # public key -> state
        self.node_of_key: dict[str, str] = {}           # accepted public key -> node id
        self.routes: dict[str, tuple[bytes, str]] = {}  # node id -> (routing id, public key)
        self.pending_routes: dict[str, bytes] = {}      # pending or denied public key -> routing id
        self.last_seen: dict[str, float] = {}
        self.dirty_seen: dict[str, float] = {}          # last contacts not yet written to the store
        self.links: dict[str, Link] = {}                # stored public key -> the connection it spoke on last
        self.key_on_fd: dict[int, str] = {}             # descriptor -> the key whose last connection it is

    def load(self, store: Store) -> None:
        for key in store.keys():
            self.key_states[key["public_key"]] = key["state"]
            if key["state"] == proto.ACCEPTED:
                self.node_of_key[key["public_key"]] = key["node_id"]
        for node in store.nodes():
            if node["last_seen"]:
                self.last_seen[node["node_id"]] = node["last_seen"]

    def seen(self, node_id: str) -> None:
        now = time.time()
        self.last_seen[node_id] = now
        self.dirty_seen[node_id] = now

    def take_dirty_seen(self) -> dict[str, float]:
        seen, self.dirty_seen = self.dirty_seen, {}
        return seen

    def forget_key(self, key: str, reason: str = "key_deleted") -> None:
        """``key`` is no longer stored as it was (deleted, rejected, replaced: ``reason``)."""
        self._drop_link(key, reason)
        node_id = self.node_of_key.get(key)
        if node_id:
            self._unroute(node_id, key, reason)
        self.key_states.pop(key, None)
        self.node_of_key.pop(key, None)
        self.pending_routes.pop(key, None)

    # ------------------------------------------------------------------ routes (connected nodes)
    def route(self, node_id: str, ident: bytes, key: str, reason: str = "connected",
              address: str | None = None) -> None:
        """Requests to ``node_id`` go to connection ``ident`` (its accepted ``key``'s) from now on."""
        before = self.routes.get(node_id)
        self.routes[node_id] = (ident, key)
        if before is None:
            self.events.publish("node", node=node_id, state="up", reason=reason, **_address(address))
        elif before[0] != ident:
            self.events.publish("node", node=node_id, state="up", reason="reconnected", **_address(address))

    def _unroute(self, node_id: str, key: str, reason: str) -> None:
        if self.routes.get(node_id, (None, None))[1] == key:
            del self.routes[node_id]
            self.events.publish("node", node=node_id, state="down", reason=reason)

    # ------------------------------------------------------------------ connections
    def heard(self, key: str, ident: bytes, fd: int | None, peer_of: Callable[[int], tuple | None]) -> None:
        """A message from the stored ``key`` on connection ``ident`` (descriptor ``fd``). The peer
        is looked up only for a new connection, not for every message."""
        now = time.monotonic()
        link = self.links.get(key)
        if link is not None and link.ident == ident:
            link.heard = now
            return
        if link is not None and self.key_on_fd.get(link.fd) == key:
            del self.key_on_fd[link.fd]
        self.links[key] = Link(ident, fd, peer_of(fd) if fd is not None else None, now)
        if fd is not None:
            self.key_on_fd[fd] = key

    def connection_closed(self, fd: int, peer: tuple | None, open_now_to: tuple | None = None) -> bool:
        """The connection on descriptor ``fd`` (to ``peer``, if known) closed: if it was a key's
        last, that key's agent is not connected any more. ``open_now_to``: where ``fd`` leads now
        (the transport looks it up as it handles the event). Returns True when it cannot tell yet:
        the transport asks again a moment later (``open_now_to`` looked up again)."""
        key = self.key_on_fd.get(fd)
        if key is None:
            return False
        link = self.links[key]
        if peer is not None and link.peer is not None and peer != link.peer:
            return False  # a newer connection got the descriptor and spoke before this close was seen
        if link.peer is not None and open_now_to == link.peer:
            # The descriptor is open right now, to this key's agent: the close was of an older
            # connection that had the same number (a stranger's, seen late), not of this one; or
            # libzmq told of this one's close before closing its descriptor. Asked again shortly.
            return True
        self._drop_link(key, "disconnected")
        return False

    def drop_silent(self, now: float | None = None) -> list[str]:
        """Drop the connections not heard from within SILENT_LINK_S; returns their keys."""
        now = time.monotonic() if now is None else now
        silent = [key for key, link in self.links.items() if now - link.heard > SILENT_LINK_S]
        for key in silent:
            self._drop_link(key, "heartbeat_timeout")
        return silent

    def _drop_link(self, key: str, reason: str) -> None:
        """``key``'s last connection is gone, and with it every route of that key (older
        connections of the key are dead already: an agent holds one connection)."""
        link = self.links.pop(key, None)
        if link is None:
            return
        if self.key_on_fd.get(link.fd) == key:
            del self.key_on_fd[link.fd]
        node_id = self.node_of_key.get(key)
        if node_id is not None:
            self._unroute(node_id, key, reason)
        self.pending_routes.pop(key, None)

    def connected(self, node_id: str) -> bool:
        """Whether the accepted node's agent is connected now: what `nodes`, `status` and
        `keys list` say, and where requests can go."""
        return node_id in self.routes

    def connected_nodes(self) -> set[str]:
        return set(self.routes)

    def key_connected(self, key: str) -> bool:
        """Whether the agent holding ``key`` (accepted, pending or denied) is connected now."""
        node_id = self.node_of_key.get(key)
        if node_id is not None and self.routes.get(node_id, (None, None))[1] == key:
            return True
        return key in self.pending_routes

    def accepted_nodes(self) -> set[str]:
        return set(self.node_of_key.values())

    def targets(self, target: str | None, roles: dict[str, list[str]] | None = None,
                facts: dict[str, dict] | None = None) -> list[str]:
        """Accepted nodes in ``target`` (`targets.Target.matches`, the one meaning of a target: every
        node for none or `*`), sorted; ``roles``: node id -> its roles from the inventory, for
        `role:NAME`; ``facts``: node id -> its facts, for `FACT=GLOB` (a node without them matches no
        such term). Raises `targets.TargetError` for a malformed target (check it first)."""
        compiled = compile_target(target)
        roles, facts = roles or {}, facts or {}
        return compiled.select({n: (roles.get(n, ()), facts.get(n)) for n in self.accepted_nodes()})


class Enrollment:
    """The enrollment decision and the key policy, over the store and the roster.

    ``send(routing_id, Message)`` reaches a connected agent; ``drops`` is the daemon's DropLog
    (``drop(reason, *args, peer=)`` and ``allowed(peer)``), which bounds what peers make it log.
    Every change of a key's state is published (``key`` events) on the roster's ``events``.
    """

    def __init__(self, store: Store, roster: Roster, send: Callable[[bytes, Message], bool], drops,
                 max_pending: int = MAX_PENDING_KEYS) -> None:
        self.store = store
        self.roster = roster
        self.send = send
        self.drops = drops
        self.max_pending = max_pending
        self.refused_keys = 0  # new keys not stored because too many wait already
        # Accepted key -> digest of the catalogue last checked: an agent re-enrolling with the same
        # one (every reconnect) is neither checked nor written again.
        self._catalog_digests: dict[str, bytes] = {}

    # ------------------------------------------------------------------ an agent enrolls
    def on_enroll(self, ident: bytes, key: str, msg: Message, address: str = "?") -> None:
        roster = self.roster
        node_id = msg.body.get("id")
        token = msg.body.get("token")
        fp = pkeys.fingerprint(key)
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
        # The catalogue is checked (up to 256 KiB: milliseconds) only where it is kept: for an
        # accepted key when it changed, and for a key not yet accepted once, when it is first stored
        # (a key a person accepts is told at once and does not enroll again, so what it sent while
        # waiting becomes its node's catalogue). A stranger re-enrolling costs neither CPU nor writes.
        raw_catalog = msg.body.get("catalog")
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
            catalog, _ = check_catalog(raw_catalog)
            record = self.store.add_key(node_id, key, fp, state, facts, catalog)
            roster.key_states[key] = state
            if state == proto.DENIED:
                roster.events.publish("key", node=node_id, fingerprint=fp, state=state, **_address(address))
                roster.pending_routes[key] = ident
                return
            new_key = True
        else:
            new_key = False
        token_refused = None
        if record["state"] == proto.PENDING and token:
            ok, why = self.store.consume_token(token, node_id)
            token_refused = None if ok else why
            if ok:
                self.accept(record, facts, by="token")
                log.info("node %r enrolled by token, key %s, from %s", node_id, fp, address)
            elif self.drops.allowed(key):
                log.warning("node %r (key %s, from %s) presented a token that does not enroll: %s; it waits "
                            "as pending", node_id, fp, address, why)
        record = self.store.key_by_public(key)
        if record["state"] == proto.ACCEPTED:
            roster.route(node_id, ident, key, "connected", address)
            roster.pending_routes.pop(key, None)
            self.store.upsert_node(node_id, facts, time.time())
            if self._catalog_changed(key, raw_catalog):
                catalog, catalog_problem = check_catalog(raw_catalog)
                if catalog is not None:
                    self.store.set_catalog(node_id, catalog)
                elif self.drops.allowed(key):
                    log.warning("node %r: catalogue refused: %s", node_id, catalog_problem)
            roster.seen(node_id)
            self.send(ident, Message(type=proto.ENROLLED, reply_to=msg.id,
                                     body={"status": proto.ACCEPTED, "time": time.time(), "id": node_id}))
        elif record["state"] == proto.PENDING:
            if new_key:  # told once, when it starts to wait (a key a token enrolled at once never waits)
                roster.events.publish("key", node=node_id, fingerprint=fp, state=proto.PENDING, **_address(address))
            if key not in roster.pending_routes and self.drops.allowed(address):
                log.info("node %r waits as pending with key %s, from %s (pimaster keys accept %s)",
                         node_id, fp, address, node_id)
            roster.pending_routes[key] = ident
            self.store.update_key_facts(record["id"], facts)
            if not record["has_catalog"] and raw_catalog is not None:  # kept once, never rewritten
                catalog, _ = check_catalog(raw_catalog)
                if catalog is not None:
                    self.store.set_key_catalog(record["id"], catalog)
            body = {"status": proto.PENDING, "time": time.time(), "id": node_id}
            if token_refused:  # so that the node's log says why it waits, not only that it does
                body["token_refused"] = token_refused
            self.send(ident, Message(type=proto.ENROLLED, reply_to=msg.id, body=body))

    def _catalog_changed(self, key: str, raw) -> bool:
        """Whether ``raw`` differs from the catalogue this accepted key sent last (and remember it).
        repr of msgpack-decoded data is deterministic (maps keep the sender's order)."""
        digest = hashlib.sha256(repr(raw).encode()).digest()
        if self._catalog_digests.get(key) == digest:
            return False
        if len(self._catalog_digests) >= 4 * MAX_PENDING_KEYS + len(self.roster.node_of_key):
            self._catalog_digests.clear()  # bounded; at worst a catalogue is checked once more
        self._catalog_digests[key] = digest
        return True

    def accept(self, record: dict, facts: dict | None = None, replace: bool = False, by: str = "person") -> None:
        """Accepts the key ``record``; with ``replace``, the node's accepted key (if another) goes.
        The identity recorded now is what inventory entries match later. ``by``: token or person
        (the ``key`` event says which)."""
        node_id, key = record["node_id"], record["public_key"]
        events = self.roster.events
        if replace:
            old = self.store.accepted_key(node_id)
            if old is not None and old["public_key"] != key:
                self.roster.forget_key(old["public_key"], "key_replaced")
                events.publish("key", node=node_id, fingerprint=old["fingerprint"], state="replaced")
        facts = facts if facts is not None else record["facts"]
        self.store.set_key_state(record["id"], proto.ACCEPTED, replace_accepted=replace,
                                 identity=identity_of(facts))
        self.roster.key_states[key] = proto.ACCEPTED
        self.roster.node_of_key[key] = node_id
        events.publish("key", node=node_id, fingerprint=record["fingerprint"], state=proto.ACCEPTED, by=by)
        # Other keys still waiting for this id now claim an id another key holds: denied, which
        # `keys list` explains, rather than pending keys that can never be accepted as such.
        for other in self.store.deny_pending(node_id):
            self.roster.key_states[other] = proto.DENIED
            events.publish("key", node=node_id, fingerprint=pkeys.fingerprint(other), state=proto.DENIED)
        self.store.upsert_node(node_id, facts, time.time())
        # The node's catalogue is this key's own (sent while it waited; checked then), or none
        # until its agent enrolls again: never what the node's previous key sent.
        waited_with = self.store.key_catalog(record["id"]) if record.get("has_catalog") else None
        self.store.set_catalog(node_id, waited_with or {})
        if waited_with is not None:
            self.store.set_key_catalog(record["id"], None)
        self._catalog_digests.pop(key, None)

    # ------------------------------------------------------------------ a person decides
    def pick_keys(self, node: str | None, fingerprint: str | None, states: set[str], all_: bool = False,
                  only: Collection[str] | None = None) -> list[dict]:
        """Keys in ``states`` matching the node glob and the fingerprint, each when given; --all
        says that more than one may match, never that the others are ignored. ``only``: the
        fingerprints a person was shown and confirmed; a key that came since is not taken unseen."""
        keys = [k for k in self.store.keys() if k["state"] in states]
        if not node and not all_:
            raise ControlError("name a node (or use --all)")
        if node:
            keys = [k for k in keys if fnmatch.fnmatchcase(k["node_id"], node)]
        if fingerprint:
            keys = [k for k in keys if k["fingerprint"] == fingerprint.lower()]
        if only is not None:
            keys = [k for k in keys if k["fingerprint"] in only]
        return keys

    @staticmethod
    def shown(keys: list[dict]) -> list[dict]:
        """What a dry run answers: the keys the action would take, to show a person."""
        return [{"id": k["node_id"], "fingerprint": k["fingerprint"], "state": k["state"]} for k in keys]

    def accept_keys(self, node: str | None = None, fingerprint: str | None = None, replace: bool = False,
                    include_rejected: bool = False, all_: bool = False, dry_run: bool = False,
                    only: Collection[str] | None = None) -> list[dict]:
        """`keys accept`: all the matching keys, or none (with the reason as a ControlError).
        ``dry_run``: the keys it would accept (every check made), accepting none."""
        states = {proto.PENDING}
        if replace and not fingerprint:
            # Replacing hands the node's id, roles and secrets to another key: say which one.
            raise ControlError("--replace needs --fingerprint: compare it with `piagent fingerprint` on the "
                               "node (`pimaster keys list` shows the waiting key's)")
        if replace:
            states.add(proto.DENIED)
        if include_rejected:
            states.add(proto.REJECTED)
        candidates = self.pick_keys(node, fingerprint, states, all_, only)
        if not candidates:
            hint = ""
            accepted = self.pick_keys(node, fingerprint, {proto.ACCEPTED}, True) if node or fingerprint else []
            if fingerprint and node and self.pick_keys(node, None, states, all_):
                hint = f" (none with the fingerprint {fingerprint}: `pimaster keys list` shows the waiting keys)"
            elif node and any(k["state"] == proto.DENIED for k in self.store.keys(node)):
                hint = (f" ({node} has a denied key: `pimaster keys accept --replace {node} --fingerprint FP` "
                        "replaces its accepted key)")
            elif node and any(k["state"] == proto.REJECTED for k in self.store.keys(node)):
                hint = f" ({node} has a rejected key: add --include-rejected)"
            elif accepted:
                hint = (f" ({', '.join(sorted({k['node_id'] for k in accepted}))}: accepted already, nothing "
                        "waits; `pimaster keys list` shows the keys)")
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
        if dry_run:
            return self.shown(candidates)
        accepted = []
        for node_id, (key,) in by_node.items():
            self.accept(key, replace=replace)
            ident = self.roster.pending_routes.pop(key["public_key"], None)
            if ident is not None:  # the agent is connected and waiting: tell it now
                self.roster.route(node_id, ident, key["public_key"], "accepted")
                self.send(ident, Message(type=proto.ENROLLED, body={
                    "status": proto.ACCEPTED, "time": time.time(), "id": node_id}))
            log.info("key %s of %r accepted by a person", key["fingerprint"], node_id)
            accepted.append({"id": node_id, "fingerprint": key["fingerprint"]})
        return accepted

    def reject_keys(self, node: str | None = None, fingerprint: str | None = None, all_: bool = False,
                    dry_run: bool = False, only: Collection[str] | None = None) -> list[dict]:
        """`keys reject`: a node's waiting keys (its accepted one only if named or nothing else
        matches); a rejected key cannot even connect. ``dry_run``, ``only``: as accept_keys."""
        candidates = self.pick_keys(node, fingerprint, {proto.PENDING, proto.ACCEPTED, proto.DENIED}, all_, only)
        if not all_ and not fingerprint:
            candidates = [k for k in candidates if k["state"] != proto.ACCEPTED] or candidates
        if not candidates:
            raise ControlError(f"no key to reject for {node or 'any node'}")
        if dry_run:
            return self.shown(candidates)
        for key in candidates:
            self.roster.forget_key(key["public_key"], "key_rejected")
            self.store.set_key_state(key["id"], proto.REJECTED)
            self.store.set_key_catalog(key["id"], None)  # a rejected key keeps nothing it sent
            self.roster.key_states[key["public_key"]] = proto.REJECTED
            self.roster.events.publish("key", node=key["node_id"], fingerprint=key["fingerprint"],
                                       state=proto.REJECTED)
            log.info("key %s of %r rejected", key["fingerprint"], key["node_id"])
        return [{"id": k["node_id"], "fingerprint": k["fingerprint"]} for k in candidates]

    def delete_keys(self, node: str | None = None, fingerprint: str | None = None, all_: bool = False,
                    dry_run: bool = False, only: Collection[str] | None = None) -> list[dict]:
        """`keys delete`: forgets the keys (and a node left with none); their agents may enroll
        again. ``dry_run``, ``only``: as accept_keys."""
        candidates = self.pick_keys(node, fingerprint, set(proto.KEY_STATES), all_, only)
        if not candidates:
            raise ControlError(f"no key to delete for {node or 'any node'}")
        if dry_run:
            return self.shown(candidates)
        for key in candidates:
            route = self.roster.routes.get(key["node_id"])
            if route is not None and route[1] == key["public_key"]:
                # Tell a connected agent at once, so it enrolls again (and waits as pending) now
                # rather than after its heartbeats go unanswered.
                self.send(route[0], Message(type=proto.ENROLLED, body={"status": "deleted", "time": time.time(),
                                                                       "id": key["node_id"]}))
            self.roster.forget_key(key["public_key"], "key_deleted")
            self.store.delete_key(key["id"])
            self.roster.events.publish("key", node=key["node_id"], fingerprint=key["fingerprint"], state="deleted")
            if not self.store.keys(key["node_id"]):
                self.store.delete_node(key["node_id"])
            log.info("key %s of %r deleted", key["fingerprint"], key["node_id"])
        return [{"id": k["node_id"], "fingerprint": k["fingerprint"]} for k in candidates]
