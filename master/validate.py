"""Validation of a node's states before anything is sent: against the node's catalogue of state
functions (names, arguments, required ones, argument types), then requisites and run order.

The catalogue is the one the node's agent sent at enrollment (facts.check_catalog checked its
shape), or the agent's beside this master. Argument types are checked once the values are in
(after YAML and the value tokens): a value whose type is not among its argument's `types` is
refused here, with the file and the argument's line, rather than by the agent mid-job. The names
of types (`types: {arg: [name, ...]}`), what each accepts and the words for a mismatch are the
agent's (piagent.states TYPE_NAMES, accepts, type_errors: one vocabulary, one set of rules); an argument without types (or a
catalogue without any: an older agent) takes any value.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from piagent.states import COMMON_ARGS, REQUISITES, type_errors

from .statetree import StateFileError

if TYPE_CHECKING:
    from .statefile import State

# Arguments the master resolves itself before sending: `source` (+`template`) become `contents`.
MASTER_ARGS = {"file.managed": {"source", "template", "context", "defaults", "contents_pillar"}}


# Salt's requisites and global arguments pimaster has not: what to write instead. (Without this a
# Salt user reads "did you mean 'require_in'?" for `require_any`.)
_ANY = "pimaster's requisites wait for all the states named; `onchanges` and `onfail` already fire on any"
SALT_ONLY_ARGS = {
    "listen": "use `watch` (the restart happens right after what it watches, not at the end)",
    "listen_in": "use `watch_in`",
    "prereq": "run the state after, with `onchanges`, or split the job in stages",
    "prereq_in": "run the state after, with `onchanges`, or split the job in stages",
    "require_any": _ANY, "require_any_in": _ANY, "watch_any": _ANY, "watch_any_in": _ANY,
    "onchanges_any": _ANY, "onchanges_any_in": _ANY, "onfail_any": _ANY, "onfail_any_in": _ANY,
    "onfail_all": _ANY, "onfail_all_in": _ANY,
    "failhard": "a failed state stops the states that require it; `pimaster apply` exits 1",
    "output_loglevel": "use `sensitive: true` to keep a state's output out of results and logs",
    "hide_output": "use `sensitive: true` to keep a state's output out of results and logs",
    "retry": "not supported: make the command wait itself (`until …; do sleep 1; done`)",
    "parallel": "states run one after another",
    "check_cmd": "use `onlyif`/`unless` on a `cmd.run` that checks after the change",
    "reload_modules": "not needed: the agent has no execution modules to reload",
    "saltenv": "one state tree: Salt's `base` environment only",
}


# ---------------------------------------------------------------------------------------------
# Validation against the agent's catalogue, requisites and order

def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate(states: list[State], catalog: dict) -> list[StateFileError]:
    """Each state against the catalogue: its function, its arguments' names, the required ones,
    their types."""
    errors = []
    for state in states:
        spec = catalog.get(state.fun)
        if spec is None:
            errors.append(StateFileError(state.path, state.line,
                                         f"unknown state function {state.fun!r}{_suggest(state.fun, catalog)}"))
            continue
        allowed = set(spec["args"]) | MASTER_ARGS.get(state.fun, set())
        for arg in state.args:
            if arg not in allowed and arg in SALT_ONLY_ARGS:
                errors.append(StateFileError(state.path, state.lines.get(arg, state.line),
                                             f"{state.id}: Salt's `{arg}` is not supported here: {SALT_ONLY_ARGS[arg]}"))
            elif arg not in allowed:
                errors.append(StateFileError(state.path, state.line, f"{state.id}: {state.fun} has no argument "
                                             f"{arg!r}{_suggest(arg, allowed | set(COMMON_ARGS))}"))
        for required in spec["required"]:
            if required not in state.args and not (required == "contents" and
                                                   ("source" in state.args or "contents_pillar" in state.args)):
                errors.append(StateFileError(state.path, state.line,
                                             f"{state.id}: {state.fun} needs the argument {required!r}"))
        if state.fun == "file.managed" and "source" in state.args and "contents" in state.args:
            errors.append(StateFileError(state.path, state.line, f"{state.id}: give `contents` or `source`, not both"))
        errors += _type_errors(state, spec.get("types") or {})
    return errors


def _type_errors(state: State, types: dict[str, list[str]]) -> list[StateFileError]:
    """The arguments whose value is none of the types the catalogue gives for it, in the agent's
    words ("mode must be text or a whole number, not a list": never the value, it may be a secret)."""
    errors = []
    for arg, value in state.args.items():
        accepted = types.get(arg)
        if not accepted or arg in state.pending:  # untyped; or a result not known yet, of no known type
            continue
        if arg == "name" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # `name: 8080` is the text 8080 (sent as text, see render._job)
        for problem in type_errors({arg: accepted}, {arg: value}):
            errors.append(StateFileError(state.path, state.lines.get(arg, state.line),
                                         f"{state.id}: {state.fun}: {problem}"))
    return errors


def _find(states: list[State], module: str | None, ref: str) -> list[int]:
    if module == "sls":  # Salt's `- sls: NAME`: every state of that file and of what it includes
        return [i for i, s in enumerate(states) if ref in (s.within or {s.sls})]
    return [i for i, s in enumerate(states)
            if (module is None or s.module == module) and (s.id == ref or s.name == ref)]


def resolve_requisites(states: list[State]) -> tuple[list[dict[str, list[int]]], list[StateFileError]]:
    """Per state, requisite kind -> indices of the states it depends on (the `_in` forms inverted)."""
    errors = []
    deps: list[dict[str, list[int]]] = [{k: [] for k in REQUISITES} for _ in states]
    labels = [f"{s.module}: {s.id}" for s in states]
    for i, state in enumerate(states):
        for kind, refs in state.requisites.items():
            base = kind[:-3] if kind.endswith("_in") else kind
            for module, ref, line in refs:
                found = _find(states, module, ref)
                if not found and module == "sls":
                    names = sorted({s.sls for s in states})
                    errors.append(StateFileError(state.path, line, f"{state.id}: {kind} names `sls: {ref}`, and no "
                                                 f"state of this apply comes from an SLS of that name, nor from "
                                                 f"what it includes{_suggest(ref, names)}"))
                    continue
                if not found:
                    wanted = f"{module}: {ref}" if module else ref
                    errors.append(StateFileError(state.path, line, f"{state.id}: {kind} names {wanted!r}, which "
                                                 f"is not a state of this apply{_suggest(wanted, labels)}"))
                    continue
                for j in found:
                    if j == i:
                        errors.append(StateFileError(state.path, line, f"{state.id}: {kind} names itself"))
                    elif kind.endswith("_in"):
                        deps[j][base].append(i)
                    else:
                        deps[i][base].append(j)
    return deps, errors


def run_order(states: list[State], deps: list[dict[str, list[int]]]) -> tuple[list[int], StateFileError | None]:
    """File order (after `order:`), moved only where a requisite demands it; a cycle is an error."""
    def rank(i: int):
        order = states[i].extra.get("order")
        return (0 if order == "first" else 2 if order == "last" else 1,
                order if isinstance(order, int) else 0, i)

    pending = sorted(range(len(states)), key=rank)
    needs = {i: set(j for kind in deps[i].values() for j in kind) for i in pending}
    done: list[int] = []
    placed: set[int] = set()
    while pending:
        for i in pending:
            if needs[i] <= placed:
                done.append(i)
                placed.add(i)
                pending.remove(i)
                break
        else:
            return done, StateFileError(states[pending[0]].path, states[pending[0]].line,
                                        "requisite cycle: " + _cycle(states, needs, pending))
    return done, None


def _cycle(states, needs, pending) -> str:
    start = pending[0]
    path, seen = [start], {start}
    current = start
    while True:
        nxt = next(j for j in needs[current] if j in pending)
        if nxt in seen:
            loop = path[path.index(nxt):] + [nxt]
            return " -> ".join(f"{states[i].fun} {states[i].id}" for i in loop)
        path.append(nxt)
        seen.add(nxt)
        current = nxt
