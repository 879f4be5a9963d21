"""What `pimaster apply` and `pimaster job` show: a live view while results arrive, then a summary.

One vocabulary everywhere (live view, plain progress lines, the table, `--json`'s ``result``):
a state is changed, unchanged (the agent's and `--json`'s status "ok"), failed, not run or
skipped; a node's result is changed, ok (nothing changed, nothing failed), failed, interrupted,
no answer, no result yet, or not sent (--fail-stop held it back, or a cancel). In test mode
"changed" is what would change.

With --batch, a `batch` event announces each batch as it starts, and --fail-stop's `stopped` event
says why no further batch starts. A `pimaster run` job is shown by run_view.
"""

from __future__ import annotations

import json
import sys

STATUS_STYLE = {"ok": "green", "changed": "cyan", "failed": "red", "not_run": "yellow", "skipped": "dim",
                "no_answer": "red", "interrupted": "red", "running": "yellow", "sent": "yellow", "not": "yellow"}
LIVE_ROWS = 25  # beyond this many nodes, the live view lists only those still running
# A state's status as the agent reports it (and `--json` keeps it) -> the word people read.
STATE_WORDS = {"ok": "unchanged", "changed": "changed", "failed": "failed", "not_run": "not run",
               "skipped": "skipped"}
# The counts of a node's states, in the table's order: (summary key, word).
COUNTS = (("changed", "changed"), ("failed", "failed"), ("not_run", "not run"), ("ok", "unchanged"),
          ("skipped", "skipped"))
INDENT = "    "


def node_result(status: str, summary: dict | None) -> str:
    """A node's result in one word (two for "no answer", "no result yet"): from its job status
    (sent, running, done, interrupted, no_answer) and the counts of its states."""
    summary = summary or {}
    if status == "done":
        return "failed" if summary.get("failed") else "changed" if summary.get("changed") else "ok"
    return {"running": "no result yet", "sent": "no answer", "no_answer": "no answer",
            "not_sent": "not sent"}.get(status, status)


def counts_text(summary: dict | None) -> str:
    """`changed 1, unchanged 3`: the node's non-zero counts, in the table's words and order."""
    summary = summary or {}
    return ", ".join(f"{word} {summary[key]}" for key, word in COUNTS
                     if isinstance(summary.get(key), int) and summary[key])


def indented(text: str) -> str:
    """An agent's text with every line after the first indented: it cannot start a report line."""
    return text.replace("\n", "\n" + INDENT)


class LiveApply:
    """A rich Live display: a progress bar over nodes and each node's latest state."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console)
        self.task = None
        self.nodes: dict[str, dict] = {}
        self.live = None

    def __enter__(self):
        from rich.live import Live

        self.live = Live(self._render(), console=self.console, refresh_per_second=8, transient=True)
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if exc[0] is KeyboardInterrupt:
            self.live.transient = False  # Ctrl-C: what the nodes were doing stays on the screen
        self.live.__exit__(*exc)

    def _render(self):
        from rich.markup import escape

        from rich.console import Group
        from rich.table import Table

        table = Table(box=None, pad_edge=False, show_header=False)
        for column in ("node", "done", "state"):
            table.add_column(column)
        shown = [n for n, v in self.nodes.items() if v["status"] == "running"] if len(self.nodes) > LIVE_ROWS \
            else list(self.nodes)
        for node in shown[:LIVE_ROWS]:
            info = self.nodes[node]
            last = info.get("last") or {}
            # The state's id is the node's to report: never rich markup.
            status = last.get("status", "")
            text = f"[{STATUS_STYLE.get(status, 'white')}]{STATE_WORDS.get(status, escape(str(status)))}[/] " \
                   f"{escape(str(last.get('fun', '')))} {escape(str(last.get('id', '')))}" if last else "[dim]waiting[/]"
            if info["status"] != "running":
                text = f"[{STATUS_STYLE.get(info['status'].split()[0], 'red')}]{info['status']}[/]" \
                       + (f" ({info['counts']})" if info.get("counts") else "")
            elif info.get("disconnected") is not None:
                text = f"[red]disconnected[/], waiting up to {info['disconnected']:g} s for it to come back; " \
                       f"last: {text}"
            table.add_row(node, f"{info['done']}/{info['total']}", text)
        return Group(self.progress, table)

    def event(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "start":
            self.nodes = {n: {"total": count, "done": 0, "status": "running"} for n, count in event["nodes"].items()}
            mode = " (test)" if event.get("test") else ""
            self.task = self.progress.add_task(f"job {event['job']}{mode}", total=len(self.nodes))
        elif kind == "progress" and event.get("node") in self.nodes:
            info = self.nodes[event["node"]]
            info["done"] += 1
            info["last"] = event.get("state") or {}
        elif kind == "connection" and event.get("node") in self.nodes:
            info = self.nodes[event["node"]]
            grace = event.get("grace_s")
            info["disconnected"] = (grace if isinstance(grace, (int, float)) else 0) \
                if event.get("state") == "disconnected" else None
        elif kind == "warning":
            self.live.console.print(f"pimaster: warning: {event.get('message')}", markup=False, highlight=False)
        elif kind in ("batch", "stopped"):
            self.live.console.print(event_line(event), markup=False, highlight=False)
        elif kind == "node" and event.get("node") in self.nodes:
            status = node_result(event["status"], event.get("summary"))
            info = self.nodes[event["node"]]
            info["counts"] = counts_text(event.get("summary"))
            # A node given up on (no_answer) may still deliver its result: counted once.
            if info["status"] == "running" and self.task is not None:
                self.progress.advance(self.task)
            info["status"] = status
        self.live.update(self._render())


def event_line(event: dict) -> str:
    """A `batch` or `stopped` event as one line."""
    if event.get("type") == "batch":
        stage = f" (stage {event.get('stage')} of {event.get('stages')})" if (event.get("stages") or 1) > 1 else ""
        return f"batch {event.get('index')}{stage}: {', '.join(map(str, event.get('nodes') or ()))}"
    return f"stopped: {event.get('reason')}"


class PlainApply:
    """Without a terminal: one line per node as it finishes."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def event(self, event: dict) -> None:
        if event.get("type") == "start":
            print(f"job {event['job']}: {len(event['nodes'])} node(s){' (test)' if event.get('test') else ''}",
                  flush=True)
        elif event.get("type") == "warning":
            print(f"pimaster: warning: {event.get('message')}", file=sys.stderr, flush=True)
        elif event.get("type") in ("batch", "stopped"):
            print(event_line(event), flush=True)
        elif event.get("type") == "connection":
            if event.get("state") == "disconnected":
                grace = event.get("grace_s")
                wait = f" (waiting up to {grace:g} s for it to come back)" if isinstance(grace, (int, float)) else ""
                print(f"{event['node']}: disconnected{wait}", flush=True)
            else:
                print(f"{event['node']}: reconnected", flush=True)
        elif event.get("type") == "node":
            summary = event.get("summary")
            detail = counts_text(summary) if summary else event.get("error", "")
            print(f"{event['node']}: {node_result(event['status'], summary)}" + (f" ({detail})" if detail else ""),
                  flush=True)


def print_report(report: dict, table, quiet: bool = False) -> bool:
    """The end of an apply: a row per node, every failure in full, then (unless ``quiet``) every
    changed state, with its diff if it has one. True if all is well. A run's report: run_view's."""
    from .run_view import is_run, print_run_report

    if is_run(report):
        return print_run_report(report, table, outputs=True)
    rows = []
    all_ok = True
    for node_id, node in sorted(report["nodes"].items()):
        verdict = node.get("result") or node_result(node["status"], {"failed": node["failed"], "changed": node["changed"]})
        all_ok &= node["ok"]
        rows.append([node_id, (verdict, STATUS_STYLE.get(verdict.split()[0], "red")), str(node["changed"]),
                     str(node["failed"]), str(node["not_run"]), str(node["unchanged"]), str(node.get("skipped", 0)),
                     f"{node['duration_s']:.1f} s" if node["duration_s"] is not None else "-",
                     "reboot needed" if node["reboot_required"] else ""])
    changed = "would change" if report["test"] else "changed"
    table(f"job {report['job']}{' (test mode)' if report['test'] else ''}: {report['file']}",
          ["NODE", "RESULT", changed.upper(), "FAILED", "NOT RUN", "UNCHANGED", "SKIPPED", "TIME", ""], rows)
    if report.get("stopped"):
        held = sum(1 for node in report["nodes"].values() if node.get("result") == "not sent")
        print(f"stopped: {report['stopped']}; {held} node(s) were not sent the job")
    # An agent's comments and diffs are its own text (control characters already replaced by the
    # master): every line after a report line's first is indented, so none can pass for one.
    for node_id, node in sorted(report["nodes"].items()):
        for state in node["states"]:
            if state.get("status") == "failed":
                print(f"\n{node_id}: FAILED {state.get('fun')} {state.get('id')} ({state.get('source') or ''})")
                print(INDENT + indented(str(state.get("comment", ""))))
                for key, value in (state.get("changes") or {}).items():
                    text = value if isinstance(value, str) else repr(value)
                    print(INDENT + indented(f"{key}: {text}"))
    if quiet:
        return all_ok
    for node_id, node in sorted(report["nodes"].items()):
        for state in node["states"]:
            if state.get("status") != "changed":
                continue
            comment = str(state.get("comment") or "")
            print(f"{node_id}: {changed} {state.get('fun')} {state.get('id')}"
                  + (f": {indented(comment)}" if comment else ""))
            changes = state.get("changes")
            diff = changes.get("diff") if isinstance(changes, dict) else None
            if diff:
                text = diff if isinstance(diff, str) else json.dumps(diff, sort_keys=True)
                print(INDENT + indented(text.rstrip()))
    return all_ok
