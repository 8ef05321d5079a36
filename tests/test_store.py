import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import sqlite_utils

from streamchat.errors import UserError
from streamchat.migrations import MIGRATIONS, applied, migrate
from streamchat.store import Store, home, new_id

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_HOME", str(tmp_path / "home"))
    with Store() as s:
        yield s


def make_session(store, **kw):
    args = dict(
        video_path="/videos/Beach Clip.mp4",
        video_sha256="ab" * 32,
        model_id="tiny-random",
        config={"chunk_frames": 4, "fps": 2.0, "max_new_tokens": 16},
        history="rollback",
        versions={"streamchat": "0.1.0"},
        config_fingerprint="f00d",
    )
    args.update(kw)
    return store.create_session(**args)


def run_python(code: str, db_path: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(db_path)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def test_home_reads_env_each_call_and_creates_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_HOME", str(tmp_path / "a"))
    assert home() == tmp_path / "a" and (tmp_path / "a").is_dir()
    monkeypatch.setenv("STREAMCHAT_HOME", str(tmp_path / "b" / "c"))
    assert home() == tmp_path / "b" / "c" and (tmp_path / "b" / "c").is_dir()
    monkeypatch.delenv("STREAMCHAT_HOME")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # where platformdirs puts user data on Linux
    assert home() == tmp_path / "xdg" / "streamchat" and (tmp_path / "xdg" / "streamchat").is_dir()
    assert not (tmp_path / "sessions").exists()  # no longer the folder the command runs in


def test_store_defaults_to_home_and_uses_wal(store, tmp_path):
    assert store.path == tmp_path / "home" / "streamchat.db" and store.path.exists()
    assert store.db.journal_mode == "wal"
    assert store.db.execute("pragma busy_timeout").fetchone()[0] == 30000
    assert store.db.execute("pragma foreign_keys").fetchone()[0] == 1
    assert applied(store.db) == {fn.__name__ for fn in MIGRATIONS}
    assert {"sessions", "chunks", "turns", "snapshots", "runs", "turns_fts"} <= set(store.db.table_names())


def test_new_ids_sort_in_the_order_they_were_made():
    ids = [new_id() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == 2000 and all(len(i) == 32 for i in ids)


def test_create_get_and_list_sessions(store):
    first = make_session(store)
    assert first["name"].endswith(tuple("0123456789abcdef")) and "-beach-clip-" in first["name"]
    assert first["config"] == {"chunk_frames": 4, "fps": 2.0, "max_new_tokens": 16}
    assert first["versions"] == {"streamchat": "0.1.0"}
    assert first["created_utc"] == first["updated_utc"] and first["created_utc"].endswith("+00:00")
    second = make_session(store, name="second", history="keep")
    assert store.get_session("second")["id"] == second["id"]
    assert store.get_session(first["id"])["name"] == first["name"]

    store.log_chunk(first["id"], chunk_index=0, tokens=64)
    store.log_chunk(first["id"], chunk_index=1, tokens=64)
    store.log_turn(first["id"], question="q", answer="a")
    listed = store.list_sessions()
    assert [s["name"] for s in listed] == [first["name"], "second"]  # most recently updated first, not created
    assert [(s["n_chunks"], s["n_turns"], s["n_snapshots"]) for s in listed] == [(2, 1, 0), (0, 0, 0)]
    assert listed[0]["updated_utc"] > listed[1]["updated_utc"] > listed[0]["created_utc"]  # logging touches the session
    assert [s["name"] for s in store.list_sessions(every=False)] == [first["name"]]  # nothing logged: hidden
    store.touch(second["id"])
    assert [s["name"] for s in store.list_sessions()] == ["second", first["name"]]


def test_duplicate_or_bad_session_name_and_missing_session_are_user_errors(store):
    make_session(store, name="clip")
    with pytest.raises(UserError, match="already exists"):
        make_session(store, name="clip")
    with pytest.raises(UserError, match="bad session name"):
        make_session(store, name="../etc")
    with pytest.raises(UserError, match=r"no session named nope; `streamchat sessions list` shows them"):
        store.get_session("nope")
    assert len(store.list_sessions()) == 1


def test_touch_moves_updated_time(store):
    s = make_session(store)
    store.touch(s["id"])
    assert store.get_session(s["id"])["updated_utc"] > s["updated_utc"]


def test_chunks_and_turns_round_trip_with_token_ids(store):
    sid = make_session(store)["id"]
    for i in (1, 0):  # logged out of order, read back by chunk_index
        store.log_chunk(
            sid, chunk_index=i, frame_first=4 * i, frame_last=4 * i + 3, t_start_s=2.0 * i, t_end_s=2.0 * i + 1.5,
            tokens=128, cache_tokens_after=140 + 128 * i, cache_bytes=1_000_000 * (i + 1), encode_ms=12.5,
            gpu_allocated_bytes=10, gpu_reserved_bytes=20, gpu_peak_bytes=30 + i,
        )
    t1 = store.log_turn(
        sid, mode="streaming", at_s=3.5, frames_seen=8, question="What colour is the car?", answer="Red.",
        token_ids=[6033, 13, 151645], ttft_ms=41.0, latency_ms=120.0, new_tokens=3, tokens_per_s=25.0,
        cache_tokens=268, peak_bytes=123456, extra={"layout": "v1"},
    )
    t2 = store.log_turn(sid, mode="offline", question="What colour is the car?", answer="Red.", token_ids=[6033, 13], replay_of=t1)

    chunks = store.chunks(sid)
    assert [c["chunk_index"] for c in chunks] == [0, 1]
    assert [c["frame_last"] for c in chunks] == [3, 7] and chunks[1]["cache_tokens_after"] == 268
    assert chunks[1]["t_end_s"] == 3.5 and chunks[1]["gpu_peak_bytes"] == 31

    turns = store.turns(sid)
    assert [t["id"] for t in turns] == [t1, t2]
    assert turns[0]["token_ids"] == [6033, 13, 151645] and turns[0]["extra"] == {"layout": "v1"}
    assert (turns[0]["ttft_ms"], turns[0]["new_tokens"], turns[0]["peak_bytes"]) == (41.0, 3, 123456)
    assert turns[1]["replay_of"] == t1 and turns[1]["extra"] == {}
    assert [t["id"] for t in store.turns(sid, mode="offline")] == [t2]


def test_logging_rejects_unknown_columns_bad_modes_and_unknown_sessions(store):
    sid = make_session(store)["id"]
    with pytest.raises(TypeError, match="tokenz"):
        store.log_chunk(sid, chunk_index=0, tokenz=3)
    with pytest.raises(ValueError, match="mode"):
        store.log_turn(sid, mode="live", question="q", answer="a")
    with pytest.raises(sqlite3.IntegrityError):
        store.log_turn("no-such-session", question="q", answer="a")
    assert store.chunks(sid) == [] and store.turns(sid) == []
    assert "tokenz" not in store.db["chunks"].columns_dict


def test_snapshots_and_runs(store):
    sid = make_session(store)["id"]
    assert store.latest_snapshot(sid) is None
    store.log_snapshot(sid, path="/s/a", bytes=100, sha256="x", chunks=2, cache_tokens=300, frames=8)
    store.log_snapshot(sid, path="/s/b", bytes=200, sha256="y", chunks=4, cache_tokens=600, frames=16)
    assert [s["path"] for s in store.snapshots(sid)] == ["/s/a", "/s/b"]
    assert store.latest_snapshot(sid)["cache_tokens"] == 600
    r1 = store.log_run("compare", {"matched": True, "first_divergence": None}, session_id=sid)
    r2 = store.log_run("bench", {"ttft_ms": [1.0, 2.0]})
    assert [r["id"] for r in store.runs()] == [r2, r1]  # newest first
    assert store.runs(kind="compare")[0]["report"] == {"matched": True, "first_divergence": None}
    assert [r["id"] for r in store.runs(session_id=sid)] == [r1]


def test_full_text_search_finds_a_word_in_an_answer(store):
    sid = make_session(store)["id"]
    store.log_turn(sid, question="What happens?", answer="A dog chases a frisbee on the beach.")
    store.log_turn(sid, question="Who is there?", answer="Two people.")
    store.log_turn(sid, question="Is the dog happy?", answer="Yes.")
    assert [t["answer"] for t in store.logs(query="frisbee")] == ["A dog chases a frisbee on the beach."]
    assert [t["question"] for t in store.logs(n=0, query="dog")] == ["What happens?", "Is the dog happy?"]
    assert [t["answer"] for t in store.logs(query="dog beach")] == ["A dog chases a frisbee on the beach."]
    assert store.logs(query="giraffe") == []
    assert store.logs(query='"?') == []  # punctuation is not FTS syntax
    assert [t["answer"] for t in store.logs(query='people"')] == ["Two people."]


def test_logs_returns_the_latest_n_newest_last(store):
    a = make_session(store, name="a")["id"]
    b = make_session(store, name="b")["id"]
    for i in range(5):
        store.log_turn(a if i % 2 == 0 else b, question=f"q{i}", answer=f"answer {i}")
    assert [t["question"] for t in store.logs()] == ["q2", "q3", "q4"]
    assert [t["question"] for t in store.logs(n=2)] == ["q3", "q4"]
    assert [t["question"] for t in store.logs(n=0)] == ["q0", "q1", "q2", "q3", "q4"]
    assert [(t["question"], t["session_name"]) for t in store.logs(n=10, session="b")] == [("q1", "b"), ("q3", "b")]
    assert [t["question"] for t in store.logs(query="answer", session="a", n=2)] == ["q2", "q4"]
    with pytest.raises(UserError):
        store.logs(session="zzz")


def test_delete_session_removes_its_rows_and_returns_snapshot_paths(store):
    gone = make_session(store, name="gone")["id"]
    kept = make_session(store, name="kept")["id"]
    for sid in (gone, kept):
        store.log_chunk(sid, chunk_index=0)
        store.log_snapshot(sid, path=f"/snap/{sid}", bytes=1)
        store.log_run("replay", {"n": 1}, session_id=sid)
    original = store.log_turn(gone, question="unique zebra", answer="x")
    store.log_turn(gone, mode="offline", question="unique zebra", answer="x", replay_of=original)
    replay_elsewhere = store.log_turn(kept, mode="offline", question="q", answer="y", replay_of=original)

    assert store.delete_session("gone") == [f"/snap/{gone}"]
    counts = {t: store.db.execute(f"select count(*) from {t} where session_id = ?", [gone]).fetchone()[0]
              for t in ("chunks", "turns", "snapshots", "runs")}
    assert counts == {"chunks": 0, "turns": 0, "snapshots": 0, "runs": 0}
    assert [s["name"] for s in store.list_sessions()] == ["kept"]
    assert store.logs(query="zebra") == []  # FTS rows go with the turns
    assert store.turns(kept)[0]["id"] == replay_elsewhere and store.turns(kept)[0]["replay_of"] is None
    assert (len(store.chunks(kept)), len(store.snapshots(kept)), len(store.runs(session_id=kept))) == (1, 1, 1)
    with pytest.raises(UserError):
        store.delete_session("gone")


def test_export_markdown_and_json_contain_the_turns(store):
    s = make_session(store, name="exp")
    for i in range(3):
        store.log_chunk(s["id"], chunk_index=i, frame_first=4 * i, frame_last=4 * i + 3, t_start_s=2.0 * i,
                        t_end_s=2.0 * i + 1.5, tokens=100, cache_tokens_after=110 + 100 * i, encode_ms=10.0 + i,
                        gpu_peak_bytes=2**20 * (i + 1))
    store.log_turn(s["id"], at_s=2.0, frames_seen=8, question="What is on the table?", answer="A **blue** mug.",
                   token_ids=[1, 2, 3], ttft_ms=30.0, latency_ms=90.0, new_tokens=3)
    store.log_turn(s["id"], mode="offline", question="What is on the table?", answer="A mug.", token_ids=[1, 3])

    doc = json.loads(store.export("exp", "json"))
    assert doc["session"]["name"] == "exp" and doc["session"]["config"]["chunk_frames"] == 4
    assert "config_json" not in doc["session"]
    assert [t["answer"] for t in doc["turns"]] == ["A **blue** mug.", "A mug."]
    assert [t["token_ids"] for t in doc["turns"]] == [[1, 2, 3], [1, 3]]
    cs = doc["chunk_summary"]
    assert (cs["count"], cs["frame_first"], cs["frame_last"], cs["tokens"]) == (3, 0, 11, 300)
    assert (cs["cache_tokens_after"], cs["encode_ms_mean"], cs["gpu_peak_bytes"]) == (310, 11.0, 3 * 2**20)

    md = store.export(s["id"], "md")
    assert md.startswith("# Session exp\n")
    assert "**Q:** What is on the table?" in md and "A **blue** mug." in md and "A mug." in md
    assert "3 chunks, frames 0–11" in md and "300 video tokens" in md and "TTFT 30.0 ms" in md
    assert md.count("### ") == 2
    with pytest.raises(UserError, match="format"):
        store.export("exp", "html")


def seed_m001_rows(db) -> tuple[str, str]:
    """Rows as the first migration's schema held them: a session 'old' with one chunk and one turn."""
    sid, tid = new_id(), new_id()
    db.execute(
        "insert into sessions (id, name, video_path, video_sha256, model_id, config_fingerprint, config_json,"
        " history, created_utc, updated_utc, versions_json) values (?, 'old', '/v.mp4', 'aa', 'tiny-random', '',"
        " '{\"fps\": 2.0}', 'rollback', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00', '{}')",
        [sid],
    )
    db.execute("insert into chunks (id, session_id, chunk_index, tokens) values (?, ?, 0, 64)", [new_id(), sid])
    db.execute(
        "insert into turns (id, session_id, mode, question, answer, token_ids_json, created_utc)"
        " values (?, ?, 'streaming', 'Where is the cat?', 'On the windowsill.', '[7, 8]', '2026-01-01T00:00:01+00:00')",
        [tid, sid],
    )
    return sid, tid


def test_migrating_an_old_store_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    assert migrate(db, stop_after="m001_initial") == ["m001_initial"]
    assert "runs" not in db.table_names() and "extra_json" not in db["turns"].columns_dict
    sid, tid = seed_m001_rows(db)
    db.close()

    with Store(path) as store:
        assert applied(store.db) == {fn.__name__ for fn in MIGRATIONS}
        [session] = store.list_sessions()
        assert (session["name"], session["n_chunks"], session["n_turns"], session["config"]) == ("old", 1, 1, {"fps": 2.0})
        [turn] = store.logs(query="windowsill")  # rows from before FTS existed are indexed
        assert turn["id"] == tid and turn["token_ids"] == [7, 8] and turn["extra"] == {}
        assert "On the windowsill." in store.export("old", "md")
        new = store.log_turn(sid, question="And now?", answer="Asleep.", extra={"k": 1})
        store.log_run("replay", {"ok": True}, session_id=sid)
        assert [t["id"] for t in store.turns(sid)] == [tid, new]
        assert store.turns(sid)[1]["extra"] == {"k": 1} and len(store.runs(kind="replay")) == 1
    with Store(path) as again:  # reopening applies nothing twice
        assert migrate(again.db) == [] and len(again.turns(sid)) == 2


def test_reader_sees_no_lock_errors_while_another_process_writes(store):
    sid = make_session(store, name="busy")["id"]
    writer = run_python(
        """
        import sys, time
        from pathlib import Path
        from streamchat.store import Store
        store = Store(Path(sys.argv[1]))
        sid = store.get_session("busy")["id"]
        for i in range(200):
            store.log_turn(sid, question=f"q{i}", answer=f"answer number {i}", token_ids=list(range(i % 7)))
            time.sleep(0.001)  # events arrive over time, so the reads below overlap the writes
        print("done")
        """,
        store.path,
    )
    counts = []
    while writer.poll() is None:
        counts.append(store.db.execute("select count(*) from turns where session_id = ?", [sid]).fetchone()[0])
        if len(counts) % 20 == 0:
            store.touch(sid)  # this process writes too, between the other's transactions
    out, err = writer.communicate()
    assert writer.returncode == 0, err
    assert out.strip() == "done" and "locked" not in err
    counts.append(len(store.turns(sid)))
    assert counts == sorted(counts) and counts[-1] == 200
    assert any(0 < c < 200 for c in counts)  # the reads overlapped the writes
    assert [t["question"] for t in store.logs(n=2, session="busy")] == ["q198", "q199"]


def test_killed_writer_leaves_its_committed_rows_readable(store):
    sid = make_session(store, name="killed")["id"]
    writer = run_python(
        """
        import os, signal, sys
        from pathlib import Path
        from streamchat.store import Store
        store = Store(Path(sys.argv[1]))
        sid = store.get_session("killed")["id"]
        for i in range(5):
            store.log_turn(sid, question=f"q{i}", answer="committed", token_ids=[i, i + 1])
        store.db.conn.execute("BEGIN IMMEDIATE")  # a sixth turn, never committed
        store.db["turns"].insert({"id": "uncommitted", "session_id": sid, "mode": "streaming", "question": "q5"})
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        store.path,
    )
    _, err = writer.communicate(timeout=30)
    assert writer.returncode == -signal.SIGKILL, err
    with Store(store.path) as fresh:
        turns = fresh.turns(sid)
        assert [t["question"] for t in turns] == ["q0", "q1", "q2", "q3", "q4"]
        assert turns[4]["token_ids"] == [4, 5]
        fresh.log_turn(sid, question="after", answer="the lock was released")
        assert len(fresh.turns(sid)) == 6


def test_importing_the_store_does_not_import_textual_or_torch():
    code = "import sys, streamchat.store; print(sorted(m for m in ('textual', 'torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    assert out.strip() == "[]"


def test_a_worker_thread_can_log_while_the_main_thread_reads(store):
    sid = make_session(store)["id"]
    errors = []

    def work():
        try:
            for i in range(100):
                store.log_turn(sid, question=f"q{i}", answer="a", token_ids=[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    worker = threading.Thread(target=work)
    worker.start()
    seen = []
    while worker.is_alive():
        seen.append(len(store.turns(sid)))
        time.sleep(0.001)  # a UI polls; a tight loop would starve the worker of the lock
    worker.join()
    assert errors == [] and seen == sorted(seen)
    assert [t["token_ids"] for t in store.turns(sid)] == [[i] for i in range(100)]
