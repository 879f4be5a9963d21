"""`pimaster apply FILE`: render a state file for each targeted node, push it, converge. The job
itself is `pimaster.jobs`; the live view and the report `pimaster.apply_view`."""

from __future__ import annotations

import os
import sys

from . import handler
from ..cli import EXIT_FAILED, EXIT_OK, parse_duration, print_json, table
from ..errors import ControlError


def add_parser(sub, name, summary, common, as_json) -> None:
    apply = sub.add_parser(name, parents=[common, as_json], help=summary,
                           description="Renders FILE (a path, or the name of a shipped state file) for every "
                                       "targeted node, refuses the whole job if any node's rendering fails, "
                                       "then pushes it and shows results as they arrive.")
    apply.add_argument("file", help="state file (path or shipped name, e.g. slurm)")
    apply.add_argument("--target", help="glob on node ids, or role:NAME (from the inventory)")
    apply.add_argument("--test", action="store_true", help="show what would change, change nothing")
    apply.add_argument("--timeout", type=parse_duration, default=parse_duration("1h"),
                       help="how long to wait for results (default 1h); later results are still recorded")
    apply.set_defaults(run=run)


def run(client, args) -> int:
    from ..apply_view import LiveApply, PlainApply, print_report

    if args.json:
        view = PlainApply()
        view.event = lambda event: None
    elif sys.stdout.isatty():
        from rich.console import Console

        view = LiveApply(Console())
    else:
        view = PlainApply()
    with view:
        report = client.call("apply", file=args.file, target=args.target, test=args.test, timeout=args.timeout,
                             cwd=os.getcwd(), timeout_extra=args.timeout + 120, on_event=view.event)
    if args.json:
        print_json(report)
        return EXIT_OK if all(n["ok"] for n in report["nodes"].values()) else EXIT_FAILED
    return EXIT_OK if print_report(report, table) else EXIT_FAILED


@handler("apply", streaming=True)
async def handle_apply(master, emit, file: str, target: str | None = None, test: bool = False,
                       timeout: float = 3600.0, cwd: str | None = None) -> dict:
    from ..jobs import apply

    if not isinstance(file, str) or not file:
        raise ControlError("name a state file")
    return await apply(master.jobs, emit, file, target, bool(test), float(timeout), cwd=cwd)
