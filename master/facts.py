"""What the master accepts from an agent about itself: facts and the state-function catalogue.

Everything an agent sends is attacker-controlled (root on one Pi must mean nothing beyond that
Pi), so facts are checked against a schema when they arrive, before anything stores or renders
them: a hostname is an RFC 1123 name, interface names are what the kernel allows, IPs and MACs
parse, numbers are numbers, every string and list is bounded. A fact that fails is dropped (and
the reason logged by the caller); the rest are kept. A fact the schema does not know is dropped
too: a state file can only ever see the facts listed here.

``check_facts`` and ``check_catalog`` are pure functions: no I/O, testable without ZeroMQ.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, Callable

from piagent.states import TYPE_NAMES

# The whole facts map of one node, as JSON, at most: a Pi's real facts are ~2 KiB.
MAX_FACTS_BYTES = 64 * 1024
MAX_CATALOG_BYTES = 256 * 1024
# An agent's catalogue: 26 functions of at most 10 arguments today. The bounds keep checking
# it (on every enrollment, in the router loop) and suggesting names from it (difflib) cheap.
MAX_CATALOG_FUNCTIONS = 512
MAX_FUNCTION_ARGS = 64
# What every node's facts must hold for other nodes' state files to render with it (the shipped
# states read these of every node). A node without them fails only its own rendering.
REQUIRED_FACTS = ("hostname", "ips", "macs", "interfaces", "cpu_count", "memory_mb")

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"{_LABEL}(\.{_LABEL})*")
# Kernel interface names: 1-15 bytes, no '/', ':' or white space; we also refuse anything that
# is not a plain ASCII word character, dot, @ or dash, which every real name is.
IFNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,14}")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5,19}")
WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")
HEX_RE = re.compile(r"[0-9a-fA-F]{1,64}")
PATH_RE = re.compile(r"/[A-Za-z0-9._/-]{0,127}")
STATE_FUN_RE = re.compile(r"[a-z][a-z0-9_]{0,31}\.[a-z][a-z0-9_]{0,63}")
ARG_RE = re.compile(r"[a-z_][a-z0-9_]{0,63}")


class BadFact(ValueError):
    pass


def _text(value: Any, limit: int = 128) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise BadFact(f"expected printable text of at most {limit} characters")
    return value


def _matching(pattern: re.Pattern, what: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise BadFact(f"not {what}")
        return value
    return check


def _hostname(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 253 or not HOSTNAME_RE.fullmatch(value):
        raise BadFact("not an RFC 1123 host name")
    return value


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise BadFact(f"not a whole number from {low} to {high}")
        return value
    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadFact("not true or false")
    return value


# ipaddress takes any text after '%' as an IPv6 scope; a scope here is an interface name.
IP_TEXT_RE = re.compile(r"[0-9A-Fa-f:.]{2,45}(%[A-Za-z0-9_.@-]{1,15})?(/[0-9]{1,3})?")


def _ip(value: Any) -> str:
    try:
        if not isinstance(value, str) or not IP_TEXT_RE.fullmatch(value) or "/" in value:
            raise ValueError
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise BadFact(f"{str(value)[:64]!r} is not an IP address") from None


def _ip_interface(value: Any) -> str:
    try:
        if not isinstance(value, str) or not IP_TEXT_RE.fullmatch(value) or "/" not in value:
            raise ValueError
        return str(ipaddress.ip_interface(value))
    except ValueError:
        raise BadFact(f"{str(value)[:64]!r} is not an address with a prefix length") from None


def _mac(value: Any) -> str:
    if not isinstance(value, str) or not MAC_RE.fullmatch(value.lower()):
        raise BadFact(f"{str(value)[:64]!r} is not a MAC address")
    return value.lower()


def _list_of(item: Callable[[Any], Any], limit: int) -> Callable[[Any], list]:
    """A bounded list; an item that fails is left out (a tunnel's odd link address must not
    cost a node all its MACs), and check_facts reports how many were."""
    def check(value: Any) -> list:
        if not isinstance(value, list) or len(value) > limit:
            raise BadFact(f"expected a list of at most {limit} items")
        kept = []
        for v in value:
            try:
                kept.append(item(v))
            except BadFact:
                pass
        return kept
    return check


def _interface(value: Any) -> dict:
    if not isinstance(value, dict) or not set(value) <= {"name", "mac", "addresses"} or "name" not in value:
        raise BadFact("an interface is {name, mac, addresses}")
    out = {"name": _matching(IFNAME_RE, "an interface name")(value["name"])}
    try:  # tunnels and the like have link addresses that are not MACs: none, then
        out["mac"] = _mac(value.get("mac"))
    except BadFact:
        out["mac"] = None
    out["addresses"] = _list_of(_ip_interface, 64)(value.get("addresses", []))
    return out


OS_KEYS = {"ID": _matching(WORD_RE, "an os-release word"), "VERSION_ID": _matching(WORD_RE, "a version"),
           "VERSION_CODENAME": _matching(WORD_RE, "a code name"), "PRETTY_NAME": _text}


def _os(value: Any) -> dict:
    if not isinstance(value, dict) or not set(value) <= set(OS_KEYS):
        raise BadFact(f"expected a map with some of {', '.join(OS_KEYS)}")
    return {k: OS_KEYS[k](v) for k, v in value.items()}


def _boot_dir(value: Any) -> str:
    if not isinstance(value, str) or not PATH_RE.fullmatch(value) or ".." in value.split("/"):
        raise BadFact("not an absolute path")
    return value


SCHEMA: dict[str, Callable[[Any], Any]] = {
    "hostname": _hostname,
    "fqdn": _hostname,
    "machine_id": _matching(HEX_RE, "a machine id"),
    "pi_model": _text,
    "pi_serial": _matching(HEX_RE, "a Pi serial number"),
    "interfaces": _list_of(_interface, 64),
    "macs": _list_of(_mac, 64),
    "ips": _list_of(_ip, 128),
    "cpu_count": _integer(1, 4096),
    "memory_mb": _integer(0, 1 << 24),
    "os": _os,
    "arch": _matching(WORD_RE, "a Debian architecture"),
    "machine": _matching(WORD_RE, "a machine type"),
    "kernel": _matching(WORD_RE, "a kernel release"),
    "boot_dir": _boot_dir,
    "systemd": _boolean,
    "virtualization": _matching(WORD_RE, "a virtualization name"),
    "network_backend": _matching(WORD_RE, "a network backend"),
    "agent_version": _matching(WORD_RE, "a version"),
}


def _size(value: Any) -> int | None:
    """Its size as JSON, or None when it is not JSON data at all (bytes, NaN, ...)."""
    try:
        return len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        return None


def check_facts(raw: Any) -> tuple[dict, list[str]]:
    """The facts that pass the schema, and one line per fact refused (for the log)."""
    if not isinstance(raw, dict):
        return {}, ["facts are not a map"]
    size = _size(raw)
    if size is None or size > MAX_FACTS_BYTES:
        what = "not plain data" if size is None else f"{size} bytes, over the {MAX_FACTS_BYTES}-byte limit"
        return {}, [f"all facts refused: {what}"]
    facts, problems = {}, []
    for key, value in raw.items():
        check = SCHEMA.get(key)
        shown = str(key)[:40].encode("unicode_escape").decode()
        if check is None:
            problems.append(f"unknown fact {shown!r}")
            continue
        try:
            facts[key] = check(value)
        except BadFact as exc:
            problems.append(f"fact {shown!r}: {exc}")
            continue
        if isinstance(value, list) and len(facts[key]) < len(value):
            problems.append(f"fact {shown!r}: {len(value) - len(facts[key])} item(s) refused")
    return facts, problems


def missing_facts(facts: dict) -> list[str]:
    return [name for name in REQUIRED_FACTS if name not in facts]


def _types_ok(types: Any, args: set[str]) -> bool:
    """A catalogue entry's `types`: a map of its own argument names to non-empty lists of distinct
    names from TYPE_NAMES, the agent's vocabulary (so at most one list per argument, each at most
    len(TYPE_NAMES) long)."""
    return isinstance(types, dict) and all(
        isinstance(arg, str) and arg in args
        and isinstance(names, list) and names
        and all(isinstance(name, str) and name in TYPE_NAMES for name in names)
        and len(set(names)) == len(names)
        for arg, names in types.items())


def check_catalog(raw: Any) -> tuple[dict | None, str | None]:
    """An agent's catalogue of state functions ({fun: {args, required, summary, types}}), or why not.

    `types` (argument -> the names of the types it accepts) is optional: an older agent sends none,
    and then any value goes, as before."""
    if not isinstance(raw, dict) or not raw:
        return None, "the catalogue is not a map"
    size = _size(raw)
    if size is None or size > MAX_CATALOG_BYTES:
        return None, "the catalogue is too large or not plain data"
    if len(raw) > MAX_CATALOG_FUNCTIONS:
        return None, f"the catalogue names over {MAX_CATALOG_FUNCTIONS} state functions"
    out = {}
    for fun, spec in raw.items():
        if not isinstance(fun, str) or not STATE_FUN_RE.fullmatch(fun) or not isinstance(spec, dict):
            return None, f"malformed catalogue entry {str(fun)[:70]!r}"
        args, required, summary = spec.get("args"), spec.get("required", []), spec.get("summary", "")
        # Linear in the entry's size, and bounded: the router loop checks this on every enrollment.
        if not isinstance(args, list) or len(args) > MAX_FUNCTION_ARGS \
                or not all(isinstance(a, str) and ARG_RE.fullmatch(a) for a in args) \
                or not isinstance(required, list) or not all(isinstance(r, str) for r in required) \
                or len(set(args)) != len(args) or len(set(required)) != len(required) \
                or not set(required) <= set(args) \
                or not isinstance(summary, str) \
                or ("types" in spec and not _types_ok(spec["types"], set(args))):
            return None, f"malformed catalogue entry {fun!r}"
        out[fun] = {"args": args, "required": required, "summary": summary[:300]}
        if "types" in spec:
            out[fun]["types"] = {arg: list(names) for arg, names in spec["types"].items()}
    return out, None
