"""systemd integration for master and agent: sd_notify and journald logging, used when available.

python3-systemd is used when installed; without it, READY/WATCHDOG still reach systemd through
the $NOTIFY_SOCKET datagram protocol (a few lines, documented in sd_notify(3)), and logs go to
stderr, which systemd also puts into the journal.
"""

from __future__ import annotations

import logging
import os
import socket
import sys


def notify(state: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    try:
        from systemd import daemon  # type: ignore

        daemon.notify(state)
        return
    except ImportError:
        pass
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        pass


def watchdog_interval_s() -> float | None:
    """Half of WatchdogSec, when systemd asked for watchdog pings, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def setup_logging(name: str, level: str = "INFO") -> logging.Logger:
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler  # type: ignore

            handler = JournalHandler(SYSLOG_IDENTIFIER=name)
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {name}[%(process)d] %(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    return logging.getLogger(name)
