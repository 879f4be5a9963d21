"""systemd integration for the master: sd_notify and journald logging, used when available.

The same few lines as the agent's (the master must not depend on agent internals): python3-systemd
when installed, else the $NOTIFY_SOCKET datagram protocol of sd_notify(3), and stderr for logs.
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
        from systemd.daemon import notify as sd_notify  # type: ignore
    except ImportError:
        sd_notify = None
    if sd_notify is not None:
        sd_notify(state)
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), target)
    except OSError:
        pass


def watchdog_interval_s() -> float | None:
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def setup_logging(level: str = "INFO") -> logging.Logger:
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler  # type: ignore

            handler = JournalHandler(SYSLOG_IDENTIFIER="pimaster")
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s pimaster[%(process)d] %(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    return logging.getLogger("pimaster")
