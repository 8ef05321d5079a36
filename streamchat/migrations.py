"""The store's schema, as an append-only list of named migrations (the simonw/llm way).

A migration that has shipped is never edited: change the schema by appending a new
function. `migrate` records each applied name in `_streamchat_migrations`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
from collections.abc import Callable, Iterator

import sqlite_utils

MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []
migration = MIGRATIONS.append

MIGRATIONS_TABLE = "_streamchat_migrations"


@contextlib.contextmanager
def write_transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """One transaction that takes the write lock up front.

    BEGIN IMMEDIATE waits (busy_timeout) for another process's writer; a deferred BEGIN
    that reads first and writes later can instead fail at once with "database is locked"
    when another process committed in between. sqlite-utils calls inside nest as savepoints.
    """
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    else:
        db.conn.execute("COMMIT")


def applied(db: sqlite_utils.Database) -> set[str]:
    if not db[MIGRATIONS_TABLE].exists():
        return set()
    return {row["name"] for row in db.query(f"select name from {MIGRATIONS_TABLE}")}


def migrate(db: sqlite_utils.Database, *, stop_after: str | None = None) -> list[str]:
    """Apply the missing migrations in order, each in its own transaction; returns their names.

    `stop_after` (a migration's name) stops there: tests use it to build an old schema.
    """
    names = [fn.__name__ for fn in MIGRATIONS]
    if stop_after is not None and stop_after not in names:
        raise ValueError(f"no migration named {stop_after!r}")
    done = applied(db)
    ran = []
    for fn in MIGRATIONS:
        name = fn.__name__
        if name not in done:
            with write_transaction(db):
                db.execute(f"create table if not exists {MIGRATIONS_TABLE} (name text primary key, applied_at text)")
                # Another process may have applied it while we waited for the lock.
                if not db.execute(f"select 1 from {MIGRATIONS_TABLE} where name = ?", [name]).fetchone():
                    fn(db)
                    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
                    db[MIGRATIONS_TABLE].insert({"name": name, "applied_at": now})
                    ran.append(name)
        if name == stop_after:
            break
    return ran


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db["sessions"].create(
        {
            "id": str,
            "name": str,
            "video_path": str,
            "video_sha256": str,
            "model_id": str,
            "config_fingerprint": str,
            "config_json": str,  # sampling, chunk settings, history mode
            "history": str,
            "created_utc": str,
            "updated_utc": str,
            "versions_json": str,  # software versions (torch, transformers, streamchat, ...)
        },
        pk="id",
    )
    db["sessions"].create_index(["name"], unique=True)
    db["chunks"].create(
        {
            "id": str,
            "session_id": str,
            "chunk_index": int,
            "frame_first": int,
            "frame_last": int,
            "t_start_s": float,
            "t_end_s": float,
            "tokens": int,
            "cache_tokens_after": int,
            "cache_bytes": int,
            "encode_ms": float,
            "gpu_allocated_bytes": int,
            "gpu_reserved_bytes": int,
            "gpu_peak_bytes": int,
            "created_utc": str,
        },
        pk="id",
        foreign_keys=[("session_id", "sessions", "id")],
    )
    db["chunks"].create_index(["session_id", "chunk_index"])
    db["turns"].create(
        {
            "id": str,
            "session_id": str,
            "mode": str,  # 'streaming' | 'offline'
            "at_s": float,
            "frames_seen": int,
            "question": str,
            "answer": str,
            "token_ids_json": str,
            "ttft_ms": float,
            "latency_ms": float,
            "new_tokens": int,
            "tokens_per_s": float,
            "cache_tokens": int,
            "peak_bytes": int,
            "replay_of": str,  # the streaming turn an offline replay re-ran
            "created_utc": str,
        },
        pk="id",
        foreign_keys=[("session_id", "sessions", "id"), ("replay_of", "turns", "id")],
    )
    db["turns"].create_index(["session_id"])
    db["snapshots"].create(
        {
            "id": str,
            "session_id": str,
            "path": str,
            "bytes": int,
            "sha256": str,
            "chunks": int,
            "cache_tokens": int,
            "frames": int,
            "created_utc": str,
        },
        pk="id",
        foreign_keys=[("session_id", "sessions", "id")],
    )
    db["snapshots"].create_index(["session_id"])


@migration
def m002_turns_fts(db: sqlite_utils.Database) -> None:
    # Triggers keep the index current; enable_fts also indexes rows that already exist.
    db["turns"].enable_fts(["question", "answer"], create_triggers=True)


@migration
def m003_runs(db: sqlite_utils.Database) -> None:
    db["runs"].create(
        {"id": str, "kind": str, "session_id": str, "created_utc": str, "report_json": str},
        pk="id",
        foreign_keys=[("session_id", "sessions", "id")],
    )
    db["runs"].create_index(["kind"])
    db["runs"].create_index(["session_id"])


@migration
def m004_turns_extra(db: sqlite_utils.Database) -> None:
    # Free-form per-turn details (prompt layout, memory policy events) without a migration each.
    db["turns"].add_column("extra_json", str)
    db["turns"].create_index(["replay_of"])


@migration
def m005_attempts(db: sqlite_utils.Database) -> None:
    # One row per `run` (or app session) and per `resume` of a session. A resume from an earlier
    # snapshot re-encodes chunks that an earlier attempt also logged; the attempt id on each chunk,
    # turn and snapshot tells the rows apart, and the newest attempt's chain is the live stream.
    db["attempts"].create(
        {
            "id": str,
            "session_id": str,
            "number": int,  # 1, 2, ... within the session
            "parent_id": str,  # the attempt whose snapshot this one restored (null for the first)
            "from_snapshot_id": str,
            "start_chunk": int,  # chunks below this index come from the parent's chain
            "command": str,  # 'run', 'resume', 'chat', ...
            "created_utc": str,
        },
        pk="id",
        foreign_keys=[("session_id", "sessions", "id")],
    )
    db["attempts"].create_index(["session_id", "number"], unique=True)
    for table in ("chunks", "turns", "snapshots"):
        db[table].add_column("attempt_id", str)
        db[table].create_index(["attempt_id"])
    # Rows logged before attempts existed all belong to a first attempt of their session.
    for session_id, created in list(db.execute("select id, created_utc from sessions")):
        attempt_id = session_id[:12] + secrets.token_hex(10)  # sorts with the session, like store.new_id
        db["attempts"].insert({"id": attempt_id, "session_id": session_id, "number": 1, "parent_id": None,
                               "from_snapshot_id": None, "start_chunk": 0, "command": "run", "created_utc": created})
        for table in ("chunks", "turns", "snapshots"):
            db.execute(f"update {table} set attempt_id = ? where session_id = ?", [attempt_id, session_id])


@migration
def m006_turns_run(db: sqlite_utils.Database) -> None:
    # The run (e.g. one `replay`) that logged a turn, so each replay's offline turns are found by its run id.
    db["turns"].add_column("run_id", str)
    db["turns"].create_index(["run_id"])


@migration
def m007_turns_retrieved(db: sqlite_utils.Database) -> None:
    # Bounded memory: the archived time spans a turn brought back ([{t_start_s, t_end_s, ...}], JSON).
    db["turns"].add_column("retrieved_json", str)
