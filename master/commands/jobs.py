"""`pimaster jobs` (recent jobs) and `pimaster job ID` (one job's results, as `apply` reports them)."""

from __future__ import annotations

from . import handler
from ..cli import EXIT_FAILED, EXIT_OK, local_time, print_json, table
from ..errors import ControlError


def add_parser(sub, name, summary, common, as_json) -> None:
    parser = sub.add_parser(name, parents=[common, as_json], help=summary)
    if name == "job":
        parser.add_argument("job_id")
    parser.set_defaults(run=run_job if name == "job" else run_jobs)


def run_jobs(client, args) -> int:
    jobs = client.call("jobs")["jobs"]
    if args.json:
        print_json({"jobs": jobs})
        return EXIT_OK
    rows = [[j["id"], local_time(j["created"]), j["file"], j["target"] or "*", "test" if j["test"] else "",
             f"{j['ok_nodes'] or 0}/{j['nodes']} ok", f"{j['finished_nodes'] or 0}/{j['nodes']} finished"] for j in jobs]
    table(None, ["JOB", "STARTED", "FILE", "TARGET", "MODE", "RESULT", "PROGRESS"], rows)
    return EXIT_OK


def run_job(client, args) -> int:
    from ..apply_view import print_report

    report = client.call("job", job_id=args.job_id)
    if args.json:
        print_json(report)
        return EXIT_OK if all(n["ok"] for n in report["nodes"].values()) else EXIT_FAILED
    return EXIT_OK if print_report(report, table) else EXIT_FAILED


@handler("jobs")
async def handle_jobs(master, limit: int = 50) -> dict:
    return {"jobs": master.store.jobs(int(limit))}


@handler("job")
async def handle_job(master, job_id: str) -> dict:
    from ..jobs import job_report

    job = master.store.job(str(job_id))
    if job is None:
        raise ControlError(f"no job {job_id!r} (see `pimaster jobs`)")
    return job_report(job)
