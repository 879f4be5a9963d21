"""What `pimaster run` (and `pimaster job` of a run) shows, and its `--json` shape.

A run is a job of one `cmd.run` state per node (runjob.py); its report reads that state's result:
the exit status (``retcode``), ``stdout`` and ``stderr`` the agent put in its changes -- bounded by
the agent (64 KiB each) and again by the master (a result's changes), and redacted of secrets
before they were stored, as every result is.

Each node's output is shown as its result arrives: without a terminal as lines prefixed with the
node's id (`node02: ...`; stdout's to stdout, stderr's to stderr), so that `grep` and scripts can
tell the nodes apart; on a terminal as a block per node under a header with its exit status. A node
cannot forge another's lines: its text has no control characters (the master replaced them) and
every line of it is prefixed or indented. Then a row per node: result, exit status, time.

A node's ``status`` (`--json`): done (the command ran to its end: ``rc`` is its exit status),
timed_out (ended after --timeout: rc 124), failed (it could not be run there: ``error`` says why),
interrupted (cancelled, or the agent stopped, while it ran), not_sent (never sent: the job was
cancelled, or --fail-stop held it back), no_answer (the node did not take it, or went away and did
not come back), running (taken, no result yet: the master stopped waiting), pending (not sent yet).
``ok``: done with exit status 0.
"""

from __future__ import annotations

import sys

# The `file` a run job is recorded with starts so (an apply's is an absolute path): `pimaster
# jobs` shows `run: uname -n`, and `pimaster job` knows a run's report by it.
RUN_LABEL = "run: "
RESULT_WORDS = {"done": "ok", "timed_out": "timed out", "failed": "could not run", "interrupted": "interrupted",
                "not_sent": "not sent", "no_answer": "no answer", "running": "no result yet", "pending": "not sent yet"}
STYLES = {"ok": "green", "exit": "red", "timed": "red", "could": "red", "interrupted": "red", "not": "yellow",
          "no": "red"}
INDENT = "    "
MAX_ERROR = 300
MAX_RC = 1 << 31


def is_run(job: dict) -> bool:
    """Whether a job (the store's, or a report) is a `pimaster run`."""
    return isinstance(job.get("file"), str) and job["file"].startswith(RUN_LABEL)


def _first_line(text) -> str | None:
    from .results import one_line

    if not isinstance(text, str) or not text.strip():
        return None
    return one_line(text.strip().splitlines()[0], MAX_ERROR)


def command_outcome(status: str, results: list, started=None, finished=None, error: str | None = None) -> dict:
    """One node's part of a run, from its job status in the store (sent, running, done,
    interrupted, no_answer) and its results (checked, redacted): the `--json` fields."""
    from .rollout import never_sent

    first = results[0] if results and isinstance(results[0], dict) else {}
    changes = first.get("changes") if isinstance(first.get("changes"), dict) else {}
    rc = changes.get("retcode")
    rc = rc if isinstance(rc, int) and not isinstance(rc, bool) and -MAX_RC < rc < MAX_RC else None
    stdout = changes.get("stdout") if isinstance(changes.get("stdout"), str) else ""
    stderr = changes.get("stderr") if isinstance(changes.get("stderr"), str) else ""
    comment = first.get("comment")
    ran = status in ("done", "interrupted") and bool(first)
    if never_sent({"status": status, "results": results}):
        # Cancelled or held back (the master's own result); `stopped` says why at length.
        word = "not_sent"
        error = "held back by --fail-stop" if first.get("fun") == "pimaster.fail_stop" else "the job was cancelled first"
    elif status == "interrupted":
        word, error = "interrupted", _first_line(comment)
    elif status == "done" and isinstance(changes.get("refused"), str):
        # More than a result may keep (results.MAX_CHANGES_BYTES): output escaped in JSON grows.
        word, error = "failed", _first_line(f"its output was not kept: {changes['refused']}")
    elif status == "done" and rc is None:
        word, error = "failed", _first_line(comment) or "the agent reported no result for the command"
    elif status == "done" and first.get("status") == "failed" and str(comment).startswith("command timed out"):
        word, error = "timed_out", _first_line(comment)
    elif status == "done":
        word = "done"
    else:
        word = {"sent": "pending"}.get(status, status)
    duration = None
    if ran and word != "not_sent" and isinstance(started, (int, float)) and isinstance(finished, (int, float)):
        duration = round(max(0.0, finished - started), 2)
    return {"ok": word == "done" and rc == 0, "rc": rc, "stdout": stdout, "stderr": stderr,
            "duration_s": duration, "status": word, "error": None if word == "done" else error}


def run_report(job: dict, elapsed: float | None = None, errors: dict[str, str] | None = None) -> dict:
    """The `--json` shape of a run: {"job": ID, "nodes": {ID: {"ok", "rc", "stdout", "stderr",
    "duration_s", "status", "error"}}, "file", "target", "created", "stopped"}; ``errors``: the
    reasons a running `pimaster run` heard (no answer: not connected...), which the store does not keep."""
    from .rollout import stopped_reason

    errors = errors or {}
    nodes = {node_id: command_outcome(item["status"], item["results"], item["started"], item["finished"],
                                      errors.get(node_id))
             for node_id, item in job["nodes"].items()}
    report = {"job": job["id"], "file": job["file"], "target": job["target"], "created": job["created"],
              "nodes": nodes, "stopped": stopped_reason(job)}
    if elapsed is not None:
        report["elapsed_s"] = round(elapsed, 2)
    return report


def result_word(node: dict) -> str:
    if node["status"] == "done":
        return "ok" if node["rc"] == 0 else f"exit {node['rc']}"
    return RESULT_WORDS.get(node["status"], str(node["status"]))


def _header(node_id: str, node: dict) -> str:
    parts = [result_word(node)]
    if node["status"] != "done" and node.get("rc") is not None:
        parts.append(f"exit {node['rc']}")
    if node.get("duration_s") is not None:
        parts.append(f"{node['duration_s']:.1f} s")
    if node.get("error"):
        parts.append(node["error"])
    return f"{node_id}: " + ", ".join(parts)


def print_output(node_id: str, node: dict, console=None) -> None:
    """One node's output: a block under a header on a terminal (``console``, rich), else lines
    prefixed with the node's id (stdout's on stdout, stderr's on stderr)."""
    if console is None:
        for text, stream in ((node["stdout"], sys.stdout), (node["stderr"], sys.stderr)):
            if text:
                stream.write("".join(f"{node_id}: {line}\n" for line in text.splitlines()))
                stream.flush()
        return
    from rich.text import Text

    word = result_word(node)
    console.print(Text(_header(node_id, node), style="bold " + STYLES.get(word.split()[0], "red")))
    for text, style in ((node["stdout"], None), (node["stderr"], "red")):
        if text:
            console.print(Text("".join(INDENT + line + "\n" for line in text.splitlines()).rstrip("\n"), style=style),
                          soft_wrap=True)


class RunOutput:
    """A running `pimaster run`'s events as the person sees them: each node's output as its result
    arrives, the batches, and the nodes that did not answer or were held back."""

    def __init__(self, terminal: bool) -> None:
        if terminal:
            from rich.console import Console

            self.console = Console(highlight=False)
        else:
            self.console = None

    def note(self, text: str, style: str = "dim") -> None:
        """A line about the run (not a node's output): on stderr without a terminal."""
        if self.console is None:
            print(text, file=sys.stderr, flush=True)
        else:
            from rich.text import Text

            self.console.print(Text(text, style=style))

    def event(self, event: dict) -> None:
        from .results import one_line

        kind = event.get("type")
        node_id = one_line(event.get("node", ""), 64)
        if kind == "start":
            batch = f", {event['batch_size']} at a time" if event.get("batch_size") else ""
            self.note(f"job {event.get('job')}: {len(event.get('nodes') or ())} node(s){batch}")
        elif kind == "batch":
            self.note(f"batch {event.get('index')}: {', '.join(map(str, event.get('nodes') or ()))}")
        elif kind == "output":
            print_output(node_id, event, self.console)
        elif kind == "node" and event.get("status") == "no_answer":
            self.note(f"{node_id}: {RESULT_WORDS[event['status']]}: {one_line(event.get('error', ''))}", "red")
        elif kind == "connection":
            self.note(f"{node_id}: {'reconnected' if event.get('state') == 'reconnected' else 'disconnected'}")
        elif kind in ("stopped", "warning"):
            self.note(f"pimaster: {one_line(event.get('reason') or event.get('message'), 1000)}", "yellow")


def print_run_report(report: dict, table, outputs: bool = False) -> bool:
    """A row per node (result, exit status, time, why not ok); with ``outputs`` (`pimaster job`),
    each node's output first. True if every node ran the command with exit status 0."""
    nodes = sorted(report["nodes"].items())
    if outputs:
        console = None
        if sys.stdout.isatty():
            from rich.console import Console

            console = Console(highlight=False)
        for node_id, node in nodes:
            print_output(node_id, node, console)
    rows = []
    for node_id, node in nodes:
        word = result_word(node)
        rows.append([node_id, (word, STYLES.get(word.split()[0], "red")), "-" if node["rc"] is None else str(node["rc"]),
                     "-" if node["duration_s"] is None else f"{node['duration_s']:.1f} s", node.get("error") or ""])
    import contextlib

    # `pimaster run '*' -- uptime | grep node03`: stdout holds the nodes' output alone, the table
    # (whose rows name nodes too) goes to stderr when stdout is not a terminal.
    aside = not outputs and not sys.stdout.isatty()
    with contextlib.redirect_stdout(sys.stderr) if aside else contextlib.nullcontext():
        table(f"job {report['job']}: {report['file']}", ["NODE", "RESULT", "EXIT", "TIME", "DETAIL"], rows)
        if report.get("stopped"):
            held = sum(1 for _, node in nodes if node["status"] == "not_sent")
            print(f"stopped: {report['stopped']}; {held} node(s) were not sent the command", flush=True)
    return all(node["ok"] for _, node in nodes)
