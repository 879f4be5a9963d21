"""The state tree and the errors of state files: where a state file is, what rendering may read,
and how a problem is reported.

A state file reads only inside its state tree, the directory of the file applied: `source:` (with
or without `salt://`), `include:` and Jinja's `{% include %}`, `{% import %}` and `{% from %}`
refuse anything whose real path (symlinks followed) is outside it, and anything under the
directories given as ``forbidden`` (the master's own state directory) even inside it. The
confinement itself is StateTree.refusal; template.py's loader, statefile.py's includes and
sources all ask it.

Every problem is a StateFileError naming the file, the line and the reason; `compile_for_node`
raises the whole list at once (StateFileErrors), so a person fixes a file in one go.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

STATE_SUFFIXES = (".yaml", ".yml", ".sls")


class StateFileError(Exception):
    """One problem in a state file: the file as shown, its line (None: the whole file), the reason."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        super().__init__(reason)
        self.path, self.line, self.reason = path, line, reason

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}" if self.line else f"{self.path}: {self.reason}"


class StateFileErrors(Exception):
    """Every problem found in one rendering, raised at once."""

    def __init__(self, errors: list[StateFileError]) -> None:
        super().__init__("\n".join(map(str, errors)))
        self.errors = errors


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class StateTree:
    """The directory a state file may read in, and the ones inside it it may not. Frozen: the
    Jinja environments are cached per tree."""

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


def state_tree(root: str, forbidden: tuple[str, ...] = ()) -> StateTree:
    """The tree rooted at ``root``, with ``forbidden`` directories inside it (real paths resolved once)."""
    root = os.path.abspath(root)
    return StateTree(root, os.path.realpath(root),
                     tuple((os.path.abspath(f), os.path.realpath(f)) for f in forbidden))


def display_path(path: str, root: str) -> str:
    """``path`` as messages show it: relative to the state tree, or whole when outside it."""
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def resolve_state_path(spec: str, states_dir: str | None, cwd: str | None = None) -> str:
    """The state file ``spec`` names: a path (relative to ``cwd``, the client's directory), or a bare
    name (`slurm`: slurm, slurm.yaml, … in ``cwd`` first, then in ``states_dir``, the shipped ones).

    The client's directory comes first: a person who copied the shipped files to edit their
    inventory and applies `network` from there means their copy, never the shipped example's.
    """
    path = spec if os.path.isabs(spec) or cwd is None else os.path.join(cwd, spec)
    if os.path.exists(path):
        return os.path.abspath(path)
    if os.sep not in spec:
        for directory in filter(None, (cwd, states_dir)):
            for suffix in ("",) + STATE_SUFFIXES:
                candidate = os.path.join(directory, spec + suffix)
                if os.path.isfile(candidate):
                    return os.path.abspath(candidate)
    raise StateFileError(spec, None, "no such state file" + (
        f" (nor a shipped one in {states_dir})" if states_dir and os.sep not in spec else ""))

