"""The health history: one sample per node every health interval, kept in its own SQLite file
(state dir/health.db, mode 0600, WAL), downsampled so that its size is bounded.

A sample is what `pimaster ping` shows of a node (`rpc.Rpc.ping`: only the fields
`results.check_health` let through) at one moment: whether it answered, rtt, 1-minute load,
temperature, the firmware's throttled bits, clock offset, memory, root disk. Three resolutions,
each covering an older span than the one before (no two overlap):

- raw: every sample, for RAW_KEEP_S (1 h);
- 1 minute: for MINUTE_KEEP_S (24 h);
- 15 minutes: for QUARTER_KEEP_S (30 days); older rows are dropped.

A downsampled row says how many samples it merges (``samples``) and how many of them the node
answered (``answered``); each value is their mean, with the highest (``_max``) of them where
that is what matters (temperature, load, rtt, memory use); the throttled bits are OR'ed (a flag seen once in
the 15 minutes stays seen). Values are stored as integers in fixed units (``FIELDS``: tenths of a
degree, hundredths of a load), which SQLite packs in 1-3 bytes instead of a REAL's 8.

Rows are (node, resolution, bucket start) in a WITHOUT ROWID table: no second index. At most
HISTORY_ROWS_PER_NODE rows per node with the 30 s default interval (see the README's "Watching the
cluster" for the bytes). `compact` moves whole buckets down a resolution once they are older than
their span, drops what is older than 30 days, what is dated in the future (a clock set back), and
the rows of nodes whose key is gone. Every method takes the one lock: the collector writes from
a worker thread while commands read.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time

RAW, MINUTE, QUARTER = 0, 60, 900
RESOLUTION_NAMES = {RAW: "raw", MINUTE: "1m", QUARTER: "15m"}
RAW_KEEP_S = 3600
MINUTE_KEEP_S = 86400
QUARTER_KEEP_S = 30 * 86400
# Rows dated further in the future than this are dropped (the master's clock was set back).
FUTURE_SLACK_S = 3600
DEFAULT_INTERVAL_S = 30.0
# Rows per node at most with the default interval, each resolution covering the span the finer
# one does not (moved in whole buckets, so up to one bucket more): a raw hour, 23 h of minutes,
# 29 days of quarters. About 4,300 rows, some 310 KB (README: "Watching the cluster").
RAW_ROWS_MAX = (RAW_KEEP_S + MINUTE) // int(DEFAULT_INTERVAL_S)
MINUTE_ROWS_MAX = (MINUTE_KEEP_S - RAW_KEEP_S + QUARTER) // MINUTE
QUARTER_ROWS_MAX = (QUARTER_KEEP_S - MINUTE_KEEP_S) // QUARTER + 1
HISTORY_ROWS_PER_NODE = RAW_ROWS_MAX + MINUTE_ROWS_MAX + QUARTER_ROWS_MAX
# Bytes per node at most (the test with a simulated month checks it; values of random data,
# which packs worst).
HISTORY_BYTES_PER_NODE = 350_000
# Health events kept per node (the newest), at most for QUARTER_KEEP_S.
EVENTS_PER_NODE = 100
# The WAL is cut back to this after a checkpoint.
WAL_SIZE_LIMIT = 1024 * 1024
# `pimaster health` returns at most this many rows (the newest): a very short interval's raw hour.
MAX_HISTORY_ROWS = 20000

# The bits of the firmware's throttled word (`vcgencmd get_throttled`) by the names the history,
# `top` and the metrics use. The low ones are now, the high ones "since boot" (sticky).
THROTTLE_BITS = {0: "under-voltage", 1: "arm-frequency-capped", 2: "throttled", 3: "soft-temperature-limit",
                 16: "under-voltage-occurred", 17: "arm-frequency-capped-occurred", 18: "throttled-occurred",
                 19: "soft-temperature-limit-occurred"}
THROTTLE_MASK = sum(1 << bit for bit in THROTTLE_BITS)
UNDER_VOLTAGE = 1 << 0
THROTTLING = (1 << 1) | (1 << 2) | (1 << 3)          # frequency capped, throttled, soft limit: now
UNDER_VOLTAGE_OCCURRED = 1 << 16
THROTTLING_OCCURRED = THROTTLING << 16

# Stored numbers: name -> (scale: stored as round(value * scale), its extreme kept when merged).
FIELDS: dict[str, tuple[int, str | None]] = {
    "rtt_ms": (100, "max"),
    "load1": (100, "max"),
    "temp_c": (10, "max"),
    "clock_offset_ms": (10, None),
    "memory_used_pct": (10, "max"),
    "memory_available_mb": (1, None),
    "disk_root_used_pct": (10, None),   # a root disk fills over hours: its mean says it
    "disk_root_free_mb": (1, None),
}
# Any value is clipped to this (a clock years off is still a number, not an overflow).
MAX_STORED = 10 ** 15
COLUMNS = ["node", "resolution", "time_ms", "samples", "answered", "throttled"] + \
    [c for name, (_, extreme) in FIELDS.items() for c in ([name] + ([f"{name}_{extreme}"] if extreme else []))]

SCHEMA = f"""
-- Rows name their node by number: an id may be 63 characters, a number takes 1 or 2 bytes.
CREATE TABLE IF NOT EXISTS nodes (
    node        INTEGER PRIMARY KEY,
    node_id     TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS samples (
    node        INTEGER NOT NULL,   -- nodes.node
    resolution  INTEGER NOT NULL,   -- seconds a row covers: 0 raw (one sample), 60, 900
    time_ms     INTEGER NOT NULL,   -- raw: when the master asked; else the bucket's start
    samples     INTEGER NOT NULL,   -- samples merged into the row
    answered    INTEGER NOT NULL,   -- of which the node answered
    throttled   INTEGER,            -- the throttled word's bits, OR'ed; NULL: never reported
    -- each value x FIELDS' scale, the mean of the samples that had it; raw rows leave the _max ones NULL
    {", ".join(f"{c} INTEGER" for c in COLUMNS[6:])},
    PRIMARY KEY (node, resolution, time_ms)
) WITHOUT ROWID;
-- The health events (`pimaster.events`, type health) of each node: its newest EVENTS_PER_NODE.
CREATE TABLE IF NOT EXISTS events (
    node        INTEGER NOT NULL,   -- nodes.node
    time_ms     INTEGER NOT NULL,
    seq         INTEGER NOT NULL,   -- events of one moment in the order they were told
    state       TEXT NOT NULL,
    details     TEXT NOT NULL,      -- JSON: the event's other fields
    PRIMARY KEY (node, time_ms, seq)
) WITHOUT ROWID;
"""


def throttle_flags(bits: int | None) -> list[str]:
    """The names of the set bits of a throttled word (``THROTTLE_BITS``), low bits first."""
    if bits is None:
        return []
    return [name for bit, name in THROTTLE_BITS.items() if bits & (1 << bit)]


def parse_throttled(text) -> int | None:
    """The agent's throttled word (`0x50005`, already shape-checked by `check_health`) as bits
    pimaster knows, or None."""
    if not isinstance(text, str):
        return None
    try:
        return int(text, 16) & THROTTLE_MASK
    except ValueError:
        return None


def sample_from_ping(row: dict, when: float) -> dict:
    """One node's sample from its `Rpc.ping` row (fields checked there): ``{"node", "time", "up",
    and each value it had}``; a node that did not answer has ``up`` False and ``error``."""
    sample: dict = {"node": row["id"], "time": when, "up": bool(row.get("ok"))}
    if not sample["up"]:
        sample["error"] = str(row.get("error") or "no answer")[:200]
        return sample
    values = {"rtt_ms": row.get("rtt_ms"), "temp_c": row.get("temp_c"),
              "clock_offset_ms": row.get("clock_offset_ms"), "memory_used_pct": row.get("memory_used_pct"),
              "memory_available_mb": row.get("memory_available_mb"),
              "disk_root_used_pct": row.get("disk_root_used_pct"), "disk_root_free_mb": row.get("disk_root_free_mb")}
    load = row.get("load")
    if isinstance(load, list) and load:
        values["load1"] = load[0]
        sample["load"] = list(load)
    for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            sample[name] = value
    bits = parse_throttled(row.get("throttled"))
    if bits is not None:
        sample["throttled"] = bits
    return sample


def _stored(value, scale: int) -> int | None:
    if value is None:
        return None
    return max(-MAX_STORED, min(MAX_STORED, round(value * scale)))


class HealthLog:
    def __init__(self, path: str) -> None:
        if not os.path.exists(path):  # owner-only before SQLite writes anything into it
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # A power cut may lose the last samples: history, not keys. Fewer writes to the SD card.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self.db.executescript(SCHEMA)
        self.numbers: dict[str, int] = {row[1]: row[0] for row in self.db.execute("SELECT node, node_id FROM nodes")}

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _number(self, node_id: str) -> int:
        """The node's number in the rows (given one now if it has none). Under the lock."""
        number = self.numbers.get(node_id)
        if number is None:
            number = self.db.execute("INSERT INTO nodes (node_id) VALUES (?)", (node_id,)).lastrowid
            self.numbers[node_id] = number
        return number

    # ------------------------------------------------------------------ writing
    def record(self, samples: list[dict]) -> None:
        """Stores ``samples`` (`sample_from_ping`'s) as raw rows."""
        if not samples:
            return
        sql = f"INSERT OR REPLACE INTO samples ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        with self.lock, self.db:
            self.db.execute("BEGIN")
            rows = []
            for s in samples:
                row = {"node": self._number(s["node"]), "resolution": RAW, "time_ms": int(s["time"] * 1000),
                       "samples": 1, "answered": 1 if s.get("up") else 0, "throttled": s.get("throttled")}
                for name, (scale, _extreme) in FIELDS.items():
                    row[name] = _stored(s.get(name), scale)
                rows.append(tuple(row.get(c) for c in COLUMNS))
            self.db.executemany(sql, rows)

    def record_events(self, node_id: str, when: float, events: list[dict]) -> None:
        """Stores a node's health events of one moment (`healthwatch.transitions`' dicts)."""
        if not events:
            return
        with self.lock, self.db:
            self.db.execute("BEGIN")
            number = self._number(node_id)
            self.db.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?, ?)", [
                (number, int(when * 1000), seq, str(e["state"]),
                 json.dumps({k: v for k, v in e.items() if k != "state"}, allow_nan=False, default=str))
                for seq, e in enumerate(events)])

    def compact(self, now: float | None = None, keep_nodes: set[str] | None = None) -> None:
        """Moves whole buckets past their resolution's span down to the next (raw -> 1 min -> 15
        min), drops rows older than 30 days or dated in the future, each node's events past its
        newest EVENTS_PER_NODE, and, given ``keep_nodes`` (the accepted nodes), every other node's."""
        now_ms = int((time.time() if now is None else now) * 1000)
        with self.lock:
            for source, target, keep_s in ((RAW, MINUTE, RAW_KEEP_S), (MINUTE, QUARTER, MINUTE_KEEP_S)):
                size_ms = target * 1000
                # Buckets that end by the cutoff: every row of them is past the span.
                limit = (now_ms - keep_s * 1000) // size_ms * size_ms
                self._merge_down(source, target, limit)
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("DELETE FROM samples WHERE resolution = ? AND time_ms < ?",
                                (QUARTER, now_ms - QUARTER_KEEP_S * 1000))
                future = now_ms + FUTURE_SLACK_S * 1000
                self.db.execute("DELETE FROM samples WHERE time_ms > ?", (future,))
                self.db.execute("DELETE FROM events WHERE time_ms < ? OR time_ms > ?",
                                (now_ms - QUARTER_KEEP_S * 1000, future))
                for (number,) in self.db.execute("SELECT node FROM events GROUP BY node HAVING COUNT(*) > ?",
                                                 (EVENTS_PER_NODE,)).fetchall():
                    self.db.execute("DELETE FROM events WHERE node = ? AND (time_ms, seq) < (SELECT time_ms, seq "
                                    "FROM events WHERE node = ? ORDER BY time_ms DESC, seq DESC LIMIT 1 OFFSET ?)",
                                    (number, number, EVENTS_PER_NODE - 1))
                if keep_nodes is not None:
                    gone = [(number, node_id) for node_id, number in self.numbers.items() if node_id not in keep_nodes]
                    for table in ("samples", "events", "nodes"):
                        self.db.executemany(f"DELETE FROM {table} WHERE node = ?", [(n,) for n, _ in gone])
                    for _, node_id in gone:
                        del self.numbers[node_id]

    def _merge_down(self, source: int, target: int, limit_ms: int) -> None:
        size_ms = target * 1000
        cursor = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM samples WHERE resolution = ? AND time_ms < ?",
                                 (source, limit_ms))
        buckets: dict[tuple[int, int], list[dict]] = {}
        for values in cursor:
            row = dict(zip(COLUMNS, values))
            buckets.setdefault((row["node"], row["time_ms"] // size_ms * size_ms), []).append(row)
        if not buckets:
            return
        merged = []
        for (number, start), rows in buckets.items():
            existing = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM samples WHERE node = ? AND "
                                       "resolution = ? AND time_ms = ?", (number, target, start)).fetchone()
            if existing:  # rows dated into a bucket already moved (a clock set back): merged into it
                rows.append(dict(zip(COLUMNS, existing)))
            merged.append(merge_rows(number, target, start, rows))
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(f"INSERT OR REPLACE INTO samples ({', '.join(COLUMNS)}) VALUES "
                                f"({', '.join('?' * len(COLUMNS))})", [tuple(r[c] for c in COLUMNS) for r in merged])
            self.db.execute("DELETE FROM samples WHERE resolution = ? AND time_ms < ?", (source, limit_ms))

    # ------------------------------------------------------------------ reading
    def history(self, node_id: str, since: float) -> tuple[list[dict], bool]:
        """``node_id``'s rows from ``since`` (seconds since the epoch), oldest first, as
        `pimaster health` shows them; and whether older ones were left out (MAX_HISTORY_ROWS)."""
        with self.lock:
            number = self.numbers.get(node_id)
            rows = [] if number is None else self.db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM samples WHERE node = ? AND time_ms >= ? "
                "ORDER BY time_ms DESC LIMIT ?", (number, int(since * 1000), MAX_HISTORY_ROWS + 1)).fetchall()
        truncated = len(rows) > MAX_HISTORY_ROWS
        return [shown(dict(zip(COLUMNS, r))) for r in reversed(rows[:MAX_HISTORY_ROWS])], truncated

    def events(self, node_id: str, since: float) -> list[dict]:
        """``node_id``'s health events from ``since``, oldest first: ``{"time", "state", ...}``."""
        with self.lock:
            number = self.numbers.get(node_id)
            rows = [] if number is None else self.db.execute(
                "SELECT time_ms, state, details FROM events WHERE node = ? AND time_ms >= ? ORDER BY time_ms, seq",
                (number, int(since * 1000))).fetchall()
        out = []
        for time_ms, state, details in rows:
            try:
                extra = json.loads(details)
            except ValueError:
                extra = {}
            out.append({**(extra if isinstance(extra, dict) else {}), "time": time_ms / 1000, "state": state})
        return out

    def sparklines(self, now: float, span_s: float = RAW_KEEP_S, slots: int = 24) -> dict[str, dict[str, list]]:
        """Per node, its mean temperature and load in each of ``slots`` equal parts of the last
        ``span_s`` (None where there was no sample): `pimaster top`'s sparklines."""
        start_ms = int((now - span_s) * 1000)
        slot_ms = max(1, int(span_s * 1000 / slots))
        with self.lock:
            names = {number: node_id for node_id, number in self.numbers.items()}
            rows = self.db.execute(
                "SELECT node, (time_ms - ?) / ? AS slot, AVG(temp_c), AVG(load1) FROM samples "
                "WHERE resolution IN (?, ?) AND time_ms >= ? GROUP BY node, slot",
                (start_ms, slot_ms, RAW, MINUTE, start_ms)).fetchall()
        lines: dict[str, dict[str, list]] = {}
        for number, slot, temp, load in rows:
            if not 0 <= slot < slots or number not in names:
                continue
            line = lines.setdefault(names[number], {"temp_c": [None] * slots, "load1": [None] * slots})
            line["temp_c"][slot] = None if temp is None else temp / FIELDS["temp_c"][0]
            line["load1"][slot] = None if load is None else load / FIELDS["load1"][0]
        return lines

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per node and resolution name (what the tests check the bounds by)."""
        with self.lock:
            rows = self.db.execute("SELECT node_id, resolution, COUNT(*) FROM samples JOIN nodes USING (node) "
                                   "GROUP BY node_id, resolution").fetchall()
        out: dict[str, dict[str, int]] = {}
        for node_id, resolution, count in rows:
            out.setdefault(node_id, {})[RESOLUTION_NAMES.get(resolution, str(resolution))] = count
        return out

    def size_bytes(self) -> int:
        """The database's size: its pages in use and free (the WAL apart)."""
        with self.lock:
            pages = self.db.execute("PRAGMA page_count").fetchone()[0]
            page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
        return pages * page_size


def merge_rows(node: int, resolution: int, start_ms: int, rows: list[dict]) -> dict:
    """One row of ``resolution`` for the bucket at ``start_ms`` from ``rows`` (raw or finer)."""
    out = {"node": node, "resolution": resolution, "time_ms": start_ms,
           "samples": sum(r["samples"] for r in rows), "answered": sum(r["answered"] for r in rows)}
    bits = [r["throttled"] for r in rows if r["throttled"] is not None]
    out["throttled"] = None
    for b in bits:
        out["throttled"] = (out["throttled"] or 0) | b
    for name, (_scale, extreme) in FIELDS.items():
        had = [(r[name], max(1, r["answered"]), r.get(f"{name}_{extreme}") if extreme else None)
               for r in rows if r[name] is not None]
        if not had:
            out[name] = None
            if extreme:
                out[f"{name}_{extreme}"] = None
            continue
        weight = sum(w for _, w, _ in had)
        out[name] = round(sum(v * w for v, w, _ in had) / weight)
        if extreme:
            pick = max if extreme == "max" else min
            out[f"{name}_{extreme}"] = pick(e if e is not None else v for v, _, e in had)
    return out


def shown(row: dict) -> dict:
    """A stored row as `pimaster health --json` gives it: values in their units, the throttled
    word as hex and its flags by name."""
    out = {"time": row["time_ms"] / 1000, "resolution": RESOLUTION_NAMES.get(row["resolution"], "?"),
           "samples": row["samples"], "answered": row["answered"],
           "up": row["answered"] == row["samples"] and row["samples"] > 0}
    for name, (scale, extreme) in FIELDS.items():
        if row[name] is not None:
            out[name] = row[name] / scale if scale != 1 else row[name]
            if extreme:
                value = row.get(f"{name}_{extreme}")
                value = row[name] if value is None else value
                out[f"{name}_{extreme}"] = value / scale if scale != 1 else value
    if row["throttled"] is not None:
        out["throttled"] = f"0x{row['throttled']:x}"
        out["throttled_flags"] = throttle_flags(row["throttled"])
    return out
