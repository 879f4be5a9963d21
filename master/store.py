"""The master's durable state: keys, enrollment tokens, nodes and jobs, in SQLite (state dir, mode 0600).

SQLite gives atomic, crash-safe writes for free (WAL journal, synchronous=FULL for the key store:
losing an accept or a token use after a power cut would be a security bug, not an inconvenience).
Tokens are stored only as SHA-256 hashes: the token itself is shown once, when it is created.

Jobs are kept within bounds (`prune_jobs`: the newest N, the last D days) so that the file on an SD
card stops growing: deleted rows free their pages, which SQLite reuses for new jobs (no VACUUM).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id          INTEGER PRIMARY KEY,
    node_id     TEXT NOT NULL,
    public_key  TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'accepted', 'rejected', 'denied')),
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    facts       TEXT NOT NULL DEFAULT '{}',
    -- What inventory entries may match this key by (MACs, Pi serial): the facts it had when it was
    -- accepted, never what it reports later (root on a Pi must not claim another node's entry).
    identity    TEXT,
    -- The catalogue (checked) a key not yet accepted sent with its enrollment: it becomes its
    -- node's when a person accepts the key, since the agent told at once does not enroll again.
    catalog     TEXT
);
CREATE INDEX IF NOT EXISTS keys_node ON keys (node_id);
-- At most one accepted key per node id: a second key for the same id is 'denied'.
CREATE UNIQUE INDEX IF NOT EXISTS keys_one_accepted ON keys (node_id) WHERE state = 'accepted';
CREATE TABLE IF NOT EXISTS tokens (
    token_hash  TEXT PRIMARY KEY,
    created     REAL NOT NULL,
    expires     REAL NOT NULL,
    uses_total  INTEGER NOT NULL,
    uses_left   INTEGER NOT NULL,
    address     TEXT NOT NULL,
    id          TEXT,            -- public name (`pimaster token list/revoke`), never the token
    ids         TEXT             -- glob the enrolled node ids must match; NULL: any
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id     TEXT PRIMARY KEY,
    facts       TEXT NOT NULL DEFAULT '{}',
    enrolled    REAL NOT NULL,
    last_seen   REAL,
    catalog     TEXT NOT NULL DEFAULT '{}'   -- the agent's state functions and their arguments
);
-- Names and addresses given to enrolled nodes that the inventory does not list: they keep them.
CREATE TABLE IF NOT EXISTS assignments (
    node_id     TEXT PRIMARY KEY,
    hostname    TEXT NOT NULL,
    ip          TEXT,
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    file        TEXT NOT NULL,
    target      TEXT,
    test        INTEGER NOT NULL,
    created     REAL NOT NULL,
    reason      TEXT             -- why the master started it by itself (`enrolled node05`); NULL: a person did
);
CREATE TABLE IF NOT EXISTS job_nodes (
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    node_id     TEXT NOT NULL,
    status      TEXT NOT NULL,   -- sent, running, done, interrupted, no_answer
    states      INTEGER NOT NULL,
    started     REAL,
    finished    REAL,
    summary     TEXT NOT NULL DEFAULT '{}',
    results     TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (job_id, node_id)
);
-- The inventory (cluster.yaml) of the last job's state file, as that apply read it: `role:NAME`
-- targets of ping and jobs resolve from it (the file itself may be on another host's disk).
CREATE TABLE IF NOT EXISTS last_inventory (
    one         INTEGER PRIMARY KEY CHECK (one = 1),
    state_file  TEXT NOT NULL,
    path        TEXT,            -- NULL: that state file had no inventory next to it
    text        TEXT,
    saved       REAL NOT NULL
);
-- What each node last got of each state file, as a keyed digest of its rendered job (not the job:
-- it carries secrets): a node joining or leaving re-applies a file only where its rendering changed.
CREATE TABLE IF NOT EXISTS applied_files (
    node_id     TEXT NOT NULL,
    file        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    job_id      TEXT NOT NULL,
    applied     REAL NOT NULL,
    PRIMARY KEY (node_id, file)
);
-- Drift: per node and state file, the states the latest check (the list in test mode) found would change.
CREATE TABLE IF NOT EXISTS drift (
    node_id     TEXT NOT NULL,
    file        TEXT NOT NULL,
    job_id      TEXT NOT NULL,
    checked     REAL NOT NULL,
    states      TEXT NOT NULL,   -- [{"id", "function", "comment"}], at most MAX_DRIFT_STATES
    PRIMARY KEY (node_id, file)
);
-- `pimaster jobs` (newest first) and pruning (oldest first) walk jobs by creation time.
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
"""

# Jobs deleted per transaction when pruning: each transaction's pages pass through the WAL, so
# small ones keep it small even when a first start prunes years of jobs.
PRUNE_CHUNK = 100
# The WAL file is cut back to this size after a checkpoint (SQLite would otherwise leave it as large
# as the largest transaction made it).
WAL_SIZE_LIMIT = 4 * 1024 * 1024
# States kept per node and file in a drift record (a node decides how many its results have).
MAX_DRIFT_STATES = 200
# `pimaster job PREFIX` names at most this many of the jobs an ambiguous prefix matches.
MAX_AMBIGUOUS_SHOWN = 10


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def dumps(value) -> str:
    """JSON for a column: NaN and infinities are refused (SQLite's JSON functions choke on them,
    which would break `pimaster jobs` for everyone)."""
    return json.dumps(value, allow_nan=False)


def identity_of(facts: dict) -> dict:
    """What inventory entries match a node by, taken from its facts at the moment it is accepted."""
    identity = {"macs": [m for m in facts.get("macs", []) if isinstance(m, str)]}
    if isinstance(facts.get("pi_serial"), str):
        identity["pi_serial"] = facts["pi_serial"]
    return identity


class Store:
    def __init__(self, path: str) -> None:
        new = not os.path.exists(path)
        if new:  # create owner-only before SQLite writes anything into it
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        # Globs on node ids in queries (`pimaster jobs --target`), as the CLI matches them elsewhere
        # (SQLite's GLOB writes a negated class [^...], fnmatch [!...]).
        self.db.create_function("fnmatch", 2, lambda name, glob: fnmatch.fnmatchcase(name, glob), deterministic=True)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self.db.executescript(SCHEMA)
        self._migrate()
        # Called with each new job's id once it is recorded (the master prunes old jobs then).
        self.on_job_created = None

    def _migrate(self) -> None:
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(nodes)")}
        if "catalog" not in columns:  # databases made before jobs existed
            self.db.execute("ALTER TABLE nodes ADD COLUMN catalog TEXT NOT NULL DEFAULT '{}'")
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(keys)")}
        if "identity" not in columns:
            self.db.execute("ALTER TABLE keys ADD COLUMN identity TEXT")
        if "catalog" not in columns:
            self.db.execute("ALTER TABLE keys ADD COLUMN catalog TEXT")
        # Keys accepted before identities were kept: the facts they have now are all there is.
        for row in self.db.execute("SELECT id, facts FROM keys WHERE state = 'accepted' AND identity IS NULL").fetchall():
            self.db.execute("UPDATE keys SET identity = ? WHERE id = ?",
                            (dumps(identity_of(json.loads(row["facts"] or "{}"))), row["id"]))
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(jobs)")}
        if "reason" not in columns:
            self.db.execute("ALTER TABLE jobs ADD COLUMN reason TEXT")
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(tokens)")}
        for column in ("id", "ids"):
            if column not in columns:
                self.db.execute(f"ALTER TABLE tokens ADD COLUMN {column} TEXT")
        for row in self.db.execute("SELECT token_hash FROM tokens WHERE id IS NULL").fetchall():
            self.db.execute("UPDATE tokens SET id = ? WHERE token_hash = ?", (secrets.token_hex(4), row["token_hash"]))

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ keys
    # A key's row without its catalogue (up to 256 KiB a key, read only when the key is accepted:
    # `keys list` and every enrollment must not parse 256 waiting keys' catalogues).
    _KEY_COLUMNS = ("id, node_id, public_key, fingerprint, state, created, updated, facts, identity, "
                    "catalog IS NOT NULL AS has_catalog")

    @staticmethod
    def _key_row(row: sqlite3.Row) -> dict:
        item = dict(row)
        item["facts"] = json.loads(item["facts"] or "{}")
        item["identity"] = json.loads(item["identity"]) if item.get("identity") else None
        item["has_catalog"] = bool(item.get("has_catalog"))
        return item

    def key_catalog(self, key_id: int) -> dict | None:
        """The catalogue a key sent while it waited (checked then), or None."""
        row = self.db.execute("SELECT catalog FROM keys WHERE id = ?", (key_id,)).fetchone()
        return json.loads(row["catalog"]) if row and row["catalog"] else None

    def count_keys(self, state: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM keys WHERE state = ?", (state,)).fetchone()[0]

    def identities(self) -> dict[str, dict]:
        """Accepted node id -> the identity recorded when its key was accepted."""
        return {r["node_id"]: json.loads(r["identity"]) if r["identity"] else {"macs": []}
                for r in self.db.execute("SELECT node_id, identity FROM keys WHERE state = 'accepted'")}

    def keys(self, node_id: str | None = None) -> list[dict]:
        if node_id is None:
            rows = self.db.execute(f"SELECT {self._KEY_COLUMNS} FROM keys ORDER BY node_id, created")
        else:
            rows = self.db.execute(f"SELECT {self._KEY_COLUMNS} FROM keys WHERE node_id = ? ORDER BY created",
                                   (node_id,))
        return [self._key_row(r) for r in rows]

    def key_by_public(self, public_key: str) -> dict | None:
        row = self.db.execute(f"SELECT {self._KEY_COLUMNS} FROM keys WHERE public_key = ?", (public_key,)).fetchone()
        return self._key_row(row) if row else None

    def accepted_key(self, node_id: str) -> dict | None:
        row = self.db.execute(f"SELECT {self._KEY_COLUMNS} FROM keys WHERE node_id = ? AND state = 'accepted'",
                              (node_id,)).fetchone()
        return self._key_row(row) if row else None

    def add_key(self, node_id: str, public_key: str, fingerprint: str, state: str, facts: dict,
                catalog: dict | None = None) -> dict:
        now = time.time()
        self.db.execute(
            "INSERT INTO keys (node_id, public_key, fingerprint, state, created, updated, facts, catalog) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (node_id, public_key, fingerprint, state, now, now, dumps(facts),
             dumps(catalog) if catalog is not None else None))
        return self.key_by_public(public_key)

    def set_key_state(self, key_id: int, state: str, replace_accepted: bool = False,
                      identity: dict | None = None) -> None:
        """Change one key's state; with replace_accepted, the node's accepted key goes in the same
        transaction. Accepting records ``identity`` (see identity_of) for inventory matching."""
        with self.transaction():
            if replace_accepted:
                self.db.execute(
                    "DELETE FROM keys WHERE state = 'accepted' AND id != ? AND node_id = "
                    "(SELECT node_id FROM keys WHERE id = ?)", (key_id, key_id))
            self.db.execute("UPDATE keys SET state = ?, updated = ?, identity = COALESCE(?, identity) WHERE id = ?",
                            (state, time.time(), dumps(identity) if identity is not None else None, key_id))

    def deny_pending(self, node_id: str) -> list[str]:
        """Every pending key of ``node_id`` becomes denied (its id is held); their public keys."""
        keys = [r["public_key"] for r in self.db.execute(
            "SELECT public_key FROM keys WHERE node_id = ? AND state = 'pending'", (node_id,))]
        self.db.execute("UPDATE keys SET state = 'denied', updated = ? WHERE node_id = ? AND state = 'pending'",
                        (time.time(), node_id))
        return keys

    def update_key_facts(self, key_id: int, facts: dict) -> None:
        # Only when they differ: a waiting agent re-sends the same facts every 10 s, and an SD card
        # should not be rewritten for that.
        self.db.execute("UPDATE keys SET facts = ? WHERE id = ? AND facts != ?", (dumps(facts), key_id, dumps(facts)))

    def set_key_catalog(self, key_id: int, catalog: dict | None) -> None:
        """The catalogue a key not yet accepted sent (checked); None forgets it."""
        self.db.execute("UPDATE keys SET catalog = ? WHERE id = ?",
                        (dumps(catalog) if catalog is not None else None, key_id))

    def delete_key(self, key_id: int) -> None:
        self.db.execute("DELETE FROM keys WHERE id = ?", (key_id,))

    # ------------------------------------------------------------------ tokens
    def add_token(self, token: str, ttl_s: float, uses: int, address: str, ids: str | None = None) -> dict:
        """Store a new token (its hash only); returns its public record (see tokens())."""
        now = time.time()
        token_id = secrets.token_hex(4)
        self.db.execute("INSERT INTO tokens (token_hash, created, expires, uses_total, uses_left, address, id, ids) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (token_hash(token), now, now + ttl_s, uses, uses, address, token_id, ids))
        return next(t for t in self.tokens() if t["id"] == token_id)

    def consume_token(self, token: str, node_id: str) -> tuple[bool, str]:
        """Use one enrollment of ``token`` for ``node_id`` if it is valid: (True, "") or (False, why not)."""
        digest = token_hash(token)
        with self.transaction():
            row = self.db.execute("SELECT * FROM tokens WHERE token_hash = ?", (digest,)).fetchone()
            if row is None:
                return False, "unknown or revoked token"
            if row["expires"] < time.time():
                return False, f"token {row['id']} expired"
            if row["uses_left"] <= 0:
                return False, f"token {row['id']} used up"
            if row["ids"] is not None and not fnmatch.fnmatchcase(node_id, row["ids"]):
                return False, f"token {row['id']} enrolls only ids matching {row['ids']!r}"
            self.db.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE token_hash = ?", (digest,))
        return True, ""

    def tokens(self) -> list[dict]:
        """Every token's public record: id, created, expires, uses_total, uses_left, ids, address."""
        return [dict(r) for r in self.db.execute("SELECT id, created, expires, uses_total, uses_left, ids, address "
                                                 "FROM tokens ORDER BY created")]

    def revoke_token(self, token_id: str) -> bool:
        return self.db.execute("DELETE FROM tokens WHERE id = ?", (token_id,)).rowcount == 1

    # ------------------------------------------------------------------ nodes
    def upsert_node(self, node_id: str, facts: dict, seen: float) -> None:
        self.db.execute(
            "INSERT INTO nodes (node_id, facts, enrolled, last_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (node_id) DO UPDATE SET facts = excluded.facts, last_seen = excluded.last_seen",
            (node_id, dumps(facts), seen, seen))

    def touch_nodes(self, seen: dict[str, float]) -> None:
        with self.transaction():
            self.db.executemany("UPDATE nodes SET last_seen = ? WHERE node_id = ?",
                                [(t, n) for n, t in seen.items()])

    def delete_node(self, node_id: str) -> None:
        self.db.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,))

    def nodes(self) -> list[dict]:
        out = []
        for row in self.db.execute("SELECT * FROM nodes ORDER BY node_id"):
            item = dict(row)
            item["facts"] = json.loads(item["facts"] or "{}")
            out.append(item)
        return out

    def set_catalog(self, node_id: str, catalog: dict) -> None:
        self.db.execute("UPDATE nodes SET catalog = ? WHERE node_id = ?", (dumps(catalog), node_id))

    def catalogs(self) -> dict[str, dict]:
        return {r["node_id"]: json.loads(r["catalog"] or "{}")
                for r in self.db.execute("SELECT node_id, catalog FROM nodes")}

    # ------------------------------------------------------------------ inventory assignments
    def assignments(self) -> dict[str, dict]:
        return {r["node_id"]: {"hostname": r["hostname"], "ip": r["ip"]}
                for r in self.db.execute("SELECT * FROM assignments")}

    def add_assignments(self, assigned: dict[str, dict]) -> None:
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO assignments VALUES (?, ?, ?, ?)",
                                [(n, a["hostname"], a.get("ip"), time.time()) for n, a in assigned.items()])

    # ------------------------------------------------------------------ jobs
    def create_job(self, job_id: str, file: str, target: str | None, test: bool, states: dict[str, int],
                   reason: str | None = None) -> None:
        """``reason``: why the master started the job by itself (None: a person's command)."""
        now = time.time()
        with self.transaction():
            self.db.execute("INSERT INTO jobs (id, file, target, test, created, reason) VALUES (?, ?, ?, ?, ?, ?)",
                            (job_id, file, target, int(test), now, reason))
            self.db.executemany("INSERT INTO job_nodes (job_id, node_id, status, states, started) VALUES (?, ?, 'sent', ?, ?)",
                                [(job_id, n, count, now) for n, count in states.items()])
        if self.on_job_created is not None:
            self.on_job_created(job_id)

    def set_last_inventory(self, state_file: str, path: str | None, text: str | None) -> None:
        self.db.execute("INSERT OR REPLACE INTO last_inventory (one, state_file, path, text, saved) VALUES (1, ?, ?, ?, ?)",
                        (state_file, path, text, time.time()))

    def last_inventory(self) -> dict | None:
        """The inventory the last job read: state_file, path (None: none), text, saved (when)."""
        row = self.db.execute("SELECT state_file, path, text, saved FROM last_inventory").fetchone()
        return dict(row) if row else None

    def set_job_node_states(self, job_id: str, states: dict[str, int]) -> None:
        """How many states each node's job has, as a later stage's rendering made it (its result is
        checked against this)."""
        self.db.executemany("UPDATE job_nodes SET states = ? WHERE job_id = ? AND node_id = ?",
                            [(count, job_id, node_id) for node_id, count in states.items()])

    def job_node_states(self, job_id: str, node_id: str) -> int | None:
        """How many states the job sent this node; None when the node is not in that job."""
        row = self.db.execute("SELECT states FROM job_nodes WHERE job_id = ? AND node_id = ?",
                              (job_id, node_id)).fetchone()
        return row["states"] if row else None

    def set_job_node_status(self, job_id: str, node_id: str, status: str) -> None:
        self.db.execute("UPDATE job_nodes SET status = ? WHERE job_id = ? AND node_id = ? AND status NOT IN "
                        "('done', 'interrupted')", (status, job_id, node_id))

    def record_result(self, job_id: str, node_id: str, status: str, summary: dict, results: list,
                      started: float | None, finished: float | None) -> bool:
        """Store one node's result; False if the job/node pair is unknown or already has one (a
        node cannot rewrite what it reported)."""
        cur = self.db.execute(
            "UPDATE job_nodes SET status = ?, summary = ?, results = ?, started = COALESCE(?, started), "
            "finished = ? WHERE job_id = ? AND node_id = ? AND status NOT IN ('done', 'interrupted')",
            (status, dumps(summary), dumps(results), started, finished or time.time(), job_id, node_id))
        return cur.rowcount == 1

    def reboots_required(self) -> dict[str, float]:
        """Node id -> when (its ``finished``: the agent's clock) the newest real (not test) apply
        finished whose results on that node include a state reporting ``reboot_required``."""
        return {r["node_id"]: r["finished"] for r in self.db.execute(
            "SELECT n.node_id, MAX(n.finished) AS finished FROM job_nodes n JOIN jobs j ON j.id = n.job_id "
            "WHERE j.test = 0 AND n.status IN ('done', 'interrupted') AND EXISTS (SELECT 1 FROM json_each(n.results) r "
            "WHERE json_extract(r.value, '$.changes.reboot_required') = 1) GROUP BY n.node_id")}

    def jobs(self, limit: int = 50, node_globs: list[str] | None = None, target: str | None = None,
             since: float | None = None) -> list[dict]:
        """The newest ``limit`` jobs, newest first, with counts of their nodes. With ``node_globs``
        or ``target``, only jobs that ran on a node whose id matches one of the globs, or were
        applied with that very ``target``; ``since``: only jobs created at or after it (epoch)."""
        where, params = [], []
        if node_globs is not None or target is not None:
            where.append("(j.target = ? OR EXISTS (SELECT 1 FROM job_nodes m, json_each(?) g "
                         "WHERE m.job_id = j.id AND fnmatch(m.node_id, g.value)))")
            params += [target, dumps(list(node_globs or []))]
        if since is not None:
            where.append("j.created >= ?")
            params.append(since)
        rows = self.db.execute(
            "SELECT j.*, COUNT(n.node_id) AS nodes, "
            "SUM(n.status IN ('done', 'interrupted', 'no_answer')) AS finished_nodes, "
            "SUM(n.status = 'done' AND json_extract(n.summary, '$.failed') = 0) AS ok_nodes, MAX(n.finished) AS finished "
            "FROM jobs j LEFT JOIN job_nodes n ON n.job_id = j.id "
            + ("WHERE " + " AND ".join(where) + " " if where else "")
            + "GROUP BY j.id ORDER BY j.created DESC, j.id DESC LIMIT ?", (*params, limit))
        # `test` is a boolean, as in `apply --json` (SQLite has none).
        return [dict(r, test=bool(r["test"])) for r in rows]

    def newest_job_id(self) -> str | None:
        row = self.db.execute("SELECT id FROM jobs ORDER BY created DESC, id DESC LIMIT 1").fetchone()
        return row["id"] if row else None

    def job_ids_starting(self, prefix: str, limit: int = MAX_AMBIGUOUS_SHOWN + 1) -> list[str]:
        """Ids of jobs that start with ``prefix`` (at most ``limit``), newest first."""
        return [r["id"] for r in self.db.execute(
            "SELECT id FROM jobs WHERE substr(id, 1, ?) = ? ORDER BY created DESC, id DESC LIMIT ?",
            (len(prefix), prefix, limit))]

    def prune_jobs(self, keep: int | None = None, created_before: float | None = None,
                   spare=(), chunk: int = PRUNE_CHUNK) -> int:
        """Deletes the jobs (with their nodes' results) past the newest ``keep`` and those created
        before ``created_before`` (epoch), except the ids in ``spare`` (jobs running now); None: no
        such bound. In transactions of ``chunk`` jobs, oldest first. Returns how many went."""
        if keep is None and created_before is None:
            return 0
        doomed = []
        if keep is not None:
            doomed.append("id NOT IN (SELECT id FROM jobs ORDER BY created DESC, id DESC LIMIT ?)")
        if created_before is not None:
            doomed.append("created < ?")
        params = [p for p in (keep, created_before) if p is not None]
        query = ("SELECT id FROM jobs WHERE id NOT IN (SELECT value FROM json_each(?)) AND (" + " OR ".join(doomed)
                 + ") ORDER BY created, id LIMIT ?")
        spared = dumps(sorted(spare))
        pruned = 0
        while True:
            with self.transaction():
                ids = [r["id"] for r in self.db.execute(query, (spared, *params, chunk))]
                if not ids:
                    return pruned
                marks = ",".join("?" * len(ids))
                self.db.execute(f"DELETE FROM job_nodes WHERE job_id IN ({marks})", ids)
                self.db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
            pruned += len(ids)

    def job(self, job_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = dict(row)
        job["nodes"] = {}
        for r in self.db.execute("SELECT * FROM job_nodes WHERE job_id = ? ORDER BY node_id", (job_id,)):
            item = dict(r)
            item["summary"] = json.loads(item["summary"])
            item["results"] = json.loads(item["results"])
            job["nodes"][item.pop("node_id")] = item
        return job

    # ------------------------------------------------------------------ what nodes got, drift
    def applied_digests(self, file: str) -> dict[str, str]:
        """Node id -> the digest of what it last got of ``file`` (a state file's path) and carried out."""
        return {r["node_id"]: r["digest"] for r in self.db.execute(
            "SELECT node_id, digest FROM applied_files WHERE file = ?", (file,))}

    def set_applied(self, file: str, job_id: str, digests: dict[str, str]) -> None:
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO applied_files VALUES (?, ?, ?, ?, ?)",
                                [(n, file, d, job_id, time.time()) for n, d in digests.items()])

    def forget_node_files(self, node_id: str) -> None:
        """A node whose key went (or was replaced: a re-flashed card) got nothing yet."""
        with self.transaction():
            self.db.execute("DELETE FROM applied_files WHERE node_id = ?", (node_id,))
            self.db.execute("DELETE FROM drift WHERE node_id = ?", (node_id,))

    def set_drift(self, file: str, job_id: str, per_node: dict[str, list[dict]]) -> None:
        """The latest check of ``file``: per node, the states that would change (empty: none)."""
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO drift VALUES (?, ?, ?, ?, ?)",
                                [(n, file, job_id, time.time(), dumps(states[:MAX_DRIFT_STATES]))
                                 for n, states in per_node.items()])

    def drift(self) -> list[dict]:
        """Every node's latest drift records: node_id, file, job_id, checked, states."""
        return [dict(r, states=json.loads(r["states"])) for r in self.db.execute(
            "SELECT * FROM drift ORDER BY node_id, file")]

    # ------------------------------------------------------------------
    def transaction(self):
        return _Transaction(self.db)


class _Transaction:
    # One connection serves the event loop and the apply's rendering thread: one transaction at a
    # time on it (SQLite refuses a BEGIN inside another).
    lock = threading.RLock()

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self):
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, exc, tb):
        try:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.lock.release()
        return False
