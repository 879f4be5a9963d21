"""`pimaster apply`: render for every targeted node, refuse the whole job on any error, push, collect.

Jobs see the rest of the master only through a ``JobBoard`` (board.py): the store, the secrets, the state
dir, the accepted nodes, ``ask_following``, and the running applies (their watchers and the strings
each node's results are redacted of). The board also takes the agents' `job_progress` and
`job_result` messages.

Results are stored in SQLite as they arrive. An agent that loses the master mid-job keeps its
result on disk and delivers it when it reconnects, so a result that arrives after the person's
`pimaster apply` has stopped waiting (or after a master restart) is still recorded against the job.

A node whose connection goes while its job runs is shown at once (a `connection` event); the apply
waits the reconnect window (DISCONNECT_GRACE_S) for it to come back, then finishes that node as
`no_answer` -- the master's word for "heard no result", not `interrupted` (the agent's word for a
job it knows was cut short): the job may still finish on the node, and its result, delivered when
the agent is back, then replaces `no_answer` (`pimaster job ID`).

`pimaster job cancel ID` (``JobBoard.cancel``) asks the job's nodes that have not reported a result
to stop it: each ends the running command, starts no further state and reports what ran, the job
`interrupted`; a running apply of it sends no further stage (those nodes are recorded as never
sent the job) and ends once the nodes it waits for have reported.

Batches (`--batch N|N%`, ``targets.batches``): within each stage, the stage's nodes are pushed a
batch at a time, each batch awaited before the next is sent; the size is counted on the whole
target (25% of 8 nodes: 2 nodes per batch in every stage), and stages still go in their order.
Without --batch a stage is one batch. `--fail-stop` (``Rollout``): once a node has failed (a failed
state, refused, no answer, no result in time), no further batch or stage starts; the nodes it would
have reached are recorded as never sent the job, and say why. `pimaster run` (runjob.py) pushes its
one `cmd.run` state through the same batches and ``_run_stage``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import functools
import hashlib
import hmac
import json
import os
import secrets
import time

from piagent import protocol as proto

from .board import JobBoard, JobWatch
from .errors import ControlError
from .facts import missing_facts
from .inventory import load_inventory, resolve_nodes
from .render import Pending, StateFileError, StateFileErrors, compile_for_node, to_attrdict
from .results import one_line
from .rollout import Rollout, never_sent, not_sent, stopped_reason
from .salt import salt_context
from .secrets import SecretError, string_leaves, strings_in
from .statetree import StateTree, state_tree
from .targets import batch_size, batches


log = logging.getLogger("pimaster")

# What one node's sensitive states may add to the strings redacted from others' results.
MAX_SENSITIVE_STRINGS = 256
MAX_SENSITIVE_LENGTH = 4096
# How often a running apply looks whether its nodes are still connected.
CONNECTION_CHECK_S = 1.0
# Applies rendering at once; more wait their turn (a rendering is CPU work, or a wait for a client).
RENDER_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="render")


class ApplyRefused(Exception):
    """The state file does not render or validate: nothing was sent."""


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _format_errors(per_node: dict[str, list[StateFileError]], targets: int | None = None) -> str:
    """Every distinct problem once; followed by the nodes it concerns when not all ``targets`` of them."""
    by_message: dict[str, list[str]] = {}
    for node_id, errors in per_node.items():
        for error in errors:
            by_message.setdefault(str(error), []).append(node_id)
    lines = []
    for message, nodes in by_message.items():
        if len(nodes) < (targets or len(per_node)) and (targets or len(per_node)) > 1:
            lines.append(f"{message} [{', '.join(sorted(nodes))}]")
        else:
            lines.append(message)
    return "\n".join(lines)


# The secret keying the digests of what each node got (store.applied_files): a digest of a job that
# carries a secret must not let anyone holding the database test guesses of it.
DIGEST_SECRET = "pimaster-applied-digest"


def job_digest(key: str, job: list[dict]) -> str:
    """What a node's rendered job is, in a few bytes (HMAC-SHA256 of its canonical JSON)."""
    text = json.dumps(job, sort_keys=True, separators=(",", ":"), default=str)
    return hmac.new(key.encode(), text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


class Plan:
    """Everything an apply needs that does not depend on results: file, inventory, nodes, catalogues."""

    def __init__(self, board: JobBoard, path: str, target: str | None, tree: StateTree,
                 only: list[str] | None = None) -> None:
        """``path``: the state file, where ``tree`` (the client's, for `pimaster apply`) has it;
        ``only``: of the target, only these nodes (the master's own jobs: a list's next file)."""
        self.path, self.tree = path, tree
        self.root = tree.root
        try:
            self.inventory = load_inventory(self.root, tree)
        except StateFileError as exc:
            raise ApplyRefused(str(exc)) from None
        accepted = board.accepted_nodes()
        self.facts = {n["node_id"]: n["facts"] for n in board.store.nodes() if n["node_id"] in accepted}
        try:
            self.entries, new_assignments = resolve_nodes(self.inventory, self.facts, board.store.assignments(),
                                                          board.store.identities())
        except StateFileError as exc:
            raise ApplyRefused(str(exc)) from None
        no_roles = (None if self.inventory.path else
                    f"roles come from the cluster.yaml next to the state file, and {self.root} has none")
        self.targets = select_targets(self.entries, target, self.facts, no_roles)
        if only is not None:
            self.targets = [n for n in self.targets if n in set(only)]
        if new_assignments:
            board.store.add_assignments(new_assignments)
        self.catalogs = board.store.catalogs()
        self.secrets = board.secrets
        # A node whose agent has not reported the facts state files read of every node (or
        # reported them malformed: they were refused) is left out of `nodes`, and its own job
        # fails; the others' jobs go ahead.
        self.unfit = {n: [f"has not reported the facts state files need ({', '.join(missing)}): its agent "
                          "sent none or they were refused (see the master's log)"]
                      for n in self.entries if (missing := missing_facts(self.facts[n]))}
        self.everyone = [self.node_context(n) for n in sorted(self.entries) if n not in self.unfit]

    @functools.cached_property
    def fallback_catalog(self) -> dict:
        """For a node whose agent never sent its catalogue: the state functions of the agent
        installed beside this master, never another node's (which that node chose)."""
        from piagent.states import catalog

        return catalog()

    def node_context(self, node_id: str) -> dict:
        # The inventory's keys win over facts of the same name; facts are only the schema's. An
        # entry's `pillar:` is that node's own (as a minion's pillar is): it is `pillar` in its
        # own renderings only, never in `node`/`nodes`, which every node's rendering sees.
        entry = {k: v for k, v in self.entries[node_id].items() if k != "pillar"}
        return dict(self.facts[node_id], **entry, facts=self.facts[node_id])

    def claimed(self, node_id: str) -> set[str]:
        """The names and addresses the inventory gives the other nodes: a node reporting one of
        them as its own must not be taken for that node (grains select files and data)."""
        return {str(e[k]) for n, e in self.entries.items() if n != node_id
                for k in ("id", "hostname", "ip") if e.get(k)}

    def unfit_errors(self, node_id: str) -> list[StateFileError]:
        return [StateFileError(os.path.basename(self.path), None, f"{node_id}: {reason}")
                for reason in self.unfit[node_id]]

    def render(self, node_ids: list[str], results) -> tuple[dict, dict, dict, dict]:
        """Per node: the job and the secret values it carries; the file's `pimaster:` settings; errors."""
        jobs, carried, errors = {}, {}, {}
        meta: dict = {}
        for node_id in node_ids:
            if node_id in self.unfit:
                continue
            used: dict[str, str] = {}

            def secret(name, length=64, _used=used):
                name = str(name)  # a literal name is state text (a str subclass): a plain name here
                try:
                    _used[name] = self.secrets.get(name, length)
                except SecretError as exc:
                    raise ValueError(str(exc)) from None
                return _used[name]

            context = {"node": self.node_context(node_id), "nodes": self.everyone,
                       "cluster": self.inventory.cluster, "results": results, "secret": secret,
                       # Salt's names (grains, pillar, salt[...]): a layer over the above, for Salt's files.
                       **salt_context(self.facts[node_id], self.entries[node_id], self.inventory.cluster,
                                      self.inventory.pillar, claimed=self.claimed(node_id))}
            own_catalog = self.catalogs.get(node_id)
            try:
                jobs[node_id] = compile_for_node(self.path, context, own_catalog or self.fallback_catalog,
                                                 meta=meta, tree=self.tree)
                carried[node_id] = list(used.values())
            except (RecursionError, MemoryError) as exc:
                # Data built to be too deep or too large (a stage's results through load_yaml...):
                # this node's job fails, the apply and the others go on.
                errors[node_id] = [StateFileError(os.path.basename(self.path), None,
                                                  f"{node_id}: rendering failed: {type(exc).__name__} (data nested "
                                                  "too deeply or too large)")]
            except StateFileErrors as exc:
                if own_catalog and self._valid_elsewhere(context, meta):
                    # The file is fine; this node's agent lacks what it uses (an older piagent, or
                    # a catalogue it chose): its own job fails, the others' go ahead.
                    self.unfit[node_id] = [f"its agent's state functions refuse this file: {exc.errors[0].reason} "
                                           "(upgrade piagent on it)"]
                else:
                    errors[node_id] = exc.errors
        return jobs, carried, meta, errors

    def _valid_elsewhere(self, context: dict, meta: dict) -> bool:
        """Whether the file compiles for this node with the state functions of the agent beside
        this master."""
        try:
            compile_for_node(self.path, context, self.fallback_catalog, meta=dict(meta), tree=self.tree)
        except StateFileErrors:
            return False
        return True


def stage_groups(meta: dict, entries: dict[str, dict], targets: list[str]) -> list[list[str]]:
    """Nodes per stage: the first stage whose role a node has; nodes with none of them go last."""
    stages = meta.get("stages") or []
    groups: list[list[str]] = [[] for _ in stages] + [[]]
    for node_id in targets:
        roles = entries[node_id].get("roles", [])
        index = next((i for i, role in enumerate(stages) if role in roles), len(stages))
        groups[index].append(node_id)
    return [g for g in groups if g]


def select_targets(entries: dict[str, dict], target: str | None, facts: dict[str, dict],
                   no_roles: str | None = None) -> list[str]:
    """The nodes of ``entries`` (the inventory's, resolved) in ``target``: `targets.Target`, the one
    meaning of a target, with the roles of ``entries`` and ``facts`` (node id -> as reported).
    Refused (ApplyRefused) when the target is malformed, has a `role:` term while ``no_roles``
    says why there are none, or matches nothing (saying which term matched what)."""
    from .targets import checked_target, compile_target, no_match

    try:
        compiled = compile_target(checked_target(target) if target is not None else None)
    except ControlError as exc:
        raise ApplyRefused(str(exc)) from None
    if compiled.needs_roles and no_roles:
        raise ApplyRefused(f"{target}: {no_roles}")
    chosen = compiled.select({n: (e.get("roles", []), facts.get(n)) for n, e in entries.items()})
    if not chosen:
        raise ApplyRefused(no_match(target, compiled, {n: (e.get("roles", []), facts.get(n))
                                                       for n, e in entries.items()}))
    return chosen


@dataclasses.dataclass
class MasterJob:
    """How the master's own jobs (the cluster's `apply:` list: on enrollment, drift checks) differ from
    a person's: ``only`` these nodes of the target; ``changed_only``: leave out nodes whose rendered
    job is what they last got and carried out (store.applied_files), except the ``newcomers``;
    ``reason``: why it started (`pimaster jobs` shows it); ``unchanged_only`` (drift checks): leave out
    nodes whose rendering is no longer what they last carried out, listed in ``outdated`` (a state
    file, cluster.yaml or another node's facts changed: a new rendering to roll out, not a node
    that drifted)."""

    reason: str | None = None
    only: list[str] | None = None
    changed_only: bool = False
    newcomers: frozenset = frozenset()
    unchanged_only: bool = False
    outdated: list = dataclasses.field(default_factory=list)


async def apply(board: JobBoard, emit, file: str, target: str | None = None, test: bool = False,
                timeout: float = 3600.0, ack_timeout: float = 15.0, tree: StateTree | None = None,
                batch: str | None = None, fail_stop: bool = False, master_job: MasterJob | None = None) -> dict | None:
    """Apply the state file at ``file`` of ``tree`` (default: this file system, its directory);
    ``batch`` (`targets.checked_batch`'s form) and ``fail_stop`` as the module docstring says;
    ``master_job`` for the master's own jobs. None when ``master_job`` left no node to send to."""
    tree = tree or state_tree(os.path.dirname(file), (board.state_dir,))
    try:
        return await _apply(board, emit, file, target, test, timeout, ack_timeout, tree, batch, fail_stop,
                            master_job or MasterJob())
    finally:
        tree.release()


async def _rendering(function, *args):
    """``function(*args)`` in a rendering thread: reading a client's state tree may wait for the
    client, so renderings have threads of their own, never those `ping` and the rest use."""
    return await asyncio.get_running_loop().run_in_executor(RENDER_THREADS, functools.partial(function, *args))


async def _apply(board: JobBoard, emit, file: str, target: str | None, test: bool, timeout: float,
                 ack_timeout: float, tree: StateTree, batch: str | None, fail_stop: bool,
                 master_job: MasterJob) -> dict | None:
    try:
        plan = await _rendering(Plan, board, file, target, tree, master_job.only)
        if not plan.targets:
            return None
        # Every node's file is rendered and checked before anything is sent. Nodes of later stages
        # see `results` as Pending here and are rendered again once the stages before them ran.
        jobs, carried, meta, errors = await _rendering(plan.render, plan.targets, Pending())
    except ApplyRefused as exc:
        raise ControlError("refused, nothing was sent:\n" + str(exc)) from None
    if errors:
        raise ControlError("refused, nothing was sent:\n" + _format_errors(errors, len(plan.targets)))
    # What each node is about to get, as rendered before any stage ran (so the same file renders the
    # same digest next time): recorded for the nodes that carry it out.
    key = board.secrets.get(DIGEST_SECRET)
    digests = {n: job_digest(key, jobs[n]) for n in plan.targets if n in jobs}
    if master_job.unchanged_only:
        last = board.store.applied_digests(plan.path)
        master_job.outdated = [n for n in plan.targets if n in digests and n in last and last[n] != digests[n]]
        plan.targets = [n for n in plan.targets if n not in master_job.outdated]
        if not plan.targets:
            return None
    if master_job.changed_only:
        last = board.store.applied_digests(plan.path)
        plan.targets = [n for n in plan.targets if n in master_job.newcomers
                        or (n in digests and last.get(n) != digests[n])]
        if not plan.targets:
            return None
    groups = stage_groups(meta, plan.entries, plan.targets)
    job_id = new_job_id()
    board.store.create_job(job_id, plan.path, target, test, {n: len(jobs.get(n, ())) for n in plan.targets},
                           master_job.reason)
    board.job_started(job_id, plan.path, target, test, plan.targets, master_job.reason)
    board.store.set_last_inventory(plan.path, plan.inventory.path, plan.inventory.text)
    watch = JobWatch(plan.targets)
    board.watchers[job_id] = watch
    board.redactions[job_id] = {}
    sensitive_outputs: set[str] = set()
    started = time.monotonic()
    deadline = started + timeout
    results_so_far: dict[str, dict] = {}
    try:
        size = batch_size(batch, len(plan.targets))
        emit({"type": "start", "job": job_id, "file": plan.path, "test": test,
              "nodes": {n: len(jobs.get(n, ())) for n in plan.targets}, "stages": [len(g) for g in groups],
              "batch_size": size if batch else None, "fail_stop": fail_stop})
        if not any(jobs.get(n) for n in plan.targets):
            emit({"type": "warning", "message": f"{os.path.basename(plan.path)} has no state for any of the "
                  f"{len(plan.targets)} node(s): an empty file, or every state under a condition none meets"})
        refused: set[str] = set()
        rollout = Rollout(board, emit, job_id, watch, fail_stop)
        for index, group in enumerate(groups):
            if rollout.held_back(group):
                continue
            if index > 0:
                try:
                    jobs, carried, _, errors = await _rendering(plan.render, group, to_attrdict(results_so_far))
                except Exception as exc:  # a bug, or data no check foresaw: this stage's nodes fail, not the job
                    log.exception("job %s: rendering a later stage failed", job_id)
                    jobs, carried = {}, {}
                    errors = {n: [StateFileError(os.path.basename(plan.path), None, f"{n}: rendering failed: "
                                                 f"{type(exc).__name__}: {exc}")] for n in group}
                # Results may add or remove states: each node's result is checked against its job as sent.
                board.store.set_job_node_states(job_id, {n: len(jobs[n]) for n in group if n in jobs})
                for node_id, problems in errors.items():
                    _refuse_node(board, emit, job_id, node_id, problems)
                rollout.check(sorted(errors))
            # Nodes whose facts or catalogue do not fit (found before, or by this rendering).
            for node_id in sorted((plan.unfit.keys() & set(plan.targets)) - refused):
                _refuse_node(board, emit, job_id, node_id, plan.unfit_errors(node_id))
                refused.add(node_id)
            rollout.check(sorted(refused))
            group = [n for n in group if n in jobs]
            for part in batches(group, str(size)):
                if rollout.held_back(part):
                    continue
                if batch:
                    rollout.announce(part, index, len(groups))
                stage_results = await _run_stage(board, emit, job_id, test, part, jobs, carried, watch,
                                                 ack_timeout, deadline, sensitive_outputs)
                for node_id, raw in stage_results.items():
                    results_so_far[node_id] = {r.get("id"): r for r in raw.get("results", []) if isinstance(r, dict)}
                    # Sensitive are the states the file marked so, not what the agent says: a node
                    # calling its own output sensitive would have it redacted from other nodes' results.
                    marked = {s.get("id") for s in jobs.get(node_id, ()) if s.get("sensitive")}
                    outputs = [s for res in raw.get("results", []) if isinstance(res, dict) and res.get("id") in marked
                               for s in string_leaves(res.get("changes"))]
                    # Bounded: a node decides how much its sensitive states print.
                    sensitive_outputs.update(s for s in outputs[:MAX_SENSITIVE_STRINGS]
                                             if len(s) <= MAX_SENSITIVE_LENGTH)
                rollout.check(part)
    finally:
        board.watchers.pop(job_id, None)
        board.redactions.pop(job_id, None)
    report = job_report(board.store.job(job_id), time.monotonic() - started)
    if not test:
        board.store.set_applied(plan.path, job_id, {n: digests[n] for n, item in report["nodes"].items()
                                                    if item["ok"] and n in digests})
    return report


def _strings_used(candidates, job: list[dict]) -> list[str]:
    """Those of ``candidates`` that occur in a string of ``job`` (what the job itself carries)."""
    leaves = list(strings_in(job))
    return [c for c in candidates if any(c in leaf for leaf in leaves)]


async def _run_stage(board, emit, job_id, test, group, jobs, carried, watch, ack_timeout, deadline,
                     sensitive_outputs, on_result=None) -> dict:
    """Push one stage's (or batch's) jobs and wait for its results (raw, for the next stage's
    rendering). ``on_result(node_id, result)``: each result as it arrives, before its `node` event."""
    if not group:
        return {}
    if watch.cancelled:  # cancelled while this stage was rendered: not sent (no await from here to sent)
        for node_id in group:
            not_sent(board, emit, job_id, node_id)
        return {}
    # Earlier stages' sensitive output: a node gets, to redact from what it reports, only the
    # strings its own job carries, never what was meant for other nodes; and the master redacts
    # only those from what that node reports (another node's output cannot rewrite its results).
    extra = sorted(sensitive_outputs)
    for n in group:
        board.redactions[job_id][n] = _strings_used(extra, jobs[n])
    bodies = {n: {"job": job_id, "test": test, "states": jobs[n],
                  "redact": carried[n] + board.redactions[job_id][n]} for n in group}
    watch.sent.update(group)
    acks = await board.ask_following(bodies, proto.APPLY, timeout=ack_timeout)
    waiting = set()
    for node_id, ack in acks.items():
        if ack.get("ok") and ack.get("body", {}).get("accepted"):
            board.store.set_job_node_status(job_id, node_id, "running")
            waiting.add(node_id)
        else:
            # The master's own words (no answer, not connected), or the agent's, on one bounded line.
            error = one_line(ack.get("error") or ack.get("body", {}).get("error") or "did not take the job")
            board.store.set_job_node_status(job_id, node_id, "no_answer")
            board.job_finished(job_id, node_id, "no_answer", None)
            emit({"type": "node", "node": node_id, "status": "no_answer", "error": error})
    raw: dict[str, dict] = {}
    released: set[str] = set()
    lost = LostNodes(board, emit, job_id)
    while waiting - set(raw) - lost.given_up - released:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            kind, node_id, body = await watch.get(min(remaining, CONNECTION_CHECK_S))
        except asyncio.TimeoutError:
            lost.check(waiting - set(raw) - released)
            continue
        if kind == "released":
            if node_id in waiting and node_id not in raw and node_id not in lost.given_up | released:
                released.add(node_id)
                board.store.set_job_node_status(job_id, node_id, "no_answer")
                board.job_finished(job_id, node_id, "no_answer", None)
                emit({"type": "node", "node": node_id, "status": "no_answer",
                      "error": "cancelled; its agent did not stop the job (a result it sends later is still kept)"})
            continue
        lost.heard_from(node_id)
        if kind == "progress":
            emit({"type": "progress", "node": node_id, "index": body.get("index"),
                  "state": board.redact(body.get("state"), job_id, node_id)})
        elif kind == "result" and node_id in waiting and node_id not in raw:
            # Also a node given up on that came back meanwhile: its result was stored over no_answer.
            raw[node_id] = body
            lost.given_up.discard(node_id)
            if on_result is not None:
                on_result(node_id, body)
            emit({"type": "node", "node": node_id, "status": body["status"], "summary": body.get("summary")})
        lost.check(waiting - set(raw) - released)
    return raw


class LostNodes:
    """The nodes of a stage whose connection went while their job ran: each is shown when its
    connection goes (and when it comes back), and finished as no_answer once it has been gone for
    the board's ``disconnect_grace``."""

    def __init__(self, board, emit, job_id: str) -> None:
        self.board, self.emit, self.job_id = board, emit, job_id
        self.since: dict[str, float] = {}   # node -> monotonic, when it was first seen gone
        self.given_up: set[str] = set()
        self.checked = 0.0

    def heard_from(self, node_id: str) -> None:
        """A message from the node: if it was gone, it is back (before the next look says so)."""
        if self.since.pop(node_id, None) is not None:
            self.emit({"type": "connection", "node": node_id, "state": "reconnected"})

    def check(self, running) -> None:
        now = time.monotonic()
        if now - self.checked < CONNECTION_CHECK_S:
            return  # not once per progress message of a large cluster: once a second is soon enough
        self.checked = now
        grace = self.board.disconnect_grace
        for node_id in sorted(set(running) - self.given_up):
            if self.board.connected(node_id):
                self.heard_from(node_id)
            elif node_id not in self.since:
                self.since[node_id] = now
                self.emit({"type": "connection", "node": node_id, "state": "disconnected", "grace_s": grace})
            elif now - self.since[node_id] >= grace:
                del self.since[node_id]
                self.given_up.add(node_id)
                self.board.store.set_job_node_status(self.job_id, node_id, "no_answer")
                self.board.job_finished(self.job_id, node_id, "no_answer", None)
                self.emit({"type": "node", "node": node_id, "status": "no_answer",
                           "error": f"disconnected during the job and not back within {grace:g} s; a result it "
                                    f"delivers later is still recorded (pimaster job {self.job_id})"})


def _refuse_node(board, emit, job_id: str, node_id: str, problems: list[StateFileError]) -> None:
    """A node of a later stage whose file does not render with the earlier stages' results."""
    message = "\n".join(map(str, problems))
    result = {"id": "render", "fun": "pimaster.render", "name": node_id, "result": False, "changes": {},
              "comment": f"refused, nothing was sent to this node:\n{message}", "status": "failed"}
    board.store.record_result(job_id, node_id, "done", {"failed": 1}, [board.redact(result, job_id, node_id)], None, None)
    board.job_finished(job_id, node_id, "done", {"failed": 1})
    emit({"type": "node", "node": node_id, "status": "done", "summary": {"failed": 1}})


def job_report(job: dict, elapsed: float | None = None) -> dict:
    """The `--json` shape: {"job": ID, "nodes": {ID: {"ok", "result", "changed", "failed", "states", ...}}};
    a `pimaster run` job's is `run_view.run_report`'s."""
    from .apply_view import node_result
    from .run_view import is_run, run_report

    if is_run(job):
        return run_report(job, elapsed)
    nodes = {}
    for node_id, item in job["nodes"].items():
        summary = item["summary"] or {}
        done = item["status"] == "done"
        nodes[node_id] = {
            "ok": done and summary.get("failed", 0) == 0,
            "status": item["status"],
            # The word the table and the progress lines show (apply_view's vocabulary).
            "result": "not sent" if never_sent(item) else node_result(item["status"], summary),
            "changed": summary.get("changed", 0),
            "failed": summary.get("failed", 0),
            "not_run": summary.get("not_run", 0),
            "skipped": summary.get("skipped", 0),
            "unchanged": summary.get("ok", 0),
            "states": item["results"],
            "duration_s": round(item["finished"] - item["started"], 2)
            if item["finished"] and item["started"] and not never_sent(item) else None,
            "reboot_required": any(isinstance(r.get("changes"), dict) and r["changes"].get("reboot_required")
                                   for r in item["results"]),
        }
    report = {"job": job["id"], "file": job["file"], "target": job["target"], "test": bool(job["test"]),
              "created": job["created"], "reason": job.get("reason"), "nodes": nodes, "stopped": stopped_reason(job)}
    if elapsed is not None:
        report["elapsed_s"] = round(elapsed, 2)
    return report
