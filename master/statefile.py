"""State files as data: the rendered YAML parsed with line numbers, the value tokens replaced by
the values (template.py), the states, includes and `pimaster:` settings read out of it, and
`source:` files read into `contents`.

A state file is a mapping of state ids to `module.function:` and a list of `- name: value`
arguments (Salt's `pkg:` + `- installed` spelling too); `include: [other]` pulls other state
files in first (`other`, `other.yaml` or Salt's dotted `dir.other`, inside the state tree only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import jinja2
import yaml
from piagent.states import REQUISITES, REQUISITES_IN

from .salt import file_context
from .statetree import STATE_SUFFIXES, StateFileError, StateTree, display_path, sls_name, sls_paths
from .template import Pending, Values, plain_data, render_state, render_template, to_attrdict

# Arguments whose YAML number is sent as the digits written (see _parse_state).
MODE_ARGS = {"mode", "dir_mode", "file_mode"}


@dataclass
class State:
    """One state of a file, as parsed: its function, its arguments, and where each came from."""

    id: str
    fun: str                   # module.function
    args: dict
    path: str                  # as shown in messages (relative to the applied file's directory)
    line: int
    file: str = ""             # absolute path, for `source:` lookups
    sls: str = ""              # Salt's SLS name of its file (`- sls: NAME` requisites)
    within: set = field(default_factory=set)          # its SLS and every SLS that includes it
    requisites: dict = field(default_factory=dict)   # kind -> [(module or None, ref, line)]
    extra: dict = field(default_factory=dict)         # unless / onlyif / order
    lines: dict = field(default_factory=dict)         # argument -> its line
    pending: set = field(default_factory=set)         # arguments whose value is a result not known yet
    names_valued: tuple = (False, [])                 # `names:` a value as a whole; each item a value

    @property
    def module(self) -> str:
        return self.fun.split(".", 1)[0]

    @property
    def name(self) -> str:
        return str(self.args.get("name", self.id))

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


# ---------------------------------------------------------------------------------------------
# Parsing the rendered YAML, with line numbers

# libyaml's parser when PyYAML has it (Debian's python3-yaml does): parsing a file for 200 nodes
# is most of an apply's time on the master.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _construct(node):
    """The Python value of a composed YAML node (we compose first to keep line numbers)."""
    if node is None:
        return None
    try:
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except yaml.YAMLError:
        return None


_STR, _INT, _FLOAT, _BOOL, _NULL, _SEQ, _MAP = (f"tag:yaml.org,2002:{t}" for t in
                                                ("str", "int", "float", "bool", "null", "seq", "map"))


def _value_node(value, start, end):
    if value is None:
        return yaml.ScalarNode(_NULL, "null", start, end)
    if isinstance(value, bool):
        return yaml.ScalarNode(_BOOL, "true" if value else "false", start, end)
    if isinstance(value, int):
        return yaml.ScalarNode(_INT, str(value), start, end)
    if isinstance(value, float):
        return yaml.ScalarNode(_FLOAT, repr(value), start, end)
    if isinstance(value, str):
        return yaml.ScalarNode(_STR, value, start, end)
    if isinstance(value, list):
        return yaml.SequenceNode(_SEQ, [_value_node(v, start, end) for v in value], start, end, flow_style=True)
    return yaml.MappingNode(_MAP, [(_value_node(k, start, end), _value_node(v, start, end))
                                   for k, v in value.items()], start, end, flow_style=True)


class _FillError(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line, self.reason = line, reason


def _block_indent(lines: list[str], indicator_line: int) -> int:
    """The indentation of a block scalar's content: that of its first line with text."""
    for line in lines[indicator_line + 1:]:
        if line.strip():
            return len(line) - len(line.lstrip(" "))
    return 0


def _fill(node, values: Values, done: dict, lines: list[str], pending: set[int], valued: set[int],
          key: bool = False):
    """The composed node with every value token replaced (see template.py's docstring); a value
    standing alone as a plain scalar becomes a node of its own type, as one value. ``lines``:
    the rendered text, for the indentation of block scalars. ``pending`` gets the id of each node
    that stands for a Pending value (a result not known yet: its type is not known either)."""
    if isinstance(node, yaml.ScalarNode):
        return _fill_scalar(node, values, key, lines, pending, valued)
    if id(node) in done:  # an alias, or a node inside itself
        return done[id(node)]
    done[id(node)] = node
    if isinstance(node, yaml.SequenceNode):
        node.value = [_fill(item, values, done, lines, pending, valued) for item in node.value]
    elif isinstance(node, yaml.MappingNode):
        node.value = [(_fill(k, values, done, lines, pending, valued, key=True),
                       _fill(v, values, done, lines, pending, valued))
                      for k, v in node.value]
    return node


def _fill_scalar(node, values: Values, key: bool, lines: list[str], pending: set[int], valued: set[int]):
    if not values.traced(node.value):
        return node
    start, end = node.start_mark, node.end_mark
    index = values.whole(node.value)
    # Plain (libyaml says "", PyYAML None), no tag or anchor in front (they widen the scalar).
    alone = (index is not None and not node.style and node.tag == _STR and start.line == end.line
             and end.column - start.column == len(node.value))
    try:
        if alone and not key:
            filled = _value_node(plain_data(values.items[index], values), start, end)
            if isinstance(values.items[index], Pending):
                pending.add(id(filled))  # the tree holds the node: the id stays its own while parsing
            valued.add(id(filled))
            return filled
        block = node.style in ("|", ">")
        text = values.substitute(node.value, dedent=_block_indent(lines, start.line) if block else 0)
    except jinja2.UndefinedError as exc:
        raise _FillError(start.line + 1, f"undefined in template: {exc.message}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise _FillError(start.line + 1, f"template error: {type(exc).__name__}: {exc}") from None
    except RecursionError:
        raise _FillError(start.line + 1, "a value nested too deeply to be YAML") from None
    if values.traced(text):
        raise _FillError(start.line + 1, "a filter rewrote text that holds {{ }} values (`{% filter upper %}`, "
                                         "`caller() | upper`...): apply it to the values instead")
    return yaml.ScalarNode(node.tag, text, start, end, style=node.style)


def _check_meta(value) -> str | None:
    if not isinstance(value, dict):
        return "expected a mapping (stages: [...])"
    unknown = set(value) - {"stages"}
    if unknown:
        return f"unknown setting(s) {', '.join(sorted(map(str, unknown)))} (known: stages)"
    stages = value.get("stages", [])
    if not isinstance(stages, list) or not all(isinstance(s, str) and s for s in stages):
        return "stages is a list of role names, applied in that order"
    return None


def parse_states(text: str, path: str, meta: dict | None = None, values: Values | None = None,
                 extends: list[State] | None = None) -> tuple[list[State], list[tuple[str, int]], list[StateFileError]]:
    """States in file order, the include list, and the problems found; `pimaster:` settings go to
    ``meta``, the states of an `extend:` block to ``extends`` (partial: only what they change).

    ``values`` are those of render_state, whose tokens in ``text`` they replace after YAML parsing.
    """
    meta = {} if meta is None else meta
    extends = [] if extends is None else extends
    errors: list[StateFileError] = []
    pending: set[int] = set()  # ids of the nodes that stand for Pending values
    valued: set[int] = set()   # ids of the nodes that stand for a {{ }} value (data, maybe a node's)
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        reason = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
        return [], [], [StateFileError(path, mark.line + 1 if mark else None, reason)]
    if root is not None and values is not None:
        try:
            root = _fill(root, values, {}, text.splitlines(), pending, valued)
        except _FillError as exc:
            return [], [], [StateFileError(path, exc.line, exc.reason)]
    if root is None:
        return [], [], []
    if not isinstance(root, yaml.MappingNode):
        return [], [], [StateFileError(path, root.start_mark.line + 1,
                                       "a state file is a mapping of state ids to states")]
    states: list[State] = []
    includes: list[tuple[str, int]] = []
    seen_ids: dict[str, int] = {}
    for key_node, value_node in root.value:
        line = key_node.start_mark.line + 1
        state_id = _construct(key_node)
        if state_id == "pimaster":  # settings for the apply itself, not a state
            value = _construct(value_node)
            problem = _check_meta(value)
            if problem:
                errors.append(StateFileError(path, line, f"pimaster: {problem}"))
            else:
                meta.update(value)
            continue
        if state_id == "include":
            value = _construct(value_node)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                errors.append(StateFileError(path, line, "include: takes a list of state file names"))
            else:
                includes += [(v, value_node.start_mark.line + 1) for v in value]
            continue
        if state_id == "exclude":
            errors.append(StateFileError(path, line, "exclude: (Salt's) is not supported: leave the state or "
                                                     "file out, or make it conditional"))
            continue
        if state_id == "extend":
            if not isinstance(value_node, yaml.MappingNode):
                errors.append(StateFileError(path, line, "extend: takes state ids, each with `module:` and "
                                                         "the arguments to change"))
                continue
            for ext_key, ext_node in value_node.value:
                ext_id = _construct(ext_key)
                if not isinstance(ext_id, (str, int, float)) or isinstance(ext_id, bool):
                    errors.append(StateFileError(path, ext_key.start_mark.line + 1, "a state id must be a string"))
                    continue
                extends += _parse_state(str(ext_id), ext_node, path, ext_key.start_mark.line + 1, errors, pending,
                                        valued, extend=True)
            continue
        if not isinstance(state_id, (str, int, float)) or isinstance(state_id, bool):
            errors.append(StateFileError(path, line, "a state id must be a string"))
            continue
        state_id = str(state_id)
        if state_id in seen_ids:
            errors.append(StateFileError(path, line, f"state id {state_id!r} is defined twice "
                                                     f"(first at line {seen_ids[state_id]})"))
            continue
        seen_ids[state_id] = line
        states += _parse_state(state_id, value_node, path, line, errors, pending, valued)
    return states, includes, errors


def _parse_state(state_id: str, node, path: str, line: int, errors: list, pending: set[int],
                 valued: set[int], extend: bool = False) -> list[State]:
    """The states under one id (one per function); ``extend``: an `extend:` entry, whose `file:`
    may name no function (it changes whichever the state has)."""
    if isinstance(node, yaml.ScalarNode) and isinstance(_construct(node), str) and "." in _construct(node):
        return [State(state_id, _construct(node), {}, path, line)]  # `vim: pkg.installed`
    if not isinstance(node, yaml.MappingNode):
        errors.append(StateFileError(path, line, f"state {state_id!r}: expected `module.function:` "
                                                 "followed by a list of arguments"))
        return []
    out = []
    for fun_node, args_node in node.value:
        fun_line = fun_node.start_mark.line + 1
        fun = _construct(fun_node)
        if not isinstance(fun, str):
            errors.append(StateFileError(path, fun_line, f"state {state_id!r}: a function name must be a string"))
            continue
        arg_items = args_node.value if isinstance(args_node, yaml.SequenceNode) else None
        if args_node is not None and isinstance(args_node, yaml.ScalarNode) and _construct(args_node) is None:
            arg_items = []
        if isinstance(args_node, yaml.MappingNode):  # `file.managed: {mode: "0644"}` is accepted too
            arg_items = [yaml.MappingNode("tag:yaml.org,2002:map", [pair], args_node.start_mark, args_node.end_mark)
                         for pair in args_node.value]
        if arg_items is None:
            errors.append(StateFileError(path, fun_line, f"{state_id}: {fun}: arguments must be a list "
                                                         "(`- name: value` lines)"))
            continue
        if "." not in fun:
            # Salt's other spelling: `pkg:` followed by `- installed` among the arguments.
            names = [i for i in arg_items if isinstance(i, yaml.ScalarNode)]
            if len(names) == 1:
                fun = f"{fun}.{_construct(names[0])}"
                arg_items = [i for i in arg_items if i is not names[0]]
            elif not (extend and not names):
                errors.append(StateFileError(path, fun_line, f"{state_id}: {fun!r} is not `module.function`"))
                continue
        state = State(state_id, fun, {}, path, fun_line)
        for item in arg_items:
            item_line = item.start_mark.line + 1
            if not isinstance(item, yaml.MappingNode) or len(item.value) != 1:
                errors.append(StateFileError(path, item_line, f"{state_id}: {fun}: each argument is one "
                                                              "`- name: value` line"))
                continue
            (arg_key_node, arg_value_node), = item.value
            key = _construct(arg_key_node)
            value = _construct(arg_value_node)
            if key in MODE_ARGS and isinstance(value, int) and isinstance(arg_value_node, yaml.ScalarNode):
                # `mode: 0644` is an octal number to YAML 1.1 and `mode: 644` a decimal one; people
                # mean the digits they wrote either way, so the agent gets those digits.
                value = arg_value_node.value
            if not isinstance(key, str):
                errors.append(StateFileError(path, item_line, f"{state_id}: {fun}: argument names are strings"))
                continue
            if key in state.args or key in state.requisites or key in state.extra:
                errors.append(StateFileError(path, item_line, f"{state_id}: {fun}: argument {key!r} given twice"))
                continue
            state.lines[key] = item_line
            if key in REQUISITES or key in REQUISITES_IN:
                refs = _parse_refs(value, arg_value_node, path, state_id, key, errors)
                if refs is not None:
                    state.requisites[key] = refs
            elif key in ("unless", "onlyif"):
                if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    state.extra[key] = value
                else:
                    errors.append(StateFileError(path, item_line, f"{state_id}: {key} takes a command or a list of commands"))
            elif key == "sensitive":
                if isinstance(value, bool):
                    state.extra[key] = value
                else:
                    errors.append(StateFileError(path, item_line, f"{state_id}: sensitive is true or false"))
            elif key == "order":
                if isinstance(value, int) and not isinstance(value, bool) or value in ("first", "last"):
                    state.extra[key] = value
                else:
                    errors.append(StateFileError(path, item_line, f"{state_id}: order is a number, first or last"))
            else:
                state.args[key] = value
                if id(arg_value_node) in pending:
                    state.pending.add(key)
                if key == "names":  # which items are values (data): those give names, never arguments
                    items = arg_value_node.value if isinstance(arg_value_node, yaml.SequenceNode) else []
                    state.names_valued = (id(arg_value_node) in valued, [id(i) in valued for i in items])
        out += _expand_names(state, errors) if "names" in state.args else [state]
    return out


def _expand_names(state: State, errors: list) -> list[State]:
    """Salt's `names:`: one state per name, all under the state's id. A name is a string, or a
    one-key mapping of the name to the arguments it sets for itself (`- eth0: [{mtu: 9000}]`)."""
    names = state.args.pop("names")
    line = state.lines.get("names", state.line)
    if "name" in state.args:
        errors.append(StateFileError(state.path, line, f"{state.id}: give `name` or `names`, not both"))
        return []
    if not isinstance(names, list) or not names:
        errors.append(StateFileError(state.path, line, f"{state.id}: names takes a list of names"))
        return []
    out = []
    whole, items_valued = state.names_valued
    for index, item in enumerate(names):
        own: dict = {}
        if isinstance(item, dict) and (whole or (items_valued[index] if index < len(items_valued) else True)):
            # A mapping that came from data (a fact, a stage's result) would set arguments: a name only.
            errors.append(StateFileError(state.path, line, f"{state.id}: names: a {{{{ }}}} value gives names "
                                                           "(strings), not a name with arguments"))
            continue
        if isinstance(item, dict) and len(item) == 1:
            (item, settings), = item.items()
            settings = settings or []
            if isinstance(settings, dict):
                settings = [settings]
            if not (isinstance(settings, list) and all(isinstance(x, dict) for x in settings)):
                errors.append(StateFileError(state.path, line, f"{state.id}: names: the arguments of {item!r} are "
                                                               "a list of `- name: value`"))
                continue
            for setting in settings:
                own.update(setting)
            if "name" in own or not all(isinstance(k, str) for k in own):
                errors.append(StateFileError(state.path, line, f"{state.id}: names: the arguments of {item!r} "
                                                               "are `- argument: value` (and not `name`)"))
                continue
        if not isinstance(item, (str, int, float)) or isinstance(item, bool):
            errors.append(StateFileError(state.path, line, f"{state.id}: names: each name is a string"))
            continue
        one = replace(state, args={**state.args, **own, "name": str(item)}, requisites=dict(state.requisites),
                      extra=dict(state.extra), lines=dict(state.lines), pending=set(state.pending))
        out.append(one)
    return out


def _parse_refs(value, node, path, state_id, kind, errors) -> list | None:
    line = node.start_mark.line + 1
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        errors.append(StateFileError(path, line, f"{state_id}: {kind} takes a list like `- pkg: munge`"))
        return None
    refs = []
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    for item, item_node in zip(value, items):
        item_line = item_node.start_mark.line + 1
        if isinstance(item, str):
            refs.append((None, item, item_line))
        elif isinstance(item, dict) and len(item) == 1:
            (module, ref), = item.items()
            if not isinstance(module, str) or not isinstance(ref, (str, int, float)):
                errors.append(StateFileError(path, item_line, f"{state_id}: {kind}: `- module: id` expected"))
                continue
            refs.append((module, str(ref), item_line))
        else:
            errors.append(StateFileError(path, item_line, f"{state_id}: {kind}: `- module: id` expected"))
    return refs


# ---------------------------------------------------------------------------------------------
# A state file and what it includes; `source:` files

def load_file(path: str, context: dict, tree: StateTree, meta: dict | None = None
              ) -> tuple[list[State], list[StateFileError]]:
    """The states of a state file, after those of the files it includes, with every `extend:`
    applied, and the problems found. ``tree``: where it and they may be read.

    As Salt includes: each file once, however many files include it (files may include each
    other), and a state id in two files is a conflict (`extend:` is how a file changes a state of
    another)."""
    loaded: set[str] = set()
    extends: list[State] = []
    includes: dict[str, set[str]] = {}  # SLS name -> the SLS names it includes
    states, errors = _load(path, context, tree, meta, loaded, extends, includes)
    within: dict[str, set[str]] = {}
    for state in states:  # `- sls: NAME` means NAME's states and those of what it includes, as Salt
        if state.sls not in within:
            within[state.sls] = _includers(state.sls, includes)
        state.within = within[state.sls]
    errors += _conflicting_ids(states)
    errors += _apply_extends(states, extends)
    return states, errors


def _load(path: str, context: dict, tree: StateTree, meta: dict | None, loaded: set[str],
          extends: list[State], graph: dict[str, set[str]]) -> tuple[list[State], list[StateFileError]]:
    loaded.add(path)
    shown = display_path(path, tree.root)
    try:
        text, values = render_state(path, dict(context, **file_context(path, tree.root)), shown, tree)
    except StateFileError as exc:
        return [], [exc]
    states, includes, errors = parse_states(text, shown, meta, values, extends)
    sls = sls_name(path, tree.root)
    for state in states + extends:
        state.file = state.file or path
        state.sls = state.sls or sls
    included: list[State] = []
    for name, line in includes:
        target, why = _include_path(path, name, tree)
        if target is None:
            errors.append(StateFileError(shown, line, why))
            continue
        graph.setdefault(sls, set()).add(sls_name(target, tree.root))
        if target in loaded:
            continue
        sub_states, sub_errors = _load(target, context, tree, meta, loaded, extends, graph)
        included += sub_states
        errors += sub_errors
    return included + states, errors


def _includers(sls: str, graph: dict[str, set[str]]) -> set[str]:
    """``sls`` and every SLS that includes it, directly or through others."""
    found, todo = {sls}, [sls]
    while todo:
        current = todo.pop()
        for parent, children in graph.items():
            if current in children and parent not in found:
                found.add(parent)
                todo.append(parent)
    return found


def _include_path(including: str, name: str, tree: StateTree) -> tuple[str | None, str]:
    """The file `include: NAME` of ``including`` means, or None and why.

    As Salt: an SLS name from the tree's root (`a.b`: a/b.sls, a/b/init.sls, .yaml and .yml too),
    `.b` from the including file's directory (`..b` one up); also a file name (`common`,
    `common.yaml`) there, and then beside the including file (how pimaster read includes before
    state trees had a root). Nothing outside the tree is looked at."""
    root = tree.root
    here = os.path.relpath(os.path.dirname(including), root).replace(os.sep, "/")
    package = [] if here == "." else here.split("/")
    if name.startswith(".") and "/" not in name:
        up = len(name) - len(name.lstrip(".")) - 1
        if up > len(package) or not name.lstrip("."):
            return None, f"include {name!r} goes above the state tree {root}"
        name = ".".join(package[:len(package) - up] + [name.lstrip(".")])
        directories = [root]
    else:
        directories = [root, os.path.dirname(including)]
    refusal = None
    tried: list[str] = []
    for directory in directories:
        bases = [name + suffix for suffix in ("",) + STATE_SUFFIXES]
        if not name.endswith(STATE_SUFFIXES):
            bases += sls_paths(name)
        for base in bases:
            candidate = os.path.normpath(os.path.join(directory, base))
            if candidate in tried:
                continue
            tried.append(candidate)
            why = tree.refusal(candidate, f"include {name!r}")
            if why:
                refusal = refusal or why
            elif tree.isfile(candidate):
                return candidate, ""
    return None, refusal or (f"include: no state file {name!r} in the state tree {root} "
                             f"({', '.join(sls_paths(name)[:1] + sls_paths(name)[3:4])}, …)")


def _conflicting_ids(states: list[State]) -> list[StateFileError]:
    first: dict[str, State] = {}
    errors = []
    for state in states:
        other = first.setdefault(state.id, state)
        if other.file != state.file:
            errors.append(StateFileError(state.path, state.line, f"conflicting ID {state.id!r}: also at {other.where} "
                                         "(a file changes a state of another with `extend:`)"))
    return errors


def _apply_extends(states: list[State], extends: list[State]) -> list[StateFileError]:
    """Salt's `extend:`: arguments of the named state replaced, its requisites added to."""
    errors = []
    for ext in extends:
        targets = [s for s in states if s.id == ext.id and s.module == ext.module
                   and ("." not in ext.fun or s.fun == ext.fun)]
        if not targets:
            errors.append(StateFileError(ext.path, ext.line, f"extend: no state {ext.id!r} with a {ext.module} "
                                         "function in this file or what it includes"))
            continue
        for target in targets:
            target.args.update(ext.args)
            target.extra.update(ext.extra)
            target.pending |= ext.pending
            for kind, refs in ext.requisites.items():
                target.requisites[kind] = target.requisites.get(kind, []) + refs
    return errors


def resolve_sources(states: list[State], context: dict, tree: StateTree) -> list[StateFileError]:
    """`file.managed`'s `source:` -> `contents`: `salt://path` from the state tree's root, a plain
    path from the state file's directory, a list: the first that exists; rendered with Jinja when
    `template: jinja` (with `defaults:` and then `context:` added to what templates see). And
    `contents_pillar: a:b` -> `contents`, from the node's pillar."""
    errors = []
    for state in states:
        if state.fun != "file.managed":
            continue
        if "contents_pillar" in state.args:
            errors += _contents_from_pillar(state, context)
        if "source" not in state.args:
            for arg in ("template", "context", "defaults"):
                if arg in state.args:
                    errors.append(StateFileError(state.path, state.lines.get(arg, state.line),
                                                 f"{state.id}: {arg} goes with source"))
            continue
        source = state.args.pop("source")
        template = state.args.pop("template", None)
        extra = {arg: state.args.pop(arg) for arg in ("defaults", "context") if arg in state.args}
        line = state.lines.get("source", state.line)
        if template not in (None, "jinja"):
            errors.append(StateFileError(state.path, state.lines.get("template", line),
                                         f"{state.id}: template must be `jinja`"))
            continue
        if extra and template != "jinja":
            errors.append(StateFileError(state.path, line, f"{state.id}: {' and '.join(extra)} need template: jinja"))
            continue
        if any(not isinstance(v, dict) for v in extra.values()):
            errors.append(StateFileError(state.path, line, f"{state.id}: defaults and context are mappings"))
            continue
        full, problem = _source_file(state, source, tree)
        if full is None:
            errors.append(StateFileError(state.path, line, f"{state.id}: {problem}"))
            continue
        shown = display_path(full, tree.root)
        try:
            if template == "jinja":
                # Salt's order: the context overrides the defaults.
                own = {**file_context(full, tree.root, state.file), **extra.get("defaults", {}),
                       **extra.get("context", {})}
                if not all(isinstance(k, str) for k in own):
                    errors.append(StateFileError(state.path, line, f"{state.id}: defaults and context are "
                                                 "mappings of names"))
                    continue
                state.args["contents"] = render_template(full, dict(context, **to_attrdict(own)), shown, tree)
            else:
                state.args["contents"] = tree.read(full).decode("utf-8")
            state.args.setdefault("contents_newline", False)  # a source file is copied exactly
        except StateFileError as exc:
            errors.append(exc)
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(StateFileError(shown, None, f"cannot read: {getattr(exc, 'strerror', None) or exc}"))
    return errors


def _source_file(state: State, source, tree: StateTree) -> tuple[str | None, str]:
    """The file a `source:` means (the first of a list that exists), or None and why."""
    sources = source if isinstance(source, list) and source else [source]
    if not all(isinstance(s, str) and s for s in sources):
        return None, "source must be a file name or a list of them"
    missing = []
    for one in sources:
        scheme = one.partition("://")[0] if "://" in one else ""
        if scheme and scheme != "salt":
            return None, f"source {one!r}: {scheme}:// sources are not supported (only salt:// and files of the state tree)"
        if one.startswith("salt://"):  # from the tree's root, as Salt's fileserver reads it
            location, _, query = one[len("salt://"):].partition("?")
            if query and query not in ("saltenv=base", "env=base"):
                return None, f"source {one!r}: one state tree, Salt's `base` environment only"
            full = os.path.normpath(os.path.join(tree.root, location))
        else:
            full = os.path.normpath(os.path.join(os.path.dirname(state.file), one))
        refusal = tree.refusal(full, f"source {one!r}")
        if refusal and one.startswith("/"):
            refusal += " (to Salt an absolute path is a file on the node; the master reads sources from the tree)"
        if refusal:
            return None, refusal
        if tree.isfile(full):
            return full, ""
        missing.append(display_path(full, tree.root))
    return None, (f"source {source!r} not found ({missing[0]})" if len(missing) == 1 else
                  f"none of the sources exists ({', '.join(missing)})")


def _contents_from_pillar(state: State, context: dict) -> list[StateFileError]:
    """`contents_pillar: a:b` -> the text at that key of the node's pillar (a list: its lines)."""
    key = state.args.pop("contents_pillar")
    line = state.lines.get("contents_pillar", state.line)
    if "contents" in state.args or "source" in state.args:
        return [StateFileError(state.path, line, f"{state.id}: give one of contents, source, contents_pillar")]
    value = context.get("pillar")
    for part in str(key).split(":"):
        if not isinstance(value, dict) or part not in value:
            return [StateFileError(state.path, line, f"{state.id}: contents_pillar {key!r}: the node's pillar has "
                                                     "no such key")]
        value = value[part]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "\n".join(value) + "\n"
    if not isinstance(value, str):
        return [StateFileError(state.path, line, f"{state.id}: contents_pillar {key!r} is not text")]
    state.args["contents"] = value
    return []
