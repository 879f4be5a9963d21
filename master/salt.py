"""Salt's names in state files: what a Salt user's files and community formulas expect to find in
Jinja, built from what the master knows, so that they render here unchanged.

Beside pimaster's own `node`, `nodes`, `cluster`, `results` and `secret()`, a state file (and a
templated `source:`) sees:

- `grains`: Salt's grain names, built from the node's facts (what it reports; the inventory's
  `hostname:` is `node.hostname`). A grain whose fact the node did not report is absent:

  | grain | from |
  | --- | --- |
  | `id` | the node's id |
  | `nodename`, `localhost` | `hostname` |
  | `fqdn`, `host`, `domain` | `fqdn` (else `hostname`): host is its first label, domain the rest |
  | `os`, `os_family` | os-release `ID`: Debian, Raspbian, Ubuntu... and their family (Debian) |
  | `osrelease`, `osmajorrelease`, `osrelease_info`, `osfinger` | os-release `VERSION_ID` (`Debian-12`) |
  | `oscodename`, `lsb_distrib_codename`, `lsb_distrib_release`, `lsb_distrib_id` | os-release |
  | `osarch` | `arch` (dpkg's: arm64, armhf) |
  | `cpuarch` | `machine` (aarch64, armv7l) |
  | `kernel`, `kernelrelease` | `Linux`, and `kernel` (the release) |
  | `num_cpus`, `mem_total` | `cpu_count`, `memory_mb` (MiB, as Salt's) |
  | `ipv4`, `ipv6` | `ips` (loopback is not reported) |
  | `ip4_interfaces`, `ip6_interfaces`, `ip_interfaces`, `hwaddr_interfaces` | `interfaces` |
  | `virtual`, `virtual_subtype` | `virtualization` (`physical` on a Pi) |
  | `init` | `systemd` |
  | `machine_id` | `machine_id` |

- `pillar`: cluster.yaml's top-level `pillar:` block merged with the node's inventory entry's
  `pillar:` (the entry wins; mappings are merged key by key, anything else is replaced).
- `opts`: a minimal minion configuration: `id`, `file_client: local`, `renderer: jinja|yaml`,
  `saltenv: base`; `saltenv` is `base`.
- `salt`: Salt's functions that only read data, called as in Salt (`salt['pillar.get'](...)`):
  `pillar.get`, `pillar.items`, `grains.get`, `grains.items`, `grains.filter_by`, `config.get`
  (minion options, then grains, then pillar, as Salt looks), `defaults.merge`, `defaults.update`,
  `defaults.deepcopy`, `defaults.get` (the formula's `defaults.yaml` or `defaults.json` in the
  state tree). Keys are Salt's `a:b:c` paths. Any other function (`cmd.run`, `mine.get`,
  `network.ip_addrs`...) would have to run on the node while the master renders the file, before
  anything is sent: it is refused with the file, the line and what to use instead.
- per file (`file_context`): `sls`, `slspath`, `sls_path`, `slsdotpath`, `slscolonpath`,
  `tplpath`, `tplfile`, `tpldir`, `tpldot`, with Salt's meanings.
- the filters `traverse`, `regex_search`, `regex_match`, `regex_replace`, `unique`, `sequence`
  and `to_bool` (here), and `json`, `yaml`, `load_yaml`, `load_json`, `load_text`, `{% do %}`,
  `{% import_yaml %}` / `import_json` / `import_text` (template.py, which keeps values data).

Facts are hostile data (a node may lie): everything here gives values, never template or YAML
text, so a fact stays one value whatever it holds (template.py's docstring has the rules).
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import json
import os
import posixpath
import re
from collections.abc import Hashable, Mapping

import jinja2
import yaml


class TemplateRefusal(jinja2.TemplateError):
    """What a template asked for that rendering on the master cannot or will not give: the message
    is the whole reason, shown with the file and line (template.py's _jinja_error)."""


# ---------------------------------------------------------------------------------------------
# Salt's data semantics: `a:b:c` paths and deep merges

_MISSING = object()


def traverse(data, key, default=None, delimiter=":"):
    """Jinja filter (Salt's `traverse`): the value at ``key``, a `a:b:c` path through mappings and
    lists (a number indexes a list; another name looks in the mappings the list holds), else
    ``default``: `{{ pillar | traverse('ntp:servers:0', 'pool.ntp.org') }}`."""
    if isinstance(key, str):
        parts = _text(key).split(_text(delimiter))
    elif isinstance(key, int) and not isinstance(key, bool):
        parts = [key]
    else:
        parts = list(key)
    here = data
    for part in parts:
        if isinstance(here, list):
            here = _in_list(here, part)
        elif isinstance(here, Mapping):
            here = _in_mapping(here, part)
        else:
            return default
        if here is _MISSING:
            return default
    return here


def _in_list(items: list, part):
    try:
        index = int(part)
    except (TypeError, ValueError):
        index = None
    if index is None:  # Salt's lists of one-key mappings (`- name: x`): the first that has it
        return next((item[str(part)] for item in items if isinstance(item, Mapping) and str(part) in item), _MISSING)
    try:
        return items[index]
    except IndexError:
        return _MISSING


def _in_mapping(mapping: Mapping, part):
    if isinstance(part, str):
        part = str(part)  # a literal of the template is state text: a plain key here
    if part in mapping:
        return mapping[part]
    try:  # `ports:80` finds the key 80 too, as YAML wrote it
        number = int(part)
    except (TypeError, ValueError):
        return _MISSING
    return mapping.get(number, _MISSING)


def update(dest: dict, src: Mapping, merge_lists: bool = False) -> dict:
    """Salt's deep merge: ``src`` into ``dest`` (changed in place, and returned); mappings merged
    key by key, lists replaced (or, with ``merge_lists``, extended by the items they lack), anything
    else replaced. ``src`` is copied in, so the two share nothing afterwards."""
    if not isinstance(dest, Mapping) or not isinstance(src, Mapping):
        raise TemplateRefusal("cannot merge: both sides must be mappings (dicts)")
    for key, value in src.items():
        mine = dest.get(key, _MISSING)
        if isinstance(mine, Mapping) and isinstance(value, Mapping):
            dest[key] = update(mine if isinstance(mine, dict) else dict(mine), value, merge_lists)
        elif merge_lists and isinstance(mine, list) and isinstance(value, list):
            dest[key] = mine + [copy.deepcopy(v) for v in value if v not in mine]
        else:
            dest[key] = copy.deepcopy(value)
    return dest


def merged(*layers) -> dict:
    """The deep merge of mappings, later ones winning (None and empty ones count as nothing)."""
    out: dict = {}
    for layer in layers:
        if layer:
            update(out, layer)
    return out


# ---------------------------------------------------------------------------------------------
# Grains from facts

# os-release IDs as Salt names them, and their families (Salt's tables, for the systems a Pi
# cluster runs); an ID not here is its own `os` and `os_family`, as in Salt.
_OS_NAMES = {"debian": "Debian", "raspbian": "Raspbian", "ubuntu": "Ubuntu", "linuxmint": "Mint",
             "pop": "Pop", "devuan": "Devuan", "kali": "Kali", "fedora": "Fedora", "centos": "CentOS",
             "rhel": "RedHat", "rocky": "Rocky", "almalinux": "AlmaLinux", "arch": "Arch",
             "manjaro": "Manjaro", "alpine": "Alpine"}
_OS_FAMILIES = {"Raspbian": "Debian", "Ubuntu": "Debian", "Mint": "Debian", "Pop": "Debian",
                "Devuan": "Debian", "Kali": "Debian", "Fedora": "RedHat", "CentOS": "RedHat",
                "Rocky": "RedHat", "AlmaLinux": "RedHat", "Manjaro": "Arch"}
# systemd-detect-virt's answers as Salt's `virtual` grain gives them: (virtual, virtual_subtype).
_VIRTUAL = {"none": ("physical", None), "qemu": ("qemu", None), "kvm": ("kvm", None),
            "oracle": ("oracle", None), "xen": ("xen", None), "bochs": ("bochs", None),
            "uml": ("uml", None), "systemd-nspawn": ("systemd-nspawn", None), "vmware": ("VMware", None),
            "microsoft": ("VirtualPC", None), "lxc": ("container", "LXC"), "lxc-libvirt": ("container", "LXC"),
            "docker": ("container", "Docker"), "amazon": ("Nitro", "Amazon EC2")}


def grains_from_facts(facts: dict, node_id: str, hostname: str | None = None,
                      claimed: set[str] | frozenset = frozenset()) -> dict:
    """Salt's grains for a node with these (schema-checked) facts; a grain nothing tells is absent.

    Grains that formulas select files and data by must not let a node pass for another:
    ``hostname`` (the inventory's, when it has one) wins over the reported one, a reported fqdn
    counts only when its first label is that name, and an address in ``claimed`` (another node's
    name or address in the inventory) is left out of `ipv4`/`ipv6`. `id` is the one grain no node
    chooses."""
    grains: dict = {"id": node_id, "kernel": "Linux"}  # piagent runs on Linux only
    hostname = hostname or facts.get("hostname")
    if hostname in claimed:
        hostname = node_id
    if hostname:
        grains["nodename"] = grains["localhost"] = hostname
    fqdn = facts.get("fqdn")
    if not fqdn or fqdn.partition(".")[0] != hostname:
        fqdn = hostname
    if fqdn:
        grains["fqdn"] = fqdn
        grains["host"], _, grains["domain"] = fqdn.partition(".")
    grains.update(_os_grains(facts.get("os") or {}))
    for grain, fact in (("osarch", "arch"), ("cpuarch", "machine"), ("kernelrelease", "kernel"),
                        ("num_cpus", "cpu_count"), ("mem_total", "memory_mb"), ("machine_id", "machine_id")):
        if facts.get(fact) is not None:
            grains[grain] = facts[fact]
    grains.update(_ip_grains(facts, claimed))
    virtual = facts.get("virtualization")
    if virtual:
        # Another answer still says it is not bare metal; Salt calls that "virtual".
        kind, subtype = _VIRTUAL.get(virtual, ("virtual", virtual))
        grains["virtual"] = kind
        if subtype:
            grains["virtual_subtype"] = subtype
    if facts.get("systemd") is True:
        grains["init"] = "systemd"
    return grains


def _os_grains(release: dict) -> dict:
    out: dict = {}
    os_id = release.get("ID")
    if os_id and not re.fullmatch(r"[A-Za-z0-9_-]+", os_id):
        os_id = None  # an os-release ID is a plain word: dots would be directories in an SLS name
    if os_id:
        out["os"] = _OS_NAMES.get(os_id.lower(), os_id)
        out["os_family"] = _OS_FAMILIES.get(out["os"], out["os"])
        out["lsb_distrib_id"] = out["os"]
    if release.get("VERSION_CODENAME"):
        out["oscodename"] = out["lsb_distrib_codename"] = release["VERSION_CODENAME"]
    version = release.get("VERSION_ID")
    if version:
        out["osrelease"] = out["lsb_distrib_release"] = version
        info = [int(p) if p.isdigit() else p for p in version.split(".")]
        out["osrelease_info"] = info
        if isinstance(info[0], int):
            out["osmajorrelease"] = info[0]
            if "os" in out:  # Salt's: Debian-12, Raspbian-11, but Ubuntu-22.04
                out["osfinger"] = f"{out['os']}-{version if out['os'] == 'Ubuntu' else info[0]}"
    return out


def _ip_grains(facts: dict, claimed: set[str] | frozenset = frozenset()) -> dict:
    out: dict = {}
    if isinstance(facts.get("ips"), list):
        own = [ip for ip in facts["ips"] if ip not in claimed]
        out["ipv4"] = [ip for ip in own if ":" not in ip]
        out["ipv6"] = [ip for ip in own if ":" in ip]
    interfaces = facts.get("interfaces")
    if isinstance(interfaces, list):
        v4, v6, both, macs = {}, {}, {}, {}
        for interface in interfaces:
            name = interface.get("name")
            addresses = [a for a in (a.split("/")[0] for a in interface.get("addresses", [])) if a not in claimed]
            v4[name] = [a for a in addresses if ":" not in a]
            v6[name] = [a for a in addresses if ":" in a]
            both[name] = addresses
            if interface.get("mac"):
                macs[name] = interface["mac"]
        out.update(ip4_interfaces=v4, ip6_interfaces=v6, ip_interfaces=both, hwaddr_interfaces=macs)
    return out


# ---------------------------------------------------------------------------------------------
# salt[...]

# What to say about a function that would run on the node, by its module.
_INSTEAD = {
    "cmd": "a cmd.run state (with `unless`/`onlyif`/`creates` for a condition; its output is in "
           "`results` for a later stage, see `pimaster: stages`)",
    "mine": "`nodes` (every node's facts) or `results` (what an earlier stage's states produced)",
    "publish": "`nodes` (every node's facts) or `results` (what an earlier stage's states produced)",
    "network": "the grains `ipv4`, `ip4_interfaces`, `hwaddr_interfaces`, `fqdn` (the node's facts)",
    "file": "`unless`/`onlyif`/`creates` on a state, or a state that manages the file",
    "pkg": "pkg.installed and friends as states",
    "service": "service.running and friends as states",
    "grains": "salt['grains.get'] or `grains`",
    "pillar": "salt['pillar.get'] or `pillar`",
}


def _with_values(function):
    """``function`` called with its text arguments as the text they stand for: a key built in a
    state file (`tplroot ~ ':lookup'`) holds a value's token until printed."""
    def call(*args, **kwargs):
        args = [_text(a) if isinstance(a, str) else a for a in args]
        kwargs = {k: _text(v) if isinstance(v, str) else v for k, v in kwargs.items()}
        return function(*args, **kwargs)
    call.__name__ = getattr(function, "__name__", "salt_function")
    return call


class _SaltModule:
    """`salt.pillar` of `salt.pillar.get(...)`: its attributes are `salt['pillar.get']`, ...."""

    def __init__(self, functions: "SaltFunctions", module: str) -> None:
        self._functions, self._module = functions, module

    def __getattr__(self, function: str):
        if function.startswith("_"):
            raise AttributeError(function)
        return self._functions[f"{self._module}.{function}"]


class SaltFunctions:
    """`salt` in templates: Salt's data-only functions, by name (`salt['pillar.get']('ntp:servers', [])`).

    Not a mapping and not callable, so that the renderer passes it through as it is; every value
    it gives is a copy, so a template changing what it got (`{% do ....update() %}`) changes
    nothing for the next lookup or the next file."""

    def __init__(self, grains: dict, pillar: dict, opts: dict) -> None:
        self._grains, self._pillar, self._opts = grains, pillar, opts
        self._functions = {
            "pillar.get": self.pillar_get, "pillar.items": lambda: copy.deepcopy(self._pillar),
            "grains.get": self.grains_get, "grains.items": lambda: copy.deepcopy(self._grains),
            "grains.filter_by": self.filter_by, "config.get": self.config_get,
            "defaults.merge": defaults_merge, "defaults.update": defaults_update,
            "defaults.deepcopy": copy.deepcopy, "defaults.get": defaults_get,
        }

    def __getitem__(self, name):
        name = _text(name)
        function = self._functions.get(name)
        if function is None:
            raise TemplateRefusal(self._refusal(name))
        return _with_values(function)

    def __getattr__(self, module: str):
        """Salt's other spelling, `salt.pillar.get('key')`: the module, whose attributes are its functions."""
        if module.startswith("_"):
            raise AttributeError(module)
        return _SaltModule(self, module)

    def __contains__(self, name) -> bool:
        return str(name) in self._functions

    def __iter__(self):
        return iter(sorted(self._functions))

    def __repr__(self) -> str:
        return f"<Salt's functions on the master: {', '.join(sorted(self._functions))}>"

    def _refusal(self, name: str) -> str:
        module = name.partition(".")[0]
        close = difflib.get_close_matches(name, list(self._functions), n=1, cutoff=0.8)
        if close:
            return f"salt[{name!r}] is not a function pimaster has (did you mean {close[0]!r}?)"
        if "." not in name:
            return (f"salt[{name!r}]: Salt's functions are named module.function, as in "
                    f"salt['pillar.get']('key', default)")
        instead = _INSTEAD.get(module) or (
            "a state for what it does, the node's facts (`grains`, `node`) or `results` of an earlier stage "
            f"(salt[...] has only {', '.join(sorted(self._functions))} here)")
        return (f"salt[{name!r}] cannot be called here: it would have to run on the node at render time, and "
                f"pimaster renders state files on the master before anything is sent; instead, use {instead}")

    def pillar_get(self, key, default="", merge=False, merge_nested_lists=None, delimiter=":",
                   pillarenv=None, saltenv=None):
        """Salt's pillar.get: the pillar value at ``key`` (`a:b:c`), else ``default`` ('' when not
        given). ``merge``: a mapping (or list) default gets the pillar's value merged into it."""
        if merge and isinstance(default, Mapping):
            found = traverse(self._pillar, key, {}, delimiter)
            if isinstance(found, Mapping):
                return update(copy.deepcopy(dict(default)), found, bool(merge_nested_lists))
        elif merge and isinstance(default, list):
            found = traverse(self._pillar, key, [], delimiter)
            if isinstance(found, list):
                return copy.deepcopy(default) + [copy.deepcopy(v) for v in found if v not in default]
        return _copy(traverse(self._pillar, key, _MISSING, delimiter), default)

    def grains_get(self, key, default="", delimiter=":", ordered=True):
        """Salt's grains.get: the grain at ``key`` (`a:b:c`), else ``default`` ('' when not given)."""
        return _copy(traverse(self._grains, key, _MISSING, delimiter), default)

    def config_get(self, key, default="", delimiter=":", merge=None, omit_opts=False, omit_pillar=False,
                   omit_master=False, omit_grains=False):
        """Salt's config.get: ``key`` in the minion options, then the grains, then the pillar (Salt's
        order); with ``merge`` ('recurse' or 'overwrite'), in all three merged, options winning."""
        stores = [s for s, omit in ((self._opts, omit_opts), (self._grains, omit_grains),
                                    (self._pillar, omit_pillar)) if not omit]
        if merge:
            combined: dict = {}
            for store in reversed(stores):
                if merge == "overwrite":
                    combined.update(copy.deepcopy(store))
                else:
                    update(combined, store)
            stores = [combined]
        for store in stores:
            found = traverse(store, key, _MISSING, delimiter)
            if found is not _MISSING:
                return copy.deepcopy(found)
        return default

    def filter_by(self, lookup_dict, grain="os_family", merge=None, default="default", base=None):
        """Salt's grains.filter_by: the entry of ``lookup_dict`` whose key (a glob pattern) matches the
        node's ``grain`` (each item, for a list grain), else the ``default`` entry, else None; merged
        over the ``base`` entry when given, and ``merge`` (a mapping, usually from pillar) over it."""
        if not isinstance(lookup_dict, Mapping):
            raise TemplateRefusal("grains.filter_by: the lookup table must be a mapping")
        value = traverse(self._grains, grain, [], ":")
        chosen = _MISSING
        for item in value if isinstance(value, list) else [value]:
            chosen = next((lookup_dict[k] for k in lookup_dict if fnmatch.fnmatchcase(str(item), str(k))), _MISSING)
            if chosen is not _MISSING:
                break
        result = copy.deepcopy(lookup_dict.get(default) if chosen is _MISSING else chosen)
        if base is not None and base in lookup_dict:
            base_values = copy.deepcopy(lookup_dict[base])
            if result is None:
                result = base_values
            elif isinstance(base_values, Mapping):
                if not isinstance(result, Mapping):
                    raise TemplateRefusal("grains.filter_by: the base and the chosen entry must both be mappings")
                result = update(base_values, result)
        if merge:
            if not isinstance(merge, Mapping):
                raise TemplateRefusal("grains.filter_by: merge must be a mapping (dict)")
            result = copy.deepcopy(dict(merge)) if result is None else update(result, merge)
        return result


def _copy(found, default):
    return default if found is _MISSING else copy.deepcopy(found)


def defaults_merge(dest, src, merge_lists=False, in_place=True, convert_none=True):
    """Salt's defaults.merge: ``src`` deep-merged into ``dest`` (in place unless ``in_place`` is
    false, then into a copy), which is returned: `{% do salt['defaults.merge'](settings, pillar_part) %}`."""
    if convert_none:
        src = {} if src is None else src
        if dest is None:
            if in_place:
                raise TemplateRefusal("defaults.merge: dest is None (in_place=True needs a mapping)")
            dest = {}
    return update(dest if in_place else copy.deepcopy(dest), src, merge_lists)


def defaults_update(dest, defaults, merge_lists=True, in_place=True, convert_none=True):
    """Salt's defaults.update: ``defaults`` under every entry of ``dest`` (a mapping of mappings)."""
    if convert_none:
        dest = {} if dest is None else dest
        defaults = {} if defaults is None else defaults
    nodes = dest if in_place else copy.deepcopy(dest)
    for name, entry in nodes.items():
        nodes[name] = update(copy.deepcopy(defaults), entry or {}, merge_lists)
    return nodes


@jinja2.pass_context
def defaults_get(context, key, default=""):
    """Salt's defaults.get: `formula:a:b` is `a:b` in the state tree's `formula/defaults.yaml` (or
    `defaults.json`), read through the template loader (inside the state tree only), else ``default``."""
    formula, _, path = str(key).partition(":")
    environment = context.environment
    for name, load, error in (("defaults.yaml", yaml.safe_load, yaml.YAMLError),
                              ("defaults.json", json.loads, ValueError)):
        try:
            source, _, _ = environment.loader.get_source(environment, posixpath.join(formula, name))
        except jinja2.TemplateNotFound:
            continue
        try:
            data = load(source) or {}
        except error as exc:
            raise TemplateRefusal(f"defaults.get: {formula}/{name} does not parse: "
                                  f"{getattr(exc, 'problem', None) or exc}") from None
        return traverse(data, path, default) if path else data
    return default


# ---------------------------------------------------------------------------------------------
# The context

def salt_context(facts: dict, entry: dict, cluster: dict, pillar: dict | None = None,
                 claimed: set[str] | frozenset = frozenset()) -> dict:
    """The Salt names one node's templates see (see the module docstring): `grains`, `pillar`,
    `opts`, `saltenv` and `salt`. ``facts``: the node's (schema-checked) facts; ``entry``: its
    resolved inventory entry (its `id`, and its own `pillar:`); ``cluster``: the inventory's
    `cluster:` block (nothing in it is Salt's, so nothing is taken from it yet); ``pillar``:
    the inventory's top-level `pillar:` block; ``claimed``: the other nodes' names and addresses
    (see grains_from_facts)."""
    node_id = str(entry.get("id", facts.get("hostname", "")))
    hostname = entry.get("hostname")
    grains = grains_from_facts(facts, node_id, str(hostname) if hostname else None, claimed)
    if isinstance(entry.get("roles"), list):  # the custom grain formulas most often read: the inventory's
        grains["roles"] = list(entry["roles"])
    entry_pillar = entry.get("pillar")
    for what, layer in (("the inventory's `pillar:`", pillar), (f"{node_id}'s `pillar:`", entry_pillar)):
        if layer is not None and not isinstance(layer, Mapping):
            raise ValueError(f"{what} must be a mapping")
    node_pillar = merged(pillar, entry_pillar)
    opts = {"id": node_id, "file_client": "local", "renderer": "jinja|yaml", "saltenv": "base"}
    return {"grains": grains, "pillar": node_pillar, "opts": opts, "saltenv": "base",
            "salt": SaltFunctions(copy.deepcopy(grains), copy.deepcopy(node_pillar), dict(opts))}


_STATE_NAME = re.compile(r"(?P<name>.*?)(\.sls|\.yaml|\.yml)?")


def file_context(path: str, root: str, sls_file: str | None = None) -> dict:
    """Salt's per-file names for the template at absolute ``path`` in the state tree at ``root``:
    `tplpath` (the path itself), `tplfile` (relative to the root), `tpldir` (its directory, `.` at
    the root), `tpldot`; and for the state file ``sls_file`` (default: ``path``), `sls` (its name
    for `include:`: `ntp/init.sls` is `ntp`, `ntp/client.sls` is `ntp.client`), `slspath` (its
    directory, '' at the root), `sls_path`, `slsdotpath`, `slscolonpath`. A templated `source:`
    gets its own `tpl*` and the names of the state file that uses it."""
    def relative(p: str) -> str:
        rel = os.path.relpath(os.path.abspath(p), os.path.abspath(root)).replace(os.sep, "/")
        return posixpath.basename(rel) if rel.startswith("../") or rel == ".." else rel

    tplfile = relative(path)
    tpldir = posixpath.dirname(tplfile) or "."
    sls_rel = relative(sls_file or path)
    slspath = posixpath.dirname(sls_rel)
    stem = _STATE_NAME.fullmatch(posixpath.basename(sls_rel)).group("name")
    sls = (slspath if stem == "init" and slspath else posixpath.join(slspath, stem)).replace("/", ".")
    return {"tplpath": path, "tplfile": tplfile, "tpldir": tpldir,
            "tpldot": "" if tpldir == "." else tpldir.replace("/", "."),
            "sls": sls, "slspath": slspath, "sls_path": slspath.replace("/", "_"),
            "slsdotpath": slspath.replace("/", "."), "slscolonpath": slspath.replace("/", ":")}


# ---------------------------------------------------------------------------------------------
# Salt's data filters (template.py registers them; each gives data, never template text)

def _flags(ignorecase, multiline) -> int:
    return (re.I if ignorecase else 0) | (re.M if multiline else 0)


def _compiled(what: str, pattern, flags: int) -> re.Pattern:
    try:
        return re.compile(str(pattern), flags)
    except re.error as exc:
        raise TemplateRefusal(f"{what}: {str(pattern)!r} is not a regular expression: {exc}") from None


# The most text a regular expression filter looks at: Python's `re` cannot be stopped, and a
# pattern that backtracks takes time growing fast with the text, which may be a node's (a fact, a
# stage's result): the master would stop for as long.
MAX_REGEX_TEXT = 16 * 1024


def _text(value, what: str | None = None) -> str:
    """``value`` as the text it stands for: a value a state file put in it printed (not its token)."""
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined: the error, at the template's line
    from .template import _rendering  # template.py imports this module

    text = str(value)
    values = _rendering.get()
    if values is not None and values.traced(text):
        text = values.substitute(text)
    if what and len(text) > MAX_REGEX_TEXT:
        raise TemplateRefusal(f"{what}: the text is {len(text)} characters, over the {MAX_REGEX_TEXT} a regular "
                              "expression may look at here (cut it first, e.g. with `[:1000]`)")
    return text


def regex_search(txt, rgx, ignorecase=False, multiline=False):
    """Jinja filter (Salt's): the groups of the first match of ``rgx`` anywhere in ``txt``, as a
    tuple (empty, and so false, when the pattern has no groups), or None when it does not match:
    `{{ 'abcd' | regex_search('^(.*)BC(.*)$', ignorecase=True) }}` is ('a', 'd')."""
    found = _compiled("regex_search", rgx, _flags(ignorecase, multiline)).search(_text(txt, "regex_search"))
    return None if found is None else found.groups()


def regex_match(txt, rgx, ignorecase=False, multiline=False):
    """Jinja filter (Salt's): as regex_search, but ``rgx`` must match at the start of ``txt``."""
    found = _compiled("regex_match", rgx, _flags(ignorecase, multiline)).match(_text(txt, "regex_match"))
    return None if found is None else found.groups()


def regex_replace(txt, rgx, val, ignorecase=False, multiline=False) -> str:
    """Jinja filter (Salt's): ``txt`` with every match of ``rgx`` replaced by ``val`` (`\\1` for a
    group): one string value."""
    pattern = _compiled("regex_replace", rgx, _flags(ignorecase, multiline))
    try:
        return str(pattern.sub(str(val), _text(txt, "regex_replace")))
    except re.error as exc:
        raise TemplateRefusal(f"regex_replace: {str(val)!r} is not a replacement for {str(rgx)!r}: {exc}") from None


def unique(values, case_sensitive=True, attribute=None) -> list:
    """Jinja filter (Salt's): the items without repeats, in their order, as a list (Jinja's
    `case_sensitive=False` and `attribute=` are understood too)."""
    if isinstance(values, jinja2.Undefined):
        str(values)
    out, seen = [], []
    for item in values:
        key = item[attribute] if attribute is not None and isinstance(item, Mapping) else item
        if not case_sensitive and isinstance(key, str):
            key = key.lower()
        if key not in seen:
            seen.append(key)
            out.append(item)
    return out


def sequence(value):
    """Jinja filter (Salt's): a list, tuple, set or mapping as it is; anything else as a list of it."""
    return value if isinstance(value, (list, tuple, set, dict)) else [value]


def to_bool(value) -> bool:
    """Jinja filter (Salt's): None is false; text is true when it is yes, 1 or true (any case); a
    number when over 0; a list or mapping when not empty; anything else false."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str(value).lower() in ("yes", "1", "true")
    if isinstance(value, int):
        return value > 0
    if not isinstance(value, Hashable):
        return len(value) > 0
    return False


FILTERS = {"traverse": traverse, "regex_search": regex_search, "regex_match": regex_match,
           "regex_replace": regex_replace, "unique": unique, "sequence": sequence, "to_bool": to_bool}
