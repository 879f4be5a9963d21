"""The state tree and the errors of state files: where a state file is, what rendering may read,
and how a problem is reported.

A state file reads only inside its state tree, the directory of the file applied: `source:` (with
or without `salt://`), `include:`, `cluster.yaml` and Jinja's `{% include %}`, `{% import %}` and
`{% from %}` refuse anything whose real path (symlinks followed) is outside it, and anything under
the directories given as ``forbidden`` (the master's own state directory) even inside it. Every
read goes through a StateTree (``refusal``, ``isfile``, ``read``): template.py's loader,
statefile.py's includes and sources and inventory.py all ask it.

`pimaster apply` resolves the file where it runs (``resolve_state_path``, in its own file
system) and serves the tree to the master over its control connection (``serve_tree_file`` with
the client's LocalTree); the master renders from a ClientTree that asks for each file once. So
the path a person types means what it means in their shell, wherever the master runs.

Every problem is a StateFileError naming the file, the line and the reason; `compile_for_node`
raises the whole list at once (StateFileErrors), so a person fixes a file in one go.
"""

from __future__ import annotations

import abc
import os
import posixpath
import stat
import threading
import time

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


# What one apply may read of a state tree the client serves: a file is at most what a job message
# to a node can carry; all of them together, and how many paths are asked about, bounded too.
MAX_TREE_FILE_BYTES = 16 * 1024 * 1024
MAX_TREE_BYTES = 64 * 1024 * 1024
MAX_TREE_LOOKUPS = 20000
# How long one apply may wait for its client's answers, all of them together: a client that
# answers slowly (or never) holds only its own apply, and only this long.
MAX_TREE_WAIT_S = 120.0


def _clean(path: str) -> str:
    """An absolute path, normalised; POSIX keeps a leading `//`, which would slip past prefix checks."""
    return "/" + posixpath.normpath(path).lstrip("/")


class TreeFileMissing(OSError):
    """A path the tree has no regular file at."""


class StateTree(abc.ABC):
    """Where a state file may read, and the reading: ``refusal`` (why a path may not be read),
    ``isfile``, ``read`` (bytes; OSError when there is nothing to read) and ``version`` (what tells
    the template cache a file changed). Paths are absolute and normalised, in the file system of
    whoever holds the files.

    One tree serves one apply: its Jinja environments (compiled templates) are kept on it
    (``envs``), so rendering one file for 200 nodes compiles it once."""

    root: str  # as shown

    def __init__(self) -> None:
        self.envs: dict = {}

    @abc.abstractmethod
    def refusal(self, path: str, what: str) -> str | None:
        """Why ``path`` may not be read (``what`` names it in the message), or None."""

    @abc.abstractmethod
    def isfile(self, path: str) -> bool:
        """Whether a file is at ``path`` (one that cannot be read counts: reading it says why)."""

    @abc.abstractmethod
    def read(self, path: str) -> bytes:
        """The file's bytes; OSError when there is none to read (TreeFileMissing: no file there)."""

    def version(self, path: str):
        return None

    def release(self) -> None:
        """Drops the compiled templates (the environments hold the tree: freed now, not at the
        next full garbage collection)."""
        self.envs.clear()


class LocalTree(StateTree):
    """A tree in this process's file system: ``root`` and, inside it, the ``forbidden`` directories
    (the master's state directory) nothing is read from. A path's real path (symlinks followed)
    decides."""

    def __init__(self, root: str, forbidden: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.real = os.path.realpath(self.root)
        self.forbidden = tuple((os.path.abspath(f), os.path.realpath(f)) for f in forbidden)

    def where(self, path: str) -> tuple[str, str] | None:
        """None when ``path`` may be read; else ("outside", root) or ("forbidden", the directory)."""
        real = os.path.realpath(path)
        if not _under(real, self.real):
            return ("outside", self.root)
        for shown, directory in self.forbidden:
            if _under(real, directory):
                return ("forbidden", shown)
        return None

    def refusal(self, path: str, what: str) -> str | None:
        return refusal_text(self.where(path), what)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def read(self, path: str) -> bytes:
        with open(os.path.realpath(path), "rb") as fh:
            return fh.read()

    def version(self, path: str):
        try:
            return os.path.realpath(path), os.path.getmtime(path)
        except OSError:
            return None


def refusal_text(where: tuple[str, str] | None, what: str) -> str | None:
    if where is None:
        return None
    kind, directory = where
    if kind == "outside":
        return f"{what} is outside the state tree {directory}"
    return f"{what} is in {directory}, which state files may not read"


def state_tree(root: str, forbidden: tuple[str, ...] = ()) -> LocalTree:
    """The tree rooted at ``root`` in this file system, with ``forbidden`` directories inside it."""
    return LocalTree(root, forbidden)


class ClientTree(StateTree):
    """The state tree of the `pimaster apply` that asked for this job, read through its connection:
    the client may see another file system than the master (the lab's node01, a PrivateTmp=
    service, another host's mount), so the client resolves paths and checks them against its tree
    (``answer``), and sends what a rendering reads, when it reads it.

    ``ask(path) -> (answer, data)`` is blocking (rendering runs in a thread). Each path is asked
    once and kept, so every node of the job renders the same files, and a later stage still has
    them when the client has gone (a file only a later stage reads then fails to render, saying
    why). Bounded: MAX_TREE_FILE_BYTES a file, MAX_TREE_BYTES in all, MAX_TREE_LOOKUPS paths,
    MAX_TREE_WAIT_S of waiting for the client in all. ``release`` drops what was read (the apply's
    end)."""

    def __init__(self, root: str, ask, forbidden: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.root = _clean(root)
        self.ask = ask
        self.forbidden = tuple(_clean(f) for f in forbidden)
        self.answers: dict[str, tuple[dict, bytes]] = {}
        self.total = 0
        self.waited = 0.0
        self.lock = threading.Lock()

    def release(self) -> None:
        """Drops the files and compiled templates (they hold the tree: freed now, not at the next
        full garbage collection)."""
        with self.lock:
            self.answers.clear()
            self.envs.clear()

    def _lookup(self, path: str) -> tuple[dict, bytes]:
        path = _clean(path)
        with self.lock:
            if path in self.answers:
                return self.answers[path]
            if len(self.answers) >= MAX_TREE_LOOKUPS:  # not kept: the count is the bound
                return {"kind": "error", "why": f"more than {MAX_TREE_LOOKUPS} paths looked up in one apply"}, b""
            # The client checks real paths (symlinks followed) in its file system; these, the
            # obvious ones, whatever the client answers.
            forbidden = next((f for f in self.forbidden if _under(path, f)), None)
            if not _under(path, self.root):
                found: tuple[dict, bytes] = ({"kind": "refused", "why": "outside", "dir": self.root}, b"")
            elif forbidden:
                found = ({"kind": "refused", "why": "forbidden", "dir": forbidden}, b"")
            elif self.total >= MAX_TREE_BYTES:
                found = ({"kind": "error", "why": f"the files one apply reads are limited to {MAX_TREE_BYTES >> 20} MiB"}, b"")
            elif self.waited >= MAX_TREE_WAIT_S:
                found = ({"kind": "error", "why": f"the `pimaster apply` serving the state tree took over "
                                                  f"{MAX_TREE_WAIT_S:.0f} s to answer"}, b"")
            else:
                started = time.monotonic()
                try:
                    found = self.ask(path, MAX_TREE_WAIT_S - self.waited)
                except Exception as exc:  # the client gone, or no answer in time: this path fails
                    found = ({"kind": "error", "why": f"the `pimaster apply` serving the state tree is gone ({exc})"}, b"")
                self.waited += time.monotonic() - started
                found = self._bounded(path, found)
            self.answers[path] = found
            return found

    def _bounded(self, path: str, found: tuple[dict, bytes]) -> tuple[dict, bytes]:
        answer, data = found
        if not isinstance(answer, dict) or answer.get("kind") not in ("file", "missing", "refused", "error"):
            return {"kind": "error", "why": "the client sent a malformed answer"}, b""
        if answer.get("read", path) != path:
            return {"kind": "error", "why": "the client answered another question (its stream is out of step)"}, b""
        if answer["kind"] != "file":
            return answer, b""
        if len(data) > MAX_TREE_FILE_BYTES:
            return {"kind": "error", "why": f"larger than {MAX_TREE_FILE_BYTES >> 20} MiB"}, b""
        if self.total + len(data) > MAX_TREE_BYTES:
            return {"kind": "error", "why": f"the files one apply reads are limited to {MAX_TREE_BYTES >> 20} MiB"}, b""
        self.total += len(data)
        return answer, data

    def refusal(self, path: str, what: str) -> str | None:
        answer, _ = self._lookup(path)
        if answer["kind"] != "refused":
            return None
        return refusal_text(("outside" if answer.get("why") == "outside" else "forbidden", str(answer.get("dir"))), what)

    def isfile(self, path: str) -> bool:
        # A file the client cannot send (too large, unreadable) is there: reading it says why.
        return self._lookup(path)[0]["kind"] in ("file", "error")

    def read(self, path: str) -> bytes:
        answer, data = self._lookup(path)
        if answer["kind"] == "file":
            return data
        if answer["kind"] == "error":
            raise OSError(answer.get("why") or "cannot read")
        raise TreeFileMissing(f"no such file: {path}")

    def version(self, path: str):
        return 0  # what was read is kept: it does not change during the apply


def serve_tree_file(tree: LocalTree, path: str) -> tuple[dict, bytes]:
    """The client's answer to the master asking for ``path`` of ``tree``: (answer, the file's bytes).
    answer["kind"]: `file`, `missing` (no regular file there), `refused` (outside the tree, or in a
    forbidden directory: `why`, `dir`), `error` (`why`)."""
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
        return {"kind": "error", "why": "not an absolute path"}, b""
    try:
        real = os.path.realpath(path)
        where = tree.where(real)
        if where is not None:
            return {"kind": "refused", "why": where[0], "dir": where[1]}, b""
        # Only a regular file is opened: opening a FIFO or a device can block or act (a watchdog).
        if not stat.S_ISREG(os.stat(real).st_mode):
            return {"kind": "missing"}, b""
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return {"kind": "missing"}, b""
    except (OSError, ValueError) as exc:  # ValueError: a path Python refuses (unencodable)
        return {"kind": "error", "why": getattr(exc, "strerror", None) or str(exc)}, b""
    too_large = {"kind": "error", "why": f"larger than {MAX_TREE_FILE_BYTES >> 20} MiB"}
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return {"kind": "missing"}, b""
        if info.st_size > MAX_TREE_FILE_BYTES:
            return too_large, b""
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(MAX_TREE_FILE_BYTES + 1)
    except OSError as exc:
        return {"kind": "error", "why": exc.strerror or str(exc)}, b""
    finally:
        os.close(fd)
    if len(data) > MAX_TREE_FILE_BYTES:
        return too_large, b""
    return {"kind": "file", "size": len(data)}, data


def display_path(path: str, root: str) -> str:
    """``path`` as messages show it: relative to the state tree, or whole when outside it."""
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def states_dir() -> str | None:
    """Where bare names (`pimaster apply slurm`) are looked up: $PIMASTER_STATES_DIR, the .deb's
    /usr/share/pimaster/states, the installed package's data (pimaster/states, a pip install), then
    the source tree's states/."""
    here = os.path.dirname(os.path.realpath(__file__))
    for candidate in (os.environ.get("PIMASTER_STATES_DIR"), "/usr/share/pimaster/states",
                      os.path.join(here, "states"), os.path.join(os.path.dirname(here), "states")):
        if candidate and os.path.isdir(candidate):
            return candidate
    return None


# Files that mark the root of a state tree: the inventory, or Salt's top file.
TREE_MARKERS = ("cluster.yaml", "cluster.yml", "top.sls")
# An SLS name's file: Salt's own suffix first.
SLS_SUFFIXES = (".sls", ".yaml", ".yml")


def sls_paths(name: str) -> list[str]:
    """The paths (relative to the tree's root) Salt's SLS name ``name`` may be:
    `ntp.client` -> ntp/client.sls (.yaml, .yml), then ntp/client/init.sls (…)."""
    base = name.replace(".", "/")
    return [base + s for s in SLS_SUFFIXES] + [f"{base}/init{s}" for s in SLS_SUFFIXES]


def sls_name(path: str, root: str) -> str:
    """Salt's SLS name of the state file ``path`` in the tree at ``root``: ntp/client.sls ->
    `ntp.client`, ntp/init.sls -> `ntp`."""
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    for suffix in SLS_SUFFIXES:
        if rel.endswith(suffix):
            rel = rel[:-len(suffix)]
            break
    if rel.endswith("/init"):  # a directory's init.sls is the directory (a root-level init.sls is `init`)
        rel = rel[:-len("/init")]
    return rel.replace("/", ".")


def tree_root(directory: str) -> str:
    """The state tree a file in ``directory`` belongs to: the nearest directory, itself or above,
    holding a cluster.yaml or a top.sls; else ``directory`` itself (a single file is its own tree)."""
    start = current = os.path.abspath(directory)
    while True:
        if any(os.path.isfile(os.path.join(current, marker)) for marker in TREE_MARKERS):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return start
        current = parent


def _state_file_in(directory: str, name: str) -> str | None:
    """``name`` in ``directory``: as given, with a suffix, or as an SLS name (a/b.sls, a/b/init.sls)."""
    for rel in [name + suffix for suffix in ("",) + STATE_SUFFIXES] + sls_paths(name):
        candidate = os.path.join(directory, rel)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None


def resolve_state_file(spec: str, states_dir: str | None, cwd: str | None = None,
                       tree: str | None = None) -> tuple[str, str]:
    """The state file ``spec`` names and the root of its state tree, as (path, root).

    ``spec`` is a path (relative to ``cwd``, the client's directory; a directory means its
    init.sls), or a name: in ``tree`` when one is given (`ntp`, `ntp.client`: Salt's SLS names,
    or a file name with or without its suffix), else in ``cwd`` first, then in ``states_dir`` (the
    shipped ones). The root is ``tree``; else, for a name, the directory it was found in; for a
    path, the nearest directory above it holding a cluster.yaml or top.sls, else its own directory.

    The client's directory comes first: a person who copied the shipped files to edit their
    inventory and applies `network` from there means their copy, never the shipped example's.
    """
    if tree is not None:
        tree = os.path.abspath(tree if os.path.isabs(tree) or cwd is None else os.path.join(cwd, tree))
        if not os.path.isdir(tree):
            raise StateFileError(tree, None, "--tree: no such directory")
    path = spec if os.path.isabs(spec) or cwd is None else os.path.join(cwd, spec)
    if os.path.isdir(path):  # a directory means its init.sls, as an SLS name does
        path = _state_file_in(path, "init") or path
    if os.path.isfile(path) and os.path.basename(path) == "top.sls":
        raise StateFileError(spec, None, "Salt's top file, which pimaster does not read: apply an SLS that "
                                         "includes what it lists (`include: [ntp, users]`)")
    if os.path.isfile(path):
        path = os.path.abspath(path)
        root = tree or tree_root(os.path.dirname(path))
        if not _under(os.path.realpath(path), os.path.realpath(root)):
            raise StateFileError(spec, None, f"is outside the state tree {root}")
        return path, root
    if os.sep not in spec:  # a name: a directory of that name without an init.sls (`time/`) hides nothing
        for directory in [tree] if tree else filter(None, (cwd, states_dir)):
            found = _state_file_in(directory, spec)
            if found:
                return found, directory
    if os.path.isdir(path):
        raise StateFileError(spec, None, "is a directory, not a state file (nor one holding an init.sls)")
    if tree:
        raise StateFileError(spec, None, f"no such state file, nor an SLS of that name in the state tree {tree}")
    raise StateFileError(spec, None, "no such state file" + (
        f" (nor a shipped one in {states_dir})" if states_dir and os.sep not in spec else ""))


def resolve_state_path(spec: str, states_dir: str | None, cwd: str | None = None) -> str:
    """The state file ``spec`` names (``resolve_state_file`` without its tree)."""
    return resolve_state_file(spec, states_dir, cwd)[0]
