"""FunctionStore: functions and their code in SQLite and a content-addressed code dir.

State lives under the data dir::

    state.db          functions, their published versions and aliases, async events
                      and jobs (SQLite, WAL)
    code/<sha256>/    unpacked, byte-compiled bundles (shared by every function using them)
    code/<sha256>.zip the uploaded zip, served back by GetFunction

Reads on the invocation path never touch SQLite: the worker keeps the records in memory
and the store is written only when something changes.

Finished events and jobs do not stay forever: ``expire_events`` and ``expire_job`` delete
those finished before a cutoff (``worker.retention`` calls them in small batches).  SQLite
reuses the pages they free for new rows, so the file stops growing once the retention
period is reached; a database created by this version also gives free pages back to the
file system (``auto_vacuum=INCREMENTAL``, ``vacuum_some``), and the WAL is cut back to
``WAL_SIZE_LIMIT`` after each checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from warmstart.errors import Conflict, InvalidParameter, NotFound
from warmstart.functions import bundle
from warmstart.functions.models import AliasRecord, FunctionConfig, FunctionRecord, ImageSource

SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    function TEXT NOT NULL,
    version INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (function, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    function TEXT NOT NULL,
    name TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (function, name)
);
CREATE TABLE IF NOT EXISTS version_counters (
    function TEXT PRIMARY KEY,
    last INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'pending',
    result BLOB
);
CREATE INDEX IF NOT EXISTS events_status ON events(status, created);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    created REAL NOT NULL,
    total INTEGER NOT NULL
);
"""


# The WAL file is truncated to this after a checkpoint (it would otherwise keep the size
# of the largest burst of writes it ever held).
WAL_SIZE_LIMIT = 16 << 20

# A job may be named by a unique prefix of its id this long or longer (the CLI shows 8).
MIN_JOB_ID_PREFIX = 6


def result_value(raw: bytes | None) -> Any:
    """An event's stored result as the JSON value the handler returned (or its error
    object); a payload that is not JSON stays a string."""
    if raw is None:
        return None
    text = bytes(raw).decode(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def record_json(rec: FunctionRecord) -> str:
    """A function record as stored (SQLite here, etcd in a cluster)."""
    return json.dumps(dataclasses.asdict(rec))


def record_from_json(text: str | bytes) -> FunctionRecord:
    """The record ``record_json`` wrote; ``ValueError`` for anything else (a cluster's
    catalog logs and skips such a record rather than failing on it)."""
    try:
        raw: dict[str, Any] = json.loads(text)
        raw["config"] = FunctionConfig.stored(raw["config"])
        raw["packages"] = tuple(raw.get("packages", ()))
        if raw.get("image"):
            img = raw["image"]
            for key in ("command", "entrypoint", "env"):
                img[key] = tuple(img.get(key, ()))
            raw["image"] = ImageSource(**img)
        return FunctionRecord(**raw)
    except (TypeError, KeyError, AttributeError, RecursionError, InvalidParameter) as exc:
        raise ValueError(f"not a function record: {type(exc).__name__}: {exc}") from exc


class FunctionStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.code_root = data_dir / "code"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.db = self._connect()
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(events)")}
        if "job_id" not in columns:  # a job's items are events that remember their job
            self.db.execute("ALTER TABLE events ADD COLUMN job_id TEXT")
            self.db.execute("ALTER TABLE events ADD COLUMN idx INTEGER")
        if "finished" not in columns:  # when an event got its final outcome (retention)
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("ALTER TABLE events ADD COLUMN finished REAL")
                # Outcomes written before the column existed: their age is their creation's.
                self.db.execute(
                    "UPDATE events SET finished=created WHERE status != 'pending'"
                )
        self.db.execute("CREATE INDEX IF NOT EXISTS events_job ON events(job_id, idx)")
        # Retention's lookups: standalone events by finishing time (job_id IS NULL), and
        # whether a job still has an item unfinished or finished recently.
        self.db.execute("CREATE INDEX IF NOT EXISTS events_finished ON events(job_id, finished)")
        self.db.execute("CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created)")
        bundle.clean_partial(self.code_root)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.data_dir / "state.db", isolation_level=None, check_same_thread=False
        )
        if db.execute("PRAGMA page_count").fetchone()[0] == 0:
            # Only a new database can take this without a full VACUUM (and only before
            # the switch to WAL writes its first page): freed pages are then handed back
            # to the file system by ``vacuum_some``.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        return db

    def another_handle(self) -> FunctionStore:
        """The same store over a connection of its own, for use by one other thread (the
        best-effort dispatcher's): its statements never join a transaction of this
        handle's, and WAL lets its reads run beside this handle's writes."""
        other = copy.copy(self)
        other.db = self._connect()
        return other

    def close(self) -> None:
        self.db.close()

    # -- code ------------------------------------------------------------------------------
    def put_code(self, data: bytes) -> tuple[str, Path]:
        sha, directory = bundle.unpack(data, self.code_root)
        zip_path = self.code_root / f"{sha}.zip"
        if not zip_path.exists():
            # A name of its own: two deploys of the same bytes run this at once (on
            # threads), and a shared temporary name let one rename the other's file away
            # (FileNotFoundError).  Both renames succeed; the bytes are the same.
            with tempfile.NamedTemporaryFile(
                dir=self.code_root, prefix=f".tmp-{sha}-", suffix=".zip", delete=False
            ) as tmp:
                tmp.write(data)
            try:
                os.chmod(tmp.name, 0o644)
                os.replace(tmp.name, zip_path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp.name)
                raise
        return sha, directory

    def code_dir(self, rec: FunctionRecord) -> Path:
        return self.code_root / rec.code_sha256

    def code_zip(self, rec: FunctionRecord) -> Path:
        return self.code_root / f"{rec.code_sha256}.zip"

    # -- functions -------------------------------------------------------------------------
    def load_all(self) -> Iterator[FunctionRecord]:
        for (text,) in self.db.execute("SELECT record FROM functions ORDER BY name"):
            yield record_from_json(text)

    def insert(self, rec: FunctionRecord) -> None:
        """Store a new function (``Conflict`` if the name is taken)."""
        try:
            self.db.execute(
                "INSERT INTO functions(name, record) VALUES (?, ?)", (rec.name, record_json(rec))
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"Function already exist: {rec.name}") from exc

    def save(self, rec: FunctionRecord) -> None:
        """Store a function's new revision (``NotFound`` if it is gone)."""
        cur = self.db.execute(
            "UPDATE functions SET record=? WHERE name=?", (record_json(rec), rec.name)
        )
        if cur.rowcount == 0:
            raise NotFound(f"Function not found: {rec.name}")

    def delete(self, name: str) -> None:
        """Delete a function with its versions, aliases and version counter."""
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute("DELETE FROM functions WHERE name=?", (name,))
            if cur.rowcount == 0:
                raise NotFound(f"Function not found: {name}")
            for table in ("versions", "aliases", "version_counters"):
                self.db.execute(f"DELETE FROM {table} WHERE function=?", (name,))

    # -- published versions and aliases -----------------------------------------------------
    def load_versions(self) -> Iterator[FunctionRecord]:
        for (text,) in self.db.execute("SELECT record FROM versions ORDER BY function, version"):
            yield record_from_json(text)

    def load_aliases(self) -> Iterator[AliasRecord]:
        for (text,) in self.db.execute("SELECT record FROM aliases ORDER BY function, name"):
            yield AliasRecord.from_json(text)

    def publish(self, name: str, make: Callable[[int], FunctionRecord]) -> FunctionRecord:
        """Store ``make(n)`` as version ``n`` of ``name``, ``n`` one past the function's
        version counter, and move the counter to ``n`` -- one transaction.  The counter
        outlives the versions it numbered: a deleted version's number is never given
        again (``NotFound`` if the function is gone)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if not self.db.execute("SELECT 1 FROM functions WHERE name=?", (name,)).fetchone():
                raise NotFound(f"Function not found: {name}")
            row = self.db.execute(
                "SELECT last FROM version_counters WHERE function=?", (name,)
            ).fetchone()
            number = (int(row[0]) if row else 0) + 1
            rec = make(number)
            self.db.execute(
                "INSERT INTO versions(function, version, record) VALUES (?, ?, ?)",
                (name, number, record_json(rec)),
            )
            self.db.execute(
                "INSERT INTO version_counters(function, last) VALUES (?, ?) "
                "ON CONFLICT(function) DO UPDATE SET last=excluded.last",
                (name, number),
            )
        return rec

    def delete_version(self, name: str, version: str) -> None:
        cur = self.db.execute(
            "DELETE FROM versions WHERE function=? AND version=?", (name, int(version))
        )
        if cur.rowcount == 0:
            raise NotFound(f"Function not found: {name}:{version}")

    def put_alias(self, alias: AliasRecord, *, create: bool) -> None:
        """Store a new alias (``create``; ``Conflict`` if the name is taken) or replace one
        (``NotFound`` if it is gone)."""
        if create:
            try:
                self.db.execute(
                    "INSERT INTO aliases(function, name, record) VALUES (?, ?, ?)",
                    (alias.function, alias.name, alias.to_json()),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"Alias already exists: {alias.function}:{alias.name}") from exc
            return
        cur = self.db.execute(
            "UPDATE aliases SET record=? WHERE function=? AND name=?",
            (alias.to_json(), alias.function, alias.name),
        )
        if cur.rowcount == 0:
            raise NotFound(f"Alias not found: {alias.function}:{alias.name}")

    def delete_alias(self, function: str, name: str) -> None:
        cur = self.db.execute("DELETE FROM aliases WHERE function=? AND name=?", (function, name))
        if cur.rowcount == 0:
            raise NotFound(f"Alias not found: {function}:{name}")

    # -- async events ------------------------------------------------------------------------
    def enqueue_event(self, function: str, payload: bytes) -> str:
        event_id = str(uuid.uuid4())
        self.db.execute(
            "INSERT INTO events(id, function, payload, created) VALUES (?, ?, ?, ?)",
            (event_id, function, payload, time.time()),
        )
        return event_id

    # -- batch jobs: a job row plus one event per input -------------------------------------
    def create_job(self, function: str, inputs: list[bytes]) -> str:
        job_id = str(uuid.uuid4())
        now = time.time()
        with self.db:  # one transaction: the job and all its items, or nothing
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO jobs(id, function, created, total) VALUES (?, ?, ?, ?)",
                (job_id, function, now, len(inputs)),
            )
            self.db.executemany(
                "INSERT INTO events(id, function, payload, created, job_id, idx) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (f"{job_id}/{i}", function, payload, now, job_id, i)
                    for i, payload in enumerate(inputs)
                ],
            )
        return job_id

    def resolve_job_id(self, job_id: str) -> str | None:
        """The full id of the job ``job_id`` names: the id itself, or a unique prefix of
        one (at least MIN_JOB_ID_PREFIX characters).  None when no job matches; an
        ambiguous or too short prefix is an InvalidParameter that says so."""
        if self.db.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone():
            return job_id
        prefix = job_id.lower()
        if len(prefix) < MIN_JOB_ID_PREFIX:
            raise InvalidParameter(
                f"job id {job_id!r}: give the whole id or at least {MIN_JOB_ID_PREFIX} of its "
                "first characters"
            )
        # Ids are ASCII (uuid4 text): every id that starts with the prefix sorts between
        # it and the prefix followed by DEL, so the primary key's index answers this.
        ids = [
            row[0]
            for row in self.db.execute(
                "SELECT id FROM jobs WHERE id >= ? AND id < ? ORDER BY id LIMIT 3",
                (prefix, prefix + "\x7f"),
            )
        ]
        if len(ids) > 1:
            shown = ", ".join(ids[:2]) + (", ..." if len(ids) > 2 else "")
            raise InvalidParameter(
                f"job id prefix {job_id!r} is ambiguous ({shown}): give more characters"
            )
        return ids[0] if ids else None

    def job(self, job_id: str) -> dict[str, Any] | None:
        """A job's progress; ``job_id`` may be a unique prefix (``resolve_job_id``)."""
        resolved = self.resolve_job_id(job_id)
        if resolved is None:
            return None
        job_id = resolved
        row = self.db.execute(
            "SELECT function, created, total FROM jobs WHERE id=?", (job_id,)
        ).fetchone()
        if row is None:
            return None
        counts = dict(
            self.db.execute(
                "SELECT status, COUNT(*) FROM events WHERE job_id=? GROUP BY status", (job_id,)
            ).fetchall()
        )
        done = counts.get("succeeded", 0) + counts.get("failed", 0) + counts.get("dropped", 0)
        return {
            "JobId": job_id,
            "function": row[0],
            "created": row[1],
            "total": row[2],
            "succeeded": counts.get("succeeded", 0),
            "failed": counts.get("failed", 0) + counts.get("dropped", 0),
            "pending": counts.get("pending", 0),
            "status": "completed" if done == row[2] else "running",
        }

    def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        ids = [
            r[0]
            for r in self.db.execute("SELECT id FROM jobs ORDER BY created DESC LIMIT ?", (limit,))
        ]
        return [j for j in (self.job(i) for i in ids) if j is not None]

    def job_results(self, job_id: str) -> list[dict[str, Any]]:
        """A job's results in input order, each ``result`` the handler's JSON value (its
        error object when it failed; a string when the payload is not JSON).  ``job_id``
        may be a unique prefix (``resolve_job_id``)."""
        job_id = self.resolve_job_id(job_id) or job_id
        rows = self.db.execute(
            "SELECT idx, status, attempts, result FROM events WHERE job_id=? ORDER BY idx",
            (job_id,),
        ).fetchall()
        return [
            {
                "index": r[0],
                "status": r[1],
                "attempts": r[2],
                "result": result_value(r[3]),
            }
            for r in rows
        ]

    def pending_count(self) -> int:
        return int(
            self.db.execute("SELECT COUNT(*) FROM events WHERE status='pending'").fetchone()[0]
        )

    def pending_events(self, limit: int = 100) -> list[tuple[str, str, bytes, int]]:
        rows = self.db.execute(
            "SELECT id, function, payload, attempts FROM events WHERE status='pending' ORDER BY created LIMIT ?",
            (limit,),
        ).fetchall()
        return [(r[0], r[1], bytes(r[2]), int(r[3])) for r in rows]

    def record_outcomes(
        self,
        finished: Sequence[tuple[str, str, bytes, int]],
        retried: Sequence[tuple[str, int]] = (),
        *,
        now: float | None = None,
    ) -> None:
        """Record events' outcomes in one transaction: ``finished`` as (id, status, result,
        attempts) -- final, stamped with ``now`` (default: the time) for retention --,
        ``retried`` as (id, attempts) -- a failed attempt, pending again.  One commit for a
        batch instead of one per event."""
        stamp = time.time() if now is None else now
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "UPDATE events SET status=?, result=?, attempts=?, finished=? WHERE id=?",
                [
                    (status, result, attempts, stamp, i)
                    for i, status, result, attempts in finished
                ],
            )
            self.db.executemany(
                "UPDATE events SET attempts=? WHERE id=?",
                [(attempts, i) for i, attempts in retried],
            )

    def event(self, event_id: str) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT function, status, attempts, result FROM events WHERE id=?", (event_id,)
        ).fetchone()
        if row is None:
            return None
        return {
            "function": row[0],
            "status": row[1],
            "attempts": row[2],
            "result": result_value(row[3]),
        }

    # -- retention ---------------------------------------------------------------------------
    def expire_events(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` Event invocations (not job items) that finished before
        ``before`` (a ``time.time()`` value), with their payloads and results; how many
        went.  Pending events -- queued, or running now -- have no finishing time and are
        never touched."""
        cur = self.db.execute(
            "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE job_id IS NULL "
            "AND finished < ? AND status != 'pending' LIMIT ?)",
            (before, limit),
        )
        return cur.rowcount

    def expired_jobs(self, before: float, limit: int) -> list[str]:
        """Up to ``limit`` jobs finished before ``before``: every item has its final
        outcome, the last of them written before ``before``.  A job with an item still
        pending is not finished, however old."""
        rows = self.db.execute(
            # Two NOT EXISTS rather than one with an OR: each is one seek in the index.
            "SELECT id FROM jobs WHERE created < ? "
            "AND NOT EXISTS (SELECT 1 FROM events WHERE job_id=jobs.id AND finished IS NULL) "
            "AND NOT EXISTS (SELECT 1 FROM events WHERE job_id=jobs.id AND finished >= ?) "
            "ORDER BY created LIMIT ?",
            (before, before, limit),
        ).fetchall()
        return [r[0] for r in rows]

    def expire_job(self, job_id: str, limit: int) -> int:
        """Delete up to ``limit`` of a finished job's items; once none is left, the job
        itself; how many rows went (0: the job is gone).  Its row goes last, so a worker
        stopped half way leaves an expired job that the next pass finds again, never
        orphaned items (meanwhile the job reads as partly deleted)."""
        with self.db:
            self.db.execute("BEGIN")
            deleted = self.db.execute(
                "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE job_id=? "
                "AND status != 'pending' LIMIT ?)",
                (job_id, max(1, limit)),
            ).rowcount
            if deleted < limit:
                left = self.db.execute(
                    "SELECT 1 FROM events WHERE job_id=? LIMIT 1", (job_id,)
                ).fetchone()
                if left is None:
                    deleted += self.db.execute("DELETE FROM jobs WHERE id=?", (job_id,)).rowcount
        return deleted

    def vacuum_some(self, pages: int) -> int:
        """Give up to ``pages`` free pages back to the file system; how many are still
        free.  Only a database created with ``auto_vacuum=INCREMENTAL`` can (0 for any
        other: it reuses free pages for new rows, and its file keeps its size)."""
        if self.db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            return 0
        self.db.execute(f"PRAGMA incremental_vacuum({int(pages)})").fetchall()
        return int(self.db.execute("PRAGMA freelist_count").fetchone()[0])
