"""`pimaster backup FILE` and `pimaster restore FILE`: the master in one file, and back (the file
format and the checks are `pimaster.backup`'s).

Neither goes through the daemon: `backup` reads the state dir itself, as the user the master runs
as (root for the service), so that the file is the caller's, written where the caller may write,
and works whether the master runs or not (the database through SQLite's online backup). `restore`
needs the master stopped: it takes the state dir's lock, which `pimaster serve` holds.
"""

from __future__ import annotations

import os

from ..cli import EXIT_OK, local_time, print_json, report_error

ENCRYPTION_HELP = ("encrypt with the passphrase on the first line of FILE: a key derived by scrypt (N=2^17, r=8, "
                   "p=1, random 16-byte salt), AES-256-GCM (the cryptography package's Scrypt and AESGCM)")


def add_parser(sub, name, summary, common, as_json) -> None:
    parser = sub.add_parser(name, parents=[common, as_json], help=summary,
                            description=BACKUP_DESCRIPTION if name == "backup" else RESTORE_DESCRIPTION)
    parser.add_argument("file", metavar="FILE", help="the backup file" + (" (written mode 0600, replaced whole)"
                                                                         if name == "backup" else ""))
    if name == "backup":
        parser.add_argument("--passphrase-file", metavar="FILE", help=ENCRYPTION_HELP)
        parser.set_defaults(run=run_backup, needs_master=False)
    else:
        parser.add_argument("--passphrase-file", metavar="FILE", help="the passphrase of an encrypted backup "
                                                                      "(the first line of FILE)")
        parser.add_argument("--force", action="store_true",
                            help="replace a master that has agent keys (its key pair, database and the secrets the "
                                 "backup holds are lost)")
        parser.set_defaults(run=run_restore, needs_master=False)


BACKUP_DESCRIPTION = (
    "Write everything the master needs into one file: its key pair (agents pin it), the key store, tokens, "
    "nodes and jobs (pimaster.db, through SQLite's online backup: the master may run), secrets/ and any other "
    "file of the state dir but the control socket, the lock and temp files. Run it as the user the master runs "
    "as (root). Keep the file off the master's SD card.")
RESTORE_DESCRIPTION = (
    "Put a backup's master into the state dir, the master stopped (systemctl stop pimaster; the lab's: "
    "pimaster lab exec node01 -- systemctl stop pimaster): every agent "
    "reconnects to it when it starts, no card touched. The file is checked first (format, checksum or "
    "AES-GCM tag, key pair, database): a damaged file or a wrong passphrase changes nothing. A master that "
    "has agent keys is replaced only with --force.")


def _passphrase(args):
    from ..backup import read_passphrase

    return read_passphrase(args.passphrase_file) if args.passphrase_file else None


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def run_backup(args) -> int:
    from piagent.fileio import write_atomic

    from ..backup import BackupError, collect, database_summary, pack, read_header

    if _inside(args.file, args.state_dir):
        return report_error(args, f"{args.file} is inside the master's state dir: a backup belongs on another disk "
                                  "or machine", "usage")
    try:
        passphrase = _passphrase(args)
        files, skipped = collect(args.state_dir)
        data = pack(files, passphrase)
        header = read_header(data)[0]
        counts = database_summary(files["pimaster.db"])
        # write_atomic's temp file is 0600 from its creation: the file is never readable by others.
        write_atomic(args.file, data, 0o600)
    except BackupError as exc:
        return report_error(args, str(exc), exc.code)
    except OSError as exc:
        return report_error(args, f"cannot write {args.file}: {exc.strerror}", "refused")
    summary = {"file": os.path.abspath(args.file), "fingerprint": header["fingerprint"], "size": len(data),
               "encrypted": passphrase is not None, "files": sorted(files), "skipped": skipped,
               "created": header["created"], **counts}
    if args.json:
        print_json(summary)
        return EXIT_OK
    how = "encrypted (scrypt + AES-256-GCM)" if passphrase is not None else "not encrypted: keep it safe"
    print(f"backed up master {summary['fingerprint']} to {summary['file']} ({_size(len(data))}, mode 0600, {how}): "
          f"{counts['accepted']} accepted key(s), {counts['tokens']} token(s), {counts['jobs']} job(s), "
          f"{sum(1 for f in files if f.startswith('secrets/'))} secret(s)")
    for path in skipped:
        print(f"left out {path}: not a file pimaster writes")
    return EXIT_OK


def run_restore(args) -> int:
    from ..backup import BackupError, restore, unpack

    try:
        passphrase = _passphrase(args)
        try:
            with open(args.file, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            return report_error(args, f"cannot read {args.file}: {exc.strerror}", "usage")
        header, files = unpack(data, passphrase)
        done = restore(args.state_dir, files, force=args.force)
    except BackupError as exc:
        message = str(exc)
        if _is_lab(args.state_dir):  # the lab's master runs in node01, not as this machine's service
            message = message.replace("(systemctl stop pimaster)", f"(in the lab: {LAB_SYSTEMCTL} stop pimaster)")
        return report_error(args, message, exc.code)
    except OSError as exc:
        return report_error(args, f"restore failed: {exc}", "internal")
    replaced = done["replaced"]
    summary = {"state_dir": os.path.abspath(args.state_dir), "fingerprint": header["fingerprint"],
               "hostname": header.get("hostname"), "created": header.get("created"), "files": done["written"],
               "replaced_fingerprint": replaced["fingerprint"], **header["database"]}
    if args.json:
        print_json(summary)
        return EXIT_OK
    database = header["database"]
    print(f"restored master {summary['fingerprint']} into {summary['state_dir']}: backup of "
          f"{summary['hostname']} made {local_time(summary['created'])}; {database['accepted']} accepted key(s), "
          f"{database['tokens']} token(s), {database['jobs']} job(s)")
    if replaced["fingerprint"] and replaced["fingerprint"] != summary["fingerprint"]:
        print(f"replaced master {replaced['fingerprint']} ({replaced['keys'] or 0} agent key(s))")
    how = f"{LAB_SYSTEMCTL} start pimaster" if _is_lab(args.state_dir) else "systemctl start pimaster"
    print(f"start it ({how}): every agent reconnects by itself")
    return EXIT_OK


# The lab's master runs in its node01, its state dir bound from the host's (`pimaster lab`).
LAB_SYSTEMCTL = "pimaster lab exec node01 -- systemctl"


def _is_lab(state_dir: str) -> bool:
    from ..lab.model import MASTER_STATE_DIR

    return os.path.realpath(state_dir) == os.path.realpath(MASTER_STATE_DIR)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
