"""The Textual app driven by Pilot on tiny-random and a generated clip.

The clip: 2 s at 24 fps, 112x112, sampled at 4 fps = 8 frames, 2 frames a chunk = 4 chunks.
A ChunkGate holds the engine inside a chunk, so every test knows where the stream is.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time

import pytest
from textual.widgets import DataTable, Input, Markdown, Static

from streamchat.app import ChatApp, ChunkGate, Launch
from streamchat.app.screens import ConfirmDiscard, HelpScreen, SessionsScreen
from streamchat.app.widgets import ChunkTimeline
from streamchat.config import SessionConfig
from streamchat.store import Store
from streamchat.video import Sampling

SIZE = (120, 40)


def aio(test):
    """Run an async test with asyncio.run (no pytest async plugin needed); fixtures pass through."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(test(*args, **kwargs))

    return run


@pytest.fixture(scope="module")
def app_clip(tmp_path_factory):
    from streamchat.clips import make_clip

    return make_clip(tmp_path_factory.mktemp("app") / "clip.mp4", seconds=2.0, fps=24.0, width=112, height=112)


def config(history: str = "keep", max_new_tokens: int = 12) -> SessionConfig:
    return SessionConfig(model="tiny-random", sampling=Sampling(fps=4.0), chunk_frames=2, history=history,
                         max_new_tokens=max_new_tokens)


def make_app(tiny, clip, *, allow: int | None = None, name: str | None = "app-test", **kw) -> tuple[ChatApp, ChunkGate]:
    gate = ChunkGate(allow)
    launch = Launch(video=str(clip), config=kw.pop("cfg", config()), device="cpu", dtype="float32", loaded=tiny, name=name)
    return ChatApp(launch, gate=gate, **kw), gate


async def until(pilot, cond, timeout: float = 15.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.01)


def chat_texts(app) -> list[str]:
    return [str(w.render()) for w in app.query("#chat Static")]


async def ask(pilot, question: str) -> None:
    await pilot.click("#question")
    await pilot.press(*question, "enter")


async def pause_after(pilot, app, gate: ChunkGate, chunks: int) -> None:
    """Pause encoding with `chunks` chunks in the cache: hold the next one, press pause, let it go."""
    await until(pilot, lambda: gate.waiting == chunks - 1, what=f"engine held inside chunk {chunks - 1}")
    await pilot.press("f2")
    gate.allow(None)
    await until(pilot, lambda: app.state == "paused", what="paused")


def session_row(name: str = "app-test") -> tuple[dict, list[dict], list[dict]]:
    with Store() as store:
        row = store.get_session(name)
        return row, store.chunks(row["id"]), store.turns(row["id"])


@aio
async def test_question_while_encoding_is_answered_at_the_current_position_then_encoding_continues(tiny, app_clip):
    app, gate = make_app(tiny, app_clip, allow=1)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: gate.waiting == 1, what="engine held inside chunk 1")
        await ask(pilot, "What moves?")
        view = app.turns[1]
        assert "waiting" in str(view.figures.render())  # queued: the engine is inside a chunk
        gate.allow(2)  # chunk 1 finishes, the question is taken, then chunk 2 starts and is held
        await until(pilot, lambda: app.last_answer is not None and gate.waiting == 2, what="answer, then chunk 2")
        row, chunks, turns = session_row()
        assert len(turns) == 1 and turns[0]["frames_seen"] == 4  # two chunks of two frames
        assert turns[0]["at_s"] == pytest.approx(0.75)
        assert app.last_answer == turns[0]["answer"]
        assert view.answer.source == turns[0]["answer"]
        assert view.written and turns[0]["answer"].startswith(view.written)  # it came through the stream
        figures = str(view.figures.render())
        assert f"cache {turns[0]['cache_tokens']} tokens" in figures and "TTFT" in figures and "tok/s" in figures
        assert f"{turns[0]['new_tokens']} tokens" in figures
        timeline = app.query_one(ChunkTimeline)
        assert timeline.marks == {1} and timeline.cached == 2 and timeline.encoding == 2
        # history=keep: the status bar counts the kept turn, as the next answer's figures will
        kept = chunks[-1]["cache_tokens_after"] + turns[0]["new_tokens"]
        assert app.metrics.values["cache_tokens"] == app.engine.live.engine.cache_tokens > kept
        gate.allow(None)
        await until(pilot, lambda: app.state == "done", what="done")
        assert len(session_row()[1]) == 4
        assert "8/8 frames" in str(app.query_one("#rate", Static).render())


@aio
async def test_pause_stops_encoding_between_chunks_and_resume_finishes(tiny, app_clip):
    app, gate = make_app(tiny, app_clip, allow=1)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: gate.waiting == 1, what="held in chunk 1")
        await pilot.press("f2")
        gate.allow(None)
        await until(pilot, lambda: app.state == "paused", what="paused")
        assert "paused" in app.sub_title
        await pilot.pause(0.3)
        assert app.query_one(ChunkTimeline).cached == 2 and len(session_row()[1]) == 2
        await pilot.press("f2")
        await until(pilot, lambda: app.state == "done", what="done")
        assert len(session_row()[1]) == 4 and "done" in app.sub_title


@aio
async def test_keys_are_remappable_by_binding_id(tiny, app_clip):
    app, gate = make_app(tiny, app_clip, allow=1, keymap={"streamchat.pause": "ctrl+t"})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: gate.waiting == 1)
        await pilot.press("f2")  # no longer bound
        await pilot.press("ctrl+t")
        gate.allow(None)
        await until(pilot, lambda: app.state == "paused", what="paused by ctrl+t")
        assert app.engine.paused
        for b in ChatApp.BINDINGS:
            assert b.id and b.key not in ("ctrl+s", "ctrl+j")


@aio
async def test_snapshot_quit_then_resume_continues_the_conversation(tiny, app_clip):
    app, gate = make_app(tiny, app_clip, allow=1)
    async with app.run_test(size=SIZE) as pilot:
        await pause_after(pilot, app, gate, 2)
        await ask(pilot, "What is red?")
        await until(pilot, lambda: app.last_answer is not None, what="answer")
        first = app.last_answer
        await pilot.press("ctrl+q")  # unsaved: asks first
        await until(pilot, lambda: isinstance(app.screen, ConfirmDiscard), what="confirm dialog")
        await pilot.press("s")  # save and quit
        await until(pilot, lambda: not app.is_running, what="exit after save")
    row, chunks, turns = session_row()
    with Store() as store:
        snaps = store.snapshots(row["id"])
    assert len(snaps) == 1 and snaps[0]["frames"] == 4 and snaps[0]["chunks"] == 2

    resumed = ChatApp(Launch(resume="app-test", device="cpu", loaded=tiny))
    async with resumed.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: resumed.info is not None, what="resumed")
        assert resumed.info.frames_done == 4 and resumed.turn_count == 1
        assert resumed.turns[1].answer.source == first  # the earlier conversation is shown
        assert resumed.query_one(ChunkTimeline).marks == {1}
        await until(pilot, lambda: resumed.state == "done", what="rest of the video encoded")
        await ask(pilot, "And now?")
        await until(pilot, lambda: resumed.last_answer not in (None, first), what="second answer")
    row, chunks, turns = session_row()
    assert [t["question"] for t in turns] == ["What is red?", "And now?"]
    assert turns[1]["frames_seen"] == 8  # continued from the snapshot's 4 frames to the end
    assert [c["chunk_index"] for c in chunks] == [0, 1, 2, 3]  # not re-encoded from the start
    # history=keep: the first turn stays in the cache, so the second sees more than the 8 frames' tokens
    assert turns[1]["cache_tokens"] > chunks[-1]["cache_tokens_after"] - turns[0]["new_tokens"]


@aio
async def test_sessions_screen_lists_the_store_and_resumes_one(tiny, app_clip, tmp_path):
    from streamchat.clips import make_clip

    other = make_clip(tmp_path / "other.mp4", seconds=2.0, fps=24.0, width=160, height=96)  # another video
    app, gate = make_app(tiny, other, allow=1, name="older")
    async with app.run_test(size=SIZE) as pilot:
        await pause_after(pilot, app, gate, 2)
        await pilot.press("f3")  # save a snapshot of 'older' at two chunks
        await until(pilot, lambda: not app.unsaved and any("Snapshot saved" in t for t in chat_texts(app)))
    app, gate = make_app(tiny, app_clip, allow=1, name="newer")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: gate.waiting == 1)
        gate.allow(2)  # newer goes on to chunk 2; older, resumed with 2 chunks, is held in its chunk 2
        await pilot.press("f5")
        await until(pilot, lambda: isinstance(app.screen, SessionsScreen))
        table = app.screen.query_one(DataTable)
        names = [table.get_row_at(i)[0] for i in range(table.row_count)]
        assert names == ["older"]  # 'newer' (this one) has no snapshot yet: nothing to resume
        assert table.get_row_at(0)[5] == 1  # older has one snapshot
        title = str(app.screen.query_one("#sessions-title", Static).render())
        assert "1 session without a snapshot (nothing to resume) not listed" in title
        newer_frame = app.frame_view._frame
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmDiscard), what="ask before leaving 'newer'")
        await pilot.press("d")
        await until(pilot, lambda: app.info is not None and app.info.session == "older", what="switched")
        assert app.info.frames_done == 4 and app.query_one(ChunkTimeline).cached == 2
        # the preview shows older's video: its last cached frame (3), or the last of the chunk it started (5)
        shown, older_frames = app.frame_view._frame, app.engine.live.stream.read_frames([3, 5])
        assert shown is not None and shown.shape != newer_frame.shape
        assert any((shown == f).all() for f in older_frames)
        assert app.metrics.values["cache_tokens"] == app.engine.live.engine.cache_tokens
        await until(pilot, lambda: gate.waiting == 2, what="'older' held in its chunk 2")
        gate.allow(None)
        await until(pilot, lambda: app.state == "done")
    with Store() as store:
        assert len(store.chunks(store.get_session("older")["id"])) >= 4


@aio
async def test_engine_error_is_a_message_not_a_crash(tiny, app_clip, monkeypatch):
    from streamchat.engine import StreamEngine

    encode = StreamEngine.encode

    def failing(self, *args, **kwargs):
        if self.chunks_encoded == 2:
            raise RuntimeError("boom in the vision tower")
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(StreamEngine, "encode", failing)
    app, gate = make_app(tiny, app_clip)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: any("boom" in t for t in chat_texts(app)), what="error in the chat")
        assert app.is_running and app.state == "paused"
        assert any("encoding stopped: RuntimeError: boom in the vision tower" in t for t in chat_texts(app))
        await ask(pilot, "Still there?")  # the app and the engine keep working
        await until(pilot, lambda: app.last_answer is not None, what="answer after the error")
    row, chunks, turns = session_row()
    assert len(chunks) == 2 and len(turns) == 1 and turns[0]["frames_seen"] == 4


@aio
async def test_a_session_that_cannot_open_is_shown_and_the_app_stays_up(tiny, tmp_path):
    app = ChatApp(Launch(video=str(tmp_path / "missing.mp4"), config=config(), device="cpu", loaded=tiny))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state == "failed", what="failed state")
        assert any("video not found" in t for t in chat_texts(app))
        await ask(pilot, "anyone?")
        assert "no engine" in str(app.turns[1].figures.render())
        assert app.is_running


@aio
async def test_typing_is_echoed_and_a_question_submitted_while_the_engine_is_inside_a_chunk(tiny, app_clip):
    app, gate = make_app(tiny, app_clip, allow=1)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: gate.waiting == 1)
        box = app.query_one("#question", Input)
        box.focus()
        delays = []
        for ch in "what is red":
            t0 = time.perf_counter()
            await pilot.press(ch if ch != " " else "space")
            await until(pilot, lambda: box.value.endswith(ch), timeout=2.0, what=f"echo of {ch!r}")
            delays.append(time.perf_counter() - t0)
        assert box.value == "what is red" and gate.waiting == 1  # the engine never left the chunk
        assert max(delays) < 0.5
        await pilot.press("enter")
        assert box.value == "" and app.turn_count == 1 and gate.waiting == 1
        gate.allow(None)
        await until(pilot, lambda: app.last_answer is not None)


@aio
async def test_compare_last_answer_with_offline_matches_on_cpu_float32(tiny, app_clip):
    app, gate = make_app(tiny, app_clip, allow=2)
    async with app.run_test(size=SIZE) as pilot:
        await pause_after(pilot, app, gate, 3)
        await ask(pilot, "What colour is the square?")
        await until(pilot, lambda: app.last_answer is not None)
        await pilot.press("f4")
        await until(pilot, lambda: app.query("#chat .compare"), what="comparison in the chat")
        text = app.query_one("#chat .compare", Markdown).source
        assert "identical tokens" in text and "Offline" in text
    row, chunks, turns = session_row()
    offline = [t for t in turns if t["mode"] == "offline"]
    streaming = [t for t in turns if t["mode"] == "streaming"]
    assert len(offline) == 1 and offline[0]["replay_of"] == streaming[0]["id"]
    assert offline[0]["token_ids"] == streaming[0]["token_ids"]


@aio
async def test_copy_help_and_quit_without_unsaved_work(tiny, app_clip):
    app, gate = make_app(tiny, app_clip, allow=0)  # held in chunk 0: nothing to lose
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: gate.waiting == 0)
        await pilot.press("f6")
        assert app.clipboard == ""  # nothing to copy yet
        app.last_answer = "an answer"
        await pilot.press("f6")
        assert app.clipboard == "an answer"
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        keys = str(app.screen.query_one("#help-keys", Static).render())
        lines = keys.splitlines()
        assert len(lines) == len(ChatApp.BINDINGS)
        assert lines[1].split() == ["f2", "streamchat.pause", "pause", "or", "resume", "encoding"]  # key, id for --keymap, what
        assert lines[-1].split()[:2] == ["ctrl+q", "streamchat.quit"]
        assert "Esc, F1 or q closes this help" in str(app.screen.query_one("#help-title", Static).render())
        await pilot.press("escape")
        await pilot.press("ctrl+q")
        await until(pilot, lambda: not app.is_running, what="quit without asking")


@aio
async def test_quit_asks_and_cancel_keeps_the_app_open(tiny, app_clip):
    app, gate = make_app(tiny, app_clip, allow=1)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: gate.waiting == 1 and app.unsaved)
        await pilot.press("ctrl+q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmDiscard))
        await pilot.press("escape")
        await pilot.pause()
        assert app.is_running and not isinstance(app.screen, ConfirmDiscard)
        await pilot.press("ctrl+q", "d")
        await until(pilot, lambda: not app.is_running, what="discard and quit")


@aio
async def test_app_session_is_listed_exported_and_replayed_by_the_cli(tiny, app_clip, capsys):
    from streamchat.cli import main

    app, gate = make_app(tiny, app_clip, allow=1)
    async with app.run_test(size=SIZE) as pilot:
        await pause_after(pilot, app, gate, 2)
        await ask(pilot, "Where is the disc?")
        await until(pilot, lambda: app.last_answer is not None)
        answer = app.last_answer
    capsys.readouterr()
    assert main(["sessions", "list", "--json"]) == 0
    assert "app-test" in capsys.readouterr().out
    assert main(["sessions", "export", "app-test", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [t["answer"] for t in doc["turns"]] == [answer] and len(doc["chunks"]) == 2
    assert await asyncio.to_thread(main, ["replay", "app-test", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["all_identical"] is True and report["replayed"] == 1


def test_realtime_worker_waits_for_each_chunk_to_arrive_and_pauses_do_not_count(tiny, app_clip):
    from streamchat.app.worker import EngineWorker, open_session

    now = [100.0]
    launch = Launch(video=str(app_clip), config=config(), device="cpu", dtype="float32", loaded=tiny,
                    name="paced", realtime=True)
    worker = EngineWorker(launch, post=lambda msg: None, clock=lambda: now[0])
    worker.live = open_session(launch, tiny)
    try:
        worker.toggle_pause()  # paused before pacing began (F2 while the model loads): not video time
        now[0] += 15.0
        worker.toggle_pause()
        # 4 fps, 2 frames a chunk: chunk 0 holds t = 0, 0.25 -> due 0.25 s after the start
        assert worker._due() is False
        now[0] += 0.24
        assert worker._due() is False
        now[0] += 0.02
        assert worker._due() is True
        worker.live.encode_next_chunk()
        assert worker._due() is False  # chunk 1 ends at 0.75 s
        worker.toggle_pause()
        now[0] += 10.0  # paused time is not video time
        worker.toggle_pause()
        assert worker._due() is False
        now[0] += 0.5
        assert worker._due() is True
    finally:
        worker.live.close()


@aio
async def test_a_partly_decodable_video_is_streamed_with_a_warning_in_the_chat(tiny, tmp_path):
    from test_video import cut_clip

    app, _ = make_app(tiny, cut_clip(tmp_path), name="cut")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: any("warning: cut.mp4" in t for t in chat_texts(app)), what="the warning")
        [line] = [t for t in chat_texts(app) if "warning:" in t]
        assert "only the first 2.00 s of 4.00 s decode (48 of 96 frames)" in line
        await until(pilot, lambda: app.state == "done", what="encoding done")
    _, chunks, _ = session_row("cut")
    assert chunks[-1]["frame_last"] == 7  # 4 fps up to 2 s: 8 frames, all of what decodes


@aio
async def test_a_resumed_finished_session_shows_its_last_frame_and_cache(tiny, tmp_path):
    from streamchat.cli import main
    from streamchat.clips import make_clip

    clip = make_clip(tmp_path / "done.mp4", seconds=1.0, fps=8.0, width=112, height=112)  # 2 s at 2 fps: 2 frames
    assert main(["run", str(clip), "--model", "tiny-random", "--session", "finished", "--snapshot", "--json"]) == 0
    app = ChatApp(Launch(resume="finished", device="cpu", loaded=tiny))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.info is not None and app.state == "done", what="resumed, nothing to encode")
        stream = app.engine.live.stream
        assert stream.next_frame == stream.total_frames == 2
        assert (app.frame_view._frame == stream.read_frames([1])[0]).all()  # no chunk ran: the frame came with the session
        assert app.metrics.values["cache_tokens"] == app.engine.live.engine.cache_tokens > 0


@aio
async def test_plots_give_way_on_a_short_terminal_even_under_the_help_screen(tiny, app_clip):
    app, gate = make_app(tiny, app_clip, allow=0)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: gate.waiting == 0)
        plots = [app.query_one("#encode-plot"), app.query_one("#ttft-plot")]
        assert [p.display for p in plots] == [False, False]
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.resize_terminal(120, 34)  # resized while the dialog is on top
        await pilot.pause()
        assert app.is_running and app.body.has_class("-short") and not app.body.has_class("-shorter")
        await pilot.press("escape")
        await pilot.pause()
        assert [p.display for p in plots] == [True, False]
        await pilot.resize_terminal(120, 40)
        await pilot.pause()
        assert [p.display for p in plots] == [True, True]


@aio
async def test_under_bounded_memory_the_answer_says_what_it_recalled_and_the_timeline_lights_it(tiny, app_clip):
    """A real bounded session (a working set of a few pages): the answer's line names the archived time
    spans it brought back, the timeline colours exactly their chunks, and clicking an older answer
    shows that answer's spans instead."""
    from streamchat.memory import MemoryConfig

    from dataclasses import replace

    cfg = replace(config(history="drop"), memory=MemoryConfig(mode="bounded", gpu_kv_budget="360", retrieve_tokens=32))
    app, gate = make_app(tiny, app_clip, allow=None, cfg=cfg)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state == "done", what="encoding done")
        await ask(pilot, "What is red?")
        await until(pilot, lambda: app.last_answer is not None, what="the answer")
        _, chunks, turns = session_row()
        spans = turns[0]["retrieved"]
        assert spans and app.engine.live.engine.book.archive.pages  # pages did leave, and some came back
        per = cfg.chunk_frames
        expected = {c for s in spans for c in range(s["frame_first"] // per, s["frame_last"] // per + 1)}
        assert app.timeline.recalled == expected
        line = str(app.turns[1].figures.render())
        assert "recalled 0:0" in line and line.count("–") == len(spans)
        assert app.turns[1].figures.has_class("-selected")
        archived = len(app.engine.live.engine.book.archive.pages)
        assert f"8/8 frames · all encoded, {archived} pages archived" in str(app.rate.render())
        # a question the archive does not serve (nothing brought back): selecting it clears the timeline
        app.turns[1].retrieved = []
        await pilot.click(app.turns[1].figures)
        assert app.timeline.recalled == set() and not app.turns[1].figures.has_class("-selected")
