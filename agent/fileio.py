"""Files replaced whole or not at all: the one atomic writer of master and agent.

Every file pimaster or piagent writes (keys, the pinned fingerprint, job results, managed files,
backups, /boot/firmware/piagent.conf, the lab's state) goes through ``write_atomic`` or
``copy_atomic``: a temp file in the same directory is written, fsynced, given its mode and owner,
renamed over the target, and the directory is fsynced. A write killed before its rename leaves a
temp file named ``.NAME.<random>.pimaster-tmp`` (ignored by ``*.conf`` readers); the next write of
the same file removes it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil

ENCODING, ERRORS = "utf-8", "surrogateescape"
DEFAULT_FILE_MODE = 0o644
TMP_TAG = ".pimaster-tmp"



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
    (writes killed before their rename) are removed first."""
    directory, base_name = os.path.split(target)
    remove_stale_temps(directory, family)
    tmp = _temp_name(directory, base_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
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
    """Temp files an earlier write of ``base_name`` left behind when it was killed before its rename."""
    prefix = f".{base_name}."
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            if entry.startswith(prefix) and entry.endswith(TMP_TAG):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, entry))


def _temp_name(directory: str, base_name: str) -> str:
    return os.path.join(directory, f".{base_name}.{secrets.token_hex(4)}{TMP_TAG}")
