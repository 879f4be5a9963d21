"""`pimaster jobs` (recent jobs: --limit, --target, --since) and `pimaster job ID|last` (one job's
results, as `apply` reports them; ID may be a unique prefix of a job id)."""

from __future__ import annotations

import argparse
import time

from . import handler
from ..cli import EXIT_FAILED, EXIT_OK, Duration, local_time, parse_target, print_json, report_error, table
from ..errors import ControlError

DEFAULT_LIMIT = 50
# Longest job id (or prefix) a request may carry.
MAX_JOB_TEXT = 64
# `pimaster job WORD ID`: actions on one job, by their first word (`cancel`). A job id
# starts with its date, so no action's name can be taken for a job's.
JOB_ACTIONS: dict = {}


def add_parser(sub, name, summary, common, as_json) -> None:
    parser = sub.add_parser(name, parents=[common, as_json], help=summary)
    if name == "job":
        parser.add_argument("job_id", metavar="ID",
                            help="a job id, a unique prefix of one (20261202-0215), or `last` for the newest "
                                 "job; `cancel ID` stops a running job on its nodes")
        # The job an action (JOB_ACTIONS) acts on: `pimaster job ACTION ID`.
        parser.add_argument("action_job_id", nargs="?", metavar="...", help=argparse.SUPPRESS)
        parser.add_argument("--quiet", action="store_true",
                            help="leave out the list of changed states and their diffs (failures are always shown)")
        parser.set_defaults(run=run_job)
        return
    parser.add_argument("--limit", type=positive_int, default=DEFAULT_LIMIT, metavar="N",
                        help=f"the newest N jobs (default {DEFAULT_LIMIT})")
    parser.add_argument("--target", metavar="TARGET", type=parse_target,
                        help="only jobs that ran on a node in TARGET (globs on node ids, 'node0*' or node01,node03, "
                             "deleted nodes too; role:NAME and FACT=GLOB terms as `ping` reads them now), or were "
                             "applied with that very --target")
    parser.add_argument("--since", type=Duration(), metavar="DURATION",
                        help="only jobs started in the last DURATION (24h, 7d)")
    parser.set_defaults(run=run_jobs)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def run_jobs(client, args) -> int:
    request = {"limit": args.limit}
    if args.target is not None:
        request["target"] = args.target
    if args.since is not None:
        request["since_s"] = args.since
    jobs = client.call("jobs", **request)["jobs"]
    if args.json:
        print_json({"jobs": jobs})
        return EXIT_OK
    rows = [[j["id"], local_time(j["created"]), j["file"], j["target"] or "*", "test" if j["test"] else "",
             f"{j['ok_nodes'] or 0}/{j['nodes']} ok", f"{j['finished_nodes'] or 0}/{j['nodes']} finished",
             j.get("reason") or ""] for j in jobs]
    # WHY: the reason the master started a job by itself (`enrolled node05`, `drift check`); empty: a person's.
    table(None, ["JOB", "STARTED", "FILE", "TARGET", "MODE", "RESULT", "PROGRESS", "WHY"], rows)
    return EXIT_OK


def run_job(client, args) -> int:
    from ..apply_view import print_report

    action = JOB_ACTIONS.get(args.job_id)
    if action is not None:
        return action(client, args)
    if args.action_job_id is not None:
        return report_error(args, f"job: one job id, or `last` (unexpected {args.action_job_id!r})")
    report = client.call("job", job_id=args.job_id)
    if args.json:
        print_json(report)
        return EXIT_OK if all(n["ok"] for n in report["nodes"].values()) else EXIT_FAILED
    return EXIT_OK if print_report(report, table, quiet=args.quiet) else EXIT_FAILED


def run_job_cancel(client, args) -> int:
    """`pimaster job cancel ID`: the job's nodes stop it (each reports what ran; the job is interrupted)."""
    if args.action_job_id is None:
        return report_error(args, "job cancel: which job? (an id, a unique prefix of one, or `last`)")
    answer = client.call("job.cancel", job_id=args.action_job_id)
    if args.json:
        print_json(answer)
    else:
        rows = [[node_id, (item["result"].replace("_", " "), "" if item["ok"] else "red"), item["detail"]]
                for node_id, item in sorted(answer["nodes"].items())]
        table(f"job {answer['job']}: cancel", ["NODE", "RESULT", "DETAIL"], rows)
    return EXIT_OK if all(item["ok"] for item in answer["nodes"].values()) else EXIT_FAILED


JOB_ACTIONS["cancel"] = run_job_cancel


@handler("jobs")
async def handle_jobs(master, limit: int = DEFAULT_LIMIT, target: str | None = None,
                      since_s: float | None = None) -> dict:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ControlError("limit: a whole number of jobs, at least 1")
    if since_s is not None and (isinstance(since_s, bool) or not isinstance(since_s, (int, float)) or not since_s > 0):
        raise ControlError("since_s: a positive number of seconds")
    node_globs = await _target_globs(master, target) if target is not None else None
    since = time.time() - since_s if since_s is not None else None
    return {"jobs": master.store.jobs(limit, node_globs, target, since)}


async def _target_globs(master, target) -> list[str]:
    """Globs on node ids for ``target``: a target on ids alone is its globs (so that the jobs of
    nodes deleted since still match); any other, the ids of the accepted nodes in it now (roles as
    `ping` reads them, none when there is no inventory: then the jobs applied with that very
    target still match). Matching nothing is no error here: no job ran there."""
    from ..targets import checked_target, compile_target, target_nodes

    globs = compile_target(checked_target(target)).id_globs()
    if globs is not None:
        return list(globs)
    try:
        nodes, _, _ = await target_nodes(master, target)
    except ControlError:  # no inventory to read roles from (the target itself was checked above)
        return []
    # Node ids hold no glob characters: each is a glob matching only itself.
    return nodes


def resolve_job_id(store, text) -> str:
    """The id of the job ``text`` names: `last` (the newest), a job id, or a prefix of exactly one.
    Raises ControlError for none, or for a prefix of several (naming them)."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_JOB_TEXT:
        raise ControlError(f"no job {str(text)[:MAX_JOB_TEXT]!r} (see `pimaster jobs`)")
    if text == "last":
        newest = store.newest_job_id()
        if newest is None:
            raise ControlError("no job yet (`pimaster apply` runs one)")
        return newest
    from ..store import MAX_AMBIGUOUS_SHOWN

    matches = store.job_ids_starting(text, MAX_AMBIGUOUS_SHOWN + 1)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ControlError(f"no job {text!r} (see `pimaster jobs`)")
    shown = "\n  ".join(matches[:MAX_AMBIGUOUS_SHOWN])
    more = "\n  ..." if len(matches) > MAX_AMBIGUOUS_SHOWN else ""
    raise ControlError(f"{text!r} is the start of several jobs' ids; give more of it:\n  {shown}{more}")


@handler("job")
async def handle_job(master, job_id: str) -> dict:
    from ..jobs import job_report

    job = master.store.job(resolve_job_id(master.store, job_id))
    if job is None:  # pruned between the two reads
        raise ControlError(f"no job {job_id!r} (see `pimaster jobs`)")
    return job_report(job)


@handler("job.cancel")
async def handle_job_cancel(master, job_id: str) -> dict:
    return await master.jobs.cancel(resolve_job_id(master.store, job_id))
