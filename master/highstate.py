"""The cluster's own list (Salt's highstate): cluster.yaml's `apply:` names the state files every
node gets, in order, and this applies them, one ordinary job per file.

    apply: [network, time, slurm]

A node stops at its first failing file: it is left out of the files after it (its failure is the
job's to show; `stopped` in the report names the file). A file refused as a whole (it does not
render) stops every node it was for. The list's files are read where the master runs, from its
cluster directory (`pimaster serve --cluster-dir`, default the shipped states): `pimaster apply`
with no file, enrollment and drift checks (`autoapply.py`) all apply the same files without any
client to read them through.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from .errors import ControlError
from .inventory import ClusterSettings, Inventory, load_inventory
from .jobs import MasterJob, apply
from .statetree import StateFileError, resolve_state_file, state_tree, states_dir

log = logging.getLogger("pimaster")


def cluster_dir(master) -> str | None:
    """The master's cluster directory: `serve --cluster-dir`, else the shipped states (None: none)."""
    return master.cluster_dir or states_dir()


def load_cluster(directory: str | None) -> Inventory:
    """The inventory of the cluster directory, its settings checked (StateFileError says what is wrong)."""
    if directory is None:
        raise StateFileError("cluster.yaml", None, "the master has no cluster directory: start it with "
                                                  "`pimaster serve --cluster-dir DIR`")
    if not os.path.isdir(directory):
        raise StateFileError(directory, None, "the master's cluster directory does not exist")
    return load_inventory(directory, state_tree(directory))


def list_files(directory: str, settings: ClusterSettings) -> list[str]:
    """The paths of the `apply:` list's files in ``directory``, each resolved as `pimaster apply
    NAME --tree DIR` would; StateFileError for a name with no file."""
    paths = []
    for name in settings.apply:
        try:
            path, _ = resolve_state_file(name, None, directory, directory)
        except StateFileError as exc:
            raise StateFileError("cluster.yaml", None, f"apply: {name}: {exc.reason}") from None
        paths.append(path)
    return paths


@dataclasses.dataclass
class ListRun:
    """One run of the list: its jobs' reports in order, and where each stopped node stopped."""

    directory: str
    files: list[str]
    reports: list[dict] = dataclasses.field(default_factory=list)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)  # file name -> why, nothing sent
    stopped: dict[str, str] = dataclasses.field(default_factory=dict)  # node id -> the file it failed
    # unchanged_only (drift checks): file path -> nodes left out, their rendering changed since they got it
    outdated: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def as_json(self) -> dict:
        """The `pimaster apply --json` shape with no FILE: {"dir", "apply", "jobs": [the job reports],
        "refused": {FILE: why}, "stopped": {NODE: FILE}, "nodes": {NODE: {"ok", "changed", "stopped_at"}}}."""
        nodes: dict[str, dict] = {}
        for report in self.reports:
            for node_id, item in report["nodes"].items():
                entry = nodes.setdefault(node_id, {"ok": True, "changed": 0, "stopped_at": None})
                entry["changed"] += item.get("changed", 0)
                entry["ok"] = entry["ok"] and item["ok"]
        for node_id, file in self.stopped.items():
            nodes.setdefault(node_id, {"ok": False, "changed": 0, "stopped_at": None}).update(ok=False, stopped_at=file)
        return {"dir": self.directory, "apply": [os.path.basename(f) for f in self.files], "jobs": self.reports,
                "refused": self.refused, "stopped": self.stopped, "nodes": dict(sorted(nodes.items()))}

    @property
    def ok(self) -> bool:
        return not self.refused and not self.stopped and all(
            item["ok"] for report in self.reports for item in report["nodes"].values())


async def apply_list(master, emit, target: str | None = None, test: bool = False, *, timeout: float = 3600.0,
                     reason: str | None = None, only: list[str] | None = None, changed_only: bool = False,
                     newcomers: frozenset = frozenset(), unchanged_only: bool = False, batch: str | None = None,
                     fail_stop: bool = False, directory: str | None = None) -> ListRun:
    """Apply the cluster directory's `apply:` list to ``target`` (default every node); ``only``,
    ``changed_only``, ``newcomers``, ``unchanged_only`` and ``reason`` as `jobs.MasterJob` says (the
    master's own runs).
    Raises ControlError when the list cannot be read; a file refused as a whole is recorded in
    ``refused`` and stops its nodes."""
    directory = directory or cluster_dir(master)
    try:
        inventory = load_cluster(directory)
        files = list_files(directory, inventory.settings)
    except StateFileError as exc:
        raise ControlError(f"refused, nothing was sent:\n{exc}") from None
    if not files:
        raise ControlError(f"refused, nothing was sent: {os.path.join(directory, 'cluster.yaml')} has no `apply:` "
                           "list (e.g. `apply: [network, time, slurm]`)", code="usage")
    run = ListRun(directory, files)
    failed_so_far: set[str] = set()
    for index, path in enumerate(files):
        nodes = only if not failed_so_far else [
            n for n in (only if only is not None else master.roster.accepted_nodes()) if n not in failed_so_far]
        if nodes is not None and not nodes:
            break
        name = os.path.basename(path)
        emit({"type": "list_file", "file": name, "index": index + 1, "of": len(files)})
        job = MasterJob(reason=reason, only=None if nodes is None else sorted(nodes), changed_only=changed_only,
                        newcomers=newcomers, unchanged_only=unchanged_only)
        try:
            report = await apply(master.jobs, emit, path, target, test, timeout,
                                 tree=state_tree(directory, (master.state_dir,)), batch=batch,
                                 fail_stop=fail_stop, master_job=job)
        except ControlError as exc:
            # The file does not render (or the target matches none of it): no node gets it, nor the rest.
            run.refused[name] = str(exc)
            emit({"type": "list_refused", "file": name, "error": str(exc)})
            log.warning("%s: %s", name, exc)
            break
        if job.outdated:
            run.outdated[path] = job.outdated
        if report is None:
            continue  # nothing to send (no node left, or none whose rendering changed)
        run.reports.append(report)
        failed = [n for n, item in report["nodes"].items() if not item["ok"]]
        for node_id in failed:
            run.stopped.setdefault(node_id, name)
        failed_so_far.update(failed)
        if fail_stop and failed:
            break
    return run
