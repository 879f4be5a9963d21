"""`pimaster apply`: render for every targeted node, refuse the whole job on any error, push, collect.

Results are stored in SQLite as they arrive. An agent that loses the master mid-job keeps its
result on disk and delivers it when it reconnects, so a result that arrives after the person's
`pimaster apply` has stopped waiting (or after a master restart) is still recorded against the job.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import secrets
import time

from piagent import protocol as proto

from .inventory import load_inventory, resolve_nodes
from .render import StateFileError, StateFileErrors, compile_for_node, resolve_state_path


class ApplyRefused(Exception):
    """The state file does not render or validate: nothing was sent."""


def states_dir() -> str | None:
    """Where bare names (`pimaster apply slurm`) are looked up: the installed or the source tree's states/."""
    for candidate in (os.environ.get("PIMASTER_STATES_DIR"), "/usr/share/pimaster/states",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "states")):
        if candidate and os.path.isdir(candidate):
            return candidate
    return None


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _format_errors(per_node: dict[str, list[StateFileError]]) -> str:
    """Every distinct problem once; prefixed with the nodes it concerns when not all of them."""
    by_message: dict[str, list[str]] = {}
    for node_id, errors in per_node.items():
        for error in errors:
            by_message.setdefault(str(error), []).append(node_id)
    lines = []
    for message, nodes in by_message.items():
        if len(per_node) > 1 and len(nodes) < len(per_node):
            lines.append(f"{message} [{', '.join(sorted(nodes))}]")
        else:
            lines.append(message)
    return "\n".join(lines)


def plan(master, file: str, target: str | None, cwd: str | None = None) -> tuple[str, dict[str, list[dict]]]:
    """The job for every targeted node, or ApplyRefused with every problem found."""
    spec = file if os.path.isabs(file) or cwd is None else os.path.join(cwd, file)
    if not os.path.exists(spec) and os.sep not in file:
        spec = file  # a bare name: a shipped state file
    try:
        path = resolve_state_path(spec, states_dir())
    except StateFileError as exc:
        raise ApplyRefused(str(exc)) from None
    root = os.path.dirname(path)
    try:
        inventory = load_inventory(root)
    except StateFileError as exc:
        raise ApplyRefused(str(exc)) from None
    nodes = {n["node_id"]: n["facts"] for n in master.store.nodes() if n["node_id"] in master.node_of_key.values()}
    assignments = master.store.assignments()
    entries, new_assignments = resolve_nodes(inventory, nodes, assignments)
    targets = select_targets(entries, target)
    if not targets:
        raise ApplyRefused(f"no accepted node matches {target or '*'}")
    if new_assignments:
        master.store.add_assignments({n: a for n, a in new_assignments.items() if n in entries})
    catalogs = master.store.catalogs()
    fallback: dict = {}
    for catalog in catalogs.values():
        fallback.update(catalog)
    everyone = [dict(nodes[n], **entries[n], facts=nodes[n]) for n in sorted(entries)]
    jobs: dict[str, list[dict]] = {}
    errors: dict[str, list[StateFileError]] = {}
    for node_id in targets:
        node_ctx = dict(nodes[node_id], **entries[node_id], facts=nodes[node_id])
        context = {"node": node_ctx, "nodes": everyone, "cluster": inventory.cluster}
        catalog = catalogs.get(node_id) or fallback
        try:
            jobs[node_id] = compile_for_node(path, context, catalog, root)
        except StateFileErrors as exc:
            errors[node_id] = exc.errors
    if errors:
        raise ApplyRefused(_format_errors(errors))
    return path, jobs


def select_targets(entries: dict[str, dict], target: str | None) -> list[str]:
    if not target or target == "*":
        return sorted(entries)
    if target.startswith("role:"):
        role = target[5:]
        return sorted(n for n, e in entries.items() if role in e.get("roles", []))
    return sorted(n for n in entries if fnmatch.fnmatchcase(n, target))


async def apply(master, emit, file: str, target: str | None = None, test: bool = False,
                timeout: float = 3600.0, ack_timeout: float = 15.0, cwd: str | None = None) -> dict:
    try:
        path, jobs = await asyncio.to_thread(plan, master, file, target, cwd)
    except ApplyRefused as exc:
        raise master.ControlError("refused, nothing was sent:\n" + str(exc)) from None
    job_id = new_job_id()
    master.store.create_job(job_id, path, target, test, {n: len(states) for n, states in jobs.items()})
    queue: asyncio.Queue = asyncio.Queue()
    master.job_watchers[job_id] = queue
    started = time.monotonic()
    outcome: dict[str, dict] = {}
    try:
        emit({"type": "start", "job": job_id, "file": path, "test": test,
              "nodes": {n: len(states) for n, states in jobs.items()}})
        bodies = {n: {"job": job_id, "test": test, "states": states} for n, states in jobs.items()}
        acks = await master.ask(bodies, proto.APPLY, timeout=ack_timeout)
        waiting = set()
        for node_id, ack in acks.items():
            if ack.get("ok") and ack.get("body", {}).get("accepted"):
                master.store.set_job_node_status(job_id, node_id, "running")
                waiting.add(node_id)
            else:
                error = ack.get("error") or ack.get("body", {}).get("error") or "did not take the job"
                master.store.set_job_node_status(job_id, node_id, "no_answer")
                outcome[node_id] = {"status": "no_answer", "error": error}
                emit({"type": "node", "node": node_id, "status": "no_answer", "error": error})
        deadline = time.monotonic() + timeout
        while waiting - set(outcome):
            try:
                kind, node_id, body = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if kind == "progress":
                emit({"type": "progress", "node": node_id, "index": body.get("index"),
                      "state": body.get("state")})
            elif kind == "result" and node_id in jobs:
                outcome[node_id] = body
                emit({"type": "node", "node": node_id, "status": body["status"], "summary": body.get("summary")})
    finally:
        master.job_watchers.pop(job_id, None)
    job = master.store.job(job_id)
    return job_report(job, time.monotonic() - started)


def job_report(job: dict, elapsed: float | None = None) -> dict:
    """The `--json` shape: {"job": ID, "nodes": {ID: {"ok", "changed", "failed", "states", ...}}}."""
    nodes = {}
    for node_id, item in job["nodes"].items():
        summary = item["summary"] or {}
        done = item["status"] == "done"
        nodes[node_id] = {
            "ok": done and summary.get("failed", 0) == 0,
            "status": item["status"],
            "changed": summary.get("changed", 0),
            "failed": summary.get("failed", 0),
            "not_run": summary.get("not_run", 0),
            "skipped": summary.get("skipped", 0),
            "unchanged": summary.get("ok", 0),
            "states": item["results"],
            "duration_s": round(item["finished"] - item["started"], 2) if item["finished"] and item["started"] else None,
            "reboot_required": any(isinstance(r.get("changes"), dict) and r["changes"].get("reboot_required")
                                   for r in item["results"]),
        }
    report = {"job": job["id"], "file": job["file"], "target": job["target"], "test": bool(job["test"]),
              "created": job["created"], "nodes": nodes}
    if elapsed is not None:
        report["elapsed_s"] = round(elapsed, 2)
    return report
