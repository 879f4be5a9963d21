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

Every problem is a StateFileError naming the file, the line and the reason; `compile_for_node`
raises the whole list at once, so a person fixes a file in one go.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
from dataclasses import dataclass, field

import jinja2
import yaml

REQUISITES = ("require", "watch", "onchanges", "onfail")
REQUISITES_IN = tuple(f"{r}_in" for r in REQUISITES)
ENGINE_ARGS = set(REQUISITES) | set(REQUISITES_IN) | {"unless", "onlyif", "order", "sensitive"}
# Arguments the master resolves itself before sending: `source` (+`template`) become `contents`.
MASTER_ARGS = {"file.managed": {"source", "template"}}
STATE_SUFFIXES = (".yaml", ".yml", ".sls")
MODE_ARGS = {"mode", "dir_mode", "file_mode"}


class StateFileError(Exception):
    def __init__(self, path: str, line: int | None, reason: str) -> None:
        super().__init__(reason)
        self.path, self.line, self.reason = path, line, reason

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}" if self.line else f"{self.path}: {self.reason}"


class StateFileErrors(Exception):
    def __init__(self, errors: list[StateFileError]) -> None:
        super().__init__("\n".join(map(str, errors)))
        self.errors = errors


@dataclass
class State:
    id: str
    fun: str                   # module.function
    args: dict
    path: str                  # as shown in messages (relative to the applied file's directory)
    line: int
    file: str = ""             # absolute path, for `source:` lookups
    requisites: dict = field(default_factory=dict)   # kind -> [(module or None, ref, line)]
    extra: dict = field(default_factory=dict)         # unless / onlyif / order

    @property
    def module(self) -> str:
        return self.fun.split(".", 1)[0]

    @property
    def name(self) -> str:
        return str(self.args.get("name", self.id))

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


class Pending:
    """What `results` holds while the stages before a node's have not run yet (the first rendering,
    which checks every node's file before anything is sent): any lookup gives another Pending, and
    it renders as an empty string."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __getitem__(self, key):
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0

    def __bool__(self):
        return False

    def __str__(self):
        return ""

    def get(self, key, default=None):
        return self


class AttrDict(dict):
    """A dict Jinja can read as `node.ip` as well as `node['ip']`."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def to_attrdict(value):
    if isinstance(value, dict):
        return AttrDict({k: to_attrdict(v) for k, v in value.items()})
    if isinstance(value, list):
        return [to_attrdict(v) for v in value]
    return value


@functools.lru_cache(maxsize=64)
def jinja_env(base_dir: str) -> jinja2.Environment:
    """One environment per directory: it caches compiled templates (reloaded when a file changes),
    so rendering one file for 200 nodes compiles it once."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(base_dir), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False, auto_reload=True)
    env.filters["yaml"] = lambda v: yaml.safe_dump(v, default_flow_style=True).strip()
    env.tests["in_network"] = in_network
    return env


def in_network(address, network) -> bool:
    """Jinja test: `'10.0.0.5/24' is in_network('10.0.0.0/24')` (a prefix on the address is ignored;
    anything that is not an address or a network is simply not in it)."""
    try:
        return ipaddress.ip_interface(str(address)).ip in ipaddress.ip_network(str(network), strict=False)
    except ValueError:
        return False


def _display(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def _jinja_error(path: str, shown: str, exc: Exception) -> StateFileError:
    line = getattr(exc, "lineno", None)
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, jinja2.UndefinedError):
        message = f"undefined in template: {message}"
    elif isinstance(exc, jinja2.TemplateSyntaxError):
        message = f"template syntax error: {message}"
    elif isinstance(exc, jinja2.TemplateNotFound):
        message = f"template not found: {exc.name}"
    else:
        message = f"template error: {type(exc).__name__}: {message}"
    if isinstance(exc, jinja2.TemplateSyntaxError) and exc.filename and os.path.abspath(exc.filename) != path:
        shown = exc.filename
    return StateFileError(shown, line, message)


def render_template(path: str, context: dict, shown: str) -> str:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise StateFileError(shown, None, f"cannot read: {exc.strerror}") from None
    if b"\0" in raw:
        raise StateFileError(shown, raw[:raw.index(b"\0")].count(b"\n") + 1, "binary data, not a text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise StateFileError(shown, line, "not UTF-8 text") from None
    env = jinja_env(os.path.dirname(path))
    try:
        return env.get_template(os.path.basename(path)).render(**context)
    except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError) as exc:
        error = _jinja_error(path, shown, exc)
        if error.line is None:
            error.line = _template_line(exc, path)
        raise error from None


def _template_line(exc: Exception, path: str) -> int | None:
    """The template line of a runtime error: Jinja compiles templates to Python, whose frames say."""
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            line = tb.tb_lineno  # Jinja rewrites its frames to point at the template's own lines
        else:
            template = tb.tb_frame.f_globals.get("__jinja_template__")
            if template is not None:
                line = template.get_corresponding_lineno(tb.tb_lineno)
        tb = tb.tb_next
    return line


def resolve_state_path(spec: str, states_dir: str | None) -> str:
    """A path as given, or the bare name of a shipped state file (`slurm` -> STATES_DIR/slurm.yaml)."""
    if os.path.exists(spec):
        return os.path.abspath(spec)
    if states_dir and os.sep not in spec:
        for suffix in ("",) + STATE_SUFFIXES:
            candidate = os.path.join(states_dir, spec + suffix)
            if os.path.isfile(candidate):
                return candidate
    raise StateFileError(spec, None, "no such state file" + (
        f" (nor a shipped one in {states_dir})" if states_dir and os.sep not in spec else ""))


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


def parse_states(text: str, path: str, meta: dict | None = None
                 ) -> tuple[list[State], list[tuple[str, int]], list[StateFileError]]:
    """States in file order, the include list, and the problems found; `pimaster:` settings go to ``meta``."""
    meta = {} if meta is None else meta
    errors: list[StateFileError] = []
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        reason = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
        return [], [], [StateFileError(path, mark.line + 1 if mark else None, reason)]
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
        if not isinstance(state_id, (str, int, float)) or isinstance(state_id, bool):
            errors.append(StateFileError(path, line, "a state id must be a string"))
            continue
        state_id = str(state_id)
        if state_id in seen_ids:
            errors.append(StateFileError(path, line, f"state id {state_id!r} is defined twice "
                                                     f"(first at line {seen_ids[state_id]})"))
            continue
        seen_ids[state_id] = line
        states += _parse_state(state_id, value_node, path, line, errors)
    return states, includes, errors


def _parse_state(state_id: str, node, path: str, line: int, errors: list) -> list[State]:
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
            if len(names) != 1:
                errors.append(StateFileError(path, fun_line, f"{state_id}: {fun!r} is not `module.function`"))
                continue
            fun = f"{fun}.{_construct(names[0])}"
            arg_items = [i for i in arg_items if i is not names[0]]
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
        out.append(state)
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
# Validation against the agent's catalogue, requisites and order

def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate(states: list[State], catalog: dict) -> list[StateFileError]:
    errors = []
    for state in states:
        spec = catalog.get(state.fun)
        if spec is None:
            errors.append(StateFileError(state.path, state.line,
                                         f"unknown state function {state.fun!r}{_suggest(state.fun, catalog)}"))
            continue
        allowed = set(spec["args"]) | MASTER_ARGS.get(state.fun, set())
        for arg in state.args:
            if arg not in allowed:
                errors.append(StateFileError(state.path, state.line, f"{state.id}: {state.fun} has no argument "
                                             f"{arg!r}{_suggest(arg, allowed | ENGINE_ARGS)}"))
        for required in spec["required"]:
            if required not in state.args and not (required == "contents" and "source" in state.args):
                errors.append(StateFileError(state.path, state.line,
                                             f"{state.id}: {state.fun} needs the argument {required!r}"))
        if state.fun == "file.managed" and "source" in state.args and "contents" in state.args:
            errors.append(StateFileError(state.path, state.line, f"{state.id}: give `contents` or `source`, not both"))
    return errors


def _find(states: list[State], module: str | None, ref: str) -> list[int]:
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
                if not found:
                    wanted = f"{module}: {ref}" if module else ref
                    errors.append(StateFileError(state.path, line, f"{state.id}: {kind} names {wanted!r}, which "
                                                 f"is not a state in this file{_suggest(wanted, labels)}"))
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


# ---------------------------------------------------------------------------------------------
# One node's job

def load_file(path: str, context: dict, root: str, stack: tuple = (), meta: dict | None = None
              ) -> tuple[list[State], list[StateFileError]]:
    shown = _display(path, root)
    try:
        text = render_template(path, context, shown)
    except StateFileError as exc:
        return [], [exc]
    states, includes, errors = parse_states(text, shown, meta)
    for state in states:
        state.file = path
    included: list[State] = []
    for name, line in includes:
        target = _include_path(os.path.dirname(path), name)
        if target is None:
            errors.append(StateFileError(shown, line, f"include: no state file {name!r} next to this one"))
            continue
        if target in stack + (path,):
            chain = " -> ".join(_display(p, root) for p in stack + (path, target))
            errors.append(StateFileError(shown, line, f"include cycle: {chain}"))
            continue
        sub_states, sub_errors = load_file(target, context, root, stack + (path,), meta)
        included += sub_states
        errors += sub_errors
    return included + states, errors


def _include_path(directory: str, name: str) -> str | None:
    """`other`, `other.yaml` or Salt's dotted `dir.other` next to the including file."""
    bases = [name]
    if "." in name and not name.endswith(STATE_SUFFIXES):
        bases.append(name.replace(".", os.sep))
    for base in bases:
        for suffix in ("",) + STATE_SUFFIXES:
            candidate = os.path.join(directory, base + suffix)
            if os.path.isfile(candidate):
                return candidate
    return None


def resolve_sources(states: list[State], context: dict, root: str) -> list[StateFileError]:
    """`source:` (relative to the state file, rendered with Jinja when `template: jinja`) -> `contents`."""
    errors = []
    for state in states:
        if state.fun != "file.managed" or "source" not in state.args:
            continue
        source = state.args.pop("source")
        template = state.args.pop("template", None)
        if not isinstance(source, str):
            errors.append(StateFileError(state.path, state.line, f"{state.id}: source must be a file name"))
            continue
        full = os.path.normpath(os.path.join(os.path.dirname(state.file), source.removeprefix("salt://")))
        shown = _display(full, root)
        if not os.path.isfile(full):
            errors.append(StateFileError(state.path, state.line, f"{state.id}: source {source!r} not found ({shown})"))
            continue
        if template not in (None, "jinja"):
            errors.append(StateFileError(state.path, state.line, f"{state.id}: template must be `jinja`"))
            continue
        try:
            if template == "jinja":
                state.args["contents"] = render_template(full, context, shown)
            else:
                with open(full, encoding="utf-8") as fh:
                    state.args["contents"] = fh.read()
            state.args.setdefault("contents_newline", False)  # a source file is copied exactly
        except StateFileError as exc:
            errors.append(exc)
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(StateFileError(shown, None, f"cannot read: {exc}"))
    return errors


def compile_for_node(path: str, context: dict, catalog: dict, root: str | None = None,
                     meta: dict | None = None) -> list[dict]:
    """The job for one node: ordered states with requisites as positions. Raises StateFileErrors.

    `pimaster:` settings of the file (e.g. stages) are put into ``meta`` when given.
    """
    root = root or os.path.dirname(path)
    context = {k: v if callable(v) or isinstance(v, Pending) else to_attrdict(v) for k, v in context.items()}
    states, errors = load_file(path, context, root, meta=meta)
    errors += validate(states, catalog)
    errors += resolve_sources(states, context, root)
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
