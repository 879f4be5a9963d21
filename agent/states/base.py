"""What every state module uses: the context a state runs in, and the result shape.

Result shape (Salt's): ``{"name": str, "result": True|False|None, "changes": dict, "comment": str}``.
``result`` is True when the system is (now) as asked, False when it could not be made so, and
None in test mode when something would change (``changes`` then says what). State functions
build it with Outcome, which keeps that rule in one place.
"""

from __future__ import annotations

import difflib
import grp
import logging
import os
import re
import pwd
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from ..fileio import ENCODING, ERRORS, copy_atomic, write_atomic

log = logging.getLogger("piagent.states")

OUTPUT_LIMIT = 64 * 1024  # captured command output kept in a result


# A state argument that is text, where a number is taken as its digits: YAML reads `value: 0`,
# `version: 1.2` or `content: 42` as numbers. (A type hint: the catalogue's "types".)
Text = str | int | float


def result(name: str, result: bool | None = True, changes: dict | None = None, comment: str = "") -> dict:
    """Salt's result shape. A state function builds its own through Outcome; this is for the rest."""
    return {"name": name, "result": result, "changes": changes or {}, "comment": comment}


def join_words(items: list[str]) -> str:
    """ "a", "a and b", "a, b and c" ("" for none)."""
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


class Outcome:
    """What a state changed -- or, in test mode, would change -- and the one comment that says so.

    A state function collects each change with the words for it, as (test mode's verb phrase, the
    past tense), then returns ``result()``::

        out = Outcome(ctx, name)
        if not is_loaded(name):
            if not ctx.test:
                ...  # modprobe; a failure: return out.fail("modprobe ... failed: ...")
            out.change("loaded", True, f"load {name}", f"loaded {name}")
        return out.result(f"{name} is loaded")

    The comment reads "would load br_netfilter" in test mode and "loaded br_netfilter" otherwise
    (several changes: "would a, b and c"), or the ``unchanged`` text when nothing changed; notes
    follow after "; ". ``result`` is True, or None in test mode when something would change: the
    rule every module follows, here once. ``before``/``after`` frame the phrases ("br_netfilter: "
    before, " chrony.service" after).
    """

    def __init__(self, ctx: StateContext, name: str, *, before: str = "", after: str = "") -> None:
        self.test, self.name, self.before, self.after = ctx.test, name, before, after
        self.changes: dict = {}
        self.notes: list[str] = []
        self._phrases: list[tuple[str, str]] = []

    def change(self, key: str, value=True, would: str = "", did: str = "") -> None:
        """One change under ``key`` in ``changes``, and its words (none: another change says it)."""
        self.changes[key] = value
        if would or did:
            self.say(would, did)

    def update(self, changes: dict, would: str = "", did: str = "") -> None:
        """Several changes at once (e.g. update_file's diff); words only if there are any."""
        if changes:
            self.changes.update(changes)
            if would or did:
                self.say(would, did)

    def say(self, would: str, did: str) -> None:
        """The words for a change: ("create /etc/motd", "created /etc/motd")."""
        if (would, did) not in self._phrases:
            self._phrases.append((would, did))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def comment(self, unchanged: str) -> str:
        if not self.changes:
            text = unchanged
        else:
            phrases = [would if self.test else did for would, did in self._phrases] or \
                      [("change " if self.test else "changed ") + ", ".join(self.changes)]
            text = self.before + ("would " if self.test else "") + join_words(phrases) + self.after
        return "; ".join(filter(None, [text] + self.notes))

    def result(self, unchanged: str = "") -> dict:
        """Salt's shape: True, or None in test mode when something would change."""
        return result(self.name, None if self.test and self.changes else True, self.changes, self.comment(unchanged))

    def fail(self, comment: str) -> dict:
        """A failure, with the changes made before it (a half-done state says what it did)."""
        return result(self.name, False, self.changes, comment)


class StateError(Exception):
    """Raised inside a state function for a clean failure: the message becomes the comment."""


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


KILL_GRACE_S = 5.0  # a command asked to end (SIGTERM) has this long before SIGKILL


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # gone already
        pass


class StopSwitch:
    """Ends a job's commands when the agent is asked to stop (SIGTERM: shutdown, `systemctl stop`).

    Each command runs in a session of its own, so its process group holds whatever it started (a
    shell's children, apt's dpkg). ``trip`` ends those groups -- SIGTERM, then SIGKILL after
    KILL_GRACE_S for what ignores it -- and from then on no command starts. ``cut_short`` counts
    the commands it ended or refused: how the engine tells which state the stop interrupted.
    Called from the agent's event loop while the job's thread runs commands, hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tripped = threading.Event()
        self._groups: set[int] = set()
        self.cut_short = 0

    @property
    def tripped(self) -> bool:
        return self._tripped.is_set()

    def trip(self) -> None:
        with self._lock:
            if self._tripped.is_set():
                return
            self._tripped.set()
            groups = list(self._groups)
            self.cut_short += len(groups)
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        if groups:
            timer = threading.Timer(KILL_GRACE_S, self._kill_remaining)
            timer.daemon = True
            timer.start()

    def _kill_remaining(self) -> None:
        with self._lock:
            groups = list(self._groups)
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)

    def refuse(self) -> bool:
        """True (and counted) when no command may start any more."""
        with self._lock:
            if self._tripped.is_set():
                self.cut_short += 1
                return True
            return False

    def started(self, proc: subprocess.Popen) -> bool:
        """Track a command just started; False when the switch tripped meanwhile (the command is
        then ended here, and counted)."""
        with self._lock:
            if not self._tripped.is_set():
                self._groups.add(proc.pid)
                return True
            self.cut_short += 1
        _signal_group(proc.pid, signal.SIGKILL)
        return False

    def ended(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._groups.discard(proc.pid)


STOPPED_RETURNCODE = 143  # 128 + SIGTERM, as a shell reports a command ended by SIGTERM
OUTPUT_GRACE_S = 2.0  # after a command ended: how long its output may still take to arrive


def _output_of_ended(proc: subprocess.Popen) -> tuple[str, str]:
    """The output of a command that has ended (or was killed), waiting at most OUTPUT_GRACE_S for
    the rest: a process it started outside its group may hold the pipes open for as long as it runs."""
    proc.wait()
    try:
        return proc.communicate(timeout=OUTPUT_GRACE_S)
    except subprocess.TimeoutExpired as exc:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        partial = [part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                   for part in (exc.stdout, exc.stderr)]
        return partial[0], partial[1] + "\n[output cut: a process the command started still holds it]"


@dataclass
class StateContext:
    test: bool = False                 # test mode: report what would change, change nothing
    state_dir: str = "/var/lib/piagent"
    watch_changed: bool = False        # a `watch` requisite changed: e.g. service.running restarts
    env: dict = field(default_factory=dict)
    stop: StopSwitch | None = None     # the job's: ends its commands when the agent stops

    @property
    def backup_dir(self) -> str:
        return os.path.join(self.state_dir, "backup")

    def run(self, argv: list[str] | str, *, shell: bool = False, env: dict | None = None,
            cwd: str | None = None, timeout: float = 3600, input: str | None = None,
            runas: str | None = None) -> CommandResult:
        """Run a command, capturing output; never raises for a non-zero exit."""
        full_env = dict(os.environ, **self.env)
        full_env.setdefault("DEBIAN_FRONTEND", "noninteractive")
        if env:
            full_env.update({str(k): str(v) for k, v in env.items()})
        if runas:
            argv = ["runuser", "-u", runas, "--"] + (["sh", "-c", argv] if shell else list(argv))
            shell = False
        if self.stop is not None and self.stop.refuse():
            return CommandResult(STOPPED_RETURNCODE, "", "not started: the agent is stopping")
        try:
            # A session (and so a process group) of its own: a timeout or the agent's stop ends the
            # command with everything it started, not only its first process.
            proc = subprocess.Popen(argv, shell=shell, env=full_env, cwd=cwd, text=True, errors="replace",
                                    stdin=subprocess.PIPE if input is not None else None,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError as exc:
            return CommandResult(127, "", f"{exc.filename}: command not found")
        tracked = self.stop is not None and self.stop.started(proc)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                # In short steps: the command may end (or be ended by the agent's stop) while a
                # process it started outside its group (setsid, a daemon) still holds its output.
                step = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
                try:
                    stdout, stderr = proc.communicate(input, timeout=step)
                    break
                except subprocess.TimeoutExpired:
                    input = None  # written once; communicate goes on reading
                if proc.poll() is not None:
                    stdout, stderr = _output_of_ended(proc)
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    _signal_group(proc.pid, signal.SIGKILL)
                    stdout, _ = _output_of_ended(proc)
                    return CommandResult(124, _clip(stdout), f"timed out after {timeout:g} s")
        except BaseException:  # e.g. Ctrl-C on `piagent state`: the command's session ends with it
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            if tracked:
                self.stop.ended(proc)
        return CommandResult(proc.returncode, _clip(stdout), _clip(stderr))

    def which(self, program: str) -> str | None:
        return shutil.which(program)

    def backup(self, path: str) -> str | None:
        """Keep the current version of ``path`` under the agent's state dir before replacing it."""
        if not os.path.isfile(path):
            return None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = os.path.join(self.backup_dir, path.lstrip("/") + f".{stamp}")
        # Several states may edit one file within a second (host.present per node on /etc/hosts):
        # each keeps its own backup, so the oldest -- the original -- is never overwritten.
        serial = 1
        while os.path.exists(target):
            serial += 1
            target = os.path.join(self.backup_dir, path.lstrip("/") + f".{stamp}.{serial}")
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        # Whole or not at all, like the file itself: an agent killed mid-copy must not leave a
        # truncated "previous version" for someone to restore (a temp name, synced, then renamed).
        name = os.path.basename(path)
        copy_atomic(path, target, family=name)
        self._prune_backups(os.path.dirname(target), name)
        return target

    KEEP_BACKUPS = 10

    def _prune_backups(self, directory: str, name: str) -> None:
        """Keep the oldest version (the file as it was before pimaster) and the newest few: an SD
        card must not fill up with old copies of a file that every apply rewrites."""
        pattern = re.compile(re.escape(name) + r"\.\d{8}T\d{6}(\.\d+)?$")
        kept = sorted((os.path.getmtime(os.path.join(directory, f)), f) for f in os.listdir(directory)
                      if pattern.match(f))
        for _, old in kept[1:-(self.KEEP_BACKUPS - 1)]:
            try:
                os.unlink(os.path.join(directory, old))
            except OSError:
                pass


def _clip(text: str | bytes | None) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text if len(text) <= OUTPUT_LIMIT else text[:OUTPUT_LIMIT] + "\n[... output clipped]"


def unified_diff(old: str, new: str, path: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                        fromfile=f"{path} (current)", tofile=f"{path} (desired)"))


# ---------------------------------------------------------------------------------------------
# Shared helpers for the state modules: files, owners and modes, argument checks, systemd.

# Files are read and written with surrogateescape, so that a byte that is not UTF-8 in a file a
# state edits (a Latin-1 comment in /etc/fstab) survives the edit unchanged.
DIFF_LIMIT = OUTPUT_LIMIT


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist. A directory or unreadable file: StateError."""
    try:
        with open(path, encoding=ENCODING, errors=ERRORS, newline="") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise StateError(f"{path} is a directory, not a file") from None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None


def diff(old: str, new: str, path: str) -> str:
    """unified_diff, clipped, and safe to send (bytes that were not UTF-8 shown as U+FFFD)."""
    if "\0" in old or "\0" in new:
        return f"Binary file {path} differs\n"
    text = unified_diff(old, new, path)
    text = text.encode(ENCODING, ERRORS).decode(ENCODING, "replace")
    return text if len(text) <= DIFF_LIMIT else text[:DIFF_LIMIT] + "\n[... diff clipped]\n"


def update_file(ctx: StateContext, path: str, old: str | None, new: str, *, mode: int | None = None,
                uid: int | None = None, gid: int | None = None) -> dict:
    """Make ``path`` hold ``new`` (``old`` is what it holds now, None: missing); the changes made.

    Nothing to do: ``{}``. Otherwise ``{"diff": ...}`` -- in test mode without writing; else after
    keeping the old version under the state dir (ctx.backup) and replacing the file atomically.
    """
    if old == new:
        return {}
    changes = {"diff": diff(old or "", new, path)}
    if not ctx.test:
        if old is not None:
            try:
                ctx.backup(path)
            except OSError as exc:  # no backup, no change: the old version must stay recoverable
                raise StateError(f"cannot keep a backup of {path} in {ctx.backup_dir}: {exc.strerror or exc}") from None
        try:
            write_atomic(path, new, mode=mode, uid=uid, gid=gid)
        except OSError as exc:
            raise StateError(f"cannot write {path}: {exc.strerror or exc}") from None
    return changes


def parse_mode(mode) -> int | None:
    """A file mode from a state: "0644", "644", "0o644" or 644 (Salt's reading: octal digits)."""
    if mode is None:
        return None
    text = str(mode).strip().lower().removeprefix("0o")
    if not text or len(text) > 4 or any(c not in "01234567" for c in text):
        raise StateError(f"mode {mode!r} is not an octal mode like \"0644\"")
    return int(text, 8)


def format_mode(mode: int) -> str:
    return f"{mode:04o}"


def lookup_owner(user=None, group=None) -> tuple[int | None, int | None, list[str]]:
    """(uid, gid, missing): ids for a user/group name or number; names that do not exist are listed.

    The caller decides: in test mode a missing user may come with a package an earlier state
    installs (the munge user with munge), in a real run it is a failure.
    """
    uid = gid = None
    missing = []
    if user is not None:
        try:
            uid = int(user) if str(user).isdigit() else pwd.getpwnam(str(user)).pw_uid
        except KeyError:
            missing.append(f"user {user!r}")
    if group is not None:
        try:
            gid = int(group) if str(group).isdigit() else grp.getgrnam(str(group)).gr_gid
        except KeyError:
            missing.append(f"group {group!r}")
    return uid, gid, missing


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def absolute_path(name, what: str = "name") -> str:
    if not isinstance(name, str) or not name.startswith("/"):
        raise StateError(f"{what} must be an absolute path, not {name!r}")
    if "\0" in name:
        raise StateError(f"{what} contains a NUL byte")
    return os.path.normpath(name)


def string_list(value, what: str, allow_empty: bool = True) -> list[str]:
    """A state argument that may be one string or a list of strings (numbers read as text)."""
    if value is None:
        return []
    items = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not all(isinstance(i, (str, int, float)) and not isinstance(i, bool)
                                              for i in items):
        raise StateError(f"{what} must be a string or a list of strings, not {value!r}")
    items = [str(i) for i in items]
    if not allow_empty and not all(i.strip() for i in items):
        raise StateError(f"{what} must not contain empty strings")
    return items


def systemd_running() -> bool:
    """True when systemd is the init system (sd_booted): /run/systemd/system exists."""
    return os.path.isdir("/run/systemd/system")


def output_tail(res: CommandResult, lines: int = 12) -> str:
    """The last lines a failed command printed, for a comment."""
    text = (res.stderr.strip() or res.stdout.strip())
    return "\n".join(text.splitlines()[-lines:])
