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
  state tree), `slsutil.merge`, `slsutil.merge_all`, `slsutil.update`, and `log.debug`/`info`/
  `warning`/`error`/`critical` (into the master's log, at debug level; they give ''). Also spelled
  `salt.pillar.get(...)`. Keys are Salt's `a:b:c` paths. `salt`, a module (`salt.pillar`) or a
  function not called is not a value: printing one is an error. Any other function (`cmd.run`, `mine.get`,
  `network.ip_addrs`...) would have to run on the node while the master renders the file, before
  anything is sent: it is refused with the file, the line and what to use instead.
- per file (`file_context`): `sls`, `slspath`, `sls_path`, `slsdotpath`, `slscolonpath`,
  `tplpath`, `tplfile`, `tpldir`, `tpldot`, with Salt's meanings.
- the filters `traverse`, `regex_search`, `regex_match`, `regex_replace`, `regex_escape`,
  `unique`, `sequence`, `to_bool`, `to_num`, `is_list`, `md5`, `sha1`, `sha256`, `sha512`,
  `base64_encode`, `base64_decode`, `union`, `intersect`, `difference`, `symmetric_difference`,
  `flatten`, `path_join`, `yaml_encode`, `yaml_dquote`, `yaml_squote`, and the test `match` (here),
  the global `raise('message')`, and `json`, `yaml`, `load_yaml`, `load_json`, `load_text`, `{% do %}`,
  `{% import_yaml %}` / `import_json` / `import_text` (template.py, which keeps values data).

Facts are hostile data (a node may lie): everything here gives values, never template or YAML
text, so a fact stays one value whatever it holds (template.py's docstring has the rules).
"""

from __future__ import annotations

import base64
import binascii
import copy
import difflib
import fnmatch
import hashlib
import functools
import json
import logging
import os
import posixpath
import re
from collections.abc import Hashable, Mapping

import jinja2
import yaml


log = logging.getLogger("pimaster")


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


class _Function:
    """`salt['pillar.get']`: the function, called with its text arguments as the text they stand
    for (a key built in a state file, `tplroot ~ ':lookup'`, holds a value's token until printed).
    A function is not a value: printed without being called, it is an error at its line."""

    def __init__(self, name: str, function) -> None:
        self._name, self._function = name, function
        if hasattr(function, "jinja_pass_arg"):  # defaults.get: Jinja passes it the context
            self.jinja_pass_arg = function.jinja_pass_arg
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        args = [_text(a) if isinstance(a, str) else a for a in args]
        kwargs = {k: _text(v) if isinstance(v, str) else v for k, v in kwargs.items()}
        return self._function(*args, **kwargs)

    def __str__(self) -> str:
        raise TemplateRefusal(f"salt[{self._name!r}] is a function, not a value: call it, "
                              f"e.g. salt[{self._name!r}](...)")

    def __repr__(self) -> str:
        return f"<salt[{self._name!r}]>"


class _SaltModule:
    """`salt.pillar` of `salt.pillar.get(...)`: its attributes are `salt['pillar.get']`, ....
    Not a value: printed, it is an error at its line."""

    def __init__(self, functions: "SaltFunctions", module: str) -> None:
        self._functions, self._module = functions, module

    def __getattr__(self, function: str):
        if function.startswith("_"):
            raise AttributeError(function)
        return self._functions[f"{self._module}.{function}"]

    def __str__(self) -> str:
        mine = [f for f in self._functions if f.startswith(self._module + ".")]
        example = mine[0] if mine else f"{self._module}.get"
        raise TemplateRefusal(f"salt.{self._module} is a module, not a value: call one of its functions, "
                              f"e.g. salt.{example}(...)")

    def __repr__(self) -> str:
        return f"<salt.{self._module}>"


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
            "slsutil.merge": slsutil_merge, "slsutil.merge_all": slsutil_merge_all,
            "slsutil.update": slsutil_update,
        }
        for level in ("debug", "info", "warning", "error", "critical"):
            self._functions[f"log.{level}"] = functools.partial(_template_log, level)

    def __getitem__(self, name):
        name = _text(name)
        function = self._functions.get(name)
        if function is None:
            raise TemplateRefusal(self._refusal(name))
        return _Function(name, function)

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

    def __str__(self) -> str:
        raise TemplateRefusal("salt is Salt's functions, not a value: call one, e.g. salt['pillar.get']('key', "
                              "default) or salt.pillar.get('key', default)")

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


def _template_log(level: str, message="", *args, **kwargs) -> str:
    """Salt's log.debug/info/warning/error/critical: the message in the master's log (at debug
    level, whatever the template's level: a node's data must not fill the master's log), and ''."""
    log.debug("template log.%s: %r", level, str(message))
    return ""


def slsutil_merge(obj_a, obj_b, strategy="smart", renderer="yaml", merge_lists=False):
    """Salt's slsutil.merge: ``obj_b`` merged into a copy of ``obj_a`` by ``strategy``: `recurse`
    (Salt's deep merge, see update; what `smart` is unless the ``renderer`` is yamlex, and what an
    unknown strategy falls back to), `overwrite` and `aggregate` (without yamlex's `!aggregate`
    marks: the top-level keys of ``obj_b`` replace those of ``obj_a``), `list` (each key of ``obj_a``
    that ``obj_b`` has too becomes the list of both values; keys only in ``obj_b`` are left out, as
    in Salt), `none` (recurse)."""
    if strategy == "smart":
        yamlex = str(renderer).split("|")[-1] == "yamlex" or str(renderer).startswith("yamlex_")
        strategy = "aggregate" if yamlex else "recurse"
    for side in (obj_a, obj_b):
        if not isinstance(side, Mapping):
            raise TemplateRefusal("slsutil.merge: both sides must be mappings (dicts)")
    if strategy == "list":
        return {k: copy.deepcopy([v, obj_b[k]] if k in obj_b else v) for k, v in obj_a.items()}
    if strategy in ("overwrite", "aggregate"):
        return copy.deepcopy({**obj_a, **obj_b})
    if strategy not in ("recurse", "none"):
        log.debug("slsutil.merge: unknown strategy %r, merged as recurse (as Salt does)", str(strategy))
    return update(copy.deepcopy(dict(obj_a)), obj_b, bool(merge_lists) and strategy != "none")


def slsutil_merge_all(lst, strategy="smart", renderer="yaml", merge_lists=False):
    """Salt's slsutil.merge_all: the mappings of ``lst`` merged in order (slsutil.merge), from {}."""
    out: dict = {}
    for obj in lst:
        out = slsutil_merge(out, obj, strategy, renderer, merge_lists)
    return out


def slsutil_update(dest, upd, recursive_update=True, merge_lists=False):
    """Salt's slsutil.update: ``upd`` merged into ``dest`` in place, which is returned: deep
    (update), or with ``recursive_update`` false each key of ``upd`` replacing dest's."""
    if not isinstance(dest, Mapping) or not isinstance(upd, Mapping):
        raise TemplateRefusal("slsutil.update: both sides must be mappings (dicts)")
    if recursive_update:
        return update(dest, upd, bool(merge_lists))
    for key, value in upd.items():
        dest[key] = copy.deepcopy(value)
    return dest


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
        return re.compile(_text(pattern), flags)
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
    from .template import printed  # template.py imports this module

    text = printed(str(value))
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


def to_num(text):
    """Jinja filter (Salt's): text that is a number as that number (int, else float), anything
    else as it is: `{{ '12' | to_num }}` is 12."""
    try:
        return int(_text(text) if isinstance(text, str) else text)
    except ValueError:
        pass
    try:
        return float(_text(text) if isinstance(text, str) else text)
    except ValueError:
        return _text(text) if isinstance(text, str) else text


def is_list(value) -> bool:
    """Jinja filter (Salt's): whether the value is a list."""
    return isinstance(value, list)


def _digest(algorithm: str):
    def digest(value) -> str:
        return hashlib.new(algorithm, _text(value).encode("utf-8")).hexdigest()
    digest.__name__ = algorithm
    digest.__doc__ = f"Jinja filter (Salt's): the {algorithm} hex digest of the text (UTF-8)."
    return digest


def base64_encode(value) -> str:
    """Jinja filter (Salt's): the text (UTF-8) in base64."""
    return base64.b64encode(_text(value).encode("utf-8")).decode("ascii")


def base64_decode(value) -> str:
    """Jinja filter (Salt's): base64 text decoded, as text (UTF-8; anything else is an error: a
    state file's values are text)."""
    try:
        return base64.b64decode(_text(value)).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        if isinstance(exc, UnicodeDecodeError):
            raise TemplateRefusal("base64_decode: the decoded bytes are not UTF-8 text") from None
        raise TemplateRefusal(f"base64_decode: not base64: {exc}") from None


def regex_escape(value) -> str:
    """Jinja filter (Salt's): the text with what is special in a regular expression escaped."""
    return re.escape(_text(value))


def _items(value, what: str) -> list:
    if isinstance(value, jinja2.Undefined):
        str(value)
    if isinstance(value, (str, Mapping)) or not hasattr(value, "__iter__"):
        raise TemplateRefusal(f"{what}: takes lists, not {type(value).__name__}")
    return list(value)


def _unique(items: list) -> list:
    out: list = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def union(lst1, lst2) -> list:
    """Jinja filter (Salt's): the items of both lists, without repeats (a list, in their order;
    Salt gives a set for tuples)."""
    return _unique(_items(lst1, "union") + _items(lst2, "union"))


def intersect(lst1, lst2) -> list:
    """Jinja filter (Salt's): the items of the first list that the second has, without repeats."""
    other = _items(lst2, "intersect")
    return _unique([item for item in _items(lst1, "intersect") if item in other])


def difference(lst1, lst2) -> list:
    """Jinja filter (Salt's): the items of the first list that the second lacks, without repeats."""
    other = _items(lst2, "difference")
    return _unique([item for item in _items(lst1, "difference") if item not in other])


def symmetric_difference(lst1, lst2) -> list:
    """Jinja filter (Salt's): the items that only one of the lists has, without repeats."""
    a, b = _items(lst1, "symmetric_difference"), _items(lst2, "symmetric_difference")
    return _unique([item for item in a if item not in b] + [item for item in b if item not in a])


def flatten(data, levels=None, preserve_nulls=False):
    """Jinja filter (Salt's): the list with the lists (any iterable but text) in it replaced by
    their items, ``levels`` deep (all, by default); None, 'None' and 'null' left out unless
    ``preserve_nulls``: `{{ [3, [4, [2]]] | flatten(levels=1) }}` is [3, 4, [2]]."""
    def flat(items, depth, inside: tuple) -> list:
        if id(items) in inside:
            raise TemplateRefusal("flatten: a list inside itself")
        out: list = []
        for item in items:
            if not preserve_nulls and (item is None or (isinstance(item, str) and item in ("None", "null"))):
                continue
            if not isinstance(item, str) and hasattr(item, "__iter__") and (depth is None or depth >= 1):
                out.extend(flat(item, None if depth is None else int(depth) - 1, inside + (id(items),)))
            else:
                out.append(item)
        return out

    try:
        return flat(_items(data, "flatten") if not isinstance(data, Mapping) else list(data), levels, ())
    except RecursionError:
        raise TemplateRefusal("flatten: nested too deeply") from None


def path_join(*parts, **kwargs) -> str:
    """Jinja filter (Salt's): the paths joined and normalised, a later absolute one appended (not
    starting over): `{{ '/etc' | path_join('/ssh', 'sshd_config') }}` is /etc/ssh/sshd_config."""
    texts = [posixpath.normpath(_text(p)) for p in parts]
    if not texts:
        return ""
    return posixpath.normpath(posixpath.join(texts[0], *(p.lstrip("/") for p in texts[1:])))


def _yaml_scalar(text: str, style: str) -> str:
    out = yaml.safe_dump(text, default_style=style, width=float("inf"), allow_unicode=True).rstrip("\n")
    return out[:-4] if out.endswith("\n...") else out


def yaml_dquote(text) -> str:
    """Jinja filter (Salt's): the text as a double-quoted YAML scalar. (template.py: in a state
    file, where a value is data already, the text itself.)"""
    return _yaml_scalar(_text(text), '"')


def yaml_squote(text) -> str:
    """Jinja filter (Salt's): the text as a single-quoted YAML scalar (template.py: in a state
    file, the text itself)."""
    return _yaml_scalar(_text(text), "'")


def yaml_scalar(value):
    """``value`` if YAML writes it as a scalar (yaml_encode takes only those), else a refusal."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    raise TemplateRefusal(f"yaml_encode: only text, numbers, true/false and none (YAML scalars), "
                          f"not a {type(value).__name__}")


def yaml_encode(value) -> str:
    """Jinja filter (Salt's): a scalar as YAML: text double-quoted, a number, true/false, null
    (template.py: in a state file, the value itself)."""
    value = yaml_scalar(value)
    if isinstance(value, str):
        return yaml_dquote(value)
    node = yaml.SafeDumper(None).represent_data(value)
    return node.value


def test_match(txt, rgx, ignorecase=False, multiline=False) -> bool:
    """Jinja test (Salt's): `{% if x is match('^node[0-9]+$') %}`: whether ``rgx`` matches at the
    start of the text."""
    return _compiled("match", rgx, _flags(ignorecase, multiline)).match(_text(txt, "match")) is not None


FILTERS = {"traverse": traverse, "regex_search": regex_search, "regex_match": regex_match,
           "regex_replace": regex_replace, "unique": unique, "sequence": sequence, "to_bool": to_bool,
           "to_num": to_num, "is_list": is_list, "md5": _digest("md5"), "sha1": _digest("sha1"),
           "sha256": _digest("sha256"), "sha512": _digest("sha512"), "base64_encode": base64_encode,
           "base64_decode": base64_decode, "regex_escape": regex_escape, "union": union,
           "intersect": intersect, "difference": difference, "symmetric_difference": symmetric_difference,
           "flatten": flatten, "path_join": path_join, "yaml_encode": yaml_encode, "yaml_dquote": yaml_dquote,
           "yaml_squote": yaml_squote}
TESTS = {"match": test_match}
