"""The Jinja side of state files: the environments, what templates see, and the value tokens that
statefile.py replaces by the values after YAML parsing.

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

Salt's Jinja, in both (salt.py has Salt's names, functions and data filters):

- `{% do expr %}` (a call for its effect: `{% do settings.update(extra) %}`), `{% break %}` and
  `{% continue %}`;
- `{% import_yaml "x.yaml" as x %}`, `import_json`, `import_text`: the file is found and read as
  `{% import %}` finds and reads it (inside the state tree only; `with context` too), rendered
  with Jinja, and its text loaded as data;
  `{% load_yaml as x %}...{% endload %}` (and `load_json`, `load_text`) does the same with the
  block's text;
- the filters (and functions) `load_yaml`, `load_json` (text to data), `load_text`; the filters
  `json` (`sort_keys=True`, `indent=None`) and `yaml` (`flow_style=True`) as Salt has them, and
  salt.py's (`traverse`, `regex_replace`, `to_num`, `md5`, `union`, `flatten`, the test `match`...).
  In a state file `yaml_encode`, `yaml_dquote` and `yaml_squote` give the value itself (the text,
  for the quoting ones): it is data already, and quotes would end up in it; in a templated file
  they give YAML scalars, as Salt's;
- `raise('message')`: the rendering fails with that message, at its file and line;
- as in Salt (3006), the rendering's context is the environment's globals while it runs: a file
  imported without context (a formula's `map.jinja`, `libmapstack.jinja`) sees `salt`, `grains`,
  `pillar`, `opts`, `saltenv`, the importing file's `tpldir`... of the node being rendered, and
  the modules such imports make are kept for that rendering only (`_Rendering`).

Each gives data: loaded YAML or JSON holds each `{{ }}` value as the value itself where it
stands alone (the rules above; in JSON, unquoted), and in a state file a filter's result is a
value like any other, never YAML text, whatever the data it was given held.

Mechanism: autoescaping is on for state files, and "escaping" a value means replacing it with a
token (`finalize`, and `_Text`, the Markup subclass whose joins and formats escape); compiled state
templates use `_Text` where Jinja's runtime uses Markup (`_StateTemplate`), and string literals of
the template are template text (`_StateCodeGenerator`). `_TreeLoader` reads templates only inside
the state tree (statetree.py).

(Over 500 lines on purpose: the token scheme, the code generator hook and the filters and
loaders that must agree with it are one piece; split, a reader would have to hold three files to
check that no value becomes YAML. Salt's filters that never see tokens are in salt.py.)
"""

from __future__ import annotations

import contextvars
import functools
import ipaddress
import json
import os
import posixpath
import re
import secrets
import shlex

import jinja2
import jinja2.compiler
import jinja2.environment
import jinja2.ext
import jinja2.filters
import jinja2.nodes
import jinja2.runtime
import yaml
from markupsafe import Markup

from .salt import FILTERS as SALT_FILTERS
from .salt import TESTS as SALT_TESTS
from .salt import SaltFunctions, TemplateRefusal, _Function, _SaltModule, _text, yaml_scalar
from .statetree import StateFileError, StateTree, TreeFileMissing, state_tree


# ---------------------------------------------------------------------------------------------
# What templates see besides the context's own data

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
    """``value`` with every dict in it an AttrDict (lists followed), for a template's context."""
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
# Templates read only inside the state tree

class _Refused(jinja2.TemplateError):
    """A template name outside the state tree: an error, not "missing" (`ignore missing` skips
    only TemplateNotFound)."""


class _TreeLoader(jinja2.BaseLoader):
    """Template names relative to the state tree's root (``searchpath``), as Salt resolves them,
    read only inside the tree, through it (the client's files, for an apply). _Environment.join_path
    turns a name relative to the including template (`./x`, or one found only beside it) into
    such a name."""

    def __init__(self, searchpath: str, tree: StateTree) -> None:
        self.searchpath, self.tree = searchpath, tree

    def exists(self, template: str) -> bool:
        path = os.path.normpath(os.path.join(self.searchpath, template))
        return self.tree.refusal(path, "") is None and self.tree.isfile(path)

    def get_source(self, environment, template):
        path = os.path.normpath(os.path.join(self.searchpath, template))
        why = self.tree.refusal(path, f"template {template!r}")
        if why:
            raise _Refused(why)
        version = self.tree.version(path)
        try:
            source = self.tree.read(path).decode("utf-8")
        except (TreeFileMissing, FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise jinja2.TemplateNotFound(template) from None
        except OSError as exc:
            raise _Refused(f"template {template!r}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise _Refused(f"template {template!r} is not UTF-8 text") from None

        def uptodate() -> bool:
            return self.tree.version(path) == version

        return source, path, uptodate


# ---------------------------------------------------------------------------------------------
# Values in state files: each {{ }} becomes a token in the text, and its value again after YAML

class Values:
    """One rendering's values. Each stands in the text as `pmv<nonce>x<n>y`: lowercase letters and
    digits are a plain scalar anywhere in YAML and nothing special in quoted or block scalars, and
    the per-rendering nonce cannot be guessed by data or written by chance."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(6)
        self.items: list = []

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
_rendering: contextvars.ContextVar[Values | None] = contextvars.ContextVar("pimaster_values", default=None)


def _token(value) -> str:
    values = _rendering.get()
    if values is None:
        raise RuntimeError("a state file value outside a state file's rendering")
    if isinstance(value, (SaltFunctions, _SaltModule, _Function)):
        str(value)  # not a value: the error (what to call instead), at the template's line
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


class _Rendering:
    """One rendering (a file for a node): its context, and the modules its templates imported
    without context. Jinja keeps such a module on the template for later renderings, but it was
    made from this rendering's globals (the node's `grains`, `pillar`...; in a state file, its
    text holds this rendering's tokens): so it is kept here."""

    def __init__(self, context: dict) -> None:
        self.context, self.modules = context, {}


_current: contextvars.ContextVar[_Rendering | None] = contextvars.ContextVar("pimaster_rendering", default=None)


class _RenderTemplate(jinja2.Template):
    """Templates whose modules imported without context are kept per rendering (_Rendering)."""

    @property
    def _module(self):
        rendering = _current.get()
        return rendering.modules.get(self) if rendering is not None else None

    @_module.setter
    def _module(self, module):
        rendering = _current.get()
        if rendering is not None:
            rendering.modules[self] = module


class _StateTemplate(_RenderTemplate):
    """Compiled state file templates use our text class where Jinja's runtime uses Markup."""

    @classmethod
    def _from_namespace(cls, environment, namespace, globals):
        namespace.update(Markup=_Text, escape=_Text.escape, markup_join=_markup_join, Macro=_Macro)
        return super()._from_namespace(environment, namespace, globals)


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


def plain_data(value, values: Values | None = None):
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
        return {_plain_key(k, values): plain_data(v, values) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, values) for v in value]
    return values.substitute(str(value)) if values else str(value)


def _plain_key(key, values: Values | None):
    plain = plain_data(key, values)
    return plain if plain is None or isinstance(plain, (str, int, float, bool)) else str(plain)


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


def _at_render(function):
    """``function`` as a filter that gives a value: called when rendering, never at compile time
    (where its result on literals would be folded into the template's own text), and text it
    gives back as it got it (a literal) is a string value, not template text."""
    @jinja2.pass_context
    @functools.wraps(function)
    def call(context, *args, **kwargs):
        result = function(*args, **kwargs)
        return _text(result) if isinstance(result, Markup) else result
    return call


def _raise(message):
    """Salt's Jinja global `raise('message')`: the rendering fails, the error is the message (at
    its file and line)."""
    raise TemplateRefusal(_text(message))


def quote(value) -> str:
    """Jinja filter: the value shell-quoted, for commands (`cmd.run`, `unless`, ...)."""
    return shlex.quote(str(value))


# ---------------------------------------------------------------------------------------------
# Salt's Jinja: its serializers, loading text as data, and its tags

def _yaml_text(value, flow_style=True) -> str:
    """Salt's `yaml` filter: the value as YAML (one line unless ``flow_style`` is false)."""
    text = yaml.safe_dump(plain_data(value), default_flow_style=flow_style, allow_unicode=True).strip()
    # A scalar alone ends with YAML's end-of-document mark, which Salt's filter leaves out.
    return text[:-4] if text.endswith("\n...") else text


def _json_text(value, sort_keys=True, indent=None) -> str:
    """Salt's `json` filter: the value as JSON (keys sorted), not HTML-escaped as `tojson` is."""
    return json.dumps(plain_data(value), sort_keys=sort_keys, indent=indent)


def _loaded_text(value, what: str) -> tuple[str, str]:
    """The text to load, and how to name it in an error (an imported file by its name)."""
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined: the error, at the template's line
    name = getattr(value, "__name__", None) if isinstance(value, jinja2.environment.TemplateModule) else None
    return str(value), (f"{what}: {name}" if name else what)


# What YAML loaded in a template may expand to, aliases followed: a few hundred bytes of aliases
# of aliases (a stage's result, a fact) would otherwise fill the master's memory.
MAX_LOADED_NODES = 100_000


def _check_expansion(root, what: str) -> None:
    """Refuses YAML whose aliases make it expand past MAX_LOADED_NODES nodes, or refer to
    themselves (a node inside itself)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise TemplateRefusal(f"{what}: YAML that holds itself (an alias inside its own anchor)")
        open_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        if total > MAX_LOADED_NODES:
            raise TemplateRefusal(f"{what}: YAML that expands to over {MAX_LOADED_NODES} values (aliases of aliases)")
        return total

    if root is not None:
        size(root)


def load_yaml(value):
    """Jinja filter and function (Salt's): YAML text as data. In a state file, a `{{ }}` value in
    the text stays that value (see the module docstring)."""
    text, what = _loaded_text(value, "load_yaml")
    values = _rendering.get()
    try:
        _check_expansion(yaml.compose(text, Loader=_YAML_LOADER), what)
        if values is None or not values.traced(text):
            return yaml.load(text, Loader=_YAML_LOADER)
        return _yaml_with_values(text, values)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (its line {mark.line + 1})" if mark else ""
        raise TemplateRefusal(f"{what}: not YAML: {getattr(exc, 'problem', None) or exc}{where}") from None
    except RecursionError:
        raise TemplateRefusal(f"{what}: nested too deeply") from None


def load_json(value):
    """Jinja filter and function (Salt's): JSON text as data. In a state file, an unquoted `{{ }}`
    in the text is that value itself, a quoted one is printed into its string."""
    text, what = _loaded_text(value, "load_json")
    values = _rendering.get()
    try:
        if values is None or not values.traced(text):
            return json.loads(text)
        return _json_with_values(text, values)
    except json.JSONDecodeError as exc:
        raise TemplateRefusal(f"{what}: not JSON: {exc.msg} (its line {exc.lineno})") from None
    except RecursionError:
        raise TemplateRefusal(f"{what}: nested too deeply") from None


def load_text(value) -> str:
    """Jinja filter (Salt's): the text, as one string value (in a state file, never YAML text)."""
    return printed(_loaded_text(value, "load_text")[0])


def printed(text: str) -> str:
    """``text`` as it reads: the values a state file put in it printed in place of their tokens
    (text built in a state file, `tplroot ~ ':lookup'`, holds them until printed)."""
    values = _rendering.get()
    return values.substitute(text) if values is not None and values.traced(text) else text


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR_TAG = "tag:yaml.org,2002:str"


def _yaml_with_values(text: str, values: Values):
    """YAML text holding value tokens, loaded as a state file's YAML is (statefile.py): a token
    alone as a plain scalar is its value, any other is printed into its string, keys are strings."""
    root = yaml.compose(text, Loader=_YAML_LOADER)
    if root is None:
        return None
    lines, alone, seen = text.split("\n"), set(), set()

    def fill(node, key=False):
        if isinstance(node, yaml.ScalarNode):
            if not values.traced(node.value):
                return
            start, end = node.start_mark, node.end_mark
            index = values.whole(node.value)
            if (index is not None and not key and not node.style and node.tag == _STR_TAG
                    and start.line == end.line and end.column - start.column == len(node.value)):
                alone.add(index)  # put in after construction: the constructor knows only YAML types
                return
            dedent = _block_indent(lines, start.line) if node.style in ("|", ">") else 0
            node.value = values.substitute(node.value, dedent=dedent)
            if values.traced(node.value):
                raise TemplateRefusal("load_yaml: a filter rewrote text that holds {{ }} values: apply it "
                                      "to the values instead")
        elif id(node) not in seen:  # an alias, or a node inside itself
            seen.add(id(node))
            for item in node.value:
                if isinstance(node, yaml.MappingNode):
                    fill(item[0], key=True)
                    fill(item[1])
                else:
                    fill(item)

    fill(root)
    data = yaml.constructor.SafeConstructor().construct_object(root, deep=True)
    return _put_values(data, values, alone, {})


def _block_indent(lines: list[str], indicator_line: int) -> int:
    for line in lines[indicator_line + 1:]:
        if line.strip():
            return len(line) - len(line.lstrip(" "))
    return 0


# A JSON string, or a token outside one.
_JSON_PART = re.compile(r'"(?:[^"\\]|\\.)*"|' + _TOKEN.pattern)


def _json_with_values(text: str, values: Values):
    bare: set[int] = set()

    def quoted(match) -> str:
        part = match.group(0)
        if part.startswith('"'):
            return part
        index = values.whole(part)
        if index is not None:
            bare.add(index)
        return f'"{part}"'

    data = json.loads(_JSON_PART.sub(quoted, text))
    return _put_values(data, values, bare, {}, printed=True)


def _put_values(data, values: Values, alone: set[int], done: dict, printed: bool = False):
    """``data`` with each string that is a token of ``alone`` replaced by its value; with
    ``printed``, every other token in a string (a key too) printed into it."""
    if isinstance(data, str):
        index = values.whole(data)
        if index is not None and index in alone:
            value = values.items[index]
            return value.data if isinstance(value, _Flow) else value
        if printed and values.traced(data):
            text = values.substitute(data)
            if values.traced(text):
                raise TemplateRefusal("load_json: a filter rewrote text that holds {{ }} values: apply it "
                                      "to the values instead")
            return text
        return data
    if id(data) in done:
        return done[id(data)]
    if isinstance(data, list):
        done[id(data)] = data
        data[:] = [_put_values(v, values, alone, done, printed) for v in data]
    elif isinstance(data, dict):
        done[id(data)] = data
        items = [(_put_values(k, values, set(), done, printed), _put_values(v, values, alone, done, printed))
                 for k, v in data.items()]
        data.clear()
        data.update(items)
    return data


class _SaltExtension(jinja2.ext.Extension):
    """Salt's `{% import_yaml "x.yaml" as x %}` (import_json, import_text): `{% import %}` of the
    file, then `{% set x = x | load_yaml %}`; and `{% load_yaml as x %}...{% endload %}`: the
    block's text, then the same. So the file is found, read (inside the state tree) and rendered
    exactly as `{% import %}` does it, `with context` included."""

    tags = {"import_yaml", "import_json", "import_text", "load_yaml", "load_json", "load_text"}

    def parse(self, parser):
        tag = parser.stream.current
        kind = tag.value.split("_", 1)[1]
        if tag.value.startswith("import_"):
            node = parser.parse_import()  # takes the tag's name as it would take `import`
            return [node, self._load(node.target, kind, tag.lineno)]
        next(parser.stream)
        parser.stream.expect("name:as")
        target = parser.parse_assign_target(name_only=True).name
        body = parser.parse_statements(("name:endload",), drop_needle=True)
        block = jinja2.nodes.AssignBlock(jinja2.nodes.Name(target, "store"), None, body, lineno=tag.lineno)
        return [block, self._load(target, kind, tag.lineno)]

    @staticmethod
    def _load(target: str, kind: str, lineno: int):
        loaded = jinja2.nodes.Filter(jinja2.nodes.Name(target, "load"), f"load_{kind}", [], [], None, None)
        return jinja2.nodes.Assign(jinja2.nodes.Name(target, "store"), loaded).set_lineno(lineno)


_EXTENSIONS = ("jinja2.ext.do", "jinja2.ext.loopcontrols", _SaltExtension)


def _template_name(name):
    """A template name as plain text, with the values a state file put in it printed: formulas
    import `tpldir ~ '/map.jinja'`. (Whatever a value holds, the loader reads inside the tree only.)"""
    return printed(str(name)) if isinstance(name, str) else name


class _Environment(jinja2.Environment):
    """Template names are plain strings: a literal name in a state file is state text (see
    _StateCodeGenerator), which Jinja would otherwise write into compiled code as it is."""

    def get_template(self, name, parent=None, globals=None):
        return super().get_template(_template_name(name), parent, globals)

    def select_template(self, names, parent=None, globals=None):
        names = [_template_name(n) for n in names] if not isinstance(names, jinja2.Undefined) else names
        return super().select_template(names, parent, globals)

    def join_path(self, template, parent):
        """A name in `{% include %}`/`{% import %}`/`{% from %}` of template ``parent``: from the
        tree's root, as Salt reads it (`{% from "ntp/map.jinja" import … %}`); `./x` and `../x`
        from the including template's directory; and a name found only beside the including
        template as well (how pimaster read them before state trees had a root)."""
        if not isinstance(template, str) or not isinstance(parent, str):
            return template
        template = str(template)
        here = posixpath.dirname(parent)
        if template.startswith(("./", "../")):
            return posixpath.normpath(posixpath.join(here, template))
        loader = self.loader
        if here and isinstance(loader, _TreeLoader) and not loader.exists(template):
            beside = posixpath.normpath(posixpath.join(here, template))
            if loader.exists(beside):
                return beside
        return template


class _Undefined(jinja2.StrictUndefined):
    """StrictUndefined that names what is missing in a person's words: `node.colour` says "node01
    has no fact or inventory key 'colour' (did you mean 'color'?)", not "'pimaster.template.AttrDict
    object' has no attribute 'colour'"."""

    @property
    def _undefined_message(self) -> str:
        container, name = self._undefined_obj, self._undefined_name
        if self._undefined_hint or not isinstance(container, dict) or not isinstance(name, str):
            return super()._undefined_message
        import difflib

        name = str(name)  # a literal of a state file is its text class: the key as written
        close = difflib.get_close_matches(name, [k for k in container if isinstance(k, str)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if "hostname" in container and isinstance(container.get("id"), str):  # a node: its facts + entry
            return f"{container['id']} has no fact or inventory key {name!r}{hint}"
        rendering = _current.get()
        for known in ("pillar", "grains", "opts"):
            if rendering is not None and rendering.context.get(known) is container:
                if not hint and known != "opts":
                    hint = f" (for one that may be missing: salt['{known}.get']({name!r}, default))"
                return f"{known} has no key {name!r}{hint}"
        return f"no key {name!r} here{hint}"


def _environment(searchpath: str, tree: StateTree, state: bool) -> jinja2.Environment:
    env = _Environment(loader=_TreeLoader(searchpath, tree), undefined=_Undefined,
                             keep_trailing_newline=True, auto_reload=True, extensions=_EXTENSIONS,
                             autoescape=state, finalize=_finalize if state else None)
    env.tests["in_network"] = in_network
    env.tests.update(SALT_TESTS)
    env.filters["quote"] = quote
    env.filters.update(SALT_FILTERS, load_yaml=load_yaml, load_json=load_json, load_text=load_text)
    env.globals.update(load_yaml=load_yaml, load_json=load_json)
    env.globals["raise"] = _raise
    env.template_class = _RenderTemplate
    if not state:
        env.filters["yaml"] = _yaml_text
        env.filters["json"] = _json_text
        return env
    env.template_class = _StateTemplate
    env.code_generator_class = _StateCodeGenerator
    env.filters.update({
        "tojson": _tojson, "json": lambda v, sort_keys=True, indent=None: _Flow(_json_text(v, sort_keys, indent), v),
        "yaml": lambda v, flow_style=True: _Flow(_yaml_text(v, flow_style), v),
        "escape": _Text.escape, "e": _Text.escape, "forceescape": lambda v: _Text.escape(str(v)),
        "safe": lambda v: _Text(v) if isinstance(v, Markup) else _Text(str(v)),
        "join": _join, "replace": _replace, "indent": _indent, "format": _format,
        "xmlattr": _as_data(env.filters["xmlattr"]), "urlize": _as_data(env.filters["urlize"]),
    })
    # Salt's filters give values, on literals too: run when rendering, not folded into template text
    # when compiling. A value is data already in a state file: quoting it for YAML would put the
    # quotes in it, so the yaml_* filters give the value (the text, for the quoting ones).
    env.filters.update({name: _at_render(f) for name, f in SALT_FILTERS.items()})
    env.filters.update(yaml_encode=_at_render(yaml_scalar), yaml_dquote=_at_render(_text),
                       yaml_squote=_at_render(_text))
    return env


def _env(searchpath: str, tree: StateTree, state: bool) -> jinja2.Environment:
    """One environment per tree (kept on it: one apply), names relative to ``searchpath`` (its
    root): it caches compiled templates, so rendering one file for 200 nodes compiles it once."""
    key = (searchpath, state)
    if key not in tree.envs:
        tree.envs[key] = _environment(searchpath, tree, state=state)
    return tree.envs[key]


# ---------------------------------------------------------------------------------------------
# Rendering a state file or a templated file

def _jinja_error(path: str, shown: str, exc: Exception) -> StateFileError:
    line = getattr(exc, "lineno", None)
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, jinja2.UndefinedError):
        message = f"undefined in template: {message}"
    elif isinstance(exc, jinja2.TemplateSyntaxError):
        message = f"template syntax error: {message}"
    elif isinstance(exc, jinja2.TemplateNotFound):
        message = f"template not found: {exc.name}"
    elif isinstance(exc, (_Refused, TemplateRefusal)):
        pass
    else:
        message = f"template error: {type(exc).__name__}: {message}"
    # Python names the context's mappings and texts by their classes: a person wrote a mapping, a text.
    message = message.replace("'AttrDict'", "'dict'").replace("AttrDict", "dict")
    message = re.sub(r"'(_Text|_Flow|Markup)'", "'str'", message)
    where = None if isinstance(exc, jinja2.TemplateSyntaxError) else _innermost_template(exc)
    if where is not None:
        # The innermost template's file and line: a formula's salt[...] call or undefined name
        # is in its map.jinja, not on the state file's `{% from %}` line. Shown as `shown` is.
        if where[0] != path:
            beside = os.path.relpath(where[0], os.path.dirname(path))
            shown = os.path.normpath(os.path.join(os.path.dirname(shown), beside))
        line = where[1]
    if isinstance(exc, jinja2.TemplateSyntaxError) and exc.filename and os.path.abspath(exc.filename) != path:
        shown = exc.filename
    return StateFileError(shown, line, message)


def _innermost_template(exc: Exception) -> tuple[str, int] | None:
    """The file and line of the innermost template frame of ``exc`` (Jinja rewrites the frames of
    templates to point at their own files and lines)."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        template = frame.f_globals.get("__jinja_template__")
        if "__jinja_exception__" in frame.f_globals:  # a frame Jinja rewrote
            found = (frame.f_code.co_filename, tb.tb_lineno)
        elif template is not None and template.filename:
            found = (template.filename, template.get_corresponding_lineno(tb.tb_lineno))
        tb = tb.tb_next
    return found


def _render(env: jinja2.Environment, path: str, context: dict, shown: str, tree: StateTree, what: str) -> str:
    why = tree.refusal(path, what)
    if why:
        raise StateFileError(shown, None, why)
    try:
        raw = tree.read(path)
    except OSError as exc:
        raise StateFileError(shown, None, f"cannot read: {exc.strerror or exc}") from None
    if b"\0" in raw:
        raise StateFileError(shown, raw[:raw.index(b"\0")].count(b"\n") + 1, "binary data, not a text file")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise StateFileError(shown, line, "not UTF-8 text") from None
    # Salt (3006) puts the context into the environment's globals: a file imported without
    # context (a formula's map.jinja, libmapstack) sees `salt`, `grains`, `pillar`... too. The
    # environment is the tree's, for one apply, whose nodes are rendered one after the other: the
    # globals are this rendering's while it runs (and what they were, after).
    before = dict(env.globals)
    env.globals.update(context)
    current = _current.set(_Rendering(context))
    try:
        name = os.path.relpath(path, env.loader.searchpath).replace(os.sep, "/")
        return env.get_template(name).render(**context)
    except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError) as exc:
        error = _jinja_error(path, shown, exc)
        if error.line is None:
            error.line = _template_line(exc, path)
        raise error from None
    finally:
        _current.reset(current)
        env.globals.clear()
        env.globals.update(before)


def render_template(path: str, context: dict, shown: str, tree: StateTree | None = None) -> str:
    """A templated file's contents (`source:` + `template: jinja`): plain text, nothing escaped.
    ``tree``: where it may read (default: its own directory, in this file system)."""
    tree = tree or state_tree(os.path.dirname(path))
    return _render(_env(tree.root, tree, False), path, context, shown, tree, f"source {shown!r}")


def render_state(path: str, context: dict, shown: str, tree: StateTree | None = None) -> tuple[str, Values]:
    """A state file's YAML text, with a token for each value, and the values (for parse_states)."""
    tree = tree or state_tree(os.path.dirname(path))
    values = Values()
    reset = _rendering.set(values)
    try:
        text = _render(_env(tree.root, tree, True), path, context, shown, tree, f"state file {shown!r}")
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
