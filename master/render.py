"""Render and validate state files on the master, for each targeted node, before anything is sent.

A state file is YAML in SaltStack's SLS style, rendered first with Jinja2::

    /etc/hosts:
      file.managed:
        - source: hosts.j2          # relative to the state file, rendered with the same context
        - template: jinja
        - mode: "0644"
    munge:
      service.running:
        - enable: true
        - watch:
          - file: /etc/munge/munge.key

Jinja sees `node` (this node's facts and inventory entry), `nodes` (every node) and `cluster` (the
inventory's cluster-wide settings). `include: [other]` pulls other state files in first.

A node's job is compiled by four modules:

- statetree.py: where a state file may read (its state tree) and StateFileError;
- template.py: Jinja, where every `{{ }}` becomes a value token (values are data, never YAML:
  the rules are in its docstring);
- statefile.py: the rendered YAML parsed with line numbers, the tokens replaced by the values,
  states, includes and `source:` files;
- validate.py: the states against the node's catalogue (functions, arguments, their types),
  requisites and run order.

This module puts them together (`compile_for_node`) and is what the rest of the master imports.
Every problem is a StateFileError naming the file, the line and the reason; `compile_for_node`
raises the whole list at once, so a person fixes a file in one go.
"""

from __future__ import annotations

import os

from piagent.states import REQUISITES

from .statefile import MODE_ARGS, State, load_file, parse_states, resolve_sources
from .statetree import STATE_SUFFIXES, StateFileError, StateFileErrors, StateTree, resolve_state_path, state_tree
from .template import AttrDict, Pending, in_network, quote, render_state, render_template, to_attrdict
from .validate import MASTER_ARGS, resolve_requisites, run_order, validate

__all__ = [  # what the master (jobs.py, inventory.py) and the tests import from here
    "MASTER_ARGS", "MODE_ARGS", "STATE_SUFFIXES", "AttrDict", "Pending", "State",
    "StateFileError", "StateFileErrors", "compile_for_node", "in_network", "load_file", "parse_states",
    "quote", "render_state", "render_template", "resolve_requisites", "resolve_sources",
    "resolve_state_path", "run_order", "to_attrdict", "validate",
]


def compile_for_node(path: str, context: dict, catalog: dict, root: str | None = None,
                     meta: dict | None = None, forbidden: tuple[str, ...] = (),
                     tree: StateTree | None = None) -> list[dict]:
    """The job for one node: ordered states with requisites as positions. Raises StateFileErrors.

    `pimaster:` settings of the file (e.g. stages) are put into ``meta`` when given. Everything is
    read through ``tree`` (an apply's: the client's files); without one, from this file system,
    nothing outside ``root`` (default: the file's directory) nor under the directories in
    ``forbidden``, even inside it.
    """
    tree = tree or state_tree(root or os.path.dirname(path), tuple(forbidden))
    context = {k: v if callable(v) or isinstance(v, Pending) else to_attrdict(v) for k, v in context.items()}
    states, errors = load_file(path, context, tree, meta=meta)
    return _job(states, errors, context, catalog, tree)


def _job(states: list[State], errors: list[StateFileError], context: dict, catalog: dict,
         tree: StateTree) -> list[dict]:
    """Parsed states (and the problems found so far) checked, their sources read and their order
    found: the job, or StateFileErrors with every problem."""
    errors += validate(states, catalog)
    errors += resolve_sources(states, context, tree)
    deps, requisite_errors = resolve_requisites(states)
    errors += requisite_errors
    if errors:
        raise StateFileErrors(errors)
    order, cycle = run_order(states, deps)
    if cycle:
        raise StateFileErrors([cycle])
    position = {old: new for new, old in enumerate(order)}
    job = []
    for old in order:
        state = states[old]
        entry = {"id": state.id, "fun": state.fun, "name": state.name,
                 "args": {k: v for k, v in state.args.items() if k != "name"}, "source": state.where}
        for kind in REQUISITES:
            entry[kind] = sorted(position[j] for j in deps[old][kind])
        for key in ("unless", "onlyif", "sensitive"):
            if key in state.extra:
                entry[key] = state.extra[key]
        job.append(entry)
    return job
