"""Bounding what unauthenticated peers cost the master in connections (file descriptors).

CURVE lets any key complete a handshake (an unknown agent must be able to enroll), and libzmq
keeps an idle connection open for as long as the peer answers its heartbeats, so without this
anyone on the LAN could hold one descriptor per random key for ever. libzmq has no call to drop
one peer of a ROUTER socket, so the master watches its socket's connections through a monitor
socket (each accepted connection's descriptor) and every message's source descriptor (ZMQ_SRCFD),
and shuts down, at the TCP level, connections that have not shown an accepted key:

- a connection that sent nothing within ``silent_s`` (a real agent enrolls at once);
- beyond ``per_address`` such connections from one source address, the oldest first;
- beyond ``total`` such connections in all, the oldest first.

Connections younger than ``young_s`` are spared by the last two rules (a boot storm of agents,
or a test swarm on one address, is still enrolling then) until there are ``HARD_FACTOR`` times
the limit: a peer that reconnects as fast as it is cut off still holds a bounded number.

A connection counts as trusted from the moment a message from an accepted key arrives on it, so
a cluster's own agents are never touched. A pending agent cut off this way reconnects and
enrolls again by itself. Peers past the limits are logged once per sweep, not per connection.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

log = logging.getLogger("pimaster")


@dataclass
class Connection:
    peer: tuple | None
    since: float
    spoke: bool = False       # a well-formed message arrived on it (an enrollment, say)
    trusted: bool = False     # ... from a key the master has accepted
    key: str | None = None


class RateBudget:
    """Messages per second a peer (a key, or an address) may cost the master: a token bucket
    each, refilled at ``rate`` up to ``burst``. A peer over its budget has its messages dropped
    before they are decoded, so one peer cannot take the event loop from everyone else."""

    MAX_PEERS = 8192

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, when)
        self.refused = 0

    def take(self, peer: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, when = self.buckets.get(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        if len(self.buckets) >= self.MAX_PEERS and peer not in self.buckets:
            # Full: forget those whose buckets have refilled (they cost nothing to recreate).
            self.buckets = {p: b for p, b in self.buckets.items()
                            if b[0] + (now - b[1]) * self.rate < self.burst}
        if tokens < 1:
            self.buckets[peer] = (tokens, now)
            self.refused += 1
            return False
        self.buckets[peer] = (tokens - 1, now)
        return True


def peer_of(fd: int) -> tuple | None:
    """The address at the other end of descriptor ``fd`` (None if it is closed)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # closed (and perhaps reused) since
        return None
    try:
        return sock.getpeername()
    except OSError:
        return None
    finally:
        sock.detach()  # the descriptor stays libzmq's


class SessionGuard:
    HARD_FACTOR = 4

    def __init__(self, per_address: int = 128, total: int = 1024, silent_s: float = 30.0,
                 young_s: float = 10.0) -> None:
        self.per_address = per_address
        self.total = total
        self.silent_s = silent_s
        # Connections younger than this are never cut for being too many: a cluster's boot storm
        # (hundreds of agents at once) is still enrolling then.
        self.young_s = young_s
        self.connections: dict[int, Connection] = {}
        self.fd_of_key: dict[str, int] = {}  # accepted key -> the connection it spoke on last
        # Connections shut down here whose close the monitor has not reported yet: their peers,
        # so that the close can still be told from a newer connection on the same descriptor.
        self.shut_peers: dict[int, tuple | None] = {}
        self.closed = 0

    def opened(self, fd: int) -> None:
        self.shut_peers.pop(fd, None)
        self.connections[fd] = Connection(peer_of(fd), time.monotonic())

    def gone(self, fd: int) -> tuple | None:
        """The connection on ``fd`` closed; returns its peer's address, if known."""
        conn = self._forget(fd)
        shut_peer = self.shut_peers.pop(fd, None)
        return conn.peer if conn is not None else shut_peer

    def _forget(self, fd: int) -> Connection | None:
        conn = self.connections.pop(fd, None)
        if conn is not None and conn.key and self.fd_of_key.get(conn.key) == fd:
            del self.fd_of_key[conn.key]
        return conn

    def message(self, fd: int | None, trusted: bool, key: str | None = None) -> None:
        """A well-formed message arrived on ``fd`` from ``key``. An accepted key keeps one
        connection: the one it spoke on last (an agent that reconnects leaves the old one dead)."""
        conn = self.connections.get(fd) if fd is not None else None
        if conn is None:
            return
        conn.spoke = True
        conn.trusted = trusted
        conn.key = key
        if trusted and key:
            last = self.fd_of_key.get(key)
            if last != fd:
                self.fd_of_key[key] = fd
                other = self.connections.get(last) if last is not None else None
                if other is not None and other.trusted and other.key == key:
                    self._shut(last)

    def cut(self, fd: int | None) -> None:
        """Shut down the connection a message came on (a stranger that sent what only an
        accepted key may send, or too much)."""
        if fd is not None and fd in self.connections and not self.connections[fd].trusted:
            self._shut(fd)

    def untrusted(self) -> int:
        return sum(1 for c in self.connections.values() if not c.trusted)

    def sweep(self, now: float | None = None) -> list[int]:
        """Shut down the connections past the limits; returns their descriptors."""
        now = time.monotonic() if now is None else now
        untrusted = sorted(((fd, c) for fd, c in self.connections.items() if not c.trusted),
                           key=lambda item: item[1].since)
        doomed: dict[int, str] = {}
        by_address: dict[str, list[int]] = {}
        for fd, conn in untrusted:
            if not conn.spoke and now - conn.since > self.silent_s:
                doomed[fd] = "silent"
            elif conn.peer is not None:
                by_address.setdefault(conn.peer[0], []).append(fd)
        for address, fds in by_address.items():
            self._cut(fds, self.per_address, now, doomed, f"over {self.per_address} from {address}")
        self._cut([fd for fd, _ in untrusted if fd not in doomed], self.total, now, doomed,
                  f"over {self.total} in all")
        for fd in doomed:
            self._shut(fd)
        if doomed:
            reasons: dict[str, int] = {}
            for why in doomed.values():
                reasons[why] = reasons.get(why, 0) + 1
            log.warning("closed %d connection(s) that showed no accepted key: %s", len(doomed),
                        ", ".join(f"{n} {why}" for why, n in sorted(reasons.items())))
        return list(doomed)

    def _cut(self, fds: list[int], limit: int, now: float, doomed: dict, why: str) -> None:
        """Mark the oldest of ``fds`` (oldest first) past ``limit``, sparing young ones up to the hard limit."""
        over = len(fds) - limit
        hard_over = len(fds) - self.HARD_FACTOR * limit
        for position, fd in enumerate(fds[:max(0, over)]):
            if position < hard_over or now - self.connections[fd].since > self.young_s:
                doomed[fd] = why

    def _shut(self, fd: int) -> None:
        conn = self._forget(fd)
        if conn is None:
            return
        if len(self.shut_peers) >= self.total * self.HARD_FACTOR:
            self.shut_peers.clear()  # closes the monitor never reported: forget them, bounded
        self.shut_peers[fd] = conn.peer
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return
        try:
            # The descriptor may have been closed and reused since the monitor told us about it:
            # only the same peer is cut.
            if conn.peer is not None and sock.getpeername() == conn.peer:
                sock.shutdown(socket.SHUT_RDWR)
                self.closed += 1
        except OSError:
            pass
        finally:
            sock.detach()
