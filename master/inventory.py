"""The cluster inventory: `cluster.yaml` at the root of the state tree (optional).

    cluster:
      name: picluster
      subnet: 10.77.0.0/24
      gateway: 10.77.0.1
      dns: [10.77.0.1]
      time_server: node01          # a node id/hostname or an address
      name_pattern: "node{:02d}"   # for enrolled nodes the inventory does not list
      first_host: 101              # ...and their addresses, counting up from .101
      default_roles: [compute]
    nodes:
      - id: node01                 # matched by node id,
        ip: 10.77.0.11
        roles: [master, controller, nfs-server]
      - mac: "dc:a6:32:01:02:03"   # or by MAC address, or by Pi serial
        hostname: node02
        ip: 10.77.0.12
        roles: [compute]

A top-level `pillar:` is Salt's pillar for every node, deep-merged with an entry's own `pillar:`
(the entry wins): templates see it as `pillar` and `salt['pillar.get']`.

Any other key of a node entry (or of `cluster`) is passed to the templates as is. An enrolled node
that no entry matches gets the next free name and address from the pattern, and keeps them (the
master stores the assignment).

Top-level keys that steer the master itself (`ClusterSettings`, read from its cluster directory):

    apply: [network, time, slurm]  # what every node gets, in order: `pimaster apply` with no file
    auto_apply: true               # apply it to a node when its key is accepted, and re-apply to the
                                   # others what a node joining or leaving changes (default true)
    check_interval: 1h             # drift: run the list in test mode this often (default off)
    auto_correct: false            # drift: apply instead of only recording what would change
    health_interval: 30s           # how often the master records every node's health
    auto_timeout: 20m              # how long each job the master starts by itself waits for results

A node matches an entry's `mac`/`serial` by what it reported when its key was accepted (its
identity), never by what it reports now: root on one Pi must not be able to claim the
controller's entry, roles and secrets by reporting the controller's MAC. Two nodes matching one
entry is an error naming both.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

import yaml

from .statetree import StateFileError, StateTree, state_tree

INVENTORY_NAMES = ("cluster.yaml", "cluster.yml")
MATCH_KEYS = ("id", "mac", "serial")
SETTING_KEYS = ("apply", "auto_apply", "check_interval", "auto_correct", "health_interval", "auto_timeout")
# A file of the `apply:` list: a state file's name (`slurm`, `slurm.yaml`) or Salt's SLS name
# (`ntp.client`), resolved in the cluster directory.
LIST_NAME_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}\Z")
MAX_LIST_FILES = 32
# Drift checks and health sampling: not so often that they load the Pis, not so rarely they mean nothing.
MIN_CHECK_INTERVAL_S, MAX_CHECK_INTERVAL_S = 10.0, 30 * 86400.0
MIN_HEALTH_INTERVAL_S, MAX_HEALTH_INTERVAL_S = 1.0, 3600.0
DEFAULT_HEALTH_INTERVAL_S = 30.0
# How long each job the master starts by itself waits for results: a node that takes a job and never
# answers (a hung command, a hostile agent) must not hold zero touch and drift checks for an hour.
MIN_AUTO_TIMEOUT_S, MAX_AUTO_TIMEOUT_S = 60.0, 86400.0
DEFAULT_AUTO_TIMEOUT_S = 1200.0


@dataclass
class ClusterSettings:
    """What cluster.yaml tells the master to do by itself (see the module docstring)."""

    apply: list[str] = field(default_factory=list)
    auto_apply: bool = True
    check_interval: float | None = None
    auto_correct: bool = False
    health_interval: float = DEFAULT_HEALTH_INTERVAL_S
    auto_timeout: float = DEFAULT_AUTO_TIMEOUT_S


@dataclass
class Inventory:
    path: str | None = None
    cluster: dict = field(default_factory=dict)
    entries: list[dict] = field(default_factory=list)
    text: str | None = None  # as read: `role:` targets of ping and jobs resolve from the last apply's
    pillar: dict = field(default_factory=dict)  # Salt's pillar for every node (an entry's `pillar:` adds to it)
    settings: ClusterSettings = field(default_factory=ClusterSettings)

    @property
    def subnet(self) -> ipaddress.IPv4Network | None:
        value = self.cluster.get("subnet")
        return ipaddress.ip_network(value, strict=False) if value else None


def load_inventory(directory: str, tree: StateTree | None = None) -> Inventory:
    """The inventory next to the state files in ``directory``, read through ``tree`` (default: this
    file system); an empty one when there is none."""
    tree = tree or state_tree(directory)
    for name in INVENTORY_NAMES:
        path = os.path.join(directory, name)
        if tree.isfile(path) or tree.refusal(path, name):
            break
    else:
        return Inventory()
    shown = os.path.basename(path)
    refusal = tree.refusal(path, "the inventory")
    if refusal:
        raise StateFileError(shown, None, refusal)
    try:
        text = tree.read(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StateFileError(shown, None, f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_inventory(text, path)


def parse_inventory(text: str, path: str) -> Inventory:
    """The inventory in ``text`` (read from ``path``), checked; StateFileError names what is wrong."""
    shown = os.path.basename(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise StateFileError(shown, mark.line + 1 if mark else None, f"YAML syntax error: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise StateFileError(shown, 1, "the inventory is a mapping with `cluster:` and `nodes:`")
    unknown = set(data) - {"cluster", "nodes", "pillar", *SETTING_KEYS}
    if unknown:
        raise StateFileError(shown, None, f"unknown top-level key(s): {', '.join(sorted(map(str, unknown)))}")
    cluster = data.get("cluster") or {}
    entries = data.get("nodes") or []
    if not isinstance(cluster, dict):
        raise StateFileError(shown, None, "`cluster:` must be a mapping")
    if isinstance(entries, dict):  # `nodes: {node01: {...}}` reads as id -> entry
        entries = [dict(v or {}, id=k) for k, v in entries.items()]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise StateFileError(shown, None, "`nodes:` must be a list of mappings")
    pillar = data.get("pillar") or {}
    if not isinstance(pillar, dict):
        raise StateFileError(shown, None, "`pillar:` must be a mapping")
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry.get("pillar", {}), dict):
            raise StateFileError(shown, None, f"node entry {number}: pillar must be a mapping")
    inventory = Inventory(path, cluster, entries, text, pillar, parse_settings(data, text, shown))
    try:
        subnet = inventory.subnet
    except ValueError as exc:
        raise StateFileError(shown, None, f"cluster.subnet: {exc}") from None
    seen_ips: dict[str, int] = {}
    for number, entry in enumerate(entries, 1):
        if not any(k in entry for k in MATCH_KEYS):
            raise StateFileError(shown, None, f"node entry {number} has none of id, mac, serial to match a node by")
        roles = entry.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise StateFileError(shown, None, f"node entry {number}: roles must be a list of names")
        if "ip" in entry:
            try:
                ip = ipaddress.ip_address(str(entry["ip"]))
            except ValueError:
                raise StateFileError(shown, None, f"node entry {number}: {entry['ip']!r} is not an IP address") from None
            if subnet and ip not in subnet:
                raise StateFileError(shown, None, f"node entry {number}: {ip} is outside the subnet {subnet}")
            if str(ip) in seen_ips:
                raise StateFileError(shown, None, f"node entries {seen_ips[str(ip)]} and {number} share the address {ip}")
            seen_ips[str(ip)] = number
    return inventory


def _line_of(text: str, key: str) -> int | None:
    """The line of the top-level ``key:`` in ``text`` (for an error's file:line)."""
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(rf"{re.escape(key)}\s*:", line):
            return number
    return None


def _seconds(value, key: str) -> float:
    """A duration setting: seconds as a number, or `90s`, `30m`, `1h`, `7d` (`cli.parse_duration`'s forms)."""
    import argparse

    from .cli import parse_duration

    if isinstance(value, bool):
        raise ValueError(f"{key}: a duration (90s, 30m, 1h), not {value!r}")
    try:
        return parse_duration(str(value))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{key}: {exc}") from None


def parse_settings(data: dict, text: str, shown: str) -> ClusterSettings:
    """The master's own settings among ``data``'s top-level keys, checked (StateFileError with the line)."""
    settings = ClusterSettings()

    def refuse(key: str, reason: str):
        raise StateFileError(shown, _line_of(text, key), reason)

    listed = data.get("apply")
    if listed is not None:
        if isinstance(listed, str):
            listed = [listed]
        if not isinstance(listed, list) or not all(isinstance(n, str) and LIST_NAME_RE.match(n) for n in listed):
            refuse("apply", "apply: a list of state file names, e.g. [network, time, slurm]")
        if len(listed) > MAX_LIST_FILES:
            refuse("apply", f"apply: at most {MAX_LIST_FILES} state files")
        if len(set(listed)) != len(listed):
            refuse("apply", "apply: a state file is listed twice")
        settings.apply = list(listed)
    for key in ("auto_apply", "auto_correct"):
        if key in data:
            if not isinstance(data[key], bool):
                refuse(key, f"{key}: true or false, not {data[key]!r}")
            setattr(settings, key, data[key])
    for key, low, high in (("check_interval", MIN_CHECK_INTERVAL_S, MAX_CHECK_INTERVAL_S),
                           ("health_interval", MIN_HEALTH_INTERVAL_S, MAX_HEALTH_INTERVAL_S),
                           ("auto_timeout", MIN_AUTO_TIMEOUT_S, MAX_AUTO_TIMEOUT_S)):
        value = data.get(key)
        if value is None or (key == "check_interval" and value is False):
            continue  # check_interval: null/false/absent is off
        try:
            seconds = _seconds(value, key)
        except ValueError as exc:
            refuse(key, str(exc))
        if not low <= seconds <= high:
            refuse(key, f"{key}: between {low:g} s and {high / 86400 if high >= 86400 else high:g}"
                        f"{' days' if high >= 86400 else ' s'}, not {value!r}")
        setattr(settings, key, seconds)
    return settings


def _matches(entry: dict, node_id: str, identity: dict) -> bool:
    if "id" in entry and str(entry["id"]) == node_id:
        return True
    if "mac" in entry and str(entry["mac"]).lower() in [m.lower() for m in identity.get("macs", [])]:
        return True
    return bool("serial" in entry and identity.get("pi_serial")
                and str(entry["serial"]).lower() == str(identity["pi_serial"]).lower())


def _describe(entry: dict) -> str:
    return ", ".join(f"{k} {entry[k]}" for k in MATCH_KEYS if k in entry)


def resolve_nodes(inventory: Inventory, nodes: dict[str, dict], assignments: dict[str, dict],
                  identities: dict[str, dict] | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """Each node's entry (hostname, ip, roles, extra keys) and the new name/address assignments made.

    ``nodes``: node id -> facts; ``identities``: node id -> what it matches `mac`/`serial` by
    (recorded when its key was accepted; a node without one matches by id only).
    Raises StateFileError when one entry matches two nodes."""
    identities = identities or {}
    shown = os.path.basename(inventory.path) if inventory.path else "cluster.yaml"
    for number, entry in enumerate(inventory.entries, 1):
        claimants = [n for n in sorted(nodes) if _matches(entry, n, identities.get(n, {}))]
        if len(claimants) > 1:
            raise StateFileError(shown, None, f"node entry {number} ({_describe(entry)}) matches "
                                 f"{' and '.join(claimants)}: one of them is not the Pi you meant "
                                 "(`pimaster keys list`; reject the wrong key, or match by id)")
    resolved: dict[str, dict] = {}
    new_assignments: dict[str, dict] = {}
    used_names = {str(e.get("hostname") or e.get("id")) for e in inventory.entries if e.get("hostname") or e.get("id")}
    used_ips = {str(e["ip"]) for e in inventory.entries if "ip" in e}
    used_names |= {a["hostname"] for a in assignments.values()}
    used_names |= set(nodes)  # a name given to one node must not be another node's id
    # Without an inventory entry saying otherwise, a node's hostname and address come from its own
    # facts: one that another node reports too (or that is another node's id) names neither.
    reported_names = [str(f.get("hostname")) for f in nodes.values() if f.get("hostname")]
    reported_ips = [ip for f in nodes.values() for ip in set(f.get("ips", []))]
    used_ips |= {a["ip"] for a in assignments.values() if a.get("ip")}
    pattern = str(inventory.cluster.get("name_pattern", "node{:02d}"))
    subnet = inventory.subnet
    first_host = int(inventory.cluster.get("first_host", 101))
    default_roles = list(inventory.cluster.get("default_roles", []))
    for node_id in sorted(nodes):
        facts = nodes[node_id]
        entry = next((e for e in inventory.entries if _matches(e, node_id, identities.get(node_id, {}))), None)
        if entry is not None:
            item = {k: v for k, v in entry.items() if k not in ("mac", "serial")}
            item["id"] = node_id
            item.setdefault("hostname", str(entry.get("id", node_id)) if "id" in entry else node_id)
            item.setdefault("roles", [])
        elif inventory.path is None:
            hostname = facts.get("hostname", node_id)
            if hostname != node_id and (reported_names.count(hostname) > 1 or hostname in nodes):
                hostname = node_id
            item = {"id": node_id, "hostname": hostname, "roles": []}
        else:
            assigned = assignments.get(node_id)
            if assigned is None:
                # Its own id may be its name, unless that name is given to another node already.
                given = {a["hostname"] for other, a in {**assignments, **new_assignments}.items() if other != node_id}
                taken = (used_names - {node_id}) | given
                number = 1
                while pattern.format(number) in taken:
                    number += 1
                assigned = {"hostname": pattern.format(number), "ip": None}
                used_names.add(assigned["hostname"])
                if subnet is not None:
                    host = first_host
                    while str(subnet.network_address + host) in used_ips:
                        host += 1
                    assigned["ip"] = str(subnet.network_address + host)
                    used_ips.add(assigned["ip"])
                new_assignments[node_id] = assigned
            item = {"id": node_id, "hostname": assigned["hostname"], "roles": list(default_roles)}
            if assigned.get("ip"):
                item["ip"] = assigned["ip"]
        if not item.get("ip"):
            ips = [ip for ip in facts.get("ips", []) if ":" not in ip and reported_ips.count(ip) == 1
                   and ip not in used_ips]
            if ips:
                item["ip"] = ips[0]
        resolved[node_id] = item
    return resolved, new_assignments
