"""The agent's state engine: runs a rendered, validated list of states in order.

The master has already rendered the state file, checked every function and argument, resolved the
requisites to positions in this list and put the list in run order (file order, moved only where a
requisite demands). Each state arrives as::

    {"id": "/etc/hosts", "fun": "file.managed", "name": "/etc/hosts", "args": {...},
     "require": [0], "watch": [], "onchanges": [], "onfail": [], "unless": [], "onlyif": [],
     "source": "states/hosts.yaml:3"}

Per state the result is Salt's shape plus ``id``, ``fun``, ``status`` and ``duration_ms``; status
is one of ok, changed (in test mode: would change), failed, not_run (a requisite failed: the state
was not tried, which is not a failure of its own) and skipped (unless/onlyif/onchanges/onfail said
no).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from .states import arg_types, registry, type_errors
from .states.base import StateContext, StateError, StopSwitch, result as make_result

log = logging.getLogger("piagent.engine")

OK, CHANGED, FAILED, NOT_RUN, SKIPPED = "ok", "changed", "failed", "not_run", "skipped"


def _status(res: dict) -> str:
    if res["result"] is False:
        return FAILED
    return CHANGED if res["changes"] else OK


def _commands(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def run_states(states: list[dict], *, test: bool = False, state_dir: str = "/var/lib/piagent",
               on_result: Callable[[int, dict], None] | None = None,
               make_context: Callable[..., StateContext] = StateContext,
               stop: StopSwitch | None = None) -> list[dict]:
    """Run the states in order; each one's result goes to ``on_result`` as soon as it is known.

    ``make_context`` makes each state's StateContext (its keyword arguments are StateContext's):
    tests give one that answers commands from a recording instead of running them.

    ``stop`` (tripped when the agent is asked to stop) ends the running state's commands; the
    result then says exactly what ran: the states that finished as they finished, the one whose
    command was ended (or refused) failed as interrupted, and the rest not run.
    """
    functions = registry()
    results: list[dict] = []
    for index, state in enumerate(states):
        started = time.monotonic()
        if stop is not None and stop.tripped:
            name = state.get("name") or state.get("id") or "?"
            res = dict(make_result(name, None, comment="not run: the agent stopped before this state"), status=NOT_RUN)
        else:
            cut_short_before = stop.cut_short if stop is not None else 0
            res = _run_one(index, state, results, functions, test, state_dir, make_context, stop)
            if stop is not None and stop.cut_short > cut_short_before:
                res = _interrupted(res)
        res.update(id=state.get("id", res["name"]), fun=state["fun"], source=state.get("source"),
                   duration_ms=round((time.monotonic() - started) * 1000, 1))
        res.setdefault("status", _status(res))
        if state.get("sensitive"):
            res["sensitive"] = True  # its output goes to the master only, never into kept results
        results.append(res)
        if on_result is not None:
            on_result(index, res)
    return results


def _interrupted(res: dict) -> dict:
    """The state whose command the agent's stop ended: failed, whatever the command's exit made of it."""
    said = res.get("comment") or ""
    return dict(res, result=False, status=FAILED, comment="interrupted: the agent was stopped while this "
                "state ran, and ended its command" + (f" ({said})" if said else ""))


def _run_one(index: int, state: dict, done: list[dict], functions: dict, test: bool, state_dir: str,
             make_context: Callable[..., StateContext], stop: StopSwitch | None) -> dict:
    name = state.get("name") or state.get("id") or "?"

    def refs(kind: str) -> list[dict]:
        # The master sends only earlier positions; anything else is a malformed job, not a crash.
        return [done[i] for i in state.get(kind) or [] if isinstance(i, int) and 0 <= i < index]

    def label(res: dict) -> str:
        return f"{res['fun']} {res['id']}"

    blocked = [r for r in refs("require") + refs("watch") + refs("onchanges") if r["status"] in (FAILED, NOT_RUN)]
    if blocked:
        return dict(make_result(name, None, comment="not run: requisite " + ", ".join(
            f"{label(r)} {'failed' if r['status'] == FAILED else 'was not run'}" for r in blocked)), status=NOT_RUN)
    onchanges = refs("onchanges")
    if onchanges and not any(r["changes"] for r in onchanges):
        return dict(make_result(name, True, comment="skipped: no changes in " + ", ".join(map(label, onchanges))),
                    status=SKIPPED)
    onfail = refs("onfail")
    if onfail and not any(r["status"] == FAILED for r in onfail):
        return dict(make_result(name, True, comment="skipped: nothing it handles failed"), status=SKIPPED)

    function = functions.get(state.get("fun"))
    if function is None:
        return make_result(name, False, comment=f"this agent has no state function {state.get('fun')!r}")
    args = dict(state.get("args") or {})
    args["name"] = name
    # The master checks the types too, before sending; a job from an older master may not have.
    problems = type_errors(arg_types(function), args)
    if problems:
        return make_result(name, False, comment="; ".join(problems))
    ctx = make_context(test=test, state_dir=state_dir, watch_changed=any(r["changes"] for r in refs("watch")),
                       stop=stop)
    unless = _commands(state.get("unless"))
    if unless and all(ctx.run(c, shell=True).ok for c in unless):
        return dict(make_result(name, True, comment="skipped: unless condition is true"), status=SKIPPED)
    onlyif = _commands(state.get("onlyif"))
    if onlyif and not all(ctx.run(c, shell=True).ok for c in onlyif):
        return dict(make_result(name, True, comment="skipped: onlyif condition is false"), status=SKIPPED)
    if stop is not None and stop.tripped:
        # A guard the stop cut short proves nothing: an `unless` killed mid-check reads as false,
        # and the state it guards must not run on that (run_states reports it interrupted).
        return dict(make_result(name, None, comment="not run: the agent stopped while checking its conditions"),
                    status=NOT_RUN)

    try:
        res = function(ctx, **args)
    except StateError as exc:
        return make_result(name, False, comment=str(exc))
    except TypeError as exc:  # an argument the function does not take: the master should have refused it
        return make_result(name, False, comment=f"bad arguments: {exc}")
    except Exception as exc:
        log.exception("%s %s failed", state.get("fun"), name)
        return make_result(name, False, comment=f"{type(exc).__name__}: {exc}")
    if not isinstance(res, dict) or "result" not in res:
        return make_result(name, False, comment=f"{state.get('fun')} returned no result")
    res.setdefault("name", name)
    res.setdefault("changes", {})
    res.setdefault("comment", "")
    return res


def summarize(results: list[dict]) -> dict:
    """Counts per status; `changed` counts the states that changed, or would in test mode."""
    counts = {OK: 0, CHANGED: 0, FAILED: 0, NOT_RUN: 0, SKIPPED: 0}
    for res in results:
        counts[res.get("status", OK)] = counts.get(res.get("status", OK), 0) + 1
    return counts
