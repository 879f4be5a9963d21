"""The running applies, as the rest of the master sees them: ``JobBoard`` (what a job may use of
the master, and where the agents' `job_progress` and `job_result` messages arrive), ``JobWatch``
(one apply's view of its nodes' messages) and the answer to `pimaster job cancel`.

Split from jobs.py, which holds the apply itself (plan, render, stages, push, collect).
"""

from __future__ import annotations

import asyncio
import os
from typing import Awaitable, Callable

from piagent import protocol as proto
from piagent.protocol import Message

from .errors import ControlError
from .events import EventBus
from .results import check_job_result, check_progress, one_line
from .rpc import RECONNECT_GRACE_S
from .secrets import SecretStore, redact
from .store import Store

# How long a running apply waits for a node whose connection went to come back (an agent restarted
# by systemd, a link that flapped) before it finishes the node as no_answer.
DISCONNECT_GRACE_S = RECONNECT_GRACE_S

# How long `job cancel` waits for each node's answer (an agent answers at once; one older than the
# `cancel` request drops it without a word).
CANCEL_TIMEOUT_S = 10.0
# A node's status in the store once it has reported (or was finished for) a job: nothing to cancel.
REPORTED = ("done", "interrupted")


class JobWatch:
    """What a running apply listens to: results and progress from the job's own nodes only,
    with room for progress bounded (a node can send any number of progress messages)."""

    MAX_PROGRESS = 1000

    def __init__(self, nodes) -> None:
        self.nodes = set(nodes)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.progress_queued = 0
        self.reported: set[str] = set()
        self.sent: set[str] = set()   # the nodes the job was sent to so far (stage by stage)
        self.cancelled = False        # `job cancel`: no further stage is sent

    def release(self, node_id: str) -> None:
        """`job cancel` could not stop the job on this node (no answer, or it was not running it): the
        running apply stops waiting for it (a result it delivers later is still recorded)."""
        if node_id in self.nodes:
            self.queue.put_nowait(("released", node_id, None))

    def progress(self, node_id: str, body: dict) -> bool:
        if node_id not in self.nodes or self.progress_queued >= self.MAX_PROGRESS:
            return False
        self.progress_queued += 1
        self.queue.put_nowait(("progress", node_id, body))
        return True

    def result(self, node_id: str, body: dict) -> bool:
        """The first result of each of the job's nodes (an agent resends until acknowledged)."""
        if node_id not in self.nodes or node_id in self.reported:
            return False
        self.reported.add(node_id)
        self.queue.put_nowait(("result", node_id, body))
        return True

    async def get(self, timeout: float):
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if item[0] == "progress":
            self.progress_queued -= 1
        return item


class JobBoard:
    """What jobs need of the master, and the applies running now.

    ``watchers``: job id -> the JobWatch of its running apply; ``redactions``: job id -> node id ->
    the sensitive output of earlier stages that the node's job carries (redacted from what that
    node reports). ``send`` and ``drops`` are the transport's, for the agents' job messages;
    ``connected(node_id)`` the roster's (whether a node's agent is connected now); ``events`` the
    master's bus, where jobs starting (``job_started``) and each node's result (``job_finished``)
    are published.
    """

    def __init__(self, store: Store, secrets: SecretStore, state_dir: str,
                 accepted_nodes: Callable[[], set[str]],
                 ask_following: Callable[[dict[str, dict], str, float], Awaitable[dict[str, dict]]],
                 send: Callable[[bytes, Message], bool], drops,
                 connected: Callable[[str], bool] = lambda node_id: True, events: EventBus | None = None) -> None:
        self.connected = connected
        self.events = events if events is not None else EventBus()
        self.disconnect_grace = DISCONNECT_GRACE_S
        self.store = store
        self.secrets = secrets
        self.state_dir = state_dir
        self.accepted_nodes = accepted_nodes
        self.ask_following = ask_following
        self.send = send
        self.drops = drops
        self.watchers: dict[str, JobWatch] = {}
        self.redactions: dict[str, dict[str, list[str]]] = {}
        self.cancel_timeout = CANCEL_TIMEOUT_S

    async def cancel(self, job_id: str) -> dict:
        """Stop job ``job_id`` on its nodes that have not reported a result: {"job", "nodes": {node:
        {"ok", "result", "detail"}}}, ``result`` one of cancelled (the node stops it and reports what
        ran), not_sent (a later stage's node, which now never gets it), finished (its result is in),
        not_running (the agent was not running it: it ended before the cancel came, or never
        arrived; it will not start), failed (not connected, no answer: it may run on)."""
        job = self.store.job(job_id)
        if job is None:
            raise ControlError(f"no job {job_id!r} (see `pimaster jobs`)")
        watch = self.watchers.get(job_id)
        if watch is not None:
            watch.cancelled = True  # before asking: a stage about to be sent is not sent
        nodes: dict[str, dict] = {}
        ask: dict[str, dict] = {}
        for node_id, item in job["nodes"].items():
            if item["status"] in REPORTED:
                nodes[node_id] = {"ok": True, "result": "finished", "detail": f"already finished ({item['status']})"}
            elif watch is not None and node_id not in watch.sent:
                nodes[node_id] = {"ok": True, "result": "not_sent",
                                  "detail": "a later stage's node: the job is no longer sent to it"}
            else:
                # Running, not acknowledged yet (sent), or given up on (no_answer): it may run it.
                ask[node_id] = {"job": job_id}
        answers = await self.ask_following(ask, proto.CANCEL, timeout=self.cancel_timeout) if ask else {}
        for node_id, answer in answers.items():
            nodes[node_id] = cancel_answer(answer, self.cancel_timeout)
            if watch is not None and nodes[node_id]["result"] in ("failed", "not_running"):
                watch.release(node_id)
        return {"job": job_id, "nodes": dict(sorted(nodes.items()))}

    def job_started(self, job_id: str, file: str, target: str | None, test: bool, nodes,
                    reason: str | None = None) -> None:
        """A job was recorded and is about to be sent: the ``job`` event, state ``started``
        (``reason``: why the master started it by itself)."""
        nodes = sorted(nodes)
        shown = os.path.basename(file) if file.startswith("/") else file  # a run's label is `run: CMD`
        self.events.publish("job", job=job_id, state="started", file=shown, target=target,
                            test=bool(test), nodes=nodes, node_count=len(nodes),
                            **({"reason": reason} if reason else {}))

    def job_finished(self, job_id: str, node_id: str, status: str, summary: dict | None) -> None:
        """A node's result for ``job_id`` was recorded (``status``: done, interrupted, no_answer, not_sent):
        the ``job`` event, state ``finished``, with the word `pimaster apply` shows for it."""
        from .apply_view import node_result

        self.events.publish("job", node=node_id, job=job_id, state="finished", status=status,
                            result=node_result(status, summary), summary=summary or {})

    def redact(self, value, job_id: str | None = None, node_id: str | None = None):
        """``value`` without any secret, nor the sensitive output of earlier stages that this
        node's job carried (the strings it was told to redact)."""
        secrets = self.secrets.values()
        carried = self.redactions.get(job_id, {}).get(node_id, ())
        for i, output in enumerate(sorted(carried, key=len, reverse=True)):
            secrets[f"output-{i + 1}"] = output
        return redact(value, secrets)

    def redact_raw(self, body, job_id: str | None, node_id: str):
        """An agent's message body as it came, redacted (`redact`); None when it is nested too
        deeply to walk (the checks refuse it then)."""
        try:
            return self.redact(body, job_id, node_id)
        except RecursionError:
            return None

    def on_progress(self, ident: bytes, node_id: str, key: str, msg: Message) -> None:
        """A `job_progress`: to the running apply of that job, if the node is one of its."""
        watcher = self.watchers.get(str(msg.body.get("job"))[:proto.MAX_ID_LENGTH])
        # Redacted before it is checked: the check cuts and cleans text, and a secret cut in two
        # or with its line breaks replaced would not be recognised any more.
        raw = self.redact_raw(msg.body, str(msg.body.get("job"))[:proto.MAX_ID_LENGTH], node_id) if watcher else None
        progress = check_progress(raw) if isinstance(raw, dict) else None
        if watcher is None or progress is None or not watcher.progress(node_id, progress):
            self.drops.drop("progress from %s for a job it is not running", node_id, peer=key)

    def on_job_result(self, ident: bytes, node_id: str, key: str, msg: Message) -> None:
        """A `job_result`: checked, redacted, stored once, acknowledged, handed to the apply."""
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
                self.send(ident, Message(type=proto.JOB_RESULT_ACK, reply_to=msg.id, body={"job": job_id}))
            return
        # Stored and shown: no secret value, and no output of a sensitive state. Redacted before
        # it is checked (the check cuts and cleans text: a secret cut in two, or with its line
        # breaks replaced, would not be recognised), and again after. The raw result goes only to
        # a running apply, for rendering its later stages.
        raw = self.redact_raw(msg.body, job_id, node_id)
        shown = (check_job_result(raw, states) if isinstance(raw, dict) else None) or result
        kept = [dict(r, changes={"redacted": "sensitive state"} if r.get("changes") else {})
                if r.get("sensitive") else r for r in shown["results"]]
        recorded = self.store.record_result(job_id, node_id, result["status"], result["summary"],
                                            self.redact(kept, job_id, node_id), result["started"], result["finished"])
        self.send(ident, Message(type=proto.JOB_RESULT_ACK, reply_to=msg.id, body={"job": job_id}))
        if recorded:  # not again for a result resent before its acknowledgement arrived
            self.job_finished(job_id, node_id, result["status"], result["summary"])
        watcher = self.watchers.get(job_id)
        if watcher is not None:
            watcher.result(node_id, result)


def cancel_answer(answer: dict, timeout: float) -> dict:
    """One node's answer to `cancel` (from ``ask_following``) as `job cancel` reports it."""
    body = answer.get("body") or {}
    if answer.get("ok") and body.get("cancelled") is True:
        was = "before it started" if body.get("was") == "queued" else "its running command is ended"
        return {"ok": True, "result": "cancelled",
                "detail": f"stopping: {was}, no further state starts; it reports what ran"}
    if answer.get("ok") and body.get("cancelled") is False:
        return {"ok": True, "result": "not_running",
                "detail": "its agent was not running the job (it ended, or never arrived); it will not start"}
    error = one_line(answer.get("error") or body.get("error") or "malformed answer")
    if error.startswith("no answer"):
        # An agent that does not know `cancel` drops it as an unknown message type, unanswered.
        error += ": this agent cannot cancel (a piagent older than this master?); the job runs on there"
    return {"ok": False, "result": "failed", "detail": error}
