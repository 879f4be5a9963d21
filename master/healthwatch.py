"""The health collector: every health interval (`Master.health_interval`) the master asks every
accepted node for its health the way `pimaster ping` does (`Rpc.ping`: only checked fields), stores
one sample per node in the history (`healthlog.HealthLog`; a node that is not connected or does
not answer gets an ``up: false`` sample), keeps each node's latest sample for `top` and the
metrics, and publishes what changed as ``health`` events (`pimaster.events`).

The first round comes one interval after the start, so that agents reconnecting to a restarted
master are not all reported as not answering. The history is compacted about once a minute
(`HealthLog.compact`), which also drops the rows of nodes whose key is gone; database work runs
in a worker thread, not on the master's loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from .healthlog import (THROTTLING, THROTTLING_OCCURRED, UNDER_VOLTAGE, UNDER_VOLTAGE_OCCURRED, HealthLog,
                        sample_from_ping, throttle_flags)

log = logging.getLogger("pimaster")

# How long a round waits for answers at most (less with a shorter interval).
PING_TIMEOUT_S = 5.0
COMPACT_EVERY_S = 60.0


def transitions(before: dict | None, sample: dict) -> list[dict]:
    """What changed from a node's previous sample ``before`` (None: the first this master took)
    to ``sample``, as the fields of ``health`` events: ``state`` and its details."""
    events: list[dict] = []
    first = before is None
    was_up = True if first else before["up"]
    if not sample["up"]:
        if was_up:
            events.append({"state": "not_answering", "error": sample.get("error", "")})
        return events
    if not was_up:
        events.append({"state": "answering", "rtt_ms": sample.get("rtt_ms")})
    bits = sample.get("throttled")
    if bits is None:
        return events
    # Sticky "occurred" bits already set when this master first learns the word are old news.
    first = first or before.get("throttled_known") is None
    old = 0 if first else before["throttled_known"]
    details = {"throttled": f"0x{bits:x}", "flags": throttle_flags(bits), "temp_c": sample.get("temp_c")}
    for name, now, occurred in (("throttling", THROTTLING, THROTTLING_OCCURRED),
                                 ("under_voltage", UNDER_VOLTAGE, UNDER_VOLTAGE_OCCURRED)):
        if bits & now and not old & now:
            events.append({"state": f"{name}_began", **details})
        elif old & now and not bits & now:
            events.append({"state": f"{name}_ended", **details})
        elif not first and bits & occurred & ~old and not bits & now:
            events.append({"state": f"{name}_occurred", **details})
    return events


class HealthWatch:
    """``history``: the HealthLog; ``ping``: `Rpc.ping`; ``accepted``: the accepted node ids;
    ``publish``: the event bus's; ``interval``: the health interval in seconds, asked each round."""

    def __init__(self, history: HealthLog, ping, accepted: Callable[[], set[str]], publish,
                 interval: Callable[[], float]) -> None:
        self.history = history
        self.ping = ping
        self.accepted = accepted
        self.publish = publish
        self.interval = interval
        self.latest: dict[str, dict] = {}   # node -> its latest sample (with throttled_known)
        self.rounds = 0
        self._compacted = 0.0

    async def run(self) -> None:
        due = time.monotonic() + self.interval()
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                await self.collect()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failing round (a full SD card) must not end the collector
                log.exception("health collection failed")
            # The next round one interval after this one was due; a round that overran starts
            # the next at once, never several to catch up.
            due = max(due + self.interval(), time.monotonic())

    async def collect(self) -> None:
        """One round: ask, store, tell."""
        nodes = sorted(self.accepted())
        interval = self.interval()
        if nodes:
            rows = await self.ping(nodes, min(PING_TIMEOUT_S, max(0.2, interval * 0.8)))
            now = time.time()
            samples = [sample_from_ping(row, now) for row in rows]
            await asyncio.to_thread(self.history.record, samples)
            told = {}
            for sample in samples:
                events = self._note(sample)
                if events:
                    told[sample["node"]] = events
            for node, events in told.items():
                await asyncio.to_thread(self.history.record_events, node, now, events)
        self.rounds += 1
        keep = set(nodes)
        for gone in set(self.latest) - keep:
            del self.latest[gone]
        if time.monotonic() - self._compacted >= min(COMPACT_EVERY_S, max(interval, 1.0)):
            self._compacted = time.monotonic()
            await asyncio.to_thread(self.history.compact, time.time(), keep)

    def _note(self, sample: dict) -> list[dict]:
        """Keeps ``sample`` as its node's latest; publishes and returns what changed."""
        node = sample["node"]
        before = self.latest.get(node)
        events = transitions(before, sample)
        for event in events:
            self.publish("health", node=node, **event)
        # The throttled word last reported survives samples without it (a node down for a while).
        known = sample.get("throttled", before.get("throttled_known") if before else None)
        self.latest[node] = dict(sample, throttled_known=known)
        return events
