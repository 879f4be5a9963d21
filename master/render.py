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

Values are data, never YAML. Facts come from the nodes, and a node may lie, so every `{{ ... }}`
in a state file (and in what it includes or imports) stands for exactly one YAML value, whatever
the text around it:

- `- name: {{ x }}` alone in a plain scalar is x itself, with its own type: a string stays a
  string even when it looks like a number or `true`, 60 stays the number 60, a list stays a list,
  none is null. A hostname holding a newline and `evil:` is just that odd hostname.
- inside a longer scalar (`{{ a }}/{{ b }}`), or in a quoted or block (`|`, `>`) scalar, the value
  is put in as Jinja prints it (`str()`, True for true) and the whole stays one string;
- a mapping key is always a string;
- `tojson` (or `json`) and `yaml` are how data is meant to become a structured value:
  `- dns: {{ servers | list | tojson }}` is the list, as one value (inside a longer scalar they
  give the JSON or YAML text, as before);
- text the template writes itself stays YAML: template lines, macro output, `caller()`,
  `{% set x %}...{% endset %}` blocks, `{% include %}`. `|safe` marks a value as such YAML text:
  never use it on data. Such text holds its values apart until the end, so compare values, not
  the text of a set block; a filter that rewrites such text (`{% filter upper %}`) is an error.
- `quote` shell-quotes a value for a command: `- name: ping -c1 {{ node.hostname | quote }}`.
  YAML keeps a value inside one argument, but the shell still reads the command: data in
  `cmd.run` needs `quote`.

Templated file contents (`source:` with `template: jinja`) are not YAML and are rendered as
plain Jinja text: no escaping, a value is printed as it is.

A state file reads only inside its state tree, the directory of the file applied: `source:` (with
or without `salt://`), `include:` and Jinja's `{% include %}`, `{% import %}` and `{% from %}`
refuse anything whose real path (symlinks followed) is outside it, and anything under the
directories given as ``forbidden`` (the master's own state directory) even inside it.

Every problem is a StateFileError naming the file, the line and the reason; `compile_for_node`
raises the whole list at once, so a person fixes a file in one go.
"""

from __future__ import annotations

import contextvars
import difflib
import functools
import ipaddress
import os
import re
import secrets
import shlex
from dataclasses import dataclass, field

import jinja2
import jinja2.compiler
import jinja2.filters
import jinja2.runtime
import yaml
from markupsafe import Markup

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
    lines: dict = field(default_factory=dict)         # argument -> its line

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
    it renders as an empty string (as a whole value too: "")."""

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
        if key.startswith("__"):  # a fact named __html__ must not make a node's data look like markup
            raise AttributeError(key)
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


def in_network(address, network) -> bool:
    """Jinja test: `'10.0.0.5/24' is in_network('10.0.0.0/24')` (a prefix on the address is ignored;
    anything that is not an address or a network is simply not in it)."""
    try:
        return ipaddress.ip_interface(str(address)).ip in ipaddress.ip_network(str(network), strict=False)
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# The state tree: what rendering may read

def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class _Tree:
    root: str                                # as shown
    real: str                                # its real path
    forbidden: tuple[tuple[str, str], ...]   # (as shown, real path)

    def refusal(self, path: str, what: str) -> str | None:
        """Why ``path`` may not be read (``what`` names it in the message), or None."""
        real = os.path.realpath(path)
        if not _under(real, self.real):
            return f"{what} is outside the state tree {self.root}"
        for shown, directory in self.forbidden:
            if _under(real, directory):
                return f"{what} is in {shown}, which state files may not read"
        return None


def _tree(root: str, forbidden: tuple[str, ...] = ()) -> _Tree:
    root = os.path.abspath(root)
    return _Tree(root, os.path.realpath(root),
                 tuple((os.path.abspath(f), os.path.realpath(f)) for f in forbidden))


class _Refused(jinja2.TemplateError):
    """A template name outside the state tree: an error, not "missing" (`ignore missing` skips
    only TemplateNotFound)."""


class _TreeLoader(jinja2.BaseLoader):
    """Template names relative to one directory (the rendered file's, as FileSystemLoader did),
    read only inside the state tree; the real path is checked again when the cache asks."""

    def __init__(self, searchpath: str, tree: _Tree) -> None:
        self.searchpath, self.tree = searchpath, tree

    def get_source(self, environment, template):
        path = os.path.normpath(os.path.join(self.searchpath, template))
        why = self.tree.refusal(path, f"template {template!r}")
        if why:
            raise _Refused(why)
        real = os.path.realpath(path)
        try:
            with open(real, "rb") as fh:
                source = fh.read().decode("utf-8")
            mtime = os.path.getmtime(real)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise jinja2.TemplateNotFound(template) from None

        def uptodate() -> bool:
            try:
                return os.path.realpath(path) == real and os.path.getmtime(real) == mtime
            except OSError:
                return False

        return source, path, uptodate


# ---------------------------------------------------------------------------------------------
# Values in state files: each {{ }} becomes a token in the text, and its value again after YAML

class _Values:
    """One rendering's values. Each stands in the text as `pmv<nonce>x<n>y`: lowercase letters and
    digits are a plain scalar anywhere in YAML and nothing special in quoted or block scalars, and
    the per-rendering nonce cannot be guessed by data or written by chance."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(6)
        self.items: list = []
        self.modules: dict = {}  # template -> its module imported without context

    def token(self, value) -> str:
        self.items.append(value)
        return f"pmv{self.nonce}x{len(self.items) - 1}y"

    def traced(self, text: str) -> bool:
        """Whether ``text`` holds a token, or what a filter left of one (`upper`...)."""
        return self.nonce in text.lower()

    def _index(self, match) -> int | None:
        index = int(match.group(2))
        return index if match.group(1) == self.nonce and index < len(self.items) else None

    def whole(self, text: str) -> int | None:
        """The index of the value that is all of ``text``, or None."""
        match = _TOKEN.fullmatch(text)
        return self._index(match) if match else None

    def substitute(self, text: str, below: int | None = None, dedent: int = 0) -> str:
        """``text`` with each token replaced by its value as Jinja prints it. Template text made
        into a plain string (`'%s' % caller()`) carries tokens into values: those are replaced
        too, and only by earlier values, so this ends.

        ``dedent``: the indentation of the block scalar (`|`, `>`) the tokens stand in. A value
        whose later lines all carry it was indented for that block (Salt's `{{ text | indent(8) }}`),
        and YAML would have taken it off them: so it is here. Any other value goes in as it is."""
        if self.nonce not in text:
            return text

        def printed(match):
            index = self._index(match)
            if index is None or (below is not None and index >= below):
                return match.group(0)
            value = self.substitute(str(self.items[index]), index)
            if dedent and "\n" in value:
                first, *rest = value.split("\n")
                if all(line.startswith(" " * dedent) or not line.strip() for line in rest):
                    value = "\n".join([first] + [line[dedent:] for line in rest])
            return value
        return _TOKEN.sub(printed, text)


_TOKEN = re.compile(r"pmv([0-9a-f]{12})x([0-9]+)y")
_rendering: contextvars.ContextVar[_Values | None] = contextvars.ContextVar("pimaster_values", default=None)


def _token(value) -> str:
    values = _rendering.get()
    if values is None:
        raise RuntimeError("a state file value outside a state file's rendering")
    return values.token(value)


class _Text(Markup):
    """YAML text the template wrote itself. Whatever is joined to it, formatted into it or put
    in by its methods is escaped: here that means it becomes a value token."""

    __slots__ = ()

    @classmethod
    def escape(cls, s):
        if isinstance(s, cls):
            return s
        if isinstance(s, Markup):
            return cls(s)
        return cls(_token(s))


class _Flow(str):
    """What `tojson`/`json`/`yaml` give: the text as Jinja printed it, and the data, which a
    `{{ }}` standing alone as a plain scalar turns into one structured value."""

    def __new__(cls, text: str, data):
        self = super().__new__(cls, text)
        self.data = data
        return self


@jinja2.pass_context
def _finalize(context, value):
    # pass_context: Jinja may not fold constants at compile time, so every value gets a token now.
    if isinstance(value, Markup):
        return value
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined: the error, at the template's line
    return _Text(_token(value))


def _markup_join(seq):
    """`a ~ b`: text when any part is template text (the others become tokens), else a string."""
    items = list(seq)
    if any(isinstance(item, Markup) for item in items):
        return _Text("").join(items)
    return "".join(map(str, items))


class _Macro(jinja2.runtime.Macro):
    def _invoke(self, arguments, autoescape):
        rv = super()._invoke(arguments, autoescape)
        return _Text(rv) if isinstance(rv, Markup) else rv


class _StateTemplate(jinja2.Template):
    """Compiled state file templates use our text class where Jinja's runtime uses Markup."""

    @classmethod
    def _from_namespace(cls, environment, namespace, globals):
        namespace.update(Markup=_Text, escape=_Text.escape, markup_join=_markup_join, Macro=_Macro)
        return super()._from_namespace(environment, namespace, globals)

    # Jinja keeps a module imported without context for later renderings, but its text holds one
    # rendering's tokens: it is kept per rendering.
    @property
    def _module(self):
        values = _rendering.get()
        return values.modules.get(self) if values is not None else None

    @_module.setter
    def _module(self, module):
        values = _rendering.get()
        if values is not None:
            values.modules[self] = module


class _StateCodeGenerator(jinja2.compiler.CodeGenerator):
    """String literals the state file writes itself (`', '`, `'default'`) are template text, as
    its lines are: `{{ ', ' if not loop.last }}` is a YAML separator, not a value. (`Markup` is
    the state text class in compiled state files, see _StateTemplate.)"""

    def visit_Const(self, node, frame) -> None:
        value = node.as_const(frame.eval_ctx)
        if isinstance(value, str):  # also what Jinja folded from literals at compile time
            self.write(f"Markup({str(value)!r})")
        else:
            super().visit_Const(node, frame)


def _yaml_text(value) -> str:
    return yaml.safe_dump(_plain(value), default_flow_style=True).strip()


@jinja2.pass_eval_context
def _tojson(eval_ctx, value, indent=None):
    return _Flow(str(jinja2.filters.do_tojson(eval_ctx, value, indent)), value)


@jinja2.pass_eval_context
def _join(eval_ctx, value, d="", attribute=None):
    if attribute is not None:
        value = map(jinja2.filters.make_attrgetter(eval_ctx.environment, attribute), value)
    items = list(value)
    if isinstance(d, Markup) or any(isinstance(item, Markup) for item in items):
        return _Text.escape(d).join(items)
    return str(d).join(map(str, items))


def _replace(s, old, new, count=None):
    count = -1 if count is None else count
    if not isinstance(s, Markup):
        return str(s).replace(str(old), str(new), count)
    return _Text(str(s).replace(str(old), str(_Text.escape(new)), count))


def _indent(s, width=4, first=False, blank=False):
    if not isinstance(s, Markup):
        return jinja2.filters.do_indent(str(s), width, first, blank)
    if isinstance(width, str) and not isinstance(width, Markup) and width.strip(" \t"):
        width = str(_Text.escape(width))  # only blanks are indentation; anything else is a value
    return _Text(jinja2.filters.do_indent(str(s), str(width) if isinstance(width, str) else width, first, blank))


def _format(value, *args, **kwargs):
    if args and kwargs:
        raise jinja2.FilterArgumentError("can't handle positional and keyword arguments at the same time")
    return (_Text(value) if isinstance(value, Markup) else str(value)) % (kwargs or args)


def _as_data(function):
    """An HTML filter's Markup result is a string value here, not YAML text."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return str(function(*args, **kwargs))
    return wrapper


def quote(value) -> str:
    """Jinja filter: the value shell-quoted, for commands (`cmd.run`, `unless`, ...)."""
    return shlex.quote(str(value))


class _Environment(jinja2.Environment):
    """Template names are plain strings: a literal name in a state file is state text (see
    _StateCodeGenerator), which Jinja would otherwise write into compiled code as it is."""

    def get_template(self, name, parent=None, globals=None):
        return super().get_template(str(name) if isinstance(name, str) else name, parent, globals)

    def select_template(self, names, parent=None, globals=None):
        names = [str(n) if isinstance(n, str) else n for n in names] if not isinstance(names, jinja2.Undefined) else names
        return super().select_template(names, parent, globals)


def _environment(searchpath: str, tree: _Tree, state: bool) -> jinja2.Environment:
    env = _Environment(loader=_TreeLoader(searchpath, tree), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, auto_reload=True,
                             autoescape=state, finalize=_finalize if state else None)
    env.tests["in_network"] = in_network
    env.filters["quote"] = quote
    if not state:
        env.filters["yaml"] = _yaml_text
        env.filters["json"] = env.filters["tojson"]
        return env
    env.template_class = _StateTemplate
    env.code_generator_class = _StateCodeGenerator
    env.filters.update({
        "tojson": _tojson, "json": _tojson, "yaml": lambda v: _Flow(_yaml_text(v), v),
        "escape": _Text.escape, "e": _Text.escape, "forceescape": lambda v: _Text.escape(str(v)),
        "safe": lambda v: _Text(v) if isinstance(v, Markup) else _Text(str(v)),
        "join": _join, "replace": _replace, "indent": _indent, "format": _format,
        "xmlattr": _as_data(env.filters["xmlattr"]), "urlize": _as_data(env.filters["urlize"]),
    })
    return env


@functools.lru_cache(maxsize=64)
def _state_env(searchpath: str, tree: _Tree) -> jinja2.Environment:
    """One environment per directory: it caches compiled templates (reloaded when a file changes),
    so rendering one file for 200 nodes compiles it once."""
    return _environment(searchpath, tree, state=True)


@functools.lru_cache(maxsize=64)
def _file_env(searchpath: str, tree: _Tree) -> jinja2.Environment:
    return _environment(searchpath, tree, state=False)


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
    elif isinstance(exc, _Refused):
        pass
    else:
        message = f"template error: {type(exc).__name__}: {message}"
    if isinstance(exc, jinja2.TemplateSyntaxError) and exc.filename and os.path.abspath(exc.filename) != path:
        shown = exc.filename
    return StateFileError(shown, line, message)


def _render(env: jinja2.Environment, path: str, context: dict, shown: str, tree: _Tree, what: str) -> str:
    why = tree.refusal(path, what)
    if why:
        raise StateFileError(shown, None, why)
    try:
        with open(os.path.realpath(path), "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise StateFileError(shown, None, f"cannot read: {exc.strerror}") from None
    if b"\0" in raw:
        raise StateFileError(shown, raw[:raw.index(b"\0")].count(b"\n") + 1, "binary data, not a text file")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise StateFileError(shown, line, "not UTF-8 text") from None
    try:
        return env.get_template(os.path.basename(path)).render(**context)
    except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError) as exc:
        error = _jinja_error(path, shown, exc)
        if error.line is None:
            error.line = _template_line(exc, path)
        raise error from None


def render_template(path: str, context: dict, shown: str, root: str | None = None,
                    forbidden: tuple[str, ...] = ()) -> str:
    """A templated file's contents (`source:` + `template: jinja`): plain text, nothing escaped."""
    tree = _tree(root or os.path.dirname(path), tuple(forbidden))
    return _render(_file_env(os.path.dirname(path), tree), path, context, shown, tree, f"source {shown!r}")


def render_state(path: str, context: dict, shown: str, root: str | None = None,
                 forbidden: tuple[str, ...] = ()) -> tuple[str, _Values]:
    """A state file's YAML text, with a token for each value, and the values (for parse_states)."""
    tree = _tree(root or os.path.dirname(path), tuple(forbidden))
    values = _Values()
    reset = _rendering.set(values)
    try:
        text = _render(_state_env(os.path.dirname(path), tree), path, context, shown, tree, f"state file {shown!r}")
    finally:
        _rendering.reset(reset)
    return text, values


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


_STR, _INT, _FLOAT, _BOOL, _NULL, _SEQ, _MAP = (f"tag:yaml.org,2002:{t}" for t in
                                                ("str", "int", "float", "bool", "null", "seq", "map"))


def _plain(value, values: _Values | None = None):
    """A value as plain YAML data: dicts, lists, str, int, float, bool, None; anything else str
    (with the tokens template text left in it replaced, given the rendering's ``values``)."""
    if isinstance(value, _Flow):
        value = value.data
    if isinstance(value, Pending):
        return ""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {_plain_key(k, values): _plain(v, values) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, values) for v in value]
    return values.substitute(str(value)) if values else str(value)


def _plain_key(key, values: _Values | None):
    plain = _plain(key, values)
    return plain if plain is None or isinstance(plain, (str, int, float, bool)) else str(plain)


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


def _fill(node, values: _Values, done: dict, lines: list[str], key: bool = False):
    """The composed node with every value token replaced (see the module docstring); a value
    standing alone as a plain scalar becomes a node of its own type, as one value. ``lines``:
    the rendered text, for the indentation of block scalars."""
    if isinstance(node, yaml.ScalarNode):
        return _fill_scalar(node, values, key, lines)
    if id(node) in done:  # an alias, or a node inside itself
        return done[id(node)]
    done[id(node)] = node
    if isinstance(node, yaml.SequenceNode):
        node.value = [_fill(item, values, done, lines) for item in node.value]
    elif isinstance(node, yaml.MappingNode):
        node.value = [(_fill(k, values, done, lines, key=True), _fill(v, values, done, lines)) for k, v in node.value]
    return node


def _fill_scalar(node, values: _Values, key: bool, lines: list[str]):
    if not values.traced(node.value):
        return node
    start, end = node.start_mark, node.end_mark
    index = values.whole(node.value)
    # Plain (libyaml says "", PyYAML None), no tag or anchor in front (they widen the scalar).
    alone = (index is not None and not node.style and node.tag == _STR and start.line == end.line
             and end.column - start.column == len(node.value))
    try:
        if alone and not key:
            return _value_node(_plain(values.items[index], values), start, end)
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


def parse_states(text: str, path: str, meta: dict | None = None, values: _Values | None = None
                 ) -> tuple[list[State], list[tuple[str, int]], list[StateFileError]]:
    """States in file order, the include list, and the problems found; `pimaster:` settings go to ``meta``.

    ``values`` are those of render_state, whose tokens in ``text`` they replace after YAML parsing.
    """
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
    if root is not None and values is not None:
        try:
            root = _fill(root, values, {}, text.splitlines())
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

def load_file(path: str, context: dict, root: str, stack: tuple = (), meta: dict | None = None,
              forbidden: tuple[str, ...] = ()) -> tuple[list[State], list[StateFileError]]:
    shown = _display(path, root)
    try:
        text, values = render_state(path, context, shown, root, forbidden)
    except StateFileError as exc:
        return [], [exc]
    states, includes, errors = parse_states(text, shown, meta, values)
    for state in states:
        state.file = path
    included: list[State] = []
    for name, line in includes:
        target, refusal = _include_path(os.path.dirname(path), name, _tree(root, tuple(forbidden)))
        if target is None:
            errors.append(StateFileError(shown, line, refusal or f"include: no state file {name!r} next to this one"))
            continue
        if target in stack + (path,):
            chain = " -> ".join(_display(p, root) for p in stack + (path, target))
            errors.append(StateFileError(shown, line, f"include cycle: {chain}"))
            continue
        sub_states, sub_errors = load_file(target, context, root, stack + (path,), meta, forbidden)
        included += sub_states
        errors += sub_errors
    return included + states, errors


def _include_path(directory: str, name: str, tree: _Tree) -> tuple[str | None, str | None]:
    """`other`, `other.yaml` or Salt's dotted `dir.other` next to the including file, inside the
    state tree; else None and why, when a candidate was outside (nothing outside is looked at)."""
    bases = [name]
    if "." in name and not name.endswith(STATE_SUFFIXES):
        bases.append(name.replace(".", os.sep))
    refusal = None
    for base in bases:
        for suffix in ("",) + STATE_SUFFIXES:
            candidate = os.path.normpath(os.path.join(directory, base + suffix))
            why = tree.refusal(candidate, f"include {name!r}")
            if why:
                refusal = refusal or why
            elif os.path.isfile(candidate):
                return candidate, None
    return None, refusal


def resolve_sources(states: list[State], context: dict, root: str, forbidden: tuple[str, ...] = ()
                    ) -> list[StateFileError]:
    """`source:` (relative to the state file, rendered with Jinja when `template: jinja`) -> `contents`."""
    errors = []
    tree = _tree(root, tuple(forbidden))
    for state in states:
        if state.fun != "file.managed" or "source" not in state.args:
            continue
        source = state.args.pop("source")
        template = state.args.pop("template", None)
        line = state.lines.get("source", state.line)
        if not isinstance(source, str):
            errors.append(StateFileError(state.path, line, f"{state.id}: source must be a file name"))
            continue
        full = os.path.normpath(os.path.join(os.path.dirname(state.file), source.removeprefix("salt://")))
        refusal = tree.refusal(full, f"source {source!r}")
        if refusal:
            errors.append(StateFileError(state.path, line, f"{state.id}: {refusal}"))
            continue
        shown = _display(full, root)
        if not os.path.isfile(full):
            errors.append(StateFileError(state.path, line, f"{state.id}: source {source!r} not found ({shown})"))
            continue
        if template not in (None, "jinja"):
            errors.append(StateFileError(state.path, state.lines.get("template", line),
                                         f"{state.id}: template must be `jinja`"))
            continue
        try:
            if template == "jinja":
                state.args["contents"] = render_template(full, context, shown, root, forbidden)
            else:
                with open(os.path.realpath(full), encoding="utf-8") as fh:
                    state.args["contents"] = fh.read()
            state.args.setdefault("contents_newline", False)  # a source file is copied exactly
        except StateFileError as exc:
            errors.append(exc)
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(StateFileError(shown, None, f"cannot read: {exc}"))
    return errors


def compile_for_node(path: str, context: dict, catalog: dict, root: str | None = None,
                     meta: dict | None = None, forbidden: tuple[str, ...] = ()) -> list[dict]:
    """The job for one node: ordered states with requisites as positions. Raises StateFileErrors.

    `pimaster:` settings of the file (e.g. stages) are put into ``meta`` when given. Nothing
    outside ``root`` (default: the file's directory) is read, nor anything under the directories
    in ``forbidden``, even inside it.
    """
    root = root or os.path.dirname(path)
    forbidden = tuple(forbidden)
    context = {k: v if callable(v) or isinstance(v, Pending) else to_attrdict(v) for k, v in context.items()}
    states, errors = load_file(path, context, root, meta=meta, forbidden=forbidden)
    return _job(states, errors, context, catalog, root, forbidden)


def _job(states: list[State], errors: list[StateFileError], context: dict, catalog: dict, root: str,
         forbidden: tuple[str, ...]) -> list[dict]:
    errors += validate(states, catalog)
    errors += resolve_sources(states, context, root, forbidden)
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
