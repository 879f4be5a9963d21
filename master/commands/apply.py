"""`pimaster apply FILE`: render a state file for each targeted node, push it, converge. The job
itself is `pimaster.jobs`; the live view and the report `pimaster.apply_view`."""

from __future__ import annotations

import os
import sys

from . import handler
from ..cli import EXIT_FAILED, EXIT_OK, Duration, add_target, parse_duration, print_json, table
from ..errors import ControlError, MasterUnreachable

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command ended by Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken the way Ctrl-C is: the live view restores the terminal (its cursor) and the
    person is told the job goes on."""


def _terminated(signum, frame) -> None:
    raise Terminated


def add_parser(sub, name, summary, common, as_json) -> None:
    from ..targets import parse_batch

    apply = sub.add_parser(name, parents=[common, as_json], help=summary,
                           description="Renders FILE (a path, or a name: in this directory first, then among "
                                       "the shipped state files) for every "
                                       "targeted node, refuses the whole job if any node's rendering fails, "
                                       "then pushes it and shows results as they arrive.")
    apply.add_argument("file", nargs="?",
                       help="state file: a path, an SLS name in --tree (ntp.client), or a name looked up in this "
                            "directory, then among the shipped ones (slurm); none: the `apply:` list of the "
                            "master's cluster directory, in order, each node stopping at its first failing file")
    apply.add_argument("--tree", metavar="DIR",
                       help="the state tree: includes (a.b), salt:// sources and Jinja imports resolve from its "
                            "root (default: the nearest directory above FILE holding a cluster.yaml or top.sls, "
                            "else FILE's own directory)")
    add_target(apply)
    apply.add_argument("--test", action="store_true", help="show what would change, change nothing")
    apply.add_argument("--timeout", type=Duration(), default=parse_duration("1h"), metavar="DURATION",
                       help="how long to wait for results (default 1h); later results are still recorded")
    apply.add_argument("--batch", type=parse_batch, metavar="N|N%",
                       help="push to N nodes (or N%% of the target) at a time, within each stage, each batch "
                            "finished before the next starts")
    apply.add_argument("--fail-stop", action="store_true",
                       help="start no further batch (nor stage) once a node failed or did not answer; the nodes "
                            "not reached are recorded as not sent")
    apply.add_argument("--quiet", action="store_true",
                       help="leave out the list of changed states and their diffs (failures are always shown)")
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
    started: dict = {}

    def on_event(event: dict) -> None:
        if event.get("type") == "start":
            started["job"] = event.get("job")
        if event.get("type") == "warning" and args.json:  # --json shows no events, but warnings matter
            print(f"pimaster: warning: {event.get('message')}", file=sys.stderr, flush=True)
        view.event(event)

    if args.file is None:
        return run_list(client, args, view, started, on_event)
    path, root, serve_file = state_tree_served(args.file, client.state_dir, args.tree)

    def call() -> dict:
        with view:  # left on Ctrl-C too: the terminal and its cursor are restored before the note below
            return client.call("apply", file=path, root=root, target=args.target,
                               test=args.test, timeout=args.timeout, timeout_extra=args.timeout + 120,
                               **({"batch": args.batch} if args.batch else {}),
                               **({"fail_stop": True} if args.fail_stop else {}),
                               on_event=on_event, on_ask=serve_file)

    return wait_for_job(args, started, call, lambda report: print_report(report, table, quiet=args.quiet))


def run_list(client, args, view, started: dict, on_event) -> int:
    """`pimaster apply` with no FILE: the master applies its cluster directory's list (`highstate`),
    one job per file; each job's report as `apply FILE` prints it, then where nodes stopped."""
    from ..apply_view import print_report

    if args.tree:
        raise ControlError("--tree goes with a FILE: with none, the master applies the list of its own cluster "
                           "directory (`pimaster status` shows it)", code="usage")

    def list_event(event: dict) -> None:
        if event.get("type") == "list_file" and not args.json:
            print(f"== {event.get('file')} ({event.get('index')} of {event.get('of')})", flush=True)
        elif event.get("type") == "list_refused" and not args.json:
            print(f"pimaster: {event.get('file')}: {event.get('error')}", file=sys.stderr, flush=True)
        else:
            on_event(event)

    def call() -> dict:
        with view:
            return client.call("apply_list", target=args.target, test=args.test, timeout=args.timeout,
                               timeout_extra=args.timeout * 8 + 120,
                               **({"batch": args.batch} if args.batch else {}),
                               **({"fail_stop": True} if args.fail_stop else {}), on_event=list_event)

    def print_list(result: dict) -> bool:
        ok = True
        for report in result["jobs"]:
            print()
            ok &= print_report(report, table, quiet=args.quiet)
        if result["refused"]:
            ok = False
        if result["stopped"]:
            print()
            for node_id, file in sorted(result["stopped"].items()):
                print(f"{node_id}: stopped at {file} (the files after it were not applied to it)")
        if not result["jobs"] and not result["refused"]:
            print(f"nothing to apply: no node is in the target of {', '.join(result['apply'])}")
        return ok

    if args.json:
        code = wait_for_job(args, started, call, print_list, json_ok=lambda r: all(n["ok"] for n in r["nodes"].values())
                            and not r["refused"])
    else:
        code = wait_for_job(args, started, call, print_list)
    return code


def wait_for_job(args, started: dict, call, print_report, json_ok=None) -> int:
    """The end of a command that starts a job (`apply`, `run`): ``call()`` sends the request and
    returns the report, which is printed (``print_report(report) -> ok``, or --json); ``started``
    gets the job id from the `start` event. Ctrl-C, SIGTERM or a lost master after the job started
    leave the job running on the nodes, and the person is told how to follow it."""
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    try:
        report = call()
    except KeyboardInterrupt as exc:
        print(interrupted_note(started.get("job")), file=sys.stderr, flush=True)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except (ControlError, MasterUnreachable) as exc:
        if not started.get("job"):
            raise
        # The job was sent: the master goes on with it, whatever ended this command's wait.
        print(f"pimaster: {exc}\n{interrupted_note(started['job'])}", file=sys.stderr, flush=True)
        if args.json:
            print_json({"error": str(exc), "code": getattr(exc, "code", None) or "refused", "job": started["job"]})
        return EXIT_FAILED
    if args.json:
        print_json(report)
        ok = json_ok(report) if json_ok else all(n["ok"] for n in report["nodes"].values())
        return EXIT_OK if ok else EXIT_FAILED
    return EXIT_OK if print_report(report) else EXIT_FAILED


def state_tree_served(spec: str, state_dir: str, tree_dir: str | None = None):
    """The state file ``spec`` names and its tree's root, resolved here (statetree.resolve_state_file:
    ``tree_dir``, this command's directory, the shipped states), and the answer to the master's
    questions for the files of that tree (never the master's state directory): the master may see
    another file system than this shell (the lab's node01, a service's private /tmp), so it reads
    through us."""
    from ..statetree import StateFileError, resolve_state_file, serve_tree_file, state_tree, states_dir

    try:
        spec.encode("utf-8")
    except UnicodeEncodeError:
        raise ControlError(f"{spec!r}: not a UTF-8 file name (state files need UTF-8 names)") from None
    try:
        relative = not os.path.isabs(spec) or (tree_dir is not None and not os.path.isabs(tree_dir))
        path, root = resolve_state_file(spec, states_dir(), os.getcwd() if relative else None, tree_dir)
    except StateFileError as exc:
        raise ControlError(f"refused, nothing was sent:\n{exc}") from None
    except FileNotFoundError:  # getcwd() of a directory removed under this shell
        raise ControlError("this shell's directory no longer exists: cd somewhere, or give FILE as an absolute "
                           "path") from None
    try:
        root.encode("utf-8")
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ControlError(f"{path!r}: not a UTF-8 path (state trees need UTF-8 names)") from None
    tree = state_tree(root, (state_dir,))

    def serve_file(question) -> tuple[dict, bytes]:
        if not isinstance(question, dict) or not isinstance(question.get("read"), str):
            return {"kind": "error", "why": "not a question this client answers"}, b""
        answer, data = serve_tree_file(tree, question["read"])
        return dict(answer, read=question["read"]), data  # which question it answers: checked

    return path, root, serve_file


def interrupted_note(job_id: str | None) -> str:
    """What Ctrl-C leaves: the job is the master's and the nodes', and goes on without this command."""
    if not job_id:
        return "interrupted before the master announced the job; `pimaster jobs` shows whether it started"
    return (f"job {job_id} continues on the nodes; `pimaster job {job_id}` to follow, "
            f"`pimaster job cancel {job_id}` to stop it")


@handler("apply", streaming=True, asks=True)
async def handle_apply(master, emit, ask, file: str, root: str | None = None, target: str | None = None,
                       test: bool = False, timeout: float = 3600.0, batch=None, fail_stop: bool = False) -> dict:
    """``file``: the state file as the client resolved it, in the client's file system; ``root``:
    its state tree there (default: the file's directory). Every file is read through ``ask``."""
    import asyncio

    from ..control import ANSWER_TIMEOUT_S
    from ..jobs import apply
    from ..statetree import ClientTree
    from ..targets import checked_batch

    if not isinstance(file, str) or not os.path.isabs(file) or not (
            root is None or isinstance(root, str) and os.path.isabs(root)):
        raise ControlError("name a state file and its tree (absolute paths, as `pimaster apply` sends them)")
    if ask is None:
        raise ControlError("apply reads the state tree through its client's connection, and this request has none")
    batch = checked_batch(batch)
    loop = asyncio.get_running_loop()

    def fetch(path: str, timeout: float) -> tuple[dict, bytes]:  # in the rendering thread
        return asyncio.run_coroutine_threadsafe(ask({"read": path}, timeout), loop).result(min(timeout, ANSWER_TIMEOUT_S) + 10)

    tree = ClientTree(root or os.path.dirname(file), fetch, forbidden=(master.state_dir,))
    return await apply(master.jobs, emit, file, target, bool(test), float(timeout), tree=tree, batch=batch,
                       fail_stop=bool(fail_stop))


@handler("apply_list", streaming=True)
async def handle_apply_list(master, emit, target: str | None = None, test: bool = False, timeout: float = 3600.0,
                            batch=None, fail_stop: bool = False) -> dict:
    """`pimaster apply` with no file: the master's cluster directory's `apply:` list (`highstate`)."""
    from ..highstate import apply_list
    from ..targets import checked_batch

    batch = checked_batch(batch)
    run = await apply_list(master, emit, target, bool(test), timeout=float(timeout), batch=batch,
                           fail_stop=bool(fail_stop))
    return run.as_json()
