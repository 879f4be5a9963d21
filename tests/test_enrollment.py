"""The enrollment decision and the key policy (pimaster.enrollment), without ZeroMQ sockets: a
real store in a temporary directory, replies collected from the ``send`` callable."""

from __future__ import annotations

import logging
import os

import pytest
from zmq.utils import z85

from piagent import protocol as proto
from piagent.keys import fingerprint
from piagent.protocol import Message
from pimaster.enrollment import Enrollment, Roster
from pimaster.errors import ControlError
from pimaster.store import Store
from pimaster.transport import DropLog


class Desk:
    """An Enrollment over a fresh store, and what it sent to whom."""

    def __init__(self, tmp_path, max_pending: int = 256) -> None:
        self.store = Store(str(tmp_path / "pimaster.db"))
        self.roster = Roster()
        self.sent: list[tuple[bytes, Message]] = []
        self.drops = DropLog()
        self.enrollment = Enrollment(self.store, self.roster, self.send, self.drops, max_pending)

    def send(self, ident: bytes, msg: Message) -> bool:
        self.sent.append((ident, msg))
        return True

    def enroll(self, key: str, node_id, token: str | None = None, ident: bytes = b"conn",
               facts: dict | None = None, catalog=None) -> Message | None:
        """One `enroll`; the reply it got, if any."""
        before = len(self.sent)
        body = {"id": node_id, "facts": facts if facts is not None else {"hostname": str(node_id)}}
        if token is not None:
            body["token"] = token
        if catalog is not None:
            body["catalog"] = catalog
        self.enrollment.on_enroll(ident, key, Message(type=proto.ENROLL, body=body), "192.0.2.1")
        replies = self.sent[before:]
        assert len(replies) <= 1
        return replies[0][1] if replies else None

    def states(self, node_id: str) -> list[str]:
        return sorted(k["state"] for k in self.store.keys(node_id))

    def new_token(self, uses: int = 1, ids: str | None = None) -> str:
        token = "t-" + os.urandom(8).hex()
        self.store.add_token(token, 3600, uses, "master:4510", ids)
        return token


def new_key() -> str:
    return z85.encode(os.urandom(32)).decode()


@pytest.fixture
def desk(tmp_path):
    d = Desk(tmp_path)
    yield d
    d.store.close()


def test_a_valid_token_enrolls_and_the_agent_is_told(desk):
    key = new_key()
    reply = desk.enroll(key, "n1", token=desk.new_token(), ident=b"c1")
    assert reply.type == proto.ENROLLED and reply.body["status"] == proto.ACCEPTED and reply.body["id"] == "n1"
    assert desk.states("n1") == [proto.ACCEPTED]
    assert desk.roster.key_states[key] == proto.ACCEPTED
    assert desk.roster.node_of_key[key] == "n1"
    assert desk.roster.routes["n1"] == (b"c1", key)
    assert "n1" in desk.roster.last_seen and "n1" in desk.roster.dirty_seen
    assert [n["node_id"] for n in desk.store.nodes()] == ["n1"]


def test_without_a_token_a_key_waits_until_a_person_accepts(desk):
    key = new_key()
    reply = desk.enroll(key, "n1", ident=b"c1")
    assert reply.body["status"] == proto.PENDING
    assert desk.roster.pending_routes[key] == b"c1" and "n1" not in desk.roster.routes
    accepted = desk.enrollment.accept_keys("n1")
    assert accepted == [{"id": "n1", "fingerprint": fingerprint(key)}]
    # The waiting agent is told at once, on the connection it waits on.
    ident, msg = desk.sent[-1]
    assert ident == b"c1" and msg.body["status"] == proto.ACCEPTED
    assert desk.roster.routes["n1"] == (b"c1", key) and key not in desk.roster.pending_routes


@pytest.mark.parametrize("why, ids", [("bound to other ids", "node*"), ("used up", None)])
def test_a_token_that_does_not_enroll_leaves_the_key_pending(desk, why, ids):
    token = desk.new_token(uses=1, ids=ids)
    if why == "used up":
        desk.enroll(new_key(), "first", token=token)
    reply = desk.enroll(new_key(), "other", token=token)
    assert reply.body["status"] == proto.PENDING
    assert desk.states("other") == [proto.PENDING]


def test_a_second_key_for_an_accepted_id_is_denied_and_not_answered(desk):
    old, new = new_key(), new_key()
    desk.enroll(old, "n1", token=desk.new_token(), ident=b"old")
    assert desk.enroll(new, "n1", token=desk.new_token(), ident=b"new") is None
    assert desk.states("n1") == [proto.ACCEPTED, proto.DENIED]
    assert desk.roster.key_states[new] == proto.DENIED
    with pytest.raises(ControlError, match="has a denied key"):
        desk.enrollment.accept_keys("n1")
    with pytest.raises(ControlError, match="--replace needs --fingerprint"):
        desk.enrollment.accept_keys("n1", replace=True)
    with pytest.raises(ControlError, match="none with the fingerprint"):
        desk.enrollment.accept_keys("n1", fingerprint="sha256:" + "0" * 64, replace=True)
    desk.enrollment.accept_keys("n1", fingerprint=fingerprint(new), replace=True)
    assert desk.states("n1") == [proto.ACCEPTED]
    assert desk.roster.node_of_key == {new: "n1"} and old not in desk.roster.key_states
    assert desk.roster.routes["n1"] == (b"new", new)


def test_a_key_keeps_the_id_it_enrolled_with(desk):
    key = new_key()
    desk.enroll(key, "n1", token=desk.new_token())
    assert desk.enroll(key, "n2") is None
    assert desk.store.keys("n2") == [] and desk.drops.total == 1


@pytest.mark.parametrize("node_id", ["", "a b", "../etc", 42, None, "x" * 200])
def test_a_malformed_node_id_stores_nothing(desk, node_id):
    assert desk.enroll(new_key(), node_id) is None
    assert desk.store.keys() == [] and desk.drops.total == 1


def test_past_the_pending_cap_new_keys_are_not_stored(tmp_path):
    desk = Desk(tmp_path, max_pending=2)
    for i in range(2):
        assert desk.enroll(new_key(), f"n{i}").body["status"] == proto.PENDING
    assert desk.enroll(new_key(), "n9") is None
    assert desk.store.keys("n9") == [] and desk.enrollment.refused_keys == 1
    assert desk.store.count_keys(proto.PENDING) == 2  # the keys already waiting are untouched


def test_two_keys_waiting_for_one_id_need_a_fingerprint(desk):
    first, second = new_key(), new_key()
    desk.enroll(first, "n1")
    desk.enroll(second, "n1")
    with pytest.raises(ControlError, match="more than one key waits for n1"):
        desk.enrollment.accept_keys("n1")
    desk.enrollment.accept_keys("n1", fingerprint=fingerprint(second))
    # The other key now claims an id another key holds: denied, not pending forever.
    assert desk.roster.key_states[first] == proto.DENIED
    assert desk.states("n1") == [proto.ACCEPTED, proto.DENIED]


def test_accept_all_is_all_or_nothing(desk):
    desk.enroll(new_key(), "a1")
    desk.enroll(new_key(), "b1", token=desk.new_token())
    second = new_key()
    desk.enroll(second, "b1")  # denied: b1 already has an accepted key
    desk.enrollment.reject_keys("b1", fingerprint=fingerprint(second))
    with pytest.raises(ControlError, match="name a node"):
        desk.enrollment.accept_keys()
    # b1's rejected key cannot be accepted without --replace: so a1's is not accepted either.
    with pytest.raises(ControlError, match="b1 already has an accepted key"):
        desk.enrollment.accept_keys("*", include_rejected=True, all_=True)
    assert desk.states("a1") == [proto.PENDING]
    assert [k["node_id"] for k in desk.enrollment.pick_keys(None, None, {proto.PENDING}, True)] == ["a1"]


def test_reject_takes_the_waiting_key_unless_the_accepted_one_is_named(desk):
    accepted, waiting = new_key(), new_key()
    desk.enroll(accepted, "n1", token=desk.new_token())
    desk.enroll(waiting, "n1")
    assert desk.enrollment.reject_keys("n1") == [{"id": "n1", "fingerprint": fingerprint(waiting)}]
    assert desk.roster.key_states[waiting] == proto.REJECTED
    assert desk.roster.key_states[accepted] == proto.ACCEPTED
    desk.enrollment.reject_keys("n1", fingerprint=fingerprint(accepted))
    assert desk.states("n1") == [proto.REJECTED, proto.REJECTED]
    assert "n1" not in desk.roster.routes and accepted not in desk.roster.node_of_key
    with pytest.raises(ControlError, match="add --include-rejected"):
        desk.enrollment.accept_keys("n1")


def test_delete_tells_a_connected_agent_and_forgets_the_node(desk):
    key = new_key()
    desk.enroll(key, "n1", token=desk.new_token(), ident=b"c1")
    deleted = desk.enrollment.delete_keys("n1")
    assert deleted == [{"id": "n1", "fingerprint": fingerprint(key)}]
    ident, msg = desk.sent[-1]
    assert ident == b"c1" and msg.type == proto.ENROLLED and msg.body["status"] == "deleted"
    assert desk.store.keys() == [] and desk.store.nodes() == []
    assert key not in desk.roster.key_states and "n1" not in desk.roster.routes
    # It may enroll again: as pending, a new key to a person.
    assert desk.enroll(key, "n1").body["status"] == proto.PENDING
    with pytest.raises(ControlError, match="no key to delete for n2"):
        desk.enrollment.delete_keys("n2")


def test_the_roster_is_rebuilt_from_the_store(desk):
    key, waiting = new_key(), new_key()
    desk.enroll(key, "n1", token=desk.new_token())
    desk.enroll(waiting, "n2")
    desk.store.touch_nodes(desk.roster.take_dirty_seen())
    again = Roster()
    again.load(desk.store)
    assert again.node_of_key == {key: "n1"}
    assert again.key_states == {key: proto.ACCEPTED, waiting: proto.PENDING}
    assert set(again.last_seen) == {"n1"} and again.routes == {}
    assert again.targets("n*") == ["n1"] and again.targets(None) == ["n1"] and again.targets("x*") == []


def test_what_peers_make_it_log_is_bounded(desk, caplog):
    caplog.set_level(logging.WARNING, logger="pimaster")
    key = new_key()
    for _ in range(50):
        desk.enroll(key, "bad id")
    assert desk.drops.total == 50
    assert len([r for r in caplog.records if "malformed node id" in r.getMessage()]) == DropLog().per_peer


def catalogue(*functions: str) -> dict:
    """An agent's catalogue offering ``functions`` (each with one argument, `name`)."""
    return {fun: {"args": ["name"], "required": ["name"], "summary": fun} for fun in functions}


def test_a_key_accepted_by_hand_gets_the_catalogue_it_enrolled_with(desk):
    key = new_key()
    # A malformed catalogue is not kept; the first good one is, once: a key not yet accepted
    # re-enrolling every few seconds with another one must not make the master rewrite it each time.
    desk.enroll(key, "n1", catalog={"not a function": 1}, ident=b"c1")
    desk.enroll(key, "n1", catalog=catalogue("file.managed", "cmd.run"), ident=b"c1")
    desk.enroll(key, "n1", catalog=catalogue("other.fun"), ident=b"c1")
    desk.enrollment.accept_keys("n1")
    # The agent is told at once and does not enroll again: what it sent while waiting is its own.
    assert desk.sent[-1][1].body["status"] == proto.ACCEPTED
    assert set(desk.store.catalogs()["n1"]) == {"file.managed", "cmd.run"}
    # Once accepted, a changed catalogue (an upgraded agent enrolling again) is taken.
    desk.enroll(key, "n1", catalog=catalogue("other.fun"), ident=b"c1")
    assert set(desk.store.catalogs()["n1"]) == {"other.fun"}


def test_a_key_without_a_kept_catalogue_gets_none_and_never_another_keys(desk):
    # n1's accepted key sent a catalogue; the re-flashed Pi's key (denied, then accepted with
    # --replace) sent a malformed one: n1 must not keep the old key's, nor take n2's.
    old, new, other = new_key(), new_key(), new_key()
    desk.enroll(old, "n1", token=desk.new_token(), catalog=catalogue("old.only"))
    desk.enroll(other, "n2", token=desk.new_token(), catalog=catalogue("n2.only"))
    desk.enroll(new, "n1", catalog=[1], ident=b"new")
    assert desk.states("n1") == [proto.ACCEPTED, proto.DENIED]
    desk.enrollment.accept_keys("n1", fingerprint=fingerprint(new), replace=True)
    assert desk.store.catalogs() == {"n1": {}, "n2": catalogue("n2.only")}
    # The same with a catalogue: the new key's, sent when it was denied, is n1's now.
    newer = new_key()
    desk.enroll(newer, "n1", catalog=catalogue("newer.fun"), ident=b"newer")
    desk.enrollment.accept_keys("n1", fingerprint=fingerprint(newer), replace=True)
    assert desk.store.catalogs()["n1"] == catalogue("newer.fun")
    # Kept only until it is the node's: the key's own copy is dropped.
    assert desk.store.key_catalog(desk.store.accepted_key("n1")["id"]) is None


def test_all_takes_only_the_keys_matching_the_pattern_and_fingerprint(desk):
    keys = {f"pi{i}": new_key() for i in range(1, 5)}
    for node_id, key in keys.items():
        desk.enroll(key, node_id)
    with pytest.raises(ControlError, match="no key to accept for nomatch"):
        desk.enrollment.accept_keys("nomatch*", all_=True)
    assert desk.store.count_keys(proto.PENDING) == 4
    assert [k["id"] for k in desk.enrollment.accept_keys("pi[12]", all_=True)] == ["pi1", "pi2"]
    assert [k["id"] for k in desk.enrollment.delete_keys("pi4", all_=True)] == ["pi4"]
    rejected = desk.enrollment.reject_keys("pi*", fingerprint=fingerprint(keys["pi3"]), all_=True)
    assert [k["id"] for k in rejected] == ["pi3"]
    assert {k["node_id"]: k["state"] for k in desk.store.keys()} == {
        "pi1": proto.ACCEPTED, "pi2": proto.ACCEPTED, "pi3": proto.REJECTED}


@pytest.mark.parametrize("action", ["accept", "reject", "delete"])
def test_a_dry_run_acts_on_nothing_and_only_takes_the_keys_shown(desk, action):
    first, second = new_key(), new_key()
    desk.enroll(first, "n1")
    desk.enroll(second, "n2")
    act = getattr(desk.enrollment, f"{action}_keys")
    shown = act("n*", all_=True, dry_run=True)
    assert [(k["id"], k["fingerprint"], k["state"]) for k in shown] == [
        ("n1", fingerprint(first), proto.PENDING), ("n2", fingerprint(second), proto.PENDING)]
    assert desk.states("n1") == desk.states("n2") == [proto.PENDING] and desk.sent[-1][1].body["status"] == "pending"
    # A key that arrives between the question and the answer is not taken unseen.
    late = new_key()
    desk.enroll(late, "n3")
    done = act("n*", all_=True, only=[k["fingerprint"] for k in shown])
    assert done == [{"id": k["id"], "fingerprint": k["fingerprint"]} for k in shown]
    assert desk.states("n3") == [proto.PENDING]
    with pytest.raises(ControlError, match=f"no key to {action}"):
        act("n3", only=[fingerprint(first)])


def test_accepting_an_accepted_key_says_so_rather_than_no_key(desk):
    # `keys accept n1` of an already accepted key used to say only "no key to accept".
    key = new_key()
    desk.enroll(key, "n1", token=desk.new_token())
    with pytest.raises(ControlError, match=r"no key to accept for n1 \(n1: accepted already, nothing waits"):
        desk.enrollment.accept_keys("n1")
    with pytest.raises(ControlError, match="accepted already"):
        desk.enrollment.accept_keys(None, fingerprint=fingerprint(key), all_=True)
    other = new_key()
    desk.enroll(other, "n2")
    with pytest.raises(ControlError, match="none with the fingerprint"):
        desk.enrollment.accept_keys("n2", fingerprint=fingerprint(key))


def test_a_waiting_key_re_enrolling_writes_nothing_new(desk):
    # A stranger's key re-enrolling (2 a second within its budget) with the same facts and a new
    # catalogue each time used to rewrite its row each time: SD-card wear for free.
    key = new_key()
    desk.enroll(key, "n1", catalog=catalogue("file.managed"))
    writes = desk.store.db.total_changes
    for i in range(20):
        desk.enroll(key, "n1", catalog=catalogue(f"m{i}.fun"))
    assert desk.store.db.total_changes == writes
    desk.enroll(key, "n1", facts={"hostname": "renamed"})  # facts that changed are kept, as before
    assert desk.store.keys("n1")[0]["facts"] == {"hostname": "renamed"}
    assert "catalog" not in desk.store.keys("n1")[0]  # lists of keys never carry catalogues
