"""What `pimaster apply` and `pimaster job` show: a live view while results arrive, then a summary."""

from __future__ import annotations

import sys

STATUS_STYLE = {"ok": "green", "changed": "cyan", "failed": "red", "not_run": "yellow", "skipped": "dim",
                "no_answer": "red", "interrupted": "red", "running": "yellow", "sent": "yellow"}
LIVE_ROWS = 25  # beyond this many nodes, the live view lists only those still running


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
            text = f"[{STATUS_STYLE.get(last.get('status'), 'white')}]{last.get('status', '')}[/] " \
                   f"{escape(str(last.get('fun', '')))} {escape(str(last.get('id', '')))}" if last else "[dim]waiting[/]"
            if info["status"] != "running":
                text = f"[{STATUS_STYLE.get(info['status'], 'white')}]{info['status']}[/]"
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
        elif kind == "node" and event.get("node") in self.nodes:
            summary = event.get("summary") or {}
            status = event["status"]
            if status == "done":
                status = "failed" if summary.get("failed") else "changed" if summary.get("changed") else "ok"
            info = self.nodes[event["node"]]
            # A node given up on (no_answer) may still deliver its result: counted once.
            if info["status"] == "running" and self.task is not None:
                self.progress.advance(self.task)
            info["status"] = status
        self.live.update(self._render())


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
        elif event.get("type") == "connection":
            if event.get("state") == "disconnected":
                grace = event.get("grace_s")
                wait = f" (waiting up to {grace:g} s for it to come back)" if isinstance(grace, (int, float)) else ""
                print(f"{event['node']}: disconnected{wait}", flush=True)
            else:
                print(f"{event['node']}: reconnected", flush=True)
        elif event.get("type") == "node":
            summary = event.get("summary") or {}
            detail = ", ".join(f"{k} {v}" for k, v in summary.items() if v) if summary else event.get("error", "")
            print(f"{event['node']}: {event['status']}" + (f" ({detail})" if detail else ""), flush=True)


def print_report(report: dict, table) -> bool:
    """The end of an apply: a row per node, then every failure in full. True if all is well."""
    rows = []
    all_ok = True
    for node_id, node in sorted(report["nodes"].items()):
        status = node["status"]
        if status == "done":
            verdict = "failed" if node["failed"] else "changed" if node["changed"] else "ok"
        else:
            verdict = {"running": "no result yet", "sent": "no answer", "no_answer": "no answer"}.get(status, status)
        all_ok &= node["ok"]
        rows.append([node_id, (verdict, STATUS_STYLE.get(verdict.split()[0], "red")), str(node["changed"]),
                     str(node["failed"]), str(node["not_run"]), str(node["unchanged"]),
                     f"{node['duration_s']:.1f} s" if node["duration_s"] is not None else "-",
                     "reboot needed" if node["reboot_required"] else ""])
    mode = "would change" if report["test"] else "changed"
    table(f"job {report['job']}{' (test mode)' if report['test'] else ''}: {report['file']}",
          ["NODE", "RESULT", mode.upper(), "FAILED", "NOT RUN", "UNCHANGED", "TIME", ""], rows)
    for node_id, node in sorted(report["nodes"].items()):
        for state in node["states"]:
            if state.get("status") == "failed":
                print(f"\n{node_id}: FAILED {state.get('fun')} {state.get('id')} ({state.get('source') or ''})",
                      file=sys.stdout)
                print(f"    {state.get('comment', '')}".replace("\n", "\n    "))
                for key, value in (state.get("changes") or {}).items():
                    text = value if isinstance(value, str) else repr(value)
                    print(f"    {key}: {text}".replace("\n", "\n    "))
    if report["test"]:
        for node_id, node in sorted(report["nodes"].items()):
            for state in node["states"]:
                if state.get("status") == "changed":
                    diff = (state.get("changes") or {}).get("diff")
                    # Continuation lines indented: a comment's own lines never start a line of the report.
                    print(f"{node_id}: would change {state.get('fun')} {state.get('id')}: "
                          + str(state.get("comment", "")).replace("\n", "\n    "))
                    if diff:
                        print("    " + diff.rstrip().replace("\n", "\n    "))
    return all_ok
