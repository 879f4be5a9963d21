"""Files replaced whole or not at all: the one atomic writer of master and agent.

Every file pimaster or piagent writes (keys, the pinned fingerprint, job results, managed files,
backups, /boot/firmware/piagent.conf, the lab's state) goes through ``write_atomic`` or
``copy_atomic``: a temp file in the same directory is written, fsynced, given its mode and owner,
renamed over the target, and the directory is fsynced. A write killed before its rename leaves a
temp file named ``.NAME.<origin>-<pid>-<random>.pimaster-tmp`` (ignored by ``*.conf`` readers); a
later write of the same file removes it once it is stale -- never a temp file another writer is
still writing (see remove_stale_temps).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import secrets
import shutil
import threading
import time

ENCODING, ERRORS = "utf-8", "surrogateescape"
DEFAULT_FILE_MODE = 0o644
TMP_TAG = ".pimaster-tmp"

# A left-over temp file whose writer cannot be asked whether it still runs (one on another node
# sharing the directory over NFS, as /clusterfs is; or one named before writers named themselves)
# counts as stale only when it has not been written to for this long. A write of even a large file
# takes seconds, and an hour is far beyond the clock difference of nodes kept in time by NTP (an
# NFS file's mtime is the server's clock, compared with this node's). A writer killed meanwhile
# leaves its temp file for an hour: litter, where removing a live writer's file failed its write
# ("cannot write ...: No such file or directory" when two nodes wrote one file on /clusterfs).
STALE_TEMP_AGE_S = 3600.0


def write_atomic(path: str, data: bytes | str, mode: int | None = None, uid: int | None = None,
                 gid: int | None = None) -> None:
    """Replace ``path`` with ``data`` whole or not at all, even if the process is killed mid-write.

    Mode and owner not given are kept from the existing file (a new file: 0644, owned by the
    caller); only what differs is changed, so a FAT boot partition, which refuses any chmod or
    chown it cannot represent, is written too. A symlink is followed: its target is replaced. ``str`` data is
    written as UTF-8 (bytes that were not UTF-8 when read are written back as they were).
    """
    if isinstance(data, str):
        data = data.encode(ENCODING, ERRORS)
    target = os.path.realpath(path)
    directory, base_name = os.path.split(target)
    try:
        current = os.stat(target)
    except FileNotFoundError:
        current = None
    if mode is None:
        mode = current.st_mode & 0o7777 if current else DEFAULT_FILE_MODE
    if uid is None and current:
        uid = current.st_uid
    if gid is None and current:
        gid = current.st_gid
    with _replacing(target, base_name) as tmp:
        # 0600 until complete: nobody reads a half-written secret through a looser final mode.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            st = os.fstat(fh.fileno())
            if (uid is not None and uid != st.st_uid) or (gid is not None and gid != st.st_gid):
                os.fchown(fh.fileno(), -1 if uid is None else uid, -1 if gid is None else gid)
            if os.fstat(fh.fileno()).st_mode & 0o7777 != mode:
                os.fchmod(fh.fileno(), mode)  # after chown, which clears setuid/setgid bits


def copy_atomic(source: str, target: str, family: str | None = None) -> None:
    """Copy ``source`` (data, mode, times) to ``target`` whole or not at all.

    ``family``: the base name whose left-over temp files count as stale here (default: the
    target's). Backups are ``NAME.<stamp>``, each a new name: with ``family=NAME`` a copy killed
    under an earlier stamp is cleaned up by the next backup of NAME.
    """
    with _replacing(os.path.abspath(target), family or os.path.basename(target)) as tmp:
        shutil.copy2(source, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _replacing(target: str, family: str):
    """A temp file's name next to ``target``, to be written in the ``with`` block: then renamed over
    ``target`` and the rename made durable, or, on any error, removed. Left-over temps of ``family``
    (writes killed before their rename, see remove_stale_temps) are removed first."""
    directory, base_name = os.path.split(target)
    remove_stale_temps(directory, family)
    tmp = temp_name(directory, base_name)
    with _writing_lock:
        _writing.add(os.path.basename(tmp))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        with _writing_lock:
            _writing.discard(os.path.basename(tmp))
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable: without it a power cut may undo the replace.

    Not every file system lets a directory be fsynced (vfat answers EINVAL): there the rename
    is as durable as that file system makes it.
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def remove_stale_temps(directory: str, base_name: str) -> None:
    """Remove the temp files of ``base_name`` that earlier writes left behind when they were killed
    before their rename: never one that another writer is writing right now.

    Several writers may replace one file at once: two processes on this node, or two nodes writing
    one path on a shared file system (NFS). A temp file is stale when its writer is gone: one named
    by a process of this very node (same boot, same PID namespace) when that process no longer
    runs (or, named by this process, when it is not one this process is writing); any other -- a
    writer on another node, or an older name without its writer's -- when it has not been written
    to for STALE_TEMP_AGE_S.
    """
    prefix = f".{base_name}."
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if not (entry.startswith(prefix) and entry.endswith(TMP_TAG)):
            continue
        path = os.path.join(directory, entry)
        with contextlib.suppress(OSError):
            if _is_stale(path, entry, entry[len(prefix):-len(TMP_TAG)], now):
                os.unlink(path)


def _is_stale(path: str, entry: str, middle: str, now: float) -> bool:
    """Whether the temp file ``entry`` at ``path`` (``middle``: its name between ``.NAME.`` and the
    tag) belongs to no running write. OSError: it is gone already."""
    owner = _OWNED.fullmatch(middle.rsplit(".", 1)[-1])
    if owner is not None and owner["origin"] == _origin():
        pid = int(owner["pid"])
        if pid == os.getpid():
            with _writing_lock:
                return entry not in _writing  # else: a killed earlier process that had this PID
        return not _process_runs(pid)
    return now - os.lstat(path).st_mtime > STALE_TEMP_AGE_S


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


# Who writes a temp file, in its name: this node's boot and PID namespace (together they make a PID
# mean one process), and the writer's PID. Elsewhere PIDs say nothing: there the age decides.
_OWNED = re.compile(r"(?P<origin>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{8}")
_writing: set[str] = set()  # the names of the temp files this process is writing now
_writing_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _origin() -> str | None:
    """This boot and PID namespace, as 8 hex digits; None where Linux' /proc does not tell."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return hashlib.sha256(f"{boot} {namespace}".encode()).hexdigest()[:8]


def temp_name(directory: str, base_name: str) -> str:
    token = secrets.token_hex(4)
    origin = _origin()
    name = f".{base_name}.{origin}-{os.getpid()}-{token}{TMP_TAG}" if origin else f".{base_name}.{token}{TMP_TAG}"
    if len(os.fsencode(name)) > 255:  # NAME_MAX: a very long name gets the short form (age decides)
        name = f".{base_name}.{token}{TMP_TAG}"
    return os.path.join(directory, name)
