"""The SQLite log of sessions, chunks, turns, snapshots and runs, and the queries on it.

Light on purpose (stdlib + sqlite-utils): the CLI, the TUI and replay all import it.
Columns named `*_json` come back decoded too, under the name without the suffix
(`config`, `versions`, `token_ids`, `extra`, `report`, `retrieved`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from streamchat.errors import UserError
from streamchat.migrations import migrate, write_transaction

DB_NAME = "streamchat.db"
BUSY_TIMEOUT_S = 30.0  # long enough to wait out another process's write; writes are one event each
TURN_MODES = ("streaming", "offline")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # it also names the session's folder


def home_path() -> Path:
    """`$STREAMCHAT_HOME`, else the user's data directory (platformdirs: ~/.local/share/streamchat on
    Linux, ~/Library/Application Support/streamchat on macOS), as `llm` does; read on every call.
    Not created: `home()` does that."""
    env = os.environ.get("STREAMCHAT_HOME")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("streamchat", appauthor=False))


def home() -> Path:
    """`home_path()`, created if missing."""
    path = home_path()
    path.mkdir(parents=True, exist_ok=True)
    return path


def utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


_id_lock = threading.Lock()
_last_id = (0, 0)


def new_id() -> str:
    """32 hex chars: 48-bit milliseconds then 80 random bits, so ids sort by time.

    Within one millisecond the random part counts up (ULID's monotonic rule), so ids
    made by one process also sort in the order they were made.
    """
    global _last_id
    with _id_lock:
        ms, rand = time.time_ns() // 1_000_000, secrets.randbits(80)
        if ms <= _last_id[0]:
            ms, rand = _last_id[0], _last_id[1] + 1
            if rand >> 80:  # the random part ran out: borrow the next millisecond
                ms, rand = ms + 1, 0
        _last_id = (ms, rand)
    return f"{ms:012x}{rand:020x}"


def default_session_name(video_path: str | os.PathLike) -> str:
    """Like '2026-11-26-clip-1a2b': UTC date, the video's file stem, 4 random hex digits."""
    stem = re.sub(r"[^a-z0-9]+", "-", Path(video_path).stem.lower()).strip("-")[:32] or "video"
    return f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}-{stem}-{secrets.token_hex(2)}"


def _decode(row: dict) -> dict:
    """Add the decoded value of every `*_json` column under the name without the suffix."""
    for key in [k for k in row if k.endswith("_json")]:
        raw = row[key]
        row[key[: -len("_json")]] = json.loads(raw) if raw else ([] if key in ("token_ids_json", "retrieved_json") else {})
    return row


def _encode(fields: dict, json_keys: tuple[str, ...]) -> dict:
    """`token_ids=[...]` -> `token_ids_json='[...]'` (and so on) for the keys given."""
    out = dict(fields)
    for key in json_keys:
        if key in out:
            out[f"{key}_json"] = json.dumps(out.pop(key))
    return out


class Store:
    """The session log at `path` (default `home()/streamchat.db`), created and migrated on open.

    Safe to share between threads (one lock serialises use of the connection) and between
    processes (WAL: readers never block the writer; writers wait up to BUSY_TIMEOUT_S).
    """

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else home() / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: the TUI's engine worker logs while the UI thread reads.
        conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        self.db.execute(f"pragma busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self.db.enable_wal()
        # In WAL mode NORMAL keeps every commit through a crash of the process (not of the OS).
        self.db.execute("pragma synchronous = normal")
        self.db.execute("pragma foreign_keys = on")
        migrate(self.db)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One transaction per logged event."""
        with self._lock, write_transaction(self.db) as db:
            yield db

    def _rows(self, sql: str, params: list | dict | None = None) -> list[dict]:
        with self._lock:
            return [_decode(row) for row in self.db.query(sql, params)]

    # sessions

    def create_session(
        self,
        *,
        video_path: str | os.PathLike,
        video_sha256: str,
        model_id: str,
        config: dict,
        history: str,
        name: str | None = None,
        versions: dict | None = None,
        config_fingerprint: str = "",
    ) -> dict:
        if name is not None and not _NAME_RE.match(name):
            raise UserError(
                f"bad session name {name!r}: use up to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        now = utcnow()
        row = {
            "id": new_id(),
            "name": name or default_session_name(video_path),
            "video_path": str(video_path),
            "video_sha256": video_sha256,
            "model_id": model_id,
            "config_fingerprint": config_fingerprint,
            "config_json": json.dumps(config, sort_keys=True),
            "history": history,
            "created_utc": now,
            "updated_utc": now,
            "versions_json": json.dumps(versions or {}, sort_keys=True),
        }
        for _ in range(5):  # a generated name can collide; a given one is the user's to change
            try:
                with self._write() as db:
                    db["sessions"].insert(row)
                return self.get_session(row["id"])
            except sqlite3.IntegrityError:
                if name is not None:
                    raise UserError(f"a session named {name!r} already exists; pick another name") from None
                row["name"] = default_session_name(video_path)
        raise RuntimeError("could not generate an unused session name")

    def get_session(self, name_or_id: str) -> dict:
        rows = self._rows("select * from sessions where id = ? or name = ? limit 1", [name_or_id, name_or_id])
        if not rows:
            raise UserError(f"no session named {name_or_id}; `streamchat sessions list` shows them")
        return rows[0]

    def list_sessions(self, *, every: bool = True) -> list[dict]:
        """Most recently updated first, each with `n_chunks` (the live stream's), `n_turns`,
        `n_snapshots` and `n_attempts`. `every=False` leaves out sessions that logged no turn
        and saved no snapshot (every `chat` or `run` starts one)."""
        rows = self._rows(
            f"""
            select sessions.*,
              (select count(*) from turns where turns.session_id = sessions.id) as n_turns,
              (select count(*) from snapshots where snapshots.session_id = sessions.id) as n_snapshots,
              (select count(*) from attempts where attempts.session_id = sessions.id) as n_attempts
            from sessions
            {"" if every else "where n_turns > 0 or n_snapshots > 0"}
            order by sessions.updated_utc desc, sessions.id desc
            """
        )
        for row in rows:
            row["n_chunks"] = len(self.chunks(row["id"]))
        return rows

    def touch(self, session_id: str) -> None:
        with self._write() as db:
            db.execute("update sessions set updated_utc = ? where id = ?", [utcnow(), session_id])

    def update_session(self, session_id: str, **fields: Any) -> None:
        """Change a session's plain columns (e.g. `video_path` after the video moved)."""
        fields = {k: v for k, v in fields.items() if k not in ("id", "created_utc")}
        with self._write() as db:
            unknown = set(fields) - set(db["sessions"].columns_dict)
            if unknown:
                raise TypeError(f"sessions has no column(s) {sorted(unknown)}")
            db["sessions"].update(session_id, {**fields, "updated_utc": utcnow()})

    def delete_session(self, name_or_id: str) -> list[str]:
        """Remove the session and its chunks, turns, snapshots and runs; return the snapshot
        paths so the caller can delete the files."""
        session_id = self.get_session(name_or_id)["id"]
        with self._write() as db:
            paths = [r[0] for r in db.execute("select path from snapshots where session_id = ?", [session_id])]
            # Replays logged under another session keep their turns but lose the link.
            db.execute(
                "update turns set replay_of = null where session_id != ? and replay_of in "
                "(select id from turns where session_id = ?)",
                [session_id, session_id],
            )
            for table in ("runs", "snapshots", "chunks"):
                db.execute(f"delete from {table} where session_id = ?", [session_id])
            db.execute("update turns set replay_of = null where session_id = ?", [session_id])
            db.execute("delete from turns where session_id = ?", [session_id])
            db.execute("delete from attempts where session_id = ?", [session_id])
            db.execute("delete from sessions where id = ?", [session_id])
        return paths

    # logged events

    def _log(self, table: str, fields: dict, json_keys: tuple[str, ...] = ()) -> str:
        row = {"id": new_id(), "created_utc": utcnow(), **_encode(fields, json_keys)}
        with self._write() as db:
            unknown = set(row) - set(db[table].columns_dict)
            if unknown:  # a typo would otherwise become a new column
                raise TypeError(f"{table} has no column(s) {sorted(unknown)}")
            db[table].insert(row)
            if row.get("session_id"):
                db.execute("update sessions set updated_utc = ? where id = ?", [row["created_utc"], row["session_id"]])
        return row["id"]

    def log_chunk(self, session_id: str, **fields: Any) -> str:
        return self._log("chunks", {"session_id": session_id, **fields})

    def log_turn(self, session_id: str, **fields: Any) -> str:
        """`token_ids` (a list) and `extra` (a dict) are stored as JSON; returns the turn's id."""
        fields.setdefault("mode", "streaming")
        if fields["mode"] not in TURN_MODES:
            raise ValueError(f"turn mode must be one of {TURN_MODES}, not {fields['mode']!r}")
        return self._log("turns", {"session_id": session_id, **fields}, ("token_ids", "extra", "retrieved"))

    def log_snapshot(self, session_id: str, **fields: Any) -> str:
        return self._log("snapshots", {"session_id": session_id, **fields})

    def log_run(self, kind: str, report: dict, session_id: str | None = None, run_id: str | None = None) -> str:
        """`run_id` (from `new_id()`) when turns logged before the run must point at it (replay)."""
        fields = {"kind": kind, "session_id": session_id, "report": report}
        if run_id is not None:
            fields["id"] = run_id
        return self._log("runs", fields, ("report",))

    def start_attempt(self, session_id: str, command: str, *, from_snapshot: dict | None = None) -> dict:
        """A new attempt at session `session_id`: the first (`from_snapshot` None) or one that
        restored `from_snapshot` (a snapshots row) and goes on from its chunk count."""
        with self._write() as db:
            number = db.execute("select coalesce(max(number), 0) + 1 from attempts where session_id = ?", [session_id]).fetchone()[0]
            row = {
                "id": new_id(),
                "session_id": session_id,
                "number": number,
                "parent_id": from_snapshot.get("attempt_id") if from_snapshot else None,
                "from_snapshot_id": from_snapshot["id"] if from_snapshot else None,
                "start_chunk": (from_snapshot.get("chunks") or 0) if from_snapshot else 0,
                "command": command,
                "created_utc": utcnow(),
            }
            db["attempts"].insert(row)
        return row

    def attempts(self, session_id: str) -> list[dict]:
        """Oldest first; the last one is live."""
        return self._rows("select * from attempts where session_id = ? order by number", [session_id])

    # queries

    def chunks(self, session_id: str, *, every_attempt: bool = False) -> list[dict]:
        """The live stream's chunks, one row per chunk index: the newest attempt's own chunks and,
        below the chunk it resumed from, its parent's (and so on up). Each row has `attempt` (its
        number). `every_attempt=True`: every row logged, including chunks a later resume re-encoded."""
        rows = self._rows(
            "select chunks.*, attempts.number as attempt from chunks left join attempts on attempts.id = chunks.attempt_id "
            "where chunks.session_id = ? order by chunks.chunk_index, attempts.number, chunks.id",
            [session_id],
        )
        if every_attempt:
            return rows
        attempts = {a["id"]: a for a in self.attempts(session_id)}
        chain, upper = [], float("inf")  # (attempt id, first chunk index, end) from the live attempt up
        attempt = max(attempts.values(), key=lambda a: a["number"], default=None)
        while attempt is not None and len(chain) <= len(attempts):
            chain.append((attempt["id"], attempt["start_chunk"] or 0, upper))
            upper = min(upper, attempt["start_chunk"] or 0)
            attempt = attempts.get(attempt["parent_id"])
        live: dict[int, dict] = {}
        for row in rows:
            owned = row["attempt_id"] is None or any(
                row["attempt_id"] == a and lo <= row["chunk_index"] < hi for a, lo, hi in chain
            )
            if owned:
                live[row["chunk_index"]] = row  # within one attempt the later row wins
        return [live[i] for i in sorted(live)]

    def turns(self, session_id: str, mode: str | None = None) -> list[dict]:
        """Oldest first."""
        where, params = "session_id = ?", [session_id]
        if mode is not None:
            where, params = where + " and mode = ?", params + [mode]
        return self._rows(f"select * from turns where {where} order by id", params)

    def snapshots(self, session_id: str) -> list[dict]:
        return self._rows("select * from snapshots where session_id = ? order by id", [session_id])

    def latest_snapshot(self, session_id: str) -> dict | None:
        rows = self._rows("select * from snapshots where session_id = ? order by id desc limit 1", [session_id])
        return rows[0] if rows else None

    def runs(self, kind: str | None = None, session_id: str | None = None, n: int = 0) -> list[dict]:
        """Newest first (the latest `n`; all if n <= 0), each with `session_name` (None for runs
        of no session, such as compare and bench)."""
        clauses, params = [], []
        for column, value in (("runs.kind", kind), ("runs.session_id", session_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f"where {' and '.join(clauses)}" if clauses else ""
        return self._rows(
            f"select runs.*, sessions.name as session_name from runs left join sessions on sessions.id = runs.session_id "
            f"{where} order by runs.id desc limit ?",
            params + [n if n > 0 else -1],
        )

    def count_turns(self) -> int:
        with self._lock:
            return self.db.execute("select count(*) from turns").fetchone()[0]

    def logs(self, n: int = 3, query: str | None = None, session: str | None = None, model: str | None = None,
             run: str | None = None) -> list[dict]:
        """The latest `n` turns (all if n <= 0), newest last, like `llm logs`; each has
        `session_name`, `model_id` and `attempt` (its attempt's number). `query` is full-text
        search over questions and answers: every word must appear. `model`: the session's
        model id; `run`: the run (a replay) that logged the turn."""
        clauses, params = [], {"limit": n if n > 0 else -1}
        if model is not None:
            clauses.append("sessions.model_id = :model")
            params["model"] = model
        if run is not None:
            clauses.append("turns.run_id = :run")
            params["run"] = run
        if query is not None:
            # Quote each word as FTS5 sees words (unicode61 splits on non-word characters),
            # so user text such as `what's "that"?` is never FTS syntax.
            words = re.findall(r"\w+", query)
            if not words:
                return []
            clauses.append("turns.rowid in (select rowid from turns_fts where turns_fts match :query)")
            params["query"] = " ".join(f'"{w}"' for w in words)
        if session is not None:
            clauses.append("turns.session_id = :session_id")
            params["session_id"] = self.get_session(session)["id"]
        where = f"where {' and '.join(clauses)}" if clauses else ""
        rows = self._rows(
            f"""
            select turns.*, sessions.name as session_name, sessions.model_id as model_id, attempts.number as attempt
            from turns join sessions on sessions.id = turns.session_id
            left join attempts on attempts.id = turns.attempt_id
            {where} order by turns.id desc limit :limit
            """,
            params,
        )
        return rows[::-1]

    # export

    def export(self, name_or_id: str, fmt: str = "md") -> str:
        """A session with its chunk summary, chunks, turns, snapshots and runs, as Markdown or JSON."""
        if fmt not in ("md", "json"):
            raise UserError(f"unknown export format {fmt!r}; use 'md' or 'json'")
        session = self.get_session(name_or_id)
        chunks = self.chunks(session["id"])
        doc = {
            "session": _plain(session),
            "chunk_summary": summarize_chunks(chunks),
            "attempts": [_plain(a) for a in self.attempts(session["id"])],
            "chunks": [_plain(c) for c in chunks],
            "turns": [_plain(t) for t in self.turns(session["id"])],
            "snapshots": [_plain(s) for s in self.snapshots(session["id"])],
            "runs": [_plain(r) for r in self.runs(session_id=session["id"])],
        }
        if fmt == "json":
            return json.dumps(doc, indent=2)
        return _markdown(doc)


def _plain(row: dict) -> dict:
    """The row without its raw `*_json` text (the decoded values stay)."""
    return {k: v for k, v in row.items() if not k.endswith("_json")}


def summarize_chunks(chunks: list[dict]) -> dict:
    def values(key: str) -> list:
        return [c[key] for c in chunks if c.get(key) is not None]

    encode_ms = values("encode_ms")
    last = chunks[-1] if chunks else {}
    return {
        "count": len(chunks),
        "frame_first": min(values("frame_first"), default=None),
        "frame_last": max(values("frame_last"), default=None),
        "t_start_s": min(values("t_start_s"), default=None),
        "t_end_s": max(values("t_end_s"), default=None),
        "tokens": sum(values("tokens")),
        "cache_tokens_after": last.get("cache_tokens_after"),
        "cache_bytes": last.get("cache_bytes"),
        "encode_ms_total": sum(encode_ms),
        "encode_ms_mean": sum(encode_ms) / len(encode_ms) if encode_ms else None,
        "gpu_peak_bytes": max(values("gpu_peak_bytes"), default=None),
    }


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _mib(value: int | None) -> str:
    """None: not logged; 0: no GPU to measure (the CPU reports no memory figures)."""
    if value is None:
        return "–"
    return "n/a" if value == 0 else f"{value / 2**20:.1f} MiB"


def _attempts_md(attempts: list[dict]) -> list[str]:
    """A line on the attempts when a resume made more than one (the chunks above are the live one's)."""
    if len(attempts) < 2:
        return []
    parts = [f"{a['number']}: {a['command']}" + (f" from chunk {a['start_chunk']}" if a.get("from_snapshot_id") else "") for a in attempts]
    return ["", f"{len(attempts)} attempts ({'; '.join(parts)}); live: {attempts[-1]['number']}."]


def _markdown(doc: dict) -> str:
    s, cs = doc["session"], doc["chunk_summary"]
    lines = [
        f"# Session {s['name']}",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| id | `{s['id']}` |",
        f"| video | `{s['video_path']}` |",
        f"| video sha256 | `{s['video_sha256']}` |",
        f"| model | `{s['model_id']}` |",
        f"| history | {s['history']} |",
        f"| config fingerprint | `{s['config_fingerprint']}` |",
        f"| created (UTC) | {s['created_utc']} |",
        f"| updated (UTC) | {s['updated_utc']} |",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(s["config"], indent=2, sort_keys=True),
        "```",
        "",
        "## Chunks",
        "",
        f"{cs['count']} chunks, frames {_fmt(cs['frame_first'])}–{_fmt(cs['frame_last'])}, "
        f"{_fmt(cs['t_start_s'], ' s')}–{_fmt(cs['t_end_s'], ' s')}, {cs['tokens']} video tokens; "
        f"cache {_fmt(cs['cache_tokens_after'])} tokens ({_mib(cs['cache_bytes'])}) after the last; "
        f"encode {_fmt(cs['encode_ms_mean'], ' ms')} mean, {_fmt(cs['encode_ms_total'], ' ms')} total; "
        f"GPU peak {_mib(cs['gpu_peak_bytes'])}.",
        *_attempts_md(doc.get("attempts") or []),
        "",
        "## Turns",
    ]
    for i, t in enumerate(doc["turns"], 1):
        replay = f", replay of `{t['replay_of']}`" if t.get("replay_of") else ""
        lines += [
            "",
            f"### {i}. {t['mode']} at {_fmt(t['at_s'], ' s')} ({_fmt(t['frames_seen'])} frames{replay})",
            "",
            f"**Q:** {t['question']}",
            "",
            "**A:**",
            "",
            t["answer"] or "",
            "",
            f"TTFT {_fmt(t['ttft_ms'], ' ms')} · latency {_fmt(t['latency_ms'], ' ms')} · "
            f"{_fmt(t['new_tokens'])} tokens · {_fmt(t['tokens_per_s'], ' tok/s')} · "
            f"cache {_fmt(t['cache_tokens'])} tokens · peak {_mib(t['peak_bytes'])}",
        ]
    if doc["snapshots"]:
        lines += ["", "## Snapshots", ""]
        lines += [
            f"- `{snap['path']}`: {snap['chunks']} chunks, {snap['cache_tokens']} cache tokens, {_mib(snap['bytes'])}"
            for snap in doc["snapshots"]
        ]
    return "\n".join(lines) + "\n"
