"""Which nodes a command acts on (its target), and in which batches.

A target is one line of text (as typed, as stored with a job, as a control request carries it):
terms separated by spaces, all of which a node must match (AND):

- a glob on node ids (`node0[1-4]`, `pi*`), or a comma list of them (`node01,node03`: any of them);
- `role:NAME`: the nodes whose roles in the inventory include NAME;
- `FACT=GLOB`: the nodes whose fact FACT, as their agent reported it, matches GLOB
  (`arch=arm64`, `model=*Pi 5*`, `os_codename=bookworm`; ``MATCHABLE_FACTS``);
- `!TERM`: the nodes TERM does not match (`'* !node04'`, `!role:gpu`, `!arch=armhf`).

A fact's glob may hold spaces (`model=*Pi 5*`): a word after FACT=GLOB that starts no term of
its own (role:NAME, NAME=GLOB) continues that glob, so node globs go first or are written
`id=GLOB`; quotes also group (`model="*Pi 5*"`). Node ids hold no `:`, `=`, `,` or quotes
(`piagent.config.NODE_ID_RE`). Facts come from agents
(hostile): they are matched as data only (`fnmatchcase` on their string form, the glob is the
user's), and only facts with one value (text, a number, true/false) are matchable.

`parse_target` (argparse) and `checked_target` (a control request) check the syntax, fact names
included, and keep the text; `compile_target` gives its `Target`, whose `matches` is the one
meaning of a target: `ping`, `nodes`, `jobs` (`Roster.targets`), `apply` (`jobs.select_targets`,
against the inventory it reads) and every command that acts on nodes (`resolve_target`, on the
daemon side: roles from the inventory the last apply read, facts from the store).

Batches (`--batch N|N%`) split the matched nodes into groups acted on one after the other.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import math

from .errors import ControlError

MAX_BATCH = 100_000
MAX_TARGET_TEXT = 256  # the longest target a control request may carry
ROLE_PREFIX = "role:"

# A fact a target may match: its name in a target -> (its key in the facts, the key inside that
# map, or None). `model` and `os_*` are the names people use for what the agent reports as
# `pi_model` and inside `os` (os-release); every scalar fact of `facts.SCHEMA` goes by its own name.
MATCHABLE_FACTS: dict[str, tuple[str, str | None]] = {
    "arch": ("arch", None), "model": ("pi_model", None), "pi_model": ("pi_model", None),
    "os_id": ("os", "ID"), "os_version": ("os", "VERSION_ID"), "os_codename": ("os", "VERSION_CODENAME"),
    "hostname": ("hostname", None), "fqdn": ("fqdn", None), "machine": ("machine", None),
    "kernel": ("kernel", None), "cpu_count": ("cpu_count", None), "memory_mb": ("memory_mb", None),
    "virtualization": ("virtualization", None), "network_backend": ("network_backend", None),
    "systemd": ("systemd", None),
    "boot_dir": ("boot_dir", None), "agent_version": ("agent_version", None),
    "machine_id": ("machine_id", None), "pi_serial": ("pi_serial", None),
}
# Facts that name one machine: a term on one of them picks a node only when no other node reports
# the same value (`Target.select`).
IDENTITY_FACTS = frozenset({"hostname", "fqdn", "machine_id", "pi_serial"})
# Facts with several values: not matchable (a target says which facts are, instead).
UNMATCHABLE_FACTS = {"interfaces": "a list", "macs": "a list", "ips": "a list",
                     "os": "a map (match os_id, os_version or os_codename)"}
# The longest fact value matched: the schema keeps every matchable one far shorter; anything longer
# (a store written by something else) matches no glob rather than costing time.
MAX_FACT_TEXT = 1024
SHOWN = 5  # nodes or values an explanation names, at most


class TargetError(ValueError):
    """A target that is not one: the message says why."""


def fact_names() -> str:
    """The matchable facts, for messages and help: `model (pi_model)` for an alias (its fact's own
    name, also matchable, is not listed again)."""
    aliased = {where for name, where in MATCHABLE_FACTS.items() if name != where[0]}
    return ", ".join(name if key == name else f"{name} ({key}{'.' + inner if inner else ''})"
                     for name, (key, inner) in MATCHABLE_FACTS.items() if name != key or (key, inner) not in aliased)


def fact_text(facts, name: str) -> str | None:
    """Fact ``name`` of a node (``facts``, as its agent reported them) as text to match, or None
    when the node has no such fact, or not with one value: numbers as digits, true/false."""
    key, inner = MATCHABLE_FACTS[name]
    value = facts.get(key) if isinstance(facts, dict) else None
    if inner is not None:
        value = value.get(inner) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and abs(value) < 10 ** 18:
        return str(value)
    if isinstance(value, str) and len(value) <= MAX_FACT_TEXT:
        return value
    return None


class Term:
    """One term of a target: ``kind`` `ids` (``globs``: any of them), `role` (``name``) or `fact`
    (``name`` = ``globs[0]``); ``text`` as written. (No dataclass: the CLI imports this module, and
    dataclasses costs `pimaster ping` its start-up time.)"""

    __slots__ = ("kind", "text", "name", "globs", "negated")

    def __init__(self, kind: str, text: str, name: str = "", globs: tuple[str, ...] = (),
                 negated: bool = False) -> None:
        self.kind, self.text, self.name, self.globs, self.negated = kind, text, name, globs, negated

    def __repr__(self) -> str:
        return f"Term({self.kind}, {self.text!r})"

    def matches(self, node_id: str, roles, facts) -> bool:
        return self._matches(node_id, roles, facts) != self.negated

    def _matches(self, node_id: str, roles, facts) -> bool:
        if self.kind == "ids":
            return any(fnmatch.fnmatchcase(node_id, glob) for glob in self.globs)
        if self.kind == "role":
            return self.name in roles
        value = fact_text(facts, self.name)
        return value is not None and fnmatch.fnmatchcase(value, self.globs[0])


class Target:
    """A parsed target: every node for no terms (none given, or `*`), else the nodes every term matches."""

    __slots__ = ("text", "terms")

    def __init__(self, text: str, terms: tuple[Term, ...]) -> None:
        self.text, self.terms = text, terms

    def __repr__(self) -> str:
        return f"Target({self.text!r}, {self.terms!r})"

    @property
    def needs_roles(self) -> bool:
        return any(t.kind == "role" for t in self.terms)

    @property
    def needs_facts(self) -> bool:
        return any(t.kind == "fact" for t in self.terms)

    def id_globs(self) -> tuple[str, ...] | None:
        """The globs when the target is on node ids alone (one term): ids any of them matches."""
        if len(self.terms) == 1 and self.terms[0].kind == "ids":
            return self.terms[0].globs
        return None

    def matches(self, node_id: str, roles=(), facts=None) -> bool:
        """Whether node ``node_id``, with ``roles`` (from the inventory) and ``facts`` (as its agent
        reported them), is in the target."""
        return all(term.matches(node_id, roles, facts) for term in self.terms)

    def select(self, nodes: dict[str, tuple]) -> list[str]:
        """The nodes of ``nodes`` (node id -> (roles, facts)) in the target, sorted. A fact that
        names one machine (IDENTITY_FACTS) picks a node only when no other node reports the same
        value: an agent (root on its Pi) that copies another Pi's serial or hostname must not be
        sent what was meant for that Pi."""
        shared = self.shared_identities(nodes)
        return sorted(n for n, (roles, facts) in nodes.items() if self.matches(n, roles, facts)
                      and not any(fact_text(facts, name) in values for name, values in shared.items()))

    def shared_identities(self, nodes: dict[str, tuple]) -> dict[str, set[str]]:
        """For each identity fact a term of this target matches on: the values several of
        ``nodes`` report."""
        shared: dict[str, set[str]] = {}
        for name in {t.name for t in self.terms if t.kind == "fact" and t.name in IDENTITY_FACTS and not t.negated}:
            seen: set[str] = set()
            for _roles, facts in nodes.values():
                value = fact_text(facts, name)
                if value is not None:
                    (shared.setdefault(name, set()) if value in seen else seen).add(value)
        return shared

    def explain(self, nodes: dict[str, tuple]) -> str:
        """Why no node of ``nodes`` (node id -> (roles, facts)) matches: for several terms, what each
        matches on its own; for a fact, the values the nodes reported (as data, few and short)."""
        if not nodes:
            return "no node is accepted yet"
        parts, unmatched = [], []
        shared = self.shared_identities(nodes)
        for term in self.terms:
            hits = sorted(n for n, (roles, facts) in nodes.items() if term.matches(n, roles, facts))
            claimed = [n for n in hits if fact_text(nodes[n][1], term.name) in shared.get(term.name, ())] \
                if term.kind == "fact" and not term.negated else []
            if claimed:
                parts.append(f"{term.text}: {_few(claimed)} report the same {term.name}, and a fact that names one "
                             "machine picks a node only when one node reports it (target it by id)")
                hits = [n for n in hits if n not in claimed]
                if not hits:
                    unmatched.append(term)
                    continue
            if hits:
                parts.append(f"{term.text} matches {_few(hits)}")
                continue
            unmatched.append(term)
            part = f"{term.text} matches none of the {len(nodes)} accepted" if len(self.terms) > 1 else ""
            if term.kind == "fact":
                values = sorted({v for _, facts in nodes.values() if (v := fact_text(facts, term.name)) is not None})
                seen = (f"their {term.name}: {_few([v[:40] for v in values], quote=True)}" if values
                        else f"none reported {term.name}")
                if " " in term.globs[0]:  # say how it was read: `arch=amd64 node01` is one glob
                    seen = f"{term.name} glob {term.globs[0][:60]!r}, {seen}"
                part = f"{part} ({seen})" if part else seen
            if part:
                parts.append(part)
        if len(self.terms) > 1 and not unmatched:
            parts.append("no node matches all of them")
        if any(t.kind == "fact" and " " in t.globs[0] for t in unmatched):
            parts.append("a word after FACT=GLOB that starts no term continues its glob (model=*Pi 5*): "
                         "if one was meant as a node glob, put node globs first, or write them id=GLOB")
        return "; ".join(parts)


def _few(items: list[str], quote: bool = False) -> str:
    shown = [repr(i) if quote else i for i in items[:SHOWN]]
    return ", ".join(shown) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _words(text: str) -> list[str]:
    """``text`` split at spaces outside quotes ('...' or "..."), the quotes taken away."""
    words: list[str] = []
    word, quote, started = [], None, False
    for char in text:
        if quote:
            if char == quote:
                quote = None
            else:
                word.append(char)
        elif char in "'\"":
            quote, started = char, True
        elif char.isspace():
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(char)
            started = True
    if quote:
        raise TargetError(f"{text!r}: a quote ({quote}) is not closed")
    if started:
        words.append("".join(word))
    return words


def _term(word: str) -> Term:
    name, equals, glob = word.partition("=")
    if equals and name == "id":
        word = glob  # id=GLOB: node ids, where a bare glob would continue a fact's glob
        if not word:
            raise TargetError("id= needs a glob on node ids, e.g. id=node0*")
    elif equals and ":" not in name:
        if name in UNMATCHABLE_FACTS:
            raise TargetError(f"{word!r}: fact {name} is {UNMATCHABLE_FACTS[name]}; a target matches only facts "
                              f"with one value: {fact_names()}")
        if name not in MATCHABLE_FACTS:
            raise TargetError(f"{word!r}: no fact {name!r}; a target matches these facts: {fact_names()}")
        if not glob:
            raise TargetError(f"{word!r}: {name}= needs a glob, e.g. {name}=*")
        return Term("fact", word, name, (glob,))
    if word.startswith(ROLE_PREFIX):
        if not word[len(ROLE_PREFIX):].strip():
            raise TargetError("role: needs the role's name, e.g. role:compute")
        return Term("role", word, word[len(ROLE_PREFIX):])
    if ":" in word:
        raise TargetError(f"{word!r} is not a target term: node ids hold no ':' (role:NAME for a role, "
                          "FACT=GLOB for a fact)")
    globs = tuple(word.split(","))
    if not all(globs):
        raise TargetError(f"{word!r}: an empty item in a comma list of node ids")
    return Term("ids", word, globs=globs)


@functools.lru_cache(maxsize=64)
def compile_target(text: str | None) -> Target:
    """The `Target` of ``text`` (None: every node), or TargetError saying what is wrong with it."""
    if text is None:
        return Target("*", ())
    if not text.strip():
        raise TargetError("an empty target matches no node (leave it out for every node)")
    terms: list[Term] = []
    for word in _words(text):
        if terms and terms[-1].kind == "fact" and not _starts_term(word):
            # `model=*Pi 5*`: a word that starts no term continues the fact's glob (Pi models
            # hold spaces); node globs go first, or as id=GLOB.
            last = terms.pop()
            glob = f"{last.globs[0]} {word}"
            terms.append(Term("fact", f"{last.text} {word}", last.name, (glob,), last.negated))
        elif word.startswith("!"):
            # `!node04`, `!role:gpu`, `!arch=armhf`: the nodes the term does not match.
            if word[1:] in ("", "*") or word[1:].startswith("!"):
                raise TargetError(f"{word!r}: ! leaves out the nodes of the term after it (!node04, !role:gpu, "
                                  "!arch=armhf)")
            term = _term(word[1:])
            term.text, term.negated = word, True
            terms.append(term)
        elif word != "*":
            terms.append(_term(word))
    return Target(text, tuple(terms))


def _starts_term(word: str) -> bool:
    """Whether ``word`` begins a term of its own: role:NAME, NAME=GLOB or !TERM (an id glob alone
    does not, after a fact: it continues that fact's glob)."""
    if word.startswith("!"):  # a negated term of any kind (no Pi model has a word starting with !)
        return True
    name, equals, _glob = word.partition("=")
    return word.startswith(ROLE_PREFIX) or bool(equals) and not any(c in name for c in "*?[")


def parse_target(text: str) -> str:
    """The argparse type of a target: its text, checked (the syntax and the fact names)."""
    if len(text) > MAX_TARGET_TEXT:
        raise argparse.ArgumentTypeError(f"a target is at most {MAX_TARGET_TEXT} characters")
    try:
        compile_target(text)
    except TargetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def checked_target(target) -> str:
    """A target as a control request carried it (from any client: checked again), or ControlError."""
    if not isinstance(target, str) or len(target) > MAX_TARGET_TEXT:
        raise ControlError(f"target: text (node ids, role:NAME, FACT=GLOB), at most {MAX_TARGET_TEXT} characters")
    try:
        return parse_target(target)
    except argparse.ArgumentTypeError as exc:
        raise ControlError(str(exc)) from None


def target_matches(target: str | None, node_id: str, roles=(), facts=None) -> bool:
    """Whether node ``node_id`` (its ``roles`` from the inventory, its ``facts`` as reported) is in
    ``target``: every node for none or `*`. Raises TargetError for a malformed one."""
    return compile_target(target).matches(node_id, roles, facts)


def parse_batch(text: str) -> str:
    """The argparse type of `--batch`: a number of nodes (`2`) or a share of them (`25%`)."""
    text = text.strip()
    number = text[:-1] if text.endswith("%") else text
    try:
        value = int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a batch size: a number of nodes (2) or a share (25%)") from None
    if value < 1 or (text.endswith("%") and value > 100) or value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"{text!r}: a batch is at least one node"
                                         + (", and at most 100%" if text.endswith("%") else ""))
    return f"{value}%" if text.endswith("%") else str(value)


def checked_batch(batch) -> str | None:
    """A `--batch` as a control request carried it (from any client: checked again), or ControlError."""
    if batch is None:
        return None
    if not isinstance(batch, (str, int)) or isinstance(batch, bool):
        raise ControlError("batch: a number of nodes (2) or a share of them (25%)")
    try:
        return parse_batch(str(batch))
    except argparse.ArgumentTypeError as exc:
        raise ControlError(str(exc)) from None


def batch_size(batch: str | None, total: int) -> int:
    """Nodes per batch for ``total`` nodes: all of them for none; a share rounds up (at least 1)."""
    if not batch or total == 0:
        return max(total, 1)
    if batch.endswith("%"):
        return max(1, math.ceil(total * int(batch[:-1]) / 100))
    return int(batch)


def batches(nodes: list[str], batch: str | None) -> list[list[str]]:
    """``nodes`` in batches of `batch_size`, in their order."""
    size = batch_size(batch, len(nodes))
    return [nodes[i:i + size] for i in range(0, len(nodes), size)]


async def target_nodes(master, target: str | None) -> tuple[list[str], Target, dict[str, tuple]]:
    """The accepted nodes in ``target`` (checked: ControlError when malformed), sorted; its `Target`;
    and what it was matched against, node id -> (roles, facts), for `Target.explain`. Roles come
    from the inventory the last apply read (`commands.ping.node_roles`, only for a `role:` term:
    refused when there is none), facts from the store (as the agents last reported them)."""
    if target is not None:
        target = checked_target(target)
    compiled = compile_target(target)
    roles: dict[str, list[str]] = {}
    facts: dict[str, dict] = {}
    if compiled.needs_roles:
        from .commands.ping import node_roles

        roles = await node_roles(master)
    if compiled.needs_facts:
        facts = node_facts(master)
    nodes = master.roster.targets(target, roles, facts)
    accepted = {n: (roles.get(n, ()), facts.get(n)) for n in master.roster.accepted_nodes()}
    return nodes, compiled, accepted


def node_facts(master) -> dict[str, dict]:
    """Accepted node id -> its facts, as its agent last reported them (checked by `facts.SCHEMA`)."""
    accepted = master.roster.accepted_nodes()
    return {n["node_id"]: n["facts"] for n in master.store.nodes() if n["node_id"] in accepted}


def no_match(target: str | None, compiled: Target, accepted: dict[str, tuple]) -> str:
    """The error for a target that matches no accepted node, and why (`Target.explain`)."""
    why = compiled.explain(accepted) if compiled.terms or not accepted else ""
    if not why:
        return f"no accepted node matches {target or '*'}"
    return f"no accepted node matches {target or '*'}" + (f": {why}" if len(compiled.terms) > 1 else f" ({why})")


async def resolve_target(master, target: str | None) -> list[str]:
    """The accepted nodes in ``target`` (None: every one), sorted; ControlError when it is malformed
    or matches no node (a target that matches nothing is a mistake, never an empty success)."""
    nodes, compiled, accepted = await target_nodes(master, target)
    if not nodes:
        raise ControlError(no_match(target, compiled, accepted))
    return nodes
