"""Jobs on the agent: run one at a time, report progress, keep the result until the master has it.

A job's result is written to disk (atomically) before it is sent and deleted only when the master
acknowledges it, so a result survives a lost link or a master restart and is delivered on
reconnect. A job that was running when the agent died (power cut, reboot, kill) leaves a marker;
at the next start the agent reports that job as interrupted instead of leaving it hanging.

Asked to stop (SIGTERM), the agent ends the running state's commands and starts no other state
(`stop`); the job's result then says exactly what ran and is kept like any other (`wind_down`).
The master's `cancel` does the same to one job (`cancel`), and the agent runs on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from . import protocol as proto

from . import fileio
from .protocol import Message

if TYPE_CHECKING:  # the state modules are imported only when a job runs
    from .states.base import StopSwitch

# \A...\Z, not ^...$ ("$" matches before a trailing newline): a job id names files in the state dir.
JOB_ID_RE = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")
ACCEPTED_MEMORY = 256   # job ids remembered after their files are gone (far more than a master resends)
# How long a stopping agent waits for its job to record what ran: the running command has
# base.KILL_GRACE_S to end after SIGTERM before SIGKILL; within debian/piagent.service's TimeoutStopSec.
WIND_DOWN_S = 10.0


REQUISITE_KEYS = ("require", "watch", "onchanges", "onfail")

# The engine words a state that a tripped StopSwitch ended or kept from running as the agent's
# stop; for a cancelled job these say what happened instead (see _as_cancelled).
STOPPED_WORDING = (
    ("interrupted: the agent was stopped while this state ran, and ended its command",
     "interrupted: the job was cancelled while this state ran; its command was ended"),
    ("not run: the agent stopped before this state", "not run: the job was cancelled before this state"),
)


def _as_cancelled(res: dict) -> dict:
    """A state's result worded for a cancelled job rather than a stopping agent."""
    comment = res.get("comment")
    if res.get("status") not in ("failed", "not_run") or not isinstance(comment, str):
        return res
    for stopped, cancelled in STOPPED_WORDING:
        if comment.startswith(stopped):
            return dict(res, comment=cancelled + comment[len(stopped):])
    return res


def _state_problem(state) -> str | None:
    """What is wrong with one state of an `apply` request, None if its shape is what the engine
    expects (what the master's renderer sends). Values inside `args` are the state module's to judge."""
    if not isinstance(state, dict):
        return "not a map"
    if not isinstance(state.get("fun"), str):
        return "no function name"
    for key in ("id", "name", "source"):
        if state.get(key) is not None and not isinstance(state[key], str):
            return f"{key} is not text"
    args = state.get("args")
    if args is not None and not (isinstance(args, dict) and all(isinstance(k, str) for k in args)):
        return "args is not a map of names"
    for key in REQUISITE_KEYS:
        refs = state.get(key)
        if refs is not None and not (isinstance(refs, list) and all(isinstance(i, int) for i in refs)):
            return f"{key} is not a list of positions"
    for key in ("unless", "onlyif"):
        commands = state.get(key)
        if commands is not None and not isinstance(commands, str) and \
                not (isinstance(commands, list) and all(isinstance(c, str) for c in commands)):
            return f"{key} is not a command or a list of commands"
    return None


def _plain(value):
    """JSON-safe (and so msgpack-safe) copy: whatever a module returned, the result can be sent."""
    return json.loads(json.dumps(value, default=str))


def _redact(value, secrets: list[str]):
    """Replace the job's secret values (the master says which) wherever they appear in results."""
    secrets = sorted({s for s in secrets if isinstance(s, str) and len(s) >= 6}, key=len, reverse=True)
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "[secret]")
        return value
    if isinstance(value, list):
        return [_redact(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: _redact(v, secrets) for k, v in value.items()}
    return value


def _without_sensitive(results: list[dict]) -> list[dict]:
    """What is kept on disk: a sensitive state's output is for the master's eyes only."""
    return [dict(r, changes={"redacted": "sensitive state"} if r.get("changes") else {}) if r.get("sensitive") else r
            for r in results]


async def _in_thread(function: Callable, name: str):
    """``function()`` in a daemon thread of its own, awaited. Not the loop's default executor: at
    exit asyncio joins that without a bound, and a state stuck outside any command (a hung NFS
    write) would keep a stopping agent alive until systemd's SIGKILL."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(value, error) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def work() -> None:
        value = error = None
        try:
            value = function()
        except Exception as exc:  # delivered to the awaiting task, which reports it
            error = exc
        except BaseException as exc:  # never leave the task waiting: the job would hang unrecorded
            error = RuntimeError(f"the job's thread ended with {type(exc).__name__}")
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=work, name=name, daemon=True).start()
    return await future


class JobRunner:
    def __init__(self, state_dir: str, send: Callable[[Message], Awaitable[bool]], log: logging.Logger) -> None:
        self.running_dir = os.path.join(state_dir, "jobs")
        self.results_dir = os.path.join(state_dir, "results")
        self.state_dir = state_dir
        self.send = send
        self.log = log
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()  # jobs outlive a connection: never cancelled with it
        # Set when the agent is asked to stop (SIGTERM: reboot, shutdown, `systemctl stop`): no
        # state starts after that, and the running job's switch ends its commands.
        self.stopping = False
        self._switch: StopSwitch | None = None  # the running job's
        self._running_job: str | None = None    # ...and its id
        self._accepted: dict[str, None] = {}  # recent job ids, oldest first (an ordered set)
        self._queued: set[str] = set()         # accepted, waiting for the job before them to end
        # Jobs the master cancelled (an ordered set, bounded like _accepted): one cancelled before
        # it arrived (the cancel overtook the apply) or while queued starts with its switch tripped.
        self._cancelled: dict[str, None] = {}

    def _path(self, directory: str, job_id: str) -> str:
        return os.path.join(directory, job_id + ".json")

    def accept(self, body: dict) -> dict:
        """Validate an `apply` request and start it; the answer is the acknowledgement."""
        problem = self._problem(body)
        if problem:
            # One line, never a traceback: what the master sent is wrong, not this agent.
            job_id = body.get("job")
            self.log.warning("refused a job%s: %s", f" {job_id[:64]!r}" if isinstance(job_id, str) else "", problem)
            return {"error": problem}
        job_id, states, test = body["job"], body["states"], body.get("test", False)
        redact = body.get("redact") or []
        if job_id in self._accepted or os.path.exists(self._path(self.results_dir, job_id)) \
                or os.path.exists(self._path(self.running_dir, job_id)):
            # The master may send a job again (the agent reconnected while it was handed out):
            # queued, running, done or delivered, a job id runs once.
            return {"accepted": True, "job": job_id, "note": "already known"}
        self._accepted[job_id] = None
        while len(self._accepted) > ACCEPTED_MEMORY:
            self._accepted.pop(next(iter(self._accepted)))
        self._queued.add(job_id)
        task = asyncio.ensure_future(self._run(job_id, states, bool(test), redact))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {"accepted": True, "job": job_id}

    @staticmethod
    def _problem(body: dict) -> str | None:
        job_id, states = body.get("job"), body.get("states")
        redact = body.get("redact") or []
        if not isinstance(redact, list):
            return "malformed redact list"
        if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
            return "malformed job id"
        if not isinstance(states, list):
            return "malformed states"
        for index, state in enumerate(states):
            problem = _state_problem(state)
            if problem:
                return f"malformed states: state {index}: {problem}"
        return None

    @property
    def running(self) -> bool:
        return self._switch is not None

    @property
    def running_job(self) -> str | None:
        """The id of the job running now; None when none runs."""
        return self._running_job if self._switch is not None else None

    def stop(self) -> None:
        """The agent is stopping: end the running state's commands; no further state starts."""
        self.stopping = True
        if self._switch is not None:
            self._switch.trip()

    def cancel(self, body: dict) -> dict:
        """The master's `cancel`: stop that job as `stop` would (its running command ended, no further
        state started, the result saying exactly what ran, the job interrupted); the agent runs on.
        The answer says whether this agent was running (or about to run) the job."""
        job_id = body.get("job")
        if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
            return {"error": "malformed job id"}
        if self.stopping and (job_id in self._queued or job_id == self._running_job):
            # Its switch is tripped already: the job ends anyway, worded as the agent's stop.
            return {"job": job_id, "cancelled": True, "was": "running", "note": "the agent is stopping"}
        if job_id == self._running_job and self._switch is not None:
            self._remember_cancelled(job_id)
            self._switch.trip()
            self.log.info("job %s cancelled by the master: ending its running command", job_id)
            return {"job": job_id, "cancelled": True, "was": "running"}
        if job_id in self._queued:
            self._remember_cancelled(job_id)
            self.log.info("job %s cancelled by the master before it started", job_id)
            return {"job": job_id, "cancelled": True, "was": "queued"}
        if job_id in self._accepted or os.path.exists(self._path(self.results_dir, job_id)):
            return {"job": job_id, "cancelled": False, "was": "finished"}
        # Never seen: should the apply still be on its way, it must not run.
        self._remember_cancelled(job_id)
        return {"job": job_id, "cancelled": False, "was": "unknown"}

    def _remember_cancelled(self, job_id: str) -> None:
        self._cancelled[job_id] = None
        while len(self._cancelled) > ACCEPTED_MEMORY:
            self._cancelled.pop(next(iter(self._cancelled)))

    async def wind_down(self) -> None:
        """Wait (bounded) for the jobs to record what ran before the agent exits. A job still
        running after WIND_DOWN_S keeps its marker and is reported interrupted at the next start."""
        if not self._tasks:
            return
        _, running = await asyncio.wait(set(self._tasks), timeout=WIND_DOWN_S)
        if running:
            self.log.warning("a job did not end within %.0f s of the stop; it is reported interrupted at the "
                             "next start", WIND_DOWN_S)

    async def _run(self, job_id: str, states: list[dict], test: bool, redact: list) -> None:
        from .engine import run_states, summarize
        from .states.base import StopSwitch

        async with self._lock:
            self._queued.discard(job_id)
            switch = StopSwitch()
            # Queued when the stop or the cancel came: recorded with every state not run.
            if self.stopping or job_id in self._cancelled:
                switch.trip()
            self._switch, self._running_job = switch, job_id
            os.makedirs(self.running_dir, mode=0o700, exist_ok=True)
            started = time.time()
            marker = self._path(self.running_dir, job_id)
            fileio.write_atomic(marker, json.dumps({"job": job_id, "started": started, "test": test}).encode(), 0o600)
            loop = asyncio.get_running_loop()

            # Worded as cancelled only when the cancel came before any stop of the agent (see cancel).
            def on_result(index: int, res: dict) -> None:
                if job_id in self._cancelled:
                    res = _as_cancelled(res)
                state = {k: res.get(k) for k in ("id", "fun", "status")}
                state["comment"] = _redact(str(res.get("comment", ""))[:300], redact)
                try:
                    loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.send(Message(
                        type=proto.JOB_PROGRESS, body={"job": job_id, "index": index, "state": state}))))
                except RuntimeError:  # the loop is closed: the agent exited without waiting for this job
                    pass

            def run() -> tuple[list[dict], bool]:
                results = run_states(states, test=test, state_dir=self.state_dir, on_result=on_result, stop=switch)
                return results, switch.tripped  # interrupted: the stop came before the last state ended

            self.log.info("job %s: %d state(s)%s", job_id, len(states), " in test mode" if test else "")
            try:
                results, interrupted = await _in_thread(run, f"job {job_id}")
            except Exception as exc:  # the engine itself failed: report it, never lose the job
                self.log.exception("job %s failed", job_id)
                results = [{"id": "job", "fun": "engine", "name": job_id, "result": False, "changes": {},
                            "comment": f"{type(exc).__name__}: {exc}", "status": "failed"}]
                interrupted = switch.tripped
            finally:
                self._switch, self._running_job = None, None
            if job_id in self._cancelled:
                results = [_as_cancelled(r) for r in results]
            results = _redact(_plain(results), redact)
            payload = {"job": job_id, "results": results, "summary": summarize(results),
                       "started": started, "finished": time.time(), "test": test, "interrupted": interrupted}
            self._keep(dict(payload, results=_without_sensitive(results)))
            os.unlink(marker)
            self.log.info("job %s %s: %s", job_id, ("cancelled" if job_id in self._cancelled else "interrupted")
                          if interrupted else "done", payload["summary"])
        await self._deliver(payload)  # sensitive output, if any, only in this first, live delivery

    def _keep(self, payload: dict) -> None:
        os.makedirs(self.results_dir, mode=0o700, exist_ok=True)
        fileio.write_atomic(self._path(self.results_dir, payload["job"]), json.dumps(payload).encode(), 0o600)

    async def _deliver(self, payload: dict) -> None:
        msg = Message(type=proto.JOB_RESULT, body=payload)
        try:
            # What the master will take, not only what encodes: decode() also bounds arrays and maps,
            # and a result it refuses would be resent, and refused, at every reconnect.
            proto.decode(proto.encode(msg), frozenset({proto.JOB_RESULT}), max_bytes=proto.MAX_AGENT_MESSAGE_BYTES)
        except proto.ProtocolError:  # too large for one message: keep the verdicts, drop the details
            for res in payload["results"]:
                res["changes"] = {"note": "changes too large to send; see the agent's state dir"} if res.get("changes") else {}
                if len(res.get("comment") or "") > 4096:
                    res["comment"] = res["comment"][:4096] + "\n[cut: see the agent's state dir]"
            msg = Message(type=proto.JOB_RESULT, body=payload)
        if not await self.send(msg):
            self.log.info("job %s: result kept on disk until the master is back", payload["job"])

    def acknowledged(self, job_id) -> None:
        if isinstance(job_id, str) and JOB_ID_RE.fullmatch(job_id):
            try:
                os.unlink(self._path(self.results_dir, job_id))
            except FileNotFoundError:
                pass

    def recover_interrupted(self) -> None:
        """At start: a job whose marker is still there was cut short (power, reboot, kill)."""
        try:
            markers = sorted(os.listdir(self.running_dir))
        except FileNotFoundError:
            return
        for name in markers:
            path = os.path.join(self.running_dir, name)
            try:
                with open(path) as fh:
                    info = json.load(fh)
                job_id = info["job"]
            except (OSError, ValueError, KeyError, TypeError):
                os.unlink(path)
                continue
            if os.path.exists(self._path(self.results_dir, job_id)):
                # Stopped between keeping the result and removing the marker: the result is complete.
                os.unlink(path)
                continue
            self.log.warning("job %s was interrupted (the agent stopped while it ran)", job_id)
            summary = {"ok": 0, "changed": 0, "failed": 0, "not_run": 0, "skipped": 0}
            self._keep({"job": job_id, "results": [], "summary": summary, "started": info.get("started"),
                        "finished": time.time(), "test": info.get("test", False), "interrupted": True})
            os.unlink(path)

    async def deliver_pending(self) -> None:
        """After (re)connecting: send every result the master has not acknowledged yet."""
        try:
            names = sorted(os.listdir(self.results_dir))
        except FileNotFoundError:
            return
        for name in names:
            try:
                with open(os.path.join(self.results_dir, name)) as fh:
                    payload = json.load(fh)
            except (OSError, ValueError):
                continue
            await self._deliver(payload)

    def has_pending(self) -> bool:
        """A job running, or a result the master has not acknowledged yet."""
        for directory in (self.running_dir, self.results_dir):
            try:
                if any(name.endswith(".json") for name in os.listdir(directory)):
                    return True
            except FileNotFoundError:
                pass
        return self._lock.locked()
