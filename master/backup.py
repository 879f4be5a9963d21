"""The master in one file: `pimaster backup FILE` and `pimaster restore FILE` (the cure for a dead SD card).

What makes the master the same master is its state dir: its CURVE key pair (`master.key`,
`master.pub`: every agent pins its fingerprint), `pimaster.db` (the key store, tokens, nodes, jobs
and results, the last inventory) and `secrets/` (the values states got: a munge key must stay the
one every node has). A backup holds all of it: every regular file under the state dir except the
control socket, the lock, SQLite's side files and temp files of killed writes; the database as
SQLite's online backup API copies it (`sqlite3.Connection.backup`), consistent while the master
writes.

The file (format 1)::

    pimaster-backup 1\\n
    {JSON header, one line}\\n
    payload: header["payload"]["size"] bytes

The header says what the file is (`created`, `hostname`, `fingerprint`: the master's, `pimaster`:
the version that wrote it), `payload` (`size`; `sha256` of the payload when not encrypted) and
`encryption`: null, or how the payload was encrypted: ``{"kdf": "scrypt", "n": 131072, "r": 8, "p":
1, "salt": HEX, "cipher": "AES-256-GCM", "nonce": HEX}`` -- a 256-bit key derived from the passphrase
by scrypt (cryptography's ``Scrypt``, 16-byte random salt, N=2**17, r=8, p=1: 128 MiB, about half a
second on a PC), the payload encrypted by AES-256-GCM (cryptography's ``AESGCM``, 12-byte random
nonce, the 16-byte tag at its end) with the two header lines as associated data, so that neither
payload nor header can change unnoticed. The payload itself is a gzipped tar of the files (paths
relative to the state dir). A later pimaster reads the version on the first line and knows the
format; this one refuses any other version.

Restoring checks everything before it touches anything: the format, the checksum or the AES-GCM
tag (a wrong passphrase fails there too), the paths, the key pair (the public key is the secret's),
the database (SQLite's integrity check). Then, holding the state dir's lock (`master.lock`, which
the running master holds), it writes each file atomically (`piagent.fileio.write_atomic`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import sqlite3
import tarfile
import time
from urllib.parse import quote

from piagent.fileio import TMP_TAG, write_atomic

MAGIC = b"pimaster-backup"
FORMAT_VERSION = 1
DB_NAME = "pimaster.db"
KEY_NAME, PUB_NAME = "master.key", "master.pub"
LOCK_NAME, SOCKET_NAME = "master.lock", "control.sock"
# Not the master's state but the running daemon's (the lock, the socket), or SQLite's side files
# (the database comes through the backup API) and temp files of writes killed before their rename.
NOT_STATE = {LOCK_NAME, SOCKET_NAME, DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal"}
# The health history (`pimaster.healthlog`) is not backed up: it is history the master gathers
# again, and a copy of a live WAL database's files would not be consistent.
HEALTH_DB_NAME = "health.db"
NOT_STATE |= {HEALTH_DB_NAME, f"{HEALTH_DB_NAME}-wal", f"{HEALTH_DB_NAME}-shm", f"{HEALTH_DB_NAME}-journal"}
# A path component in a backup: what pimaster names its files (secrets' names are a subset).
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
MAX_DEPTH = 4
# Bounds of what a file may ask of restore: the payload and the files in it are held in memory.
MAX_PAYLOAD = 1 << 30
MAX_FILES_SIZE = 2 << 30
MAX_FILES = 100_000
MAX_HEADER = 64 * 1024
# scrypt's cost: OWASP's minimum for scrypt (2**17, 8, 1). A file may say other values (a later
# pimaster's); these bounds keep a damaged header from asking for gigabytes of memory.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 17, 8, 1
MAX_SCRYPT_MEMORY = 1 << 30
SALT_BYTES, NONCE_BYTES, TAG_BYTES = 16, 12, 16
CIPHER = "AES-256-GCM"
# Modes restored: the public key may be read by anyone (agents fetch it anyway), nothing else.
PUBLIC_FILES = {PUB_NAME}


class BackupError(Exception):
    """Why a backup or restore cannot be done; the message is for the user. ``code``: `refused`
    (the file or the state dir is not fit: nothing was changed) or `usage`."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- reading the state dir

def collect(state_dir: str) -> tuple[dict[str, bytes], list[str]]:
    """The master's state in ``state_dir``: relative path -> contents, and the paths left out
    (names pimaster never writes, symlinks, other special files). Raises BackupError."""
    if not os.path.isdir(state_dir):
        raise BackupError(f"no master state dir at {state_dir} (--state-dir?)")
    if not os.access(state_dir, os.R_OK | os.X_OK):
        raise BackupError(f"cannot read {state_dir}: permission denied (run as the user the master runs as: "
                          "root for the service)")
    if not os.path.exists(os.path.join(state_dir, KEY_NAME)):
        raise BackupError(f"{state_dir} holds no master (no {KEY_NAME}): nothing to back up")
    files: dict[str, bytes] = {}
    skipped: list[str] = []
    for directory, dirs, names in os.walk(state_dir):
        relative_dir = os.path.relpath(directory, state_dir)
        depth = 0 if relative_dir == "." else relative_dir.count(os.sep) + 1
        for name in sorted(dirs):
            if not NAME_RE.match(name) or depth + 1 >= MAX_DEPTH or os.path.islink(os.path.join(directory, name)):
                skipped.append(_join(relative_dir, name) + "/")
                dirs.remove(name)
        for name in sorted(names):
            relative = _join(relative_dir, name)
            if relative_dir == "." and name in NOT_STATE or name.endswith(TMP_TAG):
                continue
            path = os.path.join(directory, name)
            if not NAME_RE.match(name) or os.path.islink(path) or not os.path.isfile(path):
                skipped.append(relative)
                continue
            try:
                with open(path, "rb") as fh:
                    files[relative] = fh.read()
            except PermissionError:
                raise BackupError(f"cannot read {path}: permission denied (run as the user the master runs as: "
                                  "root for the service)") from None
    files[DB_NAME] = snapshot_database(os.path.join(state_dir, DB_NAME))
    return files, skipped


def _join(directory: str, name: str) -> str:
    return name if directory == "." else f"{directory}/{name}"


def snapshot_database(path: str) -> bytes:
    """A consistent copy of the SQLite database at ``path``, through the online backup API (the
    master may write meanwhile: WAL lets it), as a rollback-journal database file."""
    if not os.path.exists(path):
        raise BackupError(f"no database at {path}")
    try:
        source = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=30)
        try:
            copy = sqlite3.connect(":memory:")
            try:
                source.backup(copy)
                data = copy.serialize()
            finally:
                copy.close()
        finally:
            source.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy the database {path}: {exc}") from None
    # Bytes 18-19 of the header (file format versions) say 2 for a WAL database; an image in WAL
    # format cannot be opened without its -wal file: the copy is a plain one (the master makes it
    # WAL again when it opens it).
    return data[:18] + b"\x01\x01" + data[20:]


def database_summary(data: bytes) -> dict:
    """Checks a database image (SQLite's integrity check, the key store's table) and counts what
    it holds: ``{"keys": agent keys, "accepted": ..., "jobs": ...}``. Raises BackupError."""
    db = sqlite3.connect(":memory:")
    try:
        db.deserialize(data)
        result = db.execute("PRAGMA integrity_check").fetchone()
        if not result or result[0] != "ok":
            raise BackupError(f"the database in the backup is damaged: {result[0] if result else 'no answer'}")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"keys", "tokens", "nodes", "jobs"} <= tables:
            raise BackupError("the database in the backup is not a pimaster key store")
        count = lambda sql: db.execute(sql).fetchone()[0]  # noqa: E731
        return {"keys": count("SELECT COUNT(*) FROM keys"),
                "accepted": count("SELECT COUNT(*) FROM keys WHERE state = 'accepted'"),
                "tokens": count("SELECT COUNT(*) FROM tokens"), "jobs": count("SELECT COUNT(*) FROM jobs")}
    except sqlite3.Error as exc:
        raise BackupError(f"the database in the backup cannot be read: {exc}") from None
    finally:
        db.close()


# ----------------------------------------------------------------------------- the file format (pure)

def pack(files: dict[str, bytes], passphrase: bytes | None = None, created: float | None = None,
         hostname: str | None = None) -> bytes:
    """The backup file of ``files`` (relative path -> contents; the key pair and the database
    among them), encrypted with ``passphrase`` when given."""
    from . import __version__

    fingerprint = check_key_pair(files)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(files):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(files[path]), _mode(path), int(created or time.time())
            tar.addfile(info, io.BytesIO(files[path]))
    payload = buffer.getvalue()
    if len(payload) + TAG_BYTES > MAX_PAYLOAD:  # restore would refuse it: say so now, not on the day it is needed
        raise BackupError(f"the master's state is {len(payload) >> 20} MiB compressed, more than a backup holds "
                          f"({MAX_PAYLOAD >> 20} MiB): keep fewer jobs (pimaster serve --keep-jobs, --keep-days)")
    header = {"created": created or time.time(), "hostname": hostname or socket.gethostname(),
              "fingerprint": fingerprint, "pimaster": __version__, "files": len(files),
              "payload": {"size": len(payload)}, "encryption": None}
    if passphrase is None:
        header["payload"]["sha256"] = hashlib.sha256(payload).hexdigest()
        return _header_bytes(header) + payload
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    header["encryption"] = {"kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex(),
                            "cipher": CIPHER, "nonce": nonce.hex()}
    header["payload"]["size"] = len(payload) + TAG_BYTES
    head = _header_bytes(header)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = derive_key(passphrase, header["encryption"])
    return head + AESGCM(key).encrypt(nonce, payload, head)


def _header_bytes(header: dict) -> bytes:
    return MAGIC + b" %d\n" % FORMAT_VERSION + json.dumps(header, sort_keys=True).encode() + b"\n"


def _mode(path: str) -> int:
    return 0o644 if path in PUBLIC_FILES else 0o600


def derive_key(passphrase: bytes, encryption: dict) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=bytes.fromhex(encryption["salt"]), length=32, n=encryption["n"], r=encryption["r"],
                  p=encryption["p"]).derive(passphrase)


def read_header(data: bytes) -> tuple[dict, bytes, bytes]:
    """The header of backup file ``data``, the bytes it covers (both lines) and the payload;
    checks the format, the version and the size. Raises BackupError."""
    first, newline, rest = data[:64].partition(b"\n")
    if not first.startswith(MAGIC + b" ") or not newline:
        raise BackupError("not a pimaster backup file (it does not start with 'pimaster-backup')")
    version = first[len(MAGIC) + 1:]
    if version != b"%d" % FORMAT_VERSION:
        raise BackupError(f"backup format {version.decode(errors='replace')!r}: this pimaster reads format "
                          f"{FORMAT_VERSION} only (a newer pimaster wrote it?)")
    start = len(first) + 1
    end = data.find(b"\n", start, start + MAX_HEADER)
    if end < 0:
        raise BackupError("the backup's header is cut off or damaged")
    try:
        header = json.loads(data[start:end])
        size = header["payload"]["size"]
        encryption = header["encryption"]
    except (ValueError, KeyError, TypeError):
        raise BackupError("the backup's header is damaged") from None
    if not isinstance(size, int) or not 0 < size <= MAX_PAYLOAD:
        raise BackupError("the backup's header is damaged (payload size)")
    payload = data[end + 1:]
    if len(payload) < size:
        raise BackupError(f"the backup is truncated: {len(payload)} of its {size} payload bytes are there")
    if len(payload) > size:
        raise BackupError(f"the backup has {len(payload) - size} bytes more than its header says: damaged")
    if encryption is not None:
        _check_encryption(encryption)
    return header, data[:end + 1], payload


def _check_encryption(encryption) -> None:
    try:
        ok = (encryption["kdf"] == "scrypt" and encryption["cipher"] == CIPHER
              and all(isinstance(encryption[k], int) and encryption[k] > 0 for k in ("n", "r", "p"))
              and 128 * encryption["n"] * encryption["r"] * encryption["p"] <= MAX_SCRYPT_MEMORY
              and len(bytes.fromhex(encryption["salt"])) >= 8 and len(bytes.fromhex(encryption["nonce"])) == NONCE_BYTES)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise BackupError(f"the backup's encryption is not one this pimaster knows (scrypt + {CIPHER}), or its "
                          "header is damaged")


def unpack(data: bytes, passphrase: bytes | None = None) -> tuple[dict, dict[str, bytes]]:
    """The header and the files of backup file ``data``, each checked (format, checksum or AES-GCM
    tag, paths, key pair, database). Raises BackupError, whose message says what is wrong."""
    header, covered, payload = read_header(data)
    encryption = header["encryption"]
    if encryption is None:
        if passphrase is not None:
            raise BackupError("this backup is not encrypted: leave out --passphrase-file", code="usage")
        if hashlib.sha256(payload).hexdigest() != header["payload"].get("sha256"):
            raise BackupError("the backup is damaged: its checksum does not match")
    else:
        if passphrase is None:
            raise BackupError("this backup is encrypted: give its passphrase with --passphrase-file FILE", code="usage")
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key = derive_key(passphrase, encryption)
        try:
            payload = AESGCM(key).decrypt(bytes.fromhex(encryption["nonce"]), payload, covered)
        except InvalidTag:
            raise BackupError("wrong passphrase, or the backup is damaged (AES-GCM authentication failed)") from None
    files = _read_tar(payload)
    fingerprint = check_key_pair(files)
    if fingerprint != header.get("fingerprint"):
        raise BackupError("the backup is damaged: its key pair is not the master its header names")
    if DB_NAME not in files:
        raise BackupError(f"the backup holds no {DB_NAME}")
    header["database"] = database_summary(files[DB_NAME])
    return header, files


def _read_tar(payload: bytes) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    raise BackupError(f"the backup holds {member.name!r}, which is not a regular file")
                check_path(member.name)
                total += member.size
                if len(files) >= MAX_FILES or total > MAX_FILES_SIZE or member.name in files:
                    raise BackupError("the backup holds more than a master's state (too many files, too large, "
                                      "or a file twice)")
                files[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BackupError(f"the backup's contents cannot be read: {exc}") from None
    return files


def check_path(path: str) -> None:
    """A path in a backup: relative, inside the state dir, made of names pimaster writes, not
    the daemon's own files. Raises BackupError."""
    parts = path.split("/")
    if (len(parts) > MAX_DEPTH or not all(NAME_RE.match(p) for p in parts) or path in NOT_STATE - {DB_NAME}
            or parts[-1].endswith(TMP_TAG)):
        raise BackupError(f"the backup holds a file restore does not write: {path!r}")


def check_key_pair(files: dict[str, bytes]) -> str:
    """The master's fingerprint, once its secret key is found to make its public key."""
    import zmq

    from piagent import keys

    try:
        secret, public = files[KEY_NAME].strip(), files[PUB_NAME].strip()
        made = zmq.curve_public(secret)
    except KeyError as exc:
        raise BackupError(f"the master's {exc.args[0]} is missing") from None
    except (ValueError, zmq.ZMQError):
        raise BackupError(f"the master's {KEY_NAME} is not a CURVE secret key") from None
    if made != public:
        raise BackupError(f"the master's {PUB_NAME} is not the public key of its {KEY_NAME}")
    return keys.fingerprint(public)


# ----------------------------------------------------------------------------- restoring

@contextlib.contextmanager
def state_dir_lock(state_dir: str):
    """The state dir's lock, the one `pimaster serve` holds while it runs: no master starts while a
    restore writes. Raises BackupError when a master runs."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(state_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"a master is running on {state_dir}: stop it first (systemctl stop pimaster)") from None
        yield
    finally:
        os.close(fd)


def present_master(state_dir: str) -> dict:
    """What master ``state_dir`` holds now: ``fingerprint`` (None: no key pair), ``keys`` (agent
    keys in its key store; None: no database), ``error`` (its database cannot be read)."""
    found = {"fingerprint": None, "keys": None, "error": None}
    try:
        with open(os.path.join(state_dir, PUB_NAME), "rb") as fh:
            from piagent import keys

            found["fingerprint"] = keys.fingerprint(fh.read().strip())
    except (OSError, ValueError):
        pass
    path = os.path.join(state_dir, DB_NAME)
    if os.path.exists(path):
        # Reading a WAL database makes its side files: those this look made go again (the caller
        # holds the lock: no master uses them), so that a refused restore leaves the dir as it was.
        made = [path + side for side in ("-wal", "-shm") if not os.path.exists(path + side)]
        try:
            db = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=5)
            try:
                found["keys"] = db.execute("SELECT COUNT(*) FROM keys").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error as exc:
            found["error"] = str(exc)
        for side in made:
            with contextlib.suppress(FileNotFoundError):
                if os.path.getsize(side) == 0 or side.endswith("-shm"):
                    os.unlink(side)
    return found


def restore(state_dir: str, files: dict[str, bytes], force: bool = False) -> dict:
    """Writes the checked ``files`` (from `unpack`) into ``state_dir``, each atomically, holding its
    lock. Refuses (BackupError, nothing changed) while a master runs there, and over a master with
    agent keys (or an unreadable database) unless ``force``. Returns what it replaced:
    ``{"replaced": present_master(...), "written": [paths]}``."""
    state_dir = os.path.abspath(state_dir)
    with state_dir_lock(state_dir):
        present = present_master(state_dir)
        if not force:
            if present["error"]:
                raise BackupError(f"{state_dir} holds a database that cannot be read ({present['error']}): "
                                  "--force to replace it")
            if present["keys"]:
                raise BackupError(f"{state_dir} holds a master ({present['fingerprint'] or 'no key pair'}) with "
                                  f"{present['keys']} agent key(s): restoring would replace it; --force to do so "
                                  "(back it up first)")
        _retire_database(state_dir, force)
        written = []
        # The database before the key pair: a restore cut short leaves the old key pair, which a
        # second restore (--force: the database has keys now) replaces.
        order = sorted(files, key=lambda p: (p in (KEY_NAME, PUB_NAME), p.count("/") == 0, p))
        for path in order:
            target = os.path.join(state_dir, *path.split("/"))
            directory = os.path.dirname(target)
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700, exist_ok=True)
            write_atomic(target, files[path], _mode(path))
            written.append(path)
    return {"replaced": present, "written": written}


def _retire_database(state_dir: str, force: bool) -> None:
    """Folds the present database's WAL into it and removes SQLite's side files: a WAL left next
    to the restored database would be replayed into it."""
    path = os.path.join(state_dir, DB_NAME)
    if os.path.exists(path):
        try:
            db = sqlite3.connect(path, timeout=5)
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                db.close()
        except sqlite3.Error as exc:
            if not force:
                raise BackupError(f"cannot close the present database {path} cleanly: {exc}") from None
    for side in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + side)


def read_passphrase(path: str) -> bytes:
    """The passphrase in file ``path``: its first line, without the line end. Raises BackupError."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(4096)
    except OSError as exc:
        raise BackupError(f"--passphrase-file {path}: {exc.strerror}", code="usage") from None
    passphrase = text.split(b"\n", 1)[0].rstrip(b"\r")
    if not passphrase:
        raise BackupError(f"--passphrase-file {path}: the file's first line is empty", code="usage")
    return passphrase
