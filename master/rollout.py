"""Which of a job's nodes are sent it, and when: batches and `--fail-stop` (``Rollout``), and the
record of the nodes a job never reached (cancelled before their stage or batch, or held back by
--fail-stop). Shared by `pimaster apply` (jobs.py) and `pimaster run` (runjob.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # light to import: `pimaster job` reads never_sent on the client side
    from .board import JobWatch

# The master-made results of nodes never sent a job: a cancel's, and --fail-stop's. ``MADE_BY`` is
# a key no agent's result can carry (results.check_state_result keeps only the known ones): an
# agent reporting a state named pimaster.fail_stop is not taken for a node never sent the job.
NOT_SENT_FUNS = ("pimaster.cancel", "pimaster.fail_stop")
MADE_BY = "made_by"


def not_sent(board, emit, job_id: str, node_id: str, stopped: str | None = None) -> None:
    """A later stage's (or batch's) node of a cancelled job, or of one ``stopped`` by --fail-stop
    (the reason): recorded as never sent it."""
    if stopped is None:
        result = {"id": "cancelled", "fun": "pimaster.cancel", "name": node_id, "result": None, "changes": {},
                  "comment": "not sent: the job was cancelled before this node's stage", "status": "not_run",
                  MADE_BY: "pimaster"}
    else:
        result = {"id": "fail-stop", "fun": "pimaster.fail_stop", "name": node_id, "result": None, "changes": {},
                  "comment": f"not sent: {stopped}", "status": "not_run", MADE_BY: "pimaster"}
    board.store.record_result(job_id, node_id, "interrupted", {"not_run": 1}, [result], None, None)
    board.job_finished(job_id, node_id, "not_sent", {"not_run": 1})  # as `run` and the apply table say
    event = {"type": "node", "node": node_id, "status": "interrupted", "summary": {"not_run": 1}}
    if stopped is not None:
        event.update(status="not_sent", error=stopped)
    emit(event)


def never_sent(item: dict) -> bool:
    """Whether a job's node (as the store has it) was never sent the job: cancelled or stopped first."""
    results = item.get("results") or []
    return (item.get("status") == "interrupted" and len(results) == 1 and isinstance(results[0], dict)
            and results[0].get("fun") in NOT_SENT_FUNS and results[0].get(MADE_BY) == "pimaster")


def node_failed(item: dict | None) -> bool:
    """Whether a job's node, as the store has it after its batch, failed for --fail-stop: not done,
    or done with a failed state."""
    return item is None or item["status"] != "done" or (item["summary"] or {}).get("failed", 0) > 0


def stopped_reason(job: dict) -> str | None:
    """Why --fail-stop held nodes of ``job`` back (None: it did not)."""
    for item in job["nodes"].values():
        results = item.get("results") or []
        if never_sent(item) and results[0].get("fun") == "pimaster.fail_stop":
            return str(results[0].get("comment", "")).removeprefix("not sent: ")
    return None


class Rollout:
    """Whether a job's next batch (or stage) may start: not once the job was cancelled, nor, with
    ``fail_stop``, once one of its nodes failed. The nodes held back are recorded as never sent the
    job, saying why; ``stopped`` is that reason (None while the job goes on)."""

    MAX_NAMED = 5  # failed nodes named in the reason

    def __init__(self, board, emit, job_id: str, watch: "JobWatch", fail_stop: bool) -> None:
        self.board, self.emit, self.job_id, self.watch, self.fail_stop = board, emit, job_id, watch, fail_stop
        self.stopped: str | None = None
        self.batches = 0

    def held_back(self, nodes: list[str]) -> bool:
        """True (and ``nodes`` recorded as never sent the job) when no further batch may start."""
        if not (self.watch.cancelled or self.stopped):
            return False
        for node_id in nodes:
            not_sent(self.board, self.emit, self.job_id, node_id, None if self.watch.cancelled else self.stopped)
        return True

    def announce(self, nodes: list[str], stage: int, stages: int) -> None:
        """A `batch` event: the next batch starts (numbered across the job's stages)."""
        self.batches += 1
        self.emit({"type": "batch", "index": self.batches, "nodes": nodes, "stage": stage + 1, "stages": stages})

    def check(self, nodes: list[str]) -> None:
        """After a batch (or nodes refused): with --fail-stop, a failed one among ``nodes`` stops the job."""
        if not self.fail_stop or self.stopped or not nodes:
            return
        job = self.board.store.job(self.job_id)
        from .run_view import command_outcome, is_run

        if is_run(job):  # a run's node failed as its report says (the command's exit status), no other way
            failed = [n for n in nodes if (item := job["nodes"].get(n)) is None or not command_outcome(
                item["status"], item["results"] or [])["ok"]]
        else:
            failed = [n for n in nodes if node_failed(job["nodes"].get(n))]
        if failed:
            named = ", ".join(failed[:self.MAX_NAMED]) + (f" and {len(failed) - self.MAX_NAMED} more"
                                                          if len(failed) > self.MAX_NAMED else "")
            self.stopped = f"--fail-stop: {named} failed, so no further batch was started"
            self.emit({"type": "stopped", "reason": self.stopped, "failed": failed})
