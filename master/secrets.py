"""Secrets: made once on the master, sent only inside the encrypted channel, redacted everywhere else.

A state file asks for one by name from Jinja: `{{ secret('munge.key', 1024) }}`. The value is
random hex text, created on first use in the master's state dir (`secrets/NAME`, mode 0600) and the
same for every node and every apply afterwards. Every known secret value is replaced by
`[secret NAME]` in whatever the master shows or stores (results, job history, events, --json), and
each agent is told the values its job carries so that it redacts its own logs and kept results.
"""

from __future__ import annotations

import os
import re
import secrets as random_source

from piagent.fileio import write_atomic

# \A...\Z, not ^...$ ("$" matches before a trailing newline): a name is a file name in secrets/.
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MIN_REDACT_LENGTH = 6  # shorter strings are too likely to occur by chance to be worth replacing


class SecretError(ValueError):
    pass


class SecretStore:
    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "secrets")
        self._cache: dict[str, str] = {}
        self._listed_mtime = None

    def get(self, name: str, length: int = 64) -> str:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise SecretError(f"secret name {name!r}: use letters, digits, '.', '_', '-'")
        if not isinstance(length, int) or not 16 <= length <= 65536:
            raise SecretError(f"secret {name!r}: length must be between 16 and 65536 characters")
        path = os.path.join(self.dir, name)
        try:
            with open(path, newline="") as fh:  # as written: CR LF stays, to be recognised in output
                value = fh.read().strip()
        except FileNotFoundError:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            value = random_source.token_hex((length + 1) // 2)[:length]
            write_atomic(path, value.encode(), 0o600)
        self._cache[name] = value
        return value

    def values(self) -> dict[str, str]:
        """Every secret the master holds (re-read when the directory changes)."""
        try:
            mtime = os.stat(self.dir).st_mtime_ns
        except FileNotFoundError:
            return dict(self._cache)
        if mtime != self._listed_mtime:
            for name in os.listdir(self.dir):
                if NAME_RE.match(name) and name not in self._cache:
                    try:
                        with open(os.path.join(self.dir, name), newline="") as fh:
                            self._cache[name] = fh.read().strip()
                    except OSError:
                        continue
            self._listed_mtime = mtime
        return dict(self._cache)


def _forms(secret: str) -> set[str]:
    """``secret`` as output may show it: as written; with CR LF read as LF (text mode); with its
    control characters shown as `?` and line breaks as spaces (`results.one_line`)."""
    if not any(c in secret for c in "\r\n\t\x0b\x0c"):
        return {secret}
    lf = secret.replace("\r\n", "\n")
    return {secret, lf, secret.replace("\r", "?"), lf.replace("\r", "?").replace("\n", " "),
            secret.replace("\r", "?").replace("\n", " ")}


def redact(value, secrets: dict[str, str]):
    """A copy of ``value`` (JSON-like) with every secret value replaced by `[secret NAME]`."""
    pairs = sorted({(form, n) for n, v in secrets.items() if isinstance(v, str) and len(v) >= MIN_REDACT_LENGTH
                    for form in _forms(v)}, key=lambda p: (-len(p[0]), p))
    if not pairs:
        return value

    def walk(item):
        if isinstance(item, str):
            for secret, name in pairs:
                if secret in item:
                    item = item.replace(secret, f"[secret {name}]")
            return _clipped_prefixes(item, pairs) if CLIP_MARK in item else item
        if isinstance(item, list):
            return [walk(i) for i in item]
        if isinstance(item, dict):
            return {k: walk(v) for k, v in item.items()}
        return item

    return walk(value)


# How an agent marks output it clipped (`piagent.states.base`: "[... output clipped]", "[... diff
# clipped]"): a secret may have been cut there, and its first part is left before the mark.
CLIP_MARK = " clipped]"
CLIP_RE = re.compile(r"\n\[\.\.\. [a-z]+ clipped\]")


def _clipped_prefixes(text: str, pairs) -> str:
    """``text`` with the start of a secret that an agent's clip cut in two (the text before a clip
    mark ending with a secret's first MIN_REDACT_LENGTH or more characters) replaced too."""
    pieces, last = [], 0
    for mark in CLIP_RE.finditer(text):
        head = text[last:mark.start()]
        for secret, name in pairs:
            cut = next((k for k in range(len(secret) - 1, MIN_REDACT_LENGTH - 1, -1) if head.endswith(secret[:k])), 0)
            if cut:
                head = head[:-cut] + f"[secret {name}, clipped]"
                break
        pieces.append(head + mark.group())
        last = mark.end()
    return "".join(pieces) + text[last:]


def strings_in(value):
    """Every string inside ``value`` (JSON-like: items of lists, values of maps), depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)


def string_leaves(value, minimum: int = MIN_REDACT_LENGTH) -> list[str]:
    """Every string of at least ``minimum`` characters inside ``value`` (what a sensitive state
    produced), and each of its lines of that length."""
    found: list[str] = []
    for item in strings_in(value):
        found += [line.strip() for line in item.splitlines() or [item] if len(line.strip()) >= minimum]
        if len(item) >= minimum:
            found.append(item)
    return found
