"""Requests to agents and their answers: ``ask`` (one request per node, answers until a timeout),
``ask_following`` (the same, following nodes that reconnect meanwhile: an apply), and ``ping``.

An answer counts only if it matches its request by id *and* comes from the node asked.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Callable

from piagent import protocol as proto
from piagent.protocol import Message

from .enrollment import Roster
from .results import check_health, one_line

# An agent seen this recently and not connected now is probably reconnecting (its address just
# changed): an apply waits for it instead of reporting it down at once.
RECONNECT_GRACE_S = 30.0
FOLLOW_POLL_S = 0.25


def rollback_note(note) -> dict | None:
    """An agent's note that it rolled a network change back, checked and bounded for `ping`."""
    if not isinstance(note, dict):
        return None
    changes = [{"interface": one_line(c.get("interface"), 32), "address": one_line(c.get("address"), 64)}
               for c in (note.get("changes") or [])[:8] if isinstance(c, dict)] \
        if isinstance(note.get("changes"), list) else []
    when = note.get("time")
    return {"time": when if isinstance(when, (int, float)) and math.isfinite(when) else None,
            "reason": one_line(note.get("reason", ""), 300), "changes": changes}


def answer_row(answer: Message, rtt: float, sent_wall: float) -> dict:
    if answer.type == proto.REFUSED:
        return {"ok": False, "error": f"refused: {one_line(answer.body.get('reason'))}",
                "rtt_ms": round(rtt * 1000, 2)}
    return {"ok": "error" not in answer.body, "rtt_ms": round(rtt * 1000, 2),
            "body": answer.body, "sent_wall": sent_wall, "rtt_s": rtt}


class Rpc:
    """Requests in flight (id -> the node asked and the future its answer completes).

    ``send(routing_id, Message) -> bool`` is the transport's; ``drops`` its DropLog.
    """

    def __init__(self, roster: Roster, send: Callable[[bytes, Message], bool], drops) -> None:
        self.roster = roster
        self.send = send
        self.drops = drops
        self.requests: dict[str, tuple[str, asyncio.Future]] = {}
        # (node id, rollback note) for every note a health answer carried: the event bus's.
        self.on_rollback: Callable[[str, dict], None] = lambda node_id, note: None

    def on_reply(self, ident: bytes, node_id: str, key: str, msg: Message) -> None:
        """A `result` or `refused` from ``node_id``: completes its request, if it asked that node."""
        waiting = self.requests.get(msg.reply_to or "")
        if waiting is None or waiting[0] != node_id:
            self.drops.drop("unexpected reply from %s", node_id, peer=key)
            return
        future = waiting[1]
        if not future.done():
            future.set_result((msg, time.monotonic()))

    async def ask(self, bodies: dict[str, dict], type_: str, timeout: float,
                  request_ttl: float | None = None) -> dict[str, dict]:
        """Send one request to each node (its own body) and collect answers until ``timeout``."""
        loop = asyncio.get_running_loop()
        sent: dict[str, tuple[str, float, float, asyncio.Future]] = {}
        results: dict[str, dict] = {}
        for node_id, body in bodies.items():
            route = self.roster.routes.get(node_id)
            if route is None:
                results[node_id] = {"ok": False, "error": "not connected"}
                continue
            msg = proto.request(type_, body, ttl_s=request_ttl or timeout)
            future = loop.create_future()
            self.requests[msg.id] = (node_id, future)
            wall, mono = time.time(), time.monotonic()
            if not self.send(route[0], msg):
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
            results[node_id] = answer_row(answer, received - mono, wall)
        return results

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
        routes, last_seen = self.roster.routes, self.roster.last_seen

        def gone(node_id: str) -> bool:
            return time.time() - last_seen.get(node_id, 0) > RECONNECT_GRACE_S

        try:
            while True:
                # Answers first: one that came back on the old connection still counts.
                for node_id, (_, msg_id, wall, mono, future) in sent.items():
                    if node_id not in results and future.done() and not future.cancelled():
                        answer, received = future.result()
                        results[node_id] = answer_row(answer, received - mono, wall)
                for node_id, body in bodies.items():
                    route = routes.get(node_id)
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
                    if self.send(route[0], msg):
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

    async def ping(self, nodes: list[str], timeout: float) -> list[dict]:
        """`pimaster ping`: a row per node of ``nodes`` (its target, resolved: `targets.target_nodes`):
        up or not, rtt, its health (only well-shaped fields), clock offset, a network rollback it noted."""
        answers = await self.ask({n: {} for n in nodes}, proto.PING, timeout)
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
            rollback = rollback_note(body.get("network_rollback"))
            if rollback:
                row["network_rollback"] = rollback
                self.on_rollback(node_id, rollback)
            if agent_time is not None and "sent_wall" in answer:
                midpoint = answer["sent_wall"] + answer["rtt_s"] / 2
                row["clock_offset_ms"] = round((agent_time - midpoint) * 1000, 2)
            row["last_seen"] = self.roster.last_seen.get(node_id)
            rows.append(row)
        return rows
