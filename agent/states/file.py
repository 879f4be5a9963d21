"""file: whole files, directories, single lines, marked blocks, appended text, regex replacements
and symlinks.

Every write replaces the file atomically (temp file, fsync, rename) after keeping the old version
under the agent's state dir (``/var/lib/piagent/backup/<path>.<time>``). Test mode shows a
unified diff of what would change. file.append, file.replace and file.symlink are Salt's states of
those names, with Salt's arguments, so that Salt users' state files run unchanged.

(Over 500 lines on purpose: most of it is the states' user reference, and the text editing of
file.line, file.blockreplace, file.append and file.replace -- line_spec/edit_line, replace_block,
append_text, replace_text: text in, text out -- sits next to the state it serves, as in every module.)
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from dataclasses import dataclass

from ..fileio import fsync_directory, remove_stale_temps, temp_name

from .base import (Outcome, StateContext, StateError, Text, absolute_path, format_mode, group_name, join_words,
                   lookup_owner, owner_name, parse_mode, read_text, update_file)

__states__ = ("managed", "directory", "absent", "line", "blockreplace", "append", "replace", "symlink")

DIRECTORY_MODE = 0o755
# Paths file.absent refuses: removing one would wreck the system, never what a state meant.
PROTECTED = {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/proc", "/root", "/run", "/sbin",
             "/sys", "/usr", "/var", "/boot/firmware"}


# ---------------------------------------------------------------------------------------------
# Owner and mode, shared by managed and directory

def _wanted_owner(ctx: StateContext, user, group, out: Outcome) -> tuple[int | None, int | None]:
    uid, gid, missing = lookup_owner(user, group)
    if missing:
        if not ctx.test:
            raise StateError(f"no {' and no '.join(missing)} on this node")
        # A package an earlier state installs may create it (the munge user comes with munge).
        out.note(f"{' and '.join(missing)} does not exist yet")
    return uid, gid


def _owner_mode_changes(st: os.stat_result | None, mode: int | None, uid: int | None, gid: int | None) -> dict:
    """What differs between the file's (or directory's) mode/owner and the wanted ones."""
    changes = {}
    if mode is not None and (st is None or stat.S_IMODE(st.st_mode) != mode):
        changes["mode"] = format_mode(mode)
    if uid is not None and (st is None or st.st_uid != uid):
        changes["user"] = owner_name(uid)
    if gid is not None and (st is None or st.st_gid != gid):
        changes["group"] = group_name(gid)
    return changes


def _apply_owner_mode(path: str, mode: int | None, uid: int | None, gid: int | None) -> None:
    try:
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            os.chmod(path, mode)  # after chown, which clears setuid/setgid
    except OSError as exc:
        raise StateError(f"cannot set owner/mode of {path}: {exc.strerror}") from None


def _parent_ready(ctx: StateContext, path: str, makedirs: bool | None, out: Outcome) -> None:
    """Make sure the parent directory exists (creating it with makedirs), or explain why not.
    ``makedirs=None``: the state has no such argument (file.line, file.blockreplace edit a file that
    must exist), so the advice is a file.directory state before it."""
    parent = os.path.dirname(path)
    if os.path.isdir(parent):
        return
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise StateError(f"{parent} exists and is not a directory")
    if not makedirs:
        advice = "a file.directory state before this one" if makedirs is None else "makedirs: true"
        if ctx.test:
            # An earlier file.directory state in the same run may create it.
            out.note(f"parent directory {parent} does not exist yet ({advice} would create it)")
            return
        raise StateError(f"parent directory {parent} does not exist ({advice} creates it)")
    if ctx.test:
        out.note(f"would create parent directory {parent}")
        return
    try:
        os.makedirs(parent, mode=DIRECTORY_MODE, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create {parent}: {exc.strerror}") from None


def _as_text(value, what: str) -> str:
    """An item of a list argument as text (the argument's own type is checked before the state runs)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise StateError(f"{what} must be text, not {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# States

def managed(ctx: StateContext, name: str, contents: Text | list[Text] | None = None, mode: str | int | None = None,
            user: str | int | None = None, group: str | int | None = None, makedirs: bool = False,
            replace: bool = True, contents_newline: bool = True) -> dict:
    """A file with the given contents, mode and owner.

    The file is replaced atomically (write a temp file, fsync, rename) and its previous version kept
    under the agent's state dir (``/var/lib/piagent/backup``). Only what differs is changed: the
    same contents with another mode gets a chmod, not a rewrite. Test mode shows a unified diff.

    Arguments:
      name: the file's absolute path (default: the state's id). A symlink is followed.
      contents: the text the file should hold; a list is joined as lines. Without contents (and
        without source) the file is created empty if missing and only its mode/owner are managed.
      source: a file whose text becomes the contents (the master reads it from the state tree):
        ``salt://a/f`` from the tree's root, a plain path beside the state file; a list of them
        means the first that exists.
      template: ``jinja`` to render ``source`` with the node's facts first (on the master);
        ``defaults:`` and then ``context:`` (mappings) are added to what the template sees.
      contents_pillar: a key of the node's pillar (``a:b``) whose text becomes the contents.
      mode: octal permissions, e.g. "0644" (unquoted, 0644 or 644, the digits are taken as
        written); a new file defaults to 0644, an existing one keeps its mode.
      user, group: owner by name or number; an existing file keeps its owner when not given.
      makedirs: create missing parent directories (0755), default false.
      replace: false to leave the contents of an existing file alone (create it only), default true.
      contents_newline: end ``contents`` with a newline if it lacks one, default true (as Salt).

    Example::

        /etc/motd:
          file.managed:
            - contents: |
                Welcome to {{ node.id }}
            - mode: "0644"
        /etc/munge/munge.key:
          file.managed:
            - source: munge.key
            - user: munge
            - group: munge
            - mode: "0400"
    """
    path = absolute_path(name)
    if contents is not None:
        if isinstance(contents, list):
            contents = "\n".join(_as_text(line, "each line of contents") for line in contents)
        else:
            contents = str(contents)
        if contents_newline and contents and not contents.endswith("\n"):
            contents += "\n"
    wanted_mode = parse_mode(mode)
    out = Outcome(ctx, name)
    uid, gid = _wanted_owner(ctx, user, group, out)
    if os.path.isdir(path):
        raise StateError(f"{path} is a directory")
    _parent_ready(ctx, path, makedirs, out)
    old = read_text(path)
    if contents is None or (old is not None and not replace):
        new = old if old is not None else ""
    else:
        new = contents
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    owner_mode = _owner_mode_changes(st, wanted_mode, uid, gid)
    if old is None:
        written = update_file(ctx, path, None, new, mode=wanted_mode, uid=uid, gid=gid)
        out.change("diff", written.get("diff", ""))
        out.change("created", True, f"create {path}", f"created {path}")
        out.update(owner_mode)
        return out.result()
    written = update_file(ctx, path, old, new, mode=wanted_mode, uid=uid, gid=gid)
    if owner_mode and not written and not ctx.test:
        _apply_owner_mode(path, wanted_mode, uid, gid)
    what = join_words([word for word, differs in (("contents", written), ("owner/mode", owner_mode)) if differs])
    out.update({**written, **owner_mode}, f"update {what} of {path}", f"updated {what} of {path}")
    return out.result(f"{path} is as wanted")


def directory(ctx: StateContext, name: str, user: str | int | None = None, group: str | int | None = None,
              mode: str | int | None = None, makedirs: bool = False) -> dict:
    """A directory, with the given mode and owner.

    Arguments:
      name: the directory's absolute path (default: the state's id).
      user, group: owner by name or number (kept when not given).
      mode: octal permissions as a string, e.g. "0755" (a new directory defaults to 0755).
      makedirs: create missing parent directories too, default false.

    Example::

        /srv/scratch:
          file.directory:
            - user: slurm
            - mode: "1777"
            - makedirs: true
    """
    path = absolute_path(name)
    wanted_mode = parse_mode(mode)
    out = Outcome(ctx, name)
    uid, gid = _wanted_owner(ctx, user, group, out)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise StateError(f"{path} exists and is not a directory")
    if os.path.isdir(path):
        changes = _owner_mode_changes(os.stat(path), wanted_mode, uid, gid)
        if changes and not ctx.test:
            _apply_owner_mode(path, wanted_mode, uid, gid)
        out.update(changes, f"update owner/mode of {path}", f"updated owner/mode of {path}")
        return out.result(f"{path} is as wanted")
    _parent_ready(ctx, path, makedirs, out)
    if not ctx.test:
        try:
            os.mkdir(path, DIRECTORY_MODE)
        except OSError as exc:
            raise StateError(f"cannot create {path}: {exc.strerror}") from None
        # mkdir's mode passes through the umask; set it exactly.
        _apply_owner_mode(path, DIRECTORY_MODE if wanted_mode is None else wanted_mode, uid, gid)
    out.change("created", True, f"create {path}", f"created {path}")
    out.update(_owner_mode_changes(None, wanted_mode, uid, gid))
    return out.result()


def absent(ctx: StateContext, name: str) -> dict:
    """No file, symlink or directory (removed with everything in it) at the path.

    A removed file's last version is kept under the agent's state dir. System directories such as
    /, /etc or /usr are refused.

    Arguments:
      name: the absolute path (default: the state's id).

    Example::

        /etc/apt/sources.list.d/old.list:
          file.absent
    """
    path = absolute_path(name)
    if path in PROTECTED:
        raise StateError(f"refusing to remove {path}")
    out = Outcome(ctx, name)
    if not os.path.lexists(path):
        return out.result(f"{path} is absent")
    is_dir = os.path.isdir(path) and not os.path.islink(path)
    out.change("removed", path, f"remove {'directory ' if is_dir else ''}{path}", f"removed {path}")
    if ctx.test:
        return out.result()
    try:
        if is_dir:
            shutil.rmtree(path)
        else:
            if os.path.isfile(path) and not os.path.islink(path):
                ctx.backup(path)
            os.unlink(path)
    except OSError as exc:
        raise StateError(f"cannot remove {path}: {exc.strerror}") from None
    return out.result()


# ---------------------------------------------------------------------------------------------
# file.line: the text editing (pure: text in, text out) apart from the file

LINE_MODES = {"ensure": "ensure", "present": "ensure", "delete": "delete", "absent": "delete"}


def _compile(pattern: Text | None, what: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(str(pattern))
    except re.error as exc:
        raise StateError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None


def _key_pattern(key: str, separator: str, commented: bool) -> re.Pattern:
    sep = separator.strip()
    # "KEY = value" and "KEY=value" are the same setting; a blank separator means whitespace.
    tail = rf"\s*{re.escape(sep)}" if sep else r"(\s|$)"
    comment = r"#+\s*" if commented else ""
    return re.compile(rf"^\s*{comment}{re.escape(key)}{tail}")


def _key_value(line: str, key: str, separator: str) -> str:
    sep = separator.strip()
    rest = line.strip()[len(key):].lstrip()
    return (rest[len(sep):] if sep else rest).strip()


@dataclass(frozen=True)
class LineSpec:
    """What a file.line state owns and wants, its arguments checked (see line_spec)."""
    op: str                         # "ensure" or "delete"
    content: str | None             # the whole line to ensure, or the exact line to delete
    match: re.Pattern | None        # the lines owned, by regular expression
    key: str | None                 # ... or by setting: KEY<separator>VALUE
    value: str | None
    separator: str
    after: re.Pattern | None        # where a new line goes
    before: re.Pattern | None

    def owns(self, body: str) -> bool:
        """Whether a line (without its end of line) is one this state owns."""
        if self.match is not None:
            return bool(self.match.search(body))
        if self.key is not None:
            if not _key_pattern(self.key, self.separator, False).match(body):
                return False
            # Deleting KEY=VALUE deletes only that setting; ensuring replaces any value of KEY.
            return self.op == "ensure" or self.value is None or _key_value(body, self.key, self.separator) == self.value
        return body.strip() == self.content.strip()


def line_spec(content: Text | None = None, match: Text | None = None, mode: str = "ensure", key: Text | None = None,
              value: Text | None = None, separator: Text = "=", after: Text | None = None,
              before: Text | None = None) -> LineSpec:
    """file.line's arguments checked and combined; a StateError says what does not fit."""
    op = LINE_MODES.get(mode)
    if op is None:
        raise StateError(f"mode must be ensure or delete (aliases present, absent), not {mode!r}")
    if key is not None and (content is not None or match is not None):
        raise StateError("give key (with value) or content/match, not both")
    separator = str(separator)
    if key is not None:
        key = str(key).strip()
        if not key or "\n" in key:
            raise StateError("key must be a non-empty single word")
        if not separator or "\n" in separator:
            raise StateError("separator must not be empty")
        if value is not None:
            value = str(value)
            content = f"{key}{separator}{value}"
        elif op == "ensure":
            raise StateError("key needs a value for mode ensure")
    if content is not None:
        content = str(content)
        if "\n" in content.rstrip("\n"):
            raise StateError("content must be a single line (use file.blockreplace for several)")
        content = content.rstrip("\n")
    if op == "ensure" and content is None:
        raise StateError("mode ensure needs content (or key and value)")
    if op == "delete" and content is None and match is None and key is None:
        raise StateError("mode delete needs content, match or key")
    return LineSpec(op, content, _compile(match, "match"), key, None if value is None else str(value), separator,
                    _compile(after, "after"), _compile(before, "before"))


def edit_line(text: str, spec: LineSpec, path: str = "the file") -> tuple[str, tuple[str, str]]:
    """``text`` with the line ensured or deleted, and the words for it: ("would" verb phrase,
    past tense). Unchanged text when it is as wanted. ``path`` only names the file in words."""
    lines = text.splitlines(keepends=True)
    bodies = [ln.rstrip("\r\n") for ln in lines]

    def eol(i: int) -> str:
        return lines[i][len(bodies[i]):] or "\n"

    hits = [i for i, body in enumerate(bodies) if spec.owns(body)]
    new_lines = list(lines)
    if spec.op == "delete":
        for i in reversed(hits):
            del new_lines[i]
        lines_word = f"{len(hits)} line{'s' * (len(hits) != 1)}"
        return "".join(new_lines), (f"delete {lines_word} from {path}", f"deleted {lines_word} from {path}")
    if hits and (spec.key is not None or spec.match is not None):
        first = hits[0]
        new_lines[first] = spec.content + eol(first)
        for i in reversed(hits[1:]):
            del new_lines[i]
        return "".join(new_lines), (f"set {spec.key or 'the matching line'} in {path}",) * 2
    if hits:
        return text, ("", "")  # the exact line is there
    commented = ([i for i, body in enumerate(bodies) if _key_pattern(spec.key, spec.separator, True).match(body)]
                 if spec.key is not None else [])
    if commented:
        new_lines[commented[0]] = spec.content + eol(commented[0])
    else:
        at = len(new_lines)
        for pattern, offset, what in ((spec.after, 1, "after"), (spec.before, 0, "before")):
            if pattern is not None:
                found = [i for i, body in enumerate(bodies) if pattern.search(body)]
                if not found:
                    raise StateError(f"no line of {path} matches {what}: {pattern.pattern!r}")
                at = found[0] + offset
                break
        if at == len(new_lines) and new_lines and not new_lines[-1].endswith("\n"):
            new_lines[-1] += "\n"
        new_lines.insert(at, spec.content + "\n")
    return "".join(new_lines), (f"add the line to {path}", f"added the line to {path}")


def line(ctx: StateContext, name: str, content: Text | None = None, match: Text | None = None,
         mode: str = "ensure", key: Text | None = None, value: Text | None = None, separator: Text = "=",
         after: Text | None = None, before: Text | None = None, create: bool = False) -> dict:
    """One line (or one key=value setting) present in, or deleted from, a file; the rest untouched.

    With ``key``/``value`` the state owns the setting, wherever it is: an existing ``KEY=...`` line
    gets the new value in place (later duplicates of the key are removed, since they would win);
    without one, a commented-out ``#KEY=...`` line is replaced in place (it sits next to its
    documentation); otherwise the line is added. With ``match`` (a regular expression) the state
    owns the lines matching it the same way. With only ``content`` the exact line is ensured.

    Arguments:
      name: the file's absolute path.
      content: the whole line (no newline), for mode ensure; for delete, the exact line to delete.
      match: a regular expression (Python ``re.search``) for the lines this state owns.
      mode: ``ensure`` (default; alias ``present``) or ``delete`` (alias ``absent``).
      key, value, separator: the setting ``KEY<separator>VALUE``, separator ``=`` by default
        (spaces around it are tolerated when matching); a separator of " " means whitespace, as in
        sshd_config. For delete, ``key`` alone deletes every setting of the key.
      after, before: regular expressions; a new line goes after/before the first line matching
        (default: at the end).
      create: create the file (0644) if missing, default false.

    Example::

        swapsize:
          file.line:
            - name: /etc/dphys-swapfile
            - key: CONF_SWAPSIZE
            - value: 0
        no-root-ssh:
          file.line:
            - name: /etc/ssh/sshd_config
            - key: PermitRootLogin
            - value: "no"
            - separator: " "
    """
    path = absolute_path(name)
    spec = line_spec(content, match, mode, key, value, separator, after, before)
    out = Outcome(ctx, name)
    old = read_text(path)
    if old is None:
        if spec.op == "delete":
            return out.result(f"{path} does not exist: nothing to delete")
        if not create:
            if ctx.test:
                # An earlier state may create it; a real run without create: true fails here.
                forecast = f"edit {path}, which does not exist yet (create: true would create it)"
                out.change("diff", f"{path} does not exist yet\n", forecast, forecast)
                return out.result()
            raise StateError(f"{path} does not exist (create: true creates it)")
        _parent_ready(ctx, path, None, out)
    new, (would, did) = edit_line(old or "", spec, path)
    out.update(update_file(ctx, path, old, new), would, did)
    return out.result(f"{path} is as wanted")


# ---------------------------------------------------------------------------------------------
# file.blockreplace: the text editing (pure) apart from the file

def replace_block(text: str, marker_start: str, marker_end: str, content: str, append: bool = False,
                  prepend: bool = False, path: str = "the file") -> tuple[str, tuple[str, str]]:
    """``text`` with the lines between the marker lines made ``content`` (markers and block added
    at the end / start when ``append`` / ``prepend`` and the markers are missing), and the words for
    it. The markers and content are checked already (see blockreplace)."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.strip().startswith(marker_start)]
    ends = [i for i, ln in enumerate(lines) if ln.strip().startswith(marker_end)]
    if len(starts) > 1 or len(ends) > 1:
        raise StateError(f"{path} has more than one {marker_start!r} / {marker_end!r} block; "
                         f"merge them by hand first")
    if starts and not (ends and ends[0] > starts[0]):
        raise StateError(f"{path} has {marker_start!r} (line {starts[0] + 1}) without {marker_end!r} after it")
    if ends and not starts:
        raise StateError(f"{path} has {marker_end!r} (line {ends[0] + 1}) without {marker_start!r} before it")
    if starts:
        start, end = starts[0], ends[0]
        new_lines = lines[:start + 1] + content.splitlines(keepends=True) + lines[end:]
        return "".join(new_lines), (f"replace the block in {path}", f"replaced the block in {path}")
    block = [marker_start + "\n"] + content.splitlines(keepends=True) + [marker_end + "\n"]
    if append:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        return "".join(lines + block), (f"append the block to {path}", f"appended the block to {path}")
    if prepend:
        return "".join(block + lines), (f"prepend the block to {path}", f"prepended the block to {path}")
    raise StateError(f"markers {marker_start!r} / {marker_end!r} not found in {path} "
                     f"(append_if_not_found: true adds the block at the end)")


def blockreplace(ctx: StateContext, name: str, marker_start: Text = "#-- start managed zone --",
                 marker_end: Text = "#-- end managed zone --", content: Text | None = "",
                 append_if_not_found: bool = False, prepend_if_not_found: bool = False) -> dict:
    """A block of lines between two marker lines, managed as a whole; the rest of the file untouched.

    For files several parties edit: a static address in ``/etc/dhcpcd.conf``, cluster entries in
    ``/etc/hosts`` or ``/etc/fstab``. The marker lines are kept as they are; everything between them
    becomes ``content``. A line counts as a marker when it starts with the marker text (after
    leading blanks).

    Arguments:
      name: the file's absolute path.
      marker_start, marker_end: the marker lines (Salt's defaults ``#-- start managed zone --`` and
        ``#-- end managed zone --``).
      content: the block's lines (a newline is added at the end if missing); "" empties the block.
      append_if_not_found / prepend_if_not_found: when the markers are not in the file, add markers
        and block at its end / start (creating the file if missing). Without either, missing markers
        are an error (as in Salt).

    Example::

        static-ip:
          file.blockreplace:
            - name: /etc/dhcpcd.conf
            - marker_start: "# BEGIN pimaster static address"
            - marker_end: "# END pimaster static address"
            - content: |
                interface eth0
                static ip_address=10.0.0.{{ node.index }}/24
            - append_if_not_found: true
    """
    path = absolute_path(name)
    marker_start = str(marker_start).strip()
    marker_end = str(marker_end).strip()
    if not marker_start or not marker_end or "\n" in marker_start + marker_end:
        raise StateError("marker_start and marker_end must be non-empty single lines")
    if marker_start.startswith(marker_end) or marker_end.startswith(marker_start):
        raise StateError("marker_start and marker_end must differ (neither a prefix of the other)")
    content = "" if content is None else str(content)
    if content and not content.endswith("\n"):
        content += "\n"
    for body in content.splitlines():
        if body.strip().startswith((marker_start, marker_end)):
            raise StateError("content must not contain a marker line")
    if append_if_not_found and prepend_if_not_found:
        raise StateError("give append_if_not_found or prepend_if_not_found, not both")

    out = Outcome(ctx, name)
    old = read_text(path)
    if old is None:
        if not (append_if_not_found or prepend_if_not_found):
            if ctx.test:
                forecast = f"edit {path}, which does not exist yet"
                out.change("diff", f"{path} does not exist yet\n", forecast, forecast)
                return out.result()
            raise StateError(f"{path} does not exist")
        _parent_ready(ctx, path, None, out)
    new, (would, did) = replace_block(old or "", marker_start, marker_end, content, append_if_not_found,
                                      prepend_if_not_found, path)
    out.update(update_file(ctx, path, old, new), would, did)
    return out.result(f"{path} is as wanted")


# ---------------------------------------------------------------------------------------------
# file.append (Salt's): the text editing (pure) apart from the file

def _chunk_key(lines: list[str], ignore_whitespace: bool) -> list[str]:
    """Lines as they are compared: with ignore_whitespace, runs of blanks count as one space, ends
    are stripped and blank lines left out (Salt matches such text whitespace-insensitively)."""
    if not ignore_whitespace:
        return [ln.rstrip("\r") for ln in lines]
    return [" ".join(ln.split()) for ln in lines if ln.strip()]


def _contains_run(haystack: list[str], needle: list[str]) -> bool:
    if not needle:
        return True
    width = len(needle)
    return any(haystack[i:i + width] == needle for i in range(len(haystack) - width + 1))


def append_text(text: str, chunks: list[str], ignore_whitespace: bool = True) -> tuple[str, list[str]]:
    """``text`` with each chunk appended (as whole lines) that is not in it yet, and the lines added.

    A chunk is there when its lines appear as consecutive whole lines of the text (compared as
    _chunk_key says); chunks appended earlier in the list count for the later ones.
    """
    lines = text.splitlines()
    added: list[str] = []
    for chunk in chunks:
        chunk_lines = chunk.splitlines()
        if _contains_run(_chunk_key(lines, ignore_whitespace), _chunk_key(chunk_lines, ignore_whitespace)):
            continue
        lines.extend(chunk_lines)
        added.extend(chunk_lines)
    if not added:
        return text, []
    if text and not text.endswith("\n"):
        text += "\n"
    return text + "".join(line + "\n" for line in added), added


def append(ctx: StateContext, name: str, text: Text | list[Text], makedirs: bool = False,
           ignore_whitespace: bool = True) -> dict:
    """Text at the end of a file, each piece appended only if the file does not have it yet (Salt's).

    ``text`` is one string or a list of them; each is looked for in the file as consecutive whole
    lines and, if missing, appended at the end (a multi-line string is one piece: all its lines
    must be there together). So a second run appends nothing. A missing file is created (0644).
    Unlike file.line, nothing is ever replaced or removed: for a setting that has a value, use
    file.line with ``key``/``value`` or file.replace.

    Arguments:
      name: the file's absolute path (default: the state's id). A symlink is followed.
      text: the line(s) to have at the end: a string (may hold several lines) or a list of strings.
      makedirs: create missing parent directories (0755) of a missing file, default false.
      ignore_whitespace: compare lines with runs of spaces/tabs as one space and blank lines left
        out, default true (as in Salt); false: the lines must be there exactly.

    Example::

        /etc/modules:
          file.append:
            - text:
              - i2c-dev
              - w1-gpio
        motd-note:
          file.append:
            - name: /etc/motd
            - text: |
                This node is managed by pimaster.
                Local changes are overwritten.
    """
    path = absolute_path(name)
    items = text if isinstance(text, list) else [text]
    chunks = [_as_text(item, "each item of text") for item in items]
    if any("\0" in chunk for chunk in chunks):
        raise StateError("text contains a NUL byte")
    if os.path.isdir(path):
        raise StateError(f"{path} is a directory")
    out = Outcome(ctx, name)
    old = read_text(path)
    if old is None:
        _parent_ready(ctx, path, makedirs, out)
    new, added = append_text(old or "", chunks, ignore_whitespace)
    lines_word = f"{len(added)} line{'s' * (len(added) != 1)}"
    if old is None:
        out.update(update_file(ctx, path, None, new), f"create {path} with {lines_word}",
                   f"created {path} with {lines_word}")
    else:
        out.update(update_file(ctx, path, old, new), f"append {lines_word} to {path}",
                   f"appended {lines_word} to {path}")
    return out.result(f"{path} has the text")


# ---------------------------------------------------------------------------------------------
# file.replace (Salt's): the text editing (pure) apart from the file

# Salt's flags are the names of Python's re flags (or their sum as a number); LOCALE is left out:
# Python refuses it for text patterns.
REGEX_FLAGS = {"A": re.A, "ASCII": re.A, "I": re.I, "IGNORECASE": re.I, "M": re.M, "MULTILINE": re.M,
               "S": re.S, "DOTALL": re.S, "X": re.X, "VERBOSE": re.X, "U": re.U, "UNICODE": re.U}


def regex_flags(flags: int | str | list[str]) -> int:
    """Salt's ``flags``: a number (8 is re.MULTILINE, Salt's default) or flag names."""
    if isinstance(flags, int) and not isinstance(flags, bool):
        if flags < 0 or flags & ~(re.A | re.I | re.M | re.S | re.X | re.U):
            raise StateError(f"flags {flags} is not a sum of re flags (IGNORECASE 2, MULTILINE 8, DOTALL 16, ...)")
        return flags
    names = [flags] if isinstance(flags, str) else flags
    value = 0
    for flag in names:
        bit = REGEX_FLAGS.get(str(flag).strip().upper().removeprefix("RE."))
        if bit is None:
            raise StateError(f"flags: {flag!r} is not one of {', '.join(sorted(n for n in REGEX_FLAGS if len(n) > 1))}")
        value |= bit
    return value


def _has_line(text: str, content: str) -> bool:
    """Whether ``content`` is in ``text`` as whole line(s): starting a line and ending one."""
    return re.search(r"(?m)^" + re.escape(content) + r"\r?$", text) is not None


def replace_text(text: str, pattern: re.Pattern, repl: str, count: int = 0, append: bool = False,
                 prepend: bool = False, not_found_content: str | None = None,
                 backslash_literal: bool = False) -> tuple[str, tuple[str, str]]:
    """``text`` with the pattern's matches replaced (Python's re.subn on the whole text), or, when
    nothing matches, the content appended/prepended as a line unless a line already holds it;
    and the words for what was done."""
    replacement = (lambda match: repl) if backslash_literal else repl
    try:
        new, found = pattern.subn(replacement, text, count=count)
    except (re.error, IndexError) as exc:
        raise StateError(f"repl {repl!r} does not fit the pattern: {exc}") from None
    if found:
        matches = f"{found} match{'es' * (found != 1)}"
        return new, (f"replace {matches}", f"replaced {matches}")
    if not (append or prepend):
        return text, ("", "")
    content = repl if not_found_content is None else not_found_content
    content = content.removesuffix("\n")
    if _has_line(text, content):
        return text, ("", "")  # added by an earlier run: what makes the state idempotent
    if prepend:
        return content + "\n" + text, ("prepend the content (the pattern is not found)",
                                       "prepended the content (the pattern is not found)")
    if text and not text.endswith("\n"):
        text += "\n"
    return text + content + "\n", ("append the content (the pattern is not found)",
                                   "appended the content (the pattern is not found)")


def replace(ctx: StateContext, name: str, pattern: Text, repl: Text, count: int = 0,
            flags: int | str | list[str] = 8, append_if_not_found: bool = False,
            prepend_if_not_found: bool = False, not_found_content: Text | None = None,
            backup: str | bool | None = None, show_changes: bool = True, ignore_if_missing: bool = False,
            backslash_literal: bool = False) -> dict:
    """Text replaced by a regular expression over the whole file (Salt's file.replace).

    The pattern is matched against the whole file's text at once (Python's ``re``; with Salt's
    default flags, MULTILINE, ``^`` and ``$`` match at each line). Every match (or the first
    ``count``) is replaced by ``repl``; when that gives the text the file has, nothing is written.
    Write the pattern so that it also matches the replaced text (``^#?PermitRootLogin .*``), or
    use ``append_if_not_found``: when nothing matches, ``not_found_content`` (default ``repl``) is
    added as a line, unless a line of the file already is exactly that -- so a second run changes
    nothing. The file is written atomically and its previous version kept under the agent's state
    dir.

    Arguments:
      name: the file's absolute path (default: the state's id). A symlink is followed.
      pattern: a Python regular expression.
      repl: the replacement; ``\\1`` and ``\\g<name>`` refer to the pattern's groups.
      count: how many matches to replace, 0 (default) for all.
      flags: Python re flags by name (a list: ``[IGNORECASE, MULTILINE]``) or as a number; default
        8 (MULTILINE), as in Salt. Giving flags replaces the default: list MULTILINE too if wanted.
      append_if_not_found / prepend_if_not_found: when the pattern matches nothing, add the content
        at the end / start of the file (not both).
      not_found_content: what to add then, default ``repl`` (give it when repl uses ``\\1``).
      backup: accepted for Salt's files, and without effect: no ``.bak`` file is made next to the
        file; pimaster keeps the previous version under /var/lib/piagent/backup whatever this says.
      show_changes: false to leave the diff out of the result (it says only that the file changed).
      ignore_if_missing: a missing file is not an error (nothing is done), default false.
      backslash_literal: take backslashes in repl literally (no group references), default false.

    Example::

        no-root-login:
          file.replace:
            - name: /etc/ssh/sshd_config
            - pattern: '^#?PermitRootLogin .*$'
            - repl: PermitRootLogin no
            - append_if_not_found: true
        gpu-memory:
          file.replace:
            - name: /boot/firmware/config.txt
            - pattern: '^gpu_mem=(\\d+)$'
            - repl: gpu_mem=16
    """
    path = absolute_path(name)
    if append_if_not_found and prepend_if_not_found:
        raise StateError("give append_if_not_found or prepend_if_not_found, not both")
    if isinstance(count, bool) or count < 0:
        raise StateError(f"count must be 0 (all) or a positive number, not {count!r}")
    compiled = _compile(pattern, "pattern")
    if compiled.pattern == "":
        raise StateError("pattern must not be empty")
    try:
        compiled = re.compile(compiled.pattern, regex_flags(flags))
    except (re.error, ValueError) as exc:
        raise StateError(f"pattern {pattern!r} with these flags is not a valid regular expression: {exc}") from None
    repl = str(repl)
    content = None if not_found_content is None else str(not_found_content)
    out = Outcome(ctx, name)
    if os.path.isdir(path):
        raise StateError(f"{path} is a directory")
    old = read_text(path)
    if old is None:
        if ignore_if_missing:
            return out.result(f"{path} does not exist: nothing to replace (ignore_if_missing)")
        if ctx.test:  # an earlier state in the same run may create it
            forecast = f"edit {path}, which does not exist yet"
            out.change("diff", f"{path} does not exist yet\n", forecast, forecast)
            return out.result()
        raise StateError(f"{path} does not exist (ignore_if_missing: true skips a missing file)")
    new, (would, did) = replace_text(old, compiled, repl, count, append_if_not_found, prepend_if_not_found,
                                     content, backslash_literal)
    changes = update_file(ctx, path, old, new)
    if changes and not show_changes:
        changes = {"diff": "(not shown: show_changes is false)\n"}
    out.update(changes, f"{would} in {path}", f"{did} in {path}")
    return out.result(f"{path} is as wanted")


# ---------------------------------------------------------------------------------------------
# file.symlink (Salt's)

def _backup_path(path: str, backupname: str) -> str:
    """Salt's backupname: a bare name goes next to the symlink; else an absolute path."""
    if "/" not in backupname:
        return os.path.join(os.path.dirname(path), backupname)
    return absolute_path(backupname, "backupname")


def make_symlink(path: str, target: str, uid: int | None, gid: int | None) -> None:
    """Point ``path`` at ``target`` whole or not at all: a link made under a temp name, owned, then
    renamed over whatever link or file is there."""
    directory, base = os.path.split(path)
    remove_stale_temps(directory, base)
    tmp = temp_name(directory, base)  # names its writer: cleaning up never takes another's
    try:
        os.symlink(target, tmp)
        if uid is not None or gid is not None:
            os.lchown(tmp, -1 if uid is None else uid, -1 if gid is None else gid)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StateError(f"cannot make the symlink {path}: {exc.strerror or exc}") from None
    fsync_directory(directory)


def symlink(ctx: StateContext, name: str, target: Text, force: bool = False, backupname: str | None = None,
            makedirs: bool = False, user: str | int | None = None, group: str | int | None = None) -> dict:
    """A symbolic link pointing at a target (Salt's file.symlink).

    A link pointing elsewhere is repointed (atomically: the new link replaces the old in one
    rename). A file or directory where the link should be is left alone and the state fails,
    unless ``backupname`` (moved there) or ``force`` (removed; a file's last version is kept
    under the agent's state dir) says what to do with it. The target need not exist.

    Arguments:
      name: the link's absolute path (default: the state's id).
      target: what it points at, exactly as given (a relative target is relative to the link's
        directory).
      force: replace a file or directory (removed with everything in it) at ``name``, and a file
        at ``backupname``; default false. System directories such as /etc are refused.
      backupname: move a file or directory at ``name`` here instead: a bare name stays in the
        same directory, or an absolute path.
      makedirs: create missing parent directories (0755), default false.
      user, group: owner of the link itself, by name or number (default: root, who makes it).

    Example::

        /usr/local/bin/python:
          file.symlink:
            - target: /usr/bin/python3
        /etc/nginx/sites-enabled/default:
          file.symlink:
            - target: ../sites-available/cluster
            - force: true
    """
    path = absolute_path(name)
    target = str(target)
    if not target or "\0" in target:
        raise StateError("target must be a non-empty path")
    out = Outcome(ctx, name)
    uid, gid = _wanted_owner(ctx, user, group, out)
    link_text = f"{path} -> {target}"
    if os.path.islink(path):
        current = os.readlink(path)
        if current == target:
            owner = _owner_mode_changes(os.lstat(path), None, uid, gid)
            if owner and not ctx.test:
                try:
                    os.lchown(path, -1 if uid is None else uid, -1 if gid is None else gid)
                except OSError as exc:
                    raise StateError(f"cannot set the owner of {path}: {exc.strerror}") from None
            out.update(owner, f"set the owner of the symlink {path}", f"set the owner of the symlink {path}")
            return out.result(f"{link_text} is as wanted")
        if not ctx.test:
            make_symlink(path, target, uid, gid)
        out.change("old", current)
        out.change("new", target, f"repoint {path} to {target} (from {current})",
                   f"repointed {path} to {target} (from {current})")
        return out.result()
    replaced_file = False  # a file that the new link replaces by its rename: removed once that is done
    if os.path.lexists(path):
        is_dir = os.path.isdir(path)
        kind = "directory" if is_dir else "file"
        if backupname is not None:
            backup = _backup_path(path, str(backupname))
            if os.path.lexists(backup):
                if not force:
                    raise StateError(f"backupname {backup} exists already (force: true replaces it)")
                if os.path.isdir(backup) and not os.path.islink(backup):
                    raise StateError(f"backupname {backup} is a directory: not replaced")
            out.change("backup", backup, f"move the {kind} {path} to {backup}", f"moved the {kind} {path} to {backup}")
            if not ctx.test:
                try:
                    os.replace(path, backup)
                except OSError as exc:
                    raise StateError(f"cannot move {path} to {backup}: {exc.strerror}") from None
        elif force:
            if path in PROTECTED:
                raise StateError(f"refusing to replace {path}")
            if not ctx.test and is_dir:
                try:
                    shutil.rmtree(path)
                except OSError as exc:
                    raise StateError(f"cannot remove {path}: {exc.strerror}") from None
            elif not ctx.test:
                ctx.backup(path)  # the link then replaces the file in one rename
                replaced_file = True
            if not replaced_file:
                out.change("removed", path, f"remove the {kind} {path}", f"removed the {kind} {path}")
        else:
            raise StateError(f"{path} is a {kind}, not a symlink (force: true replaces it; backupname: "
                             f"moves it aside)")
    else:
        _parent_ready(ctx, path, makedirs, out)
    if not ctx.test:
        try:
            make_symlink(path, target, uid, gid)
        except StateError as exc:  # what was moved or removed before stays in the result
            return out.fail(str(exc))
    if replaced_file:
        out.change("removed", path, f"remove the file {path}", f"removed the file {path}")
    out.change("new", target, f"make the symlink {link_text}", f"made the symlink {link_text}")
    out.update(_owner_mode_changes(None, None, uid, gid))
    return out.result()
