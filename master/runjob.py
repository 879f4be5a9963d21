"""`pimaster run TARGET -- CMD [ARG...]`: a command as root on every targeted node, as a job.

A run is a job of one state per node, the agent's own `cmd.run`, pushed exactly as an apply's stage
is (jobs._run_stage: `apply` requests, acknowledgements, `job_result`s; rollout.Rollout for
--batch and --fail-stop). So it is recorded like any job (`pimaster jobs`, `pimaster job ID`), its
result checked, bounded and redacted of secrets before it is stored, `pimaster job cancel` stops
it, a node that goes away is finished as no_answer after the reconnect window, and a result
delivered after the person's command stopped waiting (or after a master restart) is still
recorded. No new message: the agents run it as any job, one job at a time.

Without --shell the argv runs exactly as given: `exec` and the arguments quoted for /bin/sh
(shlex.join), so that no word of it is split, expanded or globbed again on the node. With --shell
the one string given is the command line `sh -c` runs. The job's `file` is `run: ` and that
command (`run: uname -n`), redacted and shortened, for `pimaster jobs`.
"""

from __future__ import annotations

import shlex
import time

from .board import JobWatch
from .errors import ControlError
from .jobs import _run_stage, new_job_id
from .rollout import Rollout
from .run_view import RUN_LABEL, command_outcome, run_report
from .targets import batches

# The longest command (its text as run, quoting included) a run takes.
MAX_COMMAND = 32 * 1024
MAX_ARGS = 4096
# The longest command shown in `pimaster jobs` (the whole of it is in each node's result).
MAX_LABEL = 200
# How long past --timeout the master waits for a node's result: the agent ends the command at
# --timeout and needs a moment to report it.
RESULT_MARGIN_S = 30.0
MAX_TIMEOUT_S = 7 * 86400.0


def _checked_text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ControlError(f"{what}: text")
    if "\0" in value:
        raise ControlError(f"{what}: a command cannot hold a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ControlError(f"{what}: not UTF-8 text") from None
    return value


def command_line(argv=None, shell=None) -> tuple[str, str]:
    """The command line `sh -c` runs on each node and the job's label, from exactly one of
    ``argv`` (a list of arguments, run as given) and ``shell`` (a command line); ControlError if
    neither, both or malformed."""
    if (argv is None) == (shell is None):
        raise ControlError("run: give the command as argv (its arguments) or as shell (one command line)")
    if shell is not None:
        text = _checked_text(shell, "shell")
        if not text.strip():
            raise ControlError("run --shell: the command line is empty")
        shown = shlex.join(["sh", "-c", text])
    else:
        if not isinstance(argv, list) or not argv or len(argv) > MAX_ARGS:
            raise ControlError(f"run: argv is a list of 1 to {MAX_ARGS} arguments, the command first")
        argv = [_checked_text(arg, "argv") for arg in argv]
        if not argv[0]:
            raise ControlError("run: the command's name is empty")
        # dash's exec takes no options (not even --): an argv[0] starting with `-` is a command name.
        text = shown = shlex.join(argv)
        text = "exec " + text
    if len(text) > MAX_COMMAND:
        raise ControlError(f"run: the command is {len(text)} characters long (at most {MAX_COMMAND})")
    return text, RUN_LABEL + shown


def short_label(label: str) -> str:
    """A run's `file` in the jobs table: cut to MAX_LABEL (after redaction: a cut secret would
    not be recognised)."""
    return label if len(label) <= MAX_LABEL else label[:MAX_LABEL - 3] + "..."


def checked_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ControlError(f"timeout: a number of seconds, more than 0 and at most {MAX_TIMEOUT_S:g}")
    return float(timeout)


async def run_command(board, emit, nodes: list[str], command: str, label: str, target: str | None,
                      timeout: float, batch: str | None = None, fail_stop: bool = False,
                      ack_timeout: float = 15.0) -> dict:
    """Run ``command`` (a line for `sh -c`) on ``nodes`` as one job; ``label`` its `file` in the
    jobs table. Emits what apply emits, and an `output` event per node as its result arrives
    (`run_view.command_outcome`'s fields, redacted); returns `run_view.run_report`."""
    state = {"id": "run", "fun": "cmd.run", "name": command, "args": {"timeout": timeout},
             "source": "pimaster run"}
    job_id = new_job_id()
    label = short_label(board.redact(label))
    board.store.create_job(job_id, label, target, False, {n: 1 for n in nodes})
    board.job_started(job_id, label, target, False, nodes)
    watch = JobWatch(nodes)
    board.watchers[job_id] = watch
    board.redactions[job_id] = {}
    errors: dict[str, str] = {}

    def noted(event: dict) -> None:
        # Why a node did not answer is said once, in its event: the report repeats it.
        if event.get("type") == "node" and isinstance(event.get("error"), str):
            errors[event["node"]] = event["error"]
        emit(event)

    def on_result(node_id: str, body: dict) -> None:
        results = board.redact(body.get("results", []), job_id, node_id)
        emit(dict(command_outcome(body["status"], results, body.get("started"), body.get("finished")),
                  type="output", node=node_id))

    started = time.monotonic()
    parts = batches(nodes, batch)
    try:
        noted({"type": "start", "job": job_id, "file": label, "test": False, "nodes": {n: 1 for n in nodes},
               "stages": [len(nodes)], "batch_size": len(parts[0]) if batch else None, "fail_stop": fail_stop})
        rollout = Rollout(board, noted, job_id, watch, fail_stop)
        for part in parts:
            if rollout.held_back(part):
                continue
            if batch:
                rollout.announce(part, 0, 1)
            # Each batch waits as long as its command may run, and a moment for the result.
            await _run_stage(board, noted, job_id, False, part, {n: [state] for n in part}, {n: [] for n in part},
                             watch, ack_timeout, time.monotonic() + timeout + RESULT_MARGIN_S, set(),
                             on_result=on_result)
            rollout.check(part)
    finally:
        board.watchers.pop(job_id, None)
        board.redactions.pop(job_id, None)
    return run_report(board.store.job(job_id), time.monotonic() - started, errors)
