"""Headless sessions: run, resume, sessions, logs; resume equals an uninterrupted run; faults exit 2."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlite_utils
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import streamchat.models
from streamchat import snapshots
from streamchat.cli import main
from streamchat.clips import make_clip
from streamchat.migrations import migrate
from streamchat.session import Ask, LiveSession, Pacer, run_schedule
from streamchat.store import Store
from test_store import seed_m001_rows
from test_video import VFR_TIMES, cut_clip
from streamchat.video import sha256_file

REPO = Path(__file__).resolve().parents[1]
ENGINE = ["--model", "tiny-random", "--fps", "4", "--max-new-tokens", "8"]
Q1, Q2, Q3 = "1:What is red?", "2:What moved?", "2.5:Is anything blue?"


@pytest.fixture
def load_calls():
    return []


@pytest.fixture
def home(tmp_path, monkeypatch, tiny, load_calls):
    """A fresh STREAMCHAT_HOME; `load('tiny-random')` returns the module's model (built once)."""
    real = streamchat.models.load

    def cached(model_id, device=None, dtype=None):
        load_calls.append((model_id, dtype))
        return tiny if model_id == "tiny-random" and dtype in (None, "auto", "float32") else real(model_id, device, dtype)

    monkeypatch.setattr(streamchat.models, "load", cached)
    monkeypatch.setenv("STREAMCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_json(capsys, *argv):
    rc, out, err = cli(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def error_line(capsys, *argv) -> str:
    rc, out, err = cli(capsys, *argv)
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("streamchat: error: "), (rc, out, err)
    return err


def tokens(doc):
    return [t["token_ids"] for t in doc["turns"]]


# --- resume equals an uninterrupted session -----------------------------------------------------


@pytest.mark.parametrize("history", ["drop", "keep"])
def test_resumed_session_answers_exactly_like_an_uninterrupted_one(home, clip_24fps, capsys, history):
    full = cli_json(capsys, "run", clip_24fps, *ENGINE, "--history", history, "--ask", Q1, "--ask", Q2, "--ask", Q3, "--session", "full", "--snapshot")
    first = cli_json(capsys, "run", clip_24fps, *ENGINE, "--history", history, "--ask", Q1, "--until", 1, "--session", "part", "--snapshot")
    rest = cli_json(capsys, "resume", "part", "--ask", Q2, "--ask", Q3, "--snapshot")

    # 4 fps: frames at 0, 0.25, ... 2.75 s. Each question sees every frame up to its time, 5 by 1 s (the
    # frame at 1 s paired with itself), 9 by 2 s, 11 by 2.5 s; chunks [0-3] [4+4] [5-8] [9-10] [11+11]
    assert first["frames"] == 5 and first["chunks"] == 2 and Path(first["snapshot"]).name == "snapshot-1.safetensors"
    assert tokens(first) + tokens(rest) == tokens(full) and all(len(t) == 8 for t in tokens(full))
    assert [t["frames_seen"] for t in first["turns"] + rest["turns"]] == [t["frames_seen"] for t in full["turns"]] == [5, 9, 11]
    assert [t["cache_tokens"] for t in first["turns"] + rest["turns"]] == [t["cache_tokens"] for t in full["turns"]]
    assert (rest["frames"], rest["chunks"], rest["done"]) == (full["frames"], full["chunks"], True) == (12, 5, True)
    assert Path(rest["snapshot"]).name == "snapshot-2.safetensors" and rest["restored_from"] == first["snapshot"]
    # the two final caches are bit for bit the same
    a, b = load_file(full["snapshot"]), load_file(rest["snapshot"])
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    with Store() as store:  # resume re-encoded nothing and logged into the same session
        part = store.get_session("part")
        assert len(store.chunks(part["id"])) == len(store.chunks(store.get_session("full")["id"])) == 5
        assert [t["question"] for t in store.turns(part["id"])] == ["What is red?", "What moved?", "Is anything blue?"]
        assert [s["frames"] for s in store.snapshots(part["id"])] == [5, 12]


def test_resume_from_between_two_questions_gives_the_same_tokens(home, clip_24fps, capsys):
    full = cli_json(capsys, "run", clip_24fps, *ENGINE, "--history", "keep", "--ask", Q1, "--ask", Q2, "--ask", Q3, "--session", "full")
    first = cli_json(capsys, "run", clip_24fps, *ENGINE, "--history", "keep", "--ask", Q1, "--until", 1.6, "--session", "part", "--snapshot")
    assert first["frames"] == 7  # 5 frames by the question at 1 s (the 5th paired with itself), then the pair at 1.25 and 1.5 s
    rest = cli_json(capsys, "resume", "part", "--ask", Q2, "--ask", Q3)
    assert tokens(first) + tokens(rest) == tokens(full)


def test_run_json_has_the_documented_fields_and_logs_every_event(home, clip_24fps, capsys):
    doc = cli_json(capsys, "run", clip_24fps, *ENGINE, "--ask", Q2, "--ask", Q1, "--session", "shape", "--snapshot")
    assert {"session", "frames", "chunks", "turns", "snapshot"} <= doc.keys() and doc["session"] == "shape"
    assert [t["at_s"] for t in doc["turns"]] == [1.0, 2.0]  # asked in stream order
    for t in doc["turns"]:
        assert {"at_s", "frames_seen", "question", "answer", "token_ids", "ttft_s", "latency_s", "cache_tokens"} <= t.keys()
        assert 0 < t["ttft_s"] <= t["latency_s"]
    snap = Path(doc["snapshot"])
    assert snap == home.resolve() / "shape" / "snapshot-1.safetensors"
    with Store() as store:
        s = store.get_session("shape")
        assert s["video_sha256"] == sha256_file(clip_24fps) and s["config_fingerprint"] == streamchat.models.load("tiny-random").fingerprint
        assert s["config"]["sampling"]["fps"] == 4 and s["history"] == "drop"
        chunks = store.chunks(s["id"])
        # the question at 1 s sees frame 4 (1.0 s), paired with itself; the odd last frame is padded too
        assert [(c["chunk_index"], c["frame_first"], c["frame_last"]) for c in chunks] == [(0, 0, 3), (1, 4, 4), (2, 5, 8), (3, 9, 11)]
        turns = store.turns(s["id"])
        assert [t["token_ids"] for t in turns] == tokens(doc)
        prompt = turns[0]["extra"]["prompt"]
        assert prompt[1] == {"frames": [0, 1, 2, 3, 4, 4], "grid": [4, 4]} and len(turns[0]["extra"]["first_top"]) == 8
        [row] = store.snapshots(s["id"])
        assert (row["bytes"], row["sha256"], row["chunks"], row["frames"]) == (snap.stat().st_size, sha256_file(snap), 4, 12)
        print(f"4-chunk snapshot of 112x112 clip_24fps at 4 fps: {row['bytes']} bytes, {row['cache_tokens']} cache tokens")


def test_live_session_can_be_driven_step_by_step(home, clip_24fps, tiny):
    from streamchat.config import SessionConfig
    from streamchat.video import Sampling, VideoSource

    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=4), max_new_tokens=8).validate()
    with LiveSession.create(tiny, VideoSource(clip_24fps, config.sampling), config, name="steps") as live:
        assert live.encode_next_chunk().frame_last == 3 and live.encode_next_chunk().frame_last == 7
        ans = live.ask("What is red?")
        snap = live.save_snapshot()
        live.encode_next_chunk()
        after = live.ask("Is anything blue?")
        assert live.encode_next_chunk() is None and live.done
    with LiveSession.resume("steps", loaded=tiny) as back:
        assert back.stream.next_frame == 8 and back.position_s == 1.75 and back.dialogue[0]["token_ids"] == ans.token_ids
        assert [c[:3] for c in back.chunks] == [[0, 3, False], [4, 7, False]]
        back.encode_next_chunk()
        assert back.ask("Is anything blue?").token_ids == after.token_ids
        assert back.restored_from.path == Path(snap["path"])


def test_realtime_pacing_waits_for_each_chunk_and_question(home, clip_24fps, tiny):
    from streamchat.config import SessionConfig
    from streamchat.video import Sampling, VideoSource

    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=4), max_new_tokens=4).validate()
    clock = [0.0]
    waits = []

    def sleep(s):
        waits.append(round(s, 6))
        clock[0] += s

    with LiveSession.create(tiny, VideoSource(clip_24fps, config.sampling), config) as live:
        pacer = Pacer(0.0, clock=lambda: clock[0], sleep=sleep)
        run_schedule(live, [Ask.parse("1.2:What?")], pacer=pacer)
    # chunks end at 0.75 s and 1.0 s (the frame at 1.0 s, paired with itself), the question at 1.2 s,
    # then chunks end at 2.0 s and 2.75 s
    assert clock[0] == pytest.approx(2.75) and len(waits) == 5
    assert waits[:3] == pytest.approx([0.75, 0.25, 0.2]) and sum(waits[:4]) == pytest.approx(2.0)


def test_ask_parsing_and_schedule_errors(home, clip_24fps, capsys, load_calls):
    assert Ask.parse("12.5:What is red?") == Ask(12.5, "What is red?")
    assert Ask.parse("What: a cat?") == Ask(None, "What: a cat?")
    assert "--ask 9:… is past the end of clip24.mp4 (3.00 s)" in error_line(capsys, "run", clip_24fps, *ENGINE, "--ask", "9:Q")
    assert "after --until 1" in error_line(capsys, "run", clip_24fps, *ENGINE, "--ask", "2:Q", "--until", 1)
    assert "has no question" in error_line(capsys, "run", clip_24fps, *ENGINE, "--ask", "2:  ")
    assert "no frame is sampled at or before 0.5 s (the first is at 1 s); ask at 1 s or later" in error_line(
        capsys, "run", clip_24fps, *ENGINE, "--start", 1, "--ask", "0.5:Q")
    assert "0 or more seconds" in error_line(capsys, "run", clip_24fps, *ENGINE, "--ask=-1:Q")
    cli_json(capsys, "run", clip_24fps, *ENGINE, "--session", "taken", "--until", 0.5)
    assert "already exists" in error_line(capsys, "run", clip_24fps, *ENGINE, "--session", "taken")
    assert "no snapshot to resume from" in error_line(capsys, "resume", "taken")
    assert "no session named nope" in error_line(capsys, "resume", "nope")
    assert load_calls == [("tiny-random", "auto")]  # bad input never loads the model


# --- frames and time ----------------------------------------------------------------------------


@pytest.mark.parametrize(("at", "frames"), [(0, 1), (1, 5), (2, 9)])
def test_ask_run_and_resume_see_the_same_frames_up_to_a_time(home, clip_24fps, capsys, at, frames):
    # 4 fps: frames at 0, 0.25, ... 2.75 s. A question at T sees those up to T, an odd count's last
    # frame paired with itself, whichever command asks it.
    asked = cli_json(capsys, "ask", clip_24fps, "What is red?", "--at", at, *ENGINE)
    run = cli_json(capsys, "run", clip_24fps, *ENGINE, "--ask", f"{at}:What is red?", "--session", "run")
    [turn] = run["turns"]
    assert asked["frames"] == turn["frames_seen"] == frames and turn["at_s"] == at
    assert asked["last_frame_s"] == at and asked["token_ids"] == turn["token_ids"]
    if at >= 0.25:  # a resume from the first pair (0 and 0.25 s) on
        assert cli_json(capsys, "run", clip_24fps, *ENGINE, "--until", 0.3, "--session", "part", "--snapshot")["frames"] == 2
        [again] = cli_json(capsys, "resume", "part", "--ask", f"{at}:What is red?")["turns"]
        assert (again["frames_seen"], again["at_s"], again["token_ids"]) == (frames, at, turn["token_ids"])


def test_resume_refuses_a_time_its_stream_has_passed(home, clip_24fps, capsys):
    cli_json(capsys, "run", clip_24fps, *ENGINE, "--session", "whole", "--snapshot")
    err = error_line(capsys, "resume", "whole", "--ask", "1:What is red?")
    assert "--ask 1:…: the stream already holds 12 frames, up to 2.75 s, past 1 s; ask at 2.75 s or later, or without a time" in err
    [turn] = cli_json(capsys, "resume", "whole", "--ask", "What is red?")["turns"]  # asked where the stream is
    assert (turn["at_s"], turn["frames_seen"]) == (2.75, 12)
    with Store() as store:
        assert [t["at_s"] for t in store.turns(store.get_session("whole")["id"])] == [2.75]


def test_ask_at_7_on_a_variable_rate_video_sees_the_frames_up_to_7_s(home, tmp_path, capsys):
    clip = make_clip(tmp_path / "vfr.mp4", fps=30, times=VFR_TIMES, width=112, height=112)
    doc = cli_json(capsys, "ask", clip, "What moved?", "--at", 7, "--model", "tiny-random", "--fps", 2, "--max-new-tokens", 4)
    # a frame every half second of the frames' own time: 0, 0.5, ... 7.0 s (index / average fps would
    # end at frame 86, 86 / 12.4 = 6.94 s, really 6.33 s); the video is 7.5 s long
    assert (doc["frames"], doc["last_frame_s"], doc["decodable_duration_s"], doc["truncated"]) == (15, 7.0, 7.5, False)


def test_a_truncated_video_is_used_with_one_warning_line_and_its_durations_in_json(home, tmp_path, capsys):
    cut = cut_clip(tmp_path)
    warning = ("streamchat: warning: cut.mp4: only the first 2.00 s of 4.00 s decode (48 of 96 frames), the file is "
               "truncated or damaged; streamchat uses those 2.00 s (re-download the file for the rest)\n")
    durations = {"decodable_duration_s": 2.0, "container_duration_s": 4.0, "decodable_frames": 48, "container_frames": 96, "truncated": True}
    rc, out, err = cli(capsys, "ask", cut, "What moved?", *ENGINE, "--json")
    assert rc == 0 and err == warning
    doc = json.loads(out)
    assert {k: doc[k] for k in durations} == durations and doc["frames"] == 8  # 4 fps up to 2 s
    rc, out, err = cli(capsys, "run", cut, *ENGINE, "--until", 1, "--json")
    assert rc == 0 and err == warning and {k: json.loads(out)[k] for k in durations} == durations
    assert "--at 3 is past the end of cut.mp4 (2.00 s; only 2.00 s of its 4.00 s decode)" in error_line(capsys, "ask", cut, "Q?", "--at", 3, *ENGINE)


def test_max_new_tokens_beyond_the_context_is_refused_before_any_frame_is_encoded(home, clip_24fps, capsys, tiny, tmp_path):
    from streamchat.config import SessionConfig
    from streamchat.stream import Stream
    from streamchat.video import Sampling, VideoSource

    for command in (["ask", clip_24fps, "Q?"], ["run", clip_24fps], ["compare", clip_24fps]):
        err = error_line(capsys, *command, "--model", "tiny-random", "--max-new-tokens", 40000)
        assert "--max-new-tokens 40000 does not fit: tiny-random has a context of 32768 tokens" in err
    with Store() as store:
        assert store.list_sessions() == []  # run refused before it made a session
    room = int(err.split("use --max-new-tokens ")[1].split()[0])
    # the bound is tight: with `room` answer tokens, one frame pair and a one-token question fill the context
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=4), max_new_tokens=room).validate()
    stream = Stream(tiny, VideoSource(clip_24fps, config.sampling), config, frames=2)  # planned for what it encodes
    stream.encode_until(2)
    ids = stream.engine.question_ids("x")
    assert stream.engine.cache_tokens + len(ids) + room == 32768
    assert f"--max-new-tokens {room + 1} does not fit" in error_line(capsys, "ask", clip_24fps, "x", "--model", "tiny-random", "--max-new-tokens", room + 1)
    # a refusal is the only line on stderr, even for a file that would get a warning
    assert "does not fit" in error_line(capsys, "ask", cut_clip(tmp_path), "x", "--model", "tiny-random", "--max-new-tokens", room + 1)


# --- faults -------------------------------------------------------------------------------------


@pytest.fixture
def part(home, clip_24fps, capsys):
    """Session 'part' stopped at 1 s with a snapshot; returns (its store row, snapshot row)."""
    cli_json(capsys, "run", clip_24fps, *ENGINE, "--ask", Q1, "--until", 1, "--session", "part", "--snapshot")
    with Store() as store:
        s = store.get_session("part")
        return s, store.latest_snapshot(s["id"])


def test_flipped_byte_in_snapshot_exits_2_before_loading_the_model(part, capsys, load_calls):
    _, snap = part
    data = bytearray(Path(snap["path"]).read_bytes())
    data[len(data) // 2] ^= 0x10
    Path(snap["path"]).write_bytes(data)
    calls = len(load_calls)
    assert "is damaged (sha256" in error_line(capsys, "resume", "part", "--ask", Q2)
    assert len(load_calls) == calls


def test_truncated_snapshot_exits_2(part, capsys):
    _, snap = part
    path = Path(snap["path"])
    path.write_bytes(path.read_bytes()[:1000])
    assert "is damaged" in error_line(capsys, "resume", "part")


def _rewrite_and_record(path: Path, sid: str, **changes) -> None:
    """Edit a snapshot's metadata (fixing its checksum and the store's sha256, so only the edit is wrong)."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = {**f.metadata(), **changes}
    meta["checksum"] = snapshots._checksum(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    with Store() as store:
        store.db.execute("update snapshots set sha256 = ? where session_id = ?", [sha256_file(path), sid])
        store.db.conn.commit()


def test_snapshot_from_another_model_config_exits_2(part, capsys):
    s, snap = part
    _rewrite_and_record(Path(snap["path"]), s["id"], model_fingerprint="0123456789abcdef")
    assert "other weights or architecture of model tiny-random" in error_line(capsys, "resume", "part")


def test_snapshot_of_another_format_version_exits_2(part, capsys):
    s, snap = part
    _rewrite_and_record(Path(snap["path"]), s["id"], format_version="7")
    assert "format version 7, this streamchat reads versions 1 and 2" in error_line(capsys, "resume", "part")


def test_moved_video_names_the_old_path_and_resumes_with_video(part, clip_24fps, tmp_path, capsys):
    moved = tmp_path / "moved.mp4"
    clip_24fps.rename(moved)
    try:
        err = error_line(capsys, "resume", "part", "--ask", Q2)
        assert str(clip_24fps) in err and "--video NEW_PATH" in err
        doc = cli_json(capsys, "resume", "part", "--ask", Q2, "--video", moved, "--until", 2)
        assert doc["video"] == str(moved) and doc["turns"][0]["frames_seen"] == 9
    finally:
        moved.rename(clip_24fps)
    with Store() as store:
        assert store.get_session("part")["video_path"] == str(moved)


def test_changed_video_exits_2(part, clip_24fps, tmp_path, capsys):
    other = tmp_path / "other.mp4"
    make_clip(other, seconds=3, fps=24, width=112, height=112)
    other.write_bytes(other.read_bytes() + b"\0")  # same frames, different bytes
    err = error_line(capsys, "resume", "part", "--video", other)
    assert "is not the video session part was recorded on" in err


def test_full_disk_at_the_end_of_a_run_keeps_the_answers_and_the_old_snapshot(part, capsys, monkeypatch):
    s, snap = part
    good = Path(snap["path"]).read_bytes()

    def full_disk(tensors, metadata, path):
        path.write_bytes(b"\0" * 512)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshots, "_write_tensors", full_disk)
    rc, out, err = cli(capsys, "resume", "part", "--ask", Q2, "--until", 2, "--snapshot", "--json")
    doc = json.loads(out)
    assert rc == 1 and doc["snapshot"] is None and len(doc["turns"]) == 1 and "No space left" in doc["snapshot_error"]
    assert err.count("\n") == 1 and "previous snapshot is kept" in err
    assert sorted(p.name for p in Path(snap["path"]).parent.iterdir()) == ["snapshot-1.safetensors"]
    assert Path(snap["path"]).read_bytes() == good
    monkeypatch.undo()


def test_interrupt_keeps_what_was_logged_and_exits_130(home, clip_24fps, capsys, monkeypatch):
    real_ask = LiveSession.ask
    asked = []

    def interrupted(self, *a, **kw):
        if asked:
            raise KeyboardInterrupt
        asked.append(1)
        return real_ask(self, *a, **kw)

    monkeypatch.setattr(LiveSession, "ask", interrupted)
    rc, out, err = cli(capsys, "run", clip_24fps, *ENGINE, "--ask", Q1, "--ask", Q2, "--session", "cut", "--json")
    # chunks [0-3] [4+4] for the question at 1 s, [5-8] on the way to 2 s
    assert rc == 130 and out == "" and "session cut keeps what was logged (3 chunks, 1 turn)" in err
    with Store() as store:
        s = store.get_session("cut")
        assert len(store.chunks(s["id"])) == 3 and [t["question"] for t in store.turns(s["id"])] == ["What is red?"]


def test_killed_resume_keeps_its_rows_and_the_previous_snapshot_restores(part, home, capsys):
    """SIGKILL mid-run while this process and another read the store: nothing logged is lost."""
    s, snap = part
    env = {**os.environ, "PYTHONPATH": str(REPO), "STREAMCHAT_HOME": str(home)}
    writer = subprocess.Popen(
        [sys.executable, "-m", "streamchat", "resume", "part", "--realtime", "--ask", "1.8:What moved?", "--snapshot"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stop = home / "stop-reading"
    reader = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, sqlite3
            from streamchat.store import Store
            reads = errors = 0
            while not os.path.exists({str(stop)!r}):
                try:
                    with Store() as st:
                        st.logs(n=0); st.list_sessions(); reads += 1
                except sqlite3.OperationalError:
                    errors += 1
            print(reads, errors)
        """)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        with Store() as store:
            seen = []
            while time.monotonic() < deadline and writer.poll() is None:
                seen.append(len(store.turns(s["id"])))
                if seen[-1] == 2:  # the turn at 1.8 s is logged; the last chunk (2.75 s) is a second away
                    break
                time.sleep(0.02)
            assert writer.poll() is None, writer.communicate()
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
            stop.touch()
            out, err = reader.communicate(timeout=60)
            reads, errors = map(int, out.split())
            assert reader.returncode == 0 and errors == 0 and reads > 0, err
            assert seen == sorted(seen)
            turns = store.turns(s["id"])
            assert [t["question"] for t in turns] == ["What is red?", "What moved?"]
            assert [c["chunk_index"] for c in store.chunks(s["id"])] == [0, 1, 2]  # chunk 2 (frames 5-7) came from the killed run
            assert len(store.snapshots(s["id"])) == 1 and not list((home / "part").glob("*.partial"))
        killed_answer = turns[1]["token_ids"]
    finally:
        for p in (writer, reader):
            if p.poll() is None:
                p.kill()
    assert writer.returncode == -signal.SIGKILL
    doc = cli_json(capsys, "resume", "part", "--ask", "1.8:What moved?")
    assert doc["restored_from"] == snap["path"] and doc["turns"][0]["token_ids"] == killed_answer


# --- sessions, logs, export ---------------------------------------------------------------------


def test_sessions_list_show_export_and_rm(part, clip_24fps, home, capsys):
    cli_json(capsys, "resume", "part", "--ask", Q2, "--snapshot")
    listed = cli_json(capsys, "sessions")["sessions"]
    assert [(r["name"], r["n_chunks"], r["n_turns"], r["n_snapshots"]) for r in listed] == [("part", 4, 2, 2)]
    assert cli_json(capsys, "sessions", "list") == {"sessions": listed, "hidden_empty": 0}
    rc, out, _ = cli(capsys, "sessions", "list")
    assert rc == 0 and out.splitlines()[1].startswith("part ") and clip_24fps.name in out

    shown = cli_json(capsys, "sessions", "show", "part")
    assert [t["question"] for t in shown["turns"]] == ["What is red?", "What moved?"]
    assert [x["frames"] for x in shown["snapshots"]] == [5, 12] and shown["chunk_summary"]["count"] == 4
    rc, out, _ = cli(capsys, "sessions", "show", "part")
    assert "snapshot 2:" in out and "What moved?" in out

    rc, md, _ = cli(capsys, "sessions", "export", "part", "--format", "md")
    assert rc == 0 and md.startswith("# Session part") and "**Q:** What moved?" in md
    exported = cli_json(capsys, "sessions", "export", "part")
    assert [t["token_ids"] for t in exported["turns"]] == [t["token_ids"] for t in Store().turns(exported["session"]["id"])]
    rc, _, _ = cli(capsys, "sessions", "export", "part", "--format", "json", "-o", home / "part.json")
    assert rc == 0 and json.loads((home / "part.json").read_text())["session"]["name"] == "part"

    files = [Path(x["path"]) for x in shown["snapshots"]]
    removed = cli_json(capsys, "sessions", "rm", "part")
    assert removed["removed"] == "part" and sorted(removed["snapshot_files"]) == sorted(map(str, files))
    assert not any(f.exists() for f in files) and not (home / "part").exists()
    assert cli_json(capsys, "sessions")["sessions"] == []
    assert "no session named part" in error_line(capsys, "sessions", "show", "part")


def test_logs_latest_n_query_and_session_filter(home, clip_24fps, capsys):
    cli_json(capsys, "run", clip_24fps, *ENGINE, "--ask", Q1, "--ask", Q2, "--session", "one")
    cli_json(capsys, "run", clip_24fps, *ENGINE, "--ask", Q3, "--session", "two")
    assert [t["question"] for t in cli_json(capsys, "logs")["turns"]] == ["What is red?", "What moved?", "Is anything blue?"]
    assert [t["question"] for t in cli_json(capsys, "logs", "-n", 1)["turns"]] == ["Is anything blue?"]
    assert [t["question"] for t in cli_json(capsys, "logs", "-n", 0, "--session", "one")["turns"]] == ["What is red?", "What moved?"]
    [hit] = cli_json(capsys, "logs", "-q", "blue")["turns"]
    assert hit["session_name"] == "two" and hit["token_ids"] and hit["extra"]["prompt"]
    rc, out, _ = cli(capsys, "logs", "-n", 2)
    assert rc == 0 and "> What moved?" in out and "session two" in out and out.count("TTFT") == 2


def test_sessions_logs_and_export_read_a_store_from_earlier_migrations(home, capsys):
    home.mkdir(parents=True, exist_ok=True)
    db = sqlite_utils.Database(home / "streamchat.db")
    migrate(db, stop_after="m001_initial")
    seed_m001_rows(db)
    db.conn.commit()
    db.close()

    [row] = cli_json(capsys, "sessions", "list")["sessions"]
    assert (row["name"], row["n_chunks"], row["n_turns"], row["n_snapshots"]) == ("old", 1, 1, 0)
    rc, out, _ = cli(capsys, "sessions")
    assert rc == 0 and "old" in out
    rc, out, _ = cli(capsys, "sessions", "show", "old")
    assert rc == 0 and "Where is the cat?" in out
    [turn] = cli_json(capsys, "logs", "-q", "windowsill")["turns"]
    assert turn["token_ids"] == [7, 8] and turn["extra"] == {}
    rc, out, _ = cli(capsys, "logs")
    assert rc == 0 and "On the windowsill." in out and "TTFT –" in out
    rc, md, _ = cli(capsys, "sessions", "export", "old", "--format", "md")
    assert rc == 0 and "On the windowsill." in md
    assert cli_json(capsys, "sessions", "export", "old")["turns"][0]["answer"] == "On the windowsill."
    assert "no snapshot to resume from" in error_line(capsys, "resume", "old")
    with sqlite3.connect(home / "streamchat.db") as conn:
        assert {r[0] for r in conn.execute("select name from _streamchat_migrations")} >= {"m004_turns_extra"}


def test_headless_modules_do_not_import_textual():
    code = ("import sys, streamchat.session, streamchat.snapshots, streamchat.replay, streamchat.cli_sessions; "
            "print('textual' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    assert out.strip() == "False"
