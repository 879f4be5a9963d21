"""`pimaster run TARGET -- CMD [ARG...]`: run a command as root on every targeted node, show each
node's output as it arrives, then a row per node (result, exit status, time). The job itself is
`pimaster.runjob`; the output `pimaster.run_view`."""

from __future__ import annotations

import sys

from . import handler
from ..cli import Duration, parse_duration, parse_target, report_error, table

MAX_TIMEOUT_S = 7 * 86400


def add_parser(sub, name, summary, common, as_json) -> None:
    from ..targets import parse_batch

    parser = sub.add_parser(
        name, parents=[common, as_json], help=summary,
        usage="pimaster run [options] TARGET -- CMD [ARG...]",
        description="Runs CMD with its arguments, exactly as given, as root on every node in TARGET (through "
                    "`sh -c` as one command line with --shell), recorded as a job. Each node's output is shown "
                    "as its result arrives (lines prefixed `node02: ` when the output is not a terminal), then a "
                    "row per node. Exit status 1 if on any node the command exited non-zero, timed out or "
                    "did not run.")
    parser.add_argument("target", metavar="TARGET", type=parse_target,
                        help="the nodes: a glob on node ids ('*', node0[2-4]) or role:NAME (roles as the last apply "
                             "read them)")
    parser.add_argument("command", nargs="*", metavar="CMD",
                        help="the command and its arguments, after `--` (pimaster run '*' -- uname -n)")
    parser.add_argument("--shell", action="store_true",
                        help="run the command through `sh -c`: give it as one string (pimaster run '*' --shell -- "
                             "'df -h / | tail -1')")
    parser.add_argument("--timeout", type=Duration(maximum=MAX_TIMEOUT_S), default=parse_duration("1h"),
                        metavar="DURATION", help="end the command on a node after this long (exit status 124; "
                                                 "default 1h)")
    parser.add_argument("--batch", type=parse_batch, metavar="N|N%",
                        help="run on N nodes (or N%% of them) at a time, each batch finished before the next starts")
    parser.add_argument("--fail-stop", action="store_true",
                        help="start no further batch once the command failed on a node (or a node did not answer)")
    _command_after_dashes(parser)
    parser.set_defaults(run=run)


def _command_after_dashes(parser) -> None:
    """Everything after the first `--` is the command, untouched: argparse (3.11) would drop a
    second `--` from it (`-- echo -- x` would run `echo x`), and take words of it for options."""
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        command = None
        if "--" in args:
            at = args.index("--")
            args, command = args[:at], args[at + 1:]
        namespace, extras = parse(args, namespace)
        if command is None and (namespace.command or extras):
            # `run node02 uname -n`: argparse would take -n for an option of pimaster's.
            words = " ".join(namespace.command + extras)
            parser.error(f"the command goes after `--`: pimaster run {namespace.target or 'TARGET'} -- {words}")
        if command is not None:
            if namespace.command:
                parser.error(f"the command goes after `--`, all of it (before it: {' '.join(namespace.command)})")
            namespace.command = command
        return namespace, extras

    parser.parse_known_args = parse_known_args


def run(client, args) -> int:
    from ..run_view import RunOutput, print_run_report
    from .apply import wait_for_job

    if not args.command:
        return report_error(args, "run: which command? pimaster run TARGET -- CMD [ARG...]")
    if args.shell and len(args.command) != 1:
        return report_error(args, "run --shell: give the command line as one string (quote it): "
                                  f"pimaster run {args.target} --shell -- 'CMD ARG | ...'")
    request = {"shell": args.command[0]} if args.shell else {"argv": args.command}
    try:
        for text in args.command:
            text.encode("utf-8")
    except UnicodeEncodeError:
        return report_error(args, "run: the command holds bytes that are not UTF-8 text")
    view = RunOutput(terminal=sys.stdout.isatty())
    started: dict = {}

    def on_event(event: dict) -> None:
        if event.get("type") == "start":
            started["job"] = event.get("job")
        if not args.json:
            view.event(event)

    return wait_for_job(args, started, lambda: client.call(
        "run", target=args.target, timeout=args.timeout, batch=args.batch, fail_stop=args.fail_stop,
        timeout_extra=args.timeout + 120, on_event=on_event, **request), lambda report: print_run_report(report, table))


@handler("run", streaming=True)
async def handle_run(master, emit, target: str | None = None, argv: list | None = None, shell: str | None = None,
                     timeout: float = 3600.0, batch=None, fail_stop: bool = False) -> dict:
    """Run ``argv`` (exactly) or ``shell`` (a line for `sh -c`) on the accepted nodes in ``target``."""
    from ..runjob import checked_timeout, command_line, run_command
    from ..targets import checked_batch, resolve_target

    command, label = command_line(argv, shell)
    timeout = checked_timeout(timeout)
    batch = checked_batch(batch)
    nodes = await resolve_target(master, target)
    return await run_command(master.jobs, emit, nodes, command, label, target, timeout, batch, bool(fail_stop))
