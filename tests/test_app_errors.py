"""The app under failure: questions that fail, sessions that go away or cannot be opened, start-up
checks before the app opens. Real model (tiny-random), real store, real Textual app via Pilot."""

from __future__ import annotations

import time

import pytest
from textual.widgets import Input

from streamchat.store import Store
from test_app import SIZE, aio, app_clip, ask, chat_texts, config, make_app, pause_after, session_row, until  # noqa: F401


@aio
async def test_a_question_that_fails_is_an_error_line_and_the_next_question_is_answered(tiny, app_clip):
    app, gate = make_app(tiny, app_clip, allow=1)
    async with app.run_test(size=SIZE) as pilot:
        await pause_after(pilot, app, gate, 2)
        box = app.query_one("#question", Input)
        box.value = "red " * 33_000  # about 33k tokens: more than tiny-random's 32,768-token context
        box.focus()
        await pilot.press("enter")
        failed = app.turns[1]
        await until(pilot, lambda: failed.figures.has_class("error"), what="the failure in the chat")
        line = str(failed.figures.render())
        assert line.startswith("✖ the question is") and "fit beside the cache's" in line and "(limit 32,768); ask a shorter question" in line
        echoed = chat_texts(app)[0]
        assert echoed.startswith("› red red") and echoed.endswith("… (131,999 characters)") and len(echoed) < 700
        assert app.is_running and app.state == "paused" and app.last_answer is None
        await ask(pilot, "What is red?")
        await until(pilot, lambda: app.last_answer is not None, what="the next answer")
        assert app.is_running and "TTFT" in str(app.turns[2].figures.render())
        assert not app.turns[2].figures.has_class("error")
    row, chunks, turns = session_row()
    assert [t["question"] for t in turns] == ["What is red?"]  # the failed one is not logged as a turn
    assert turns[0]["frames_seen"] == 4 and len(chunks) == 2


@aio
async def test_a_question_that_fails_at_once_leaves_the_app_and_the_session_up(tiny, app_clip):
    # --max-new-tokens sized so that the whole clip plus the shortest question and the answer fill
    # tiny-random's 32,768-token context exactly: the stream is planned, but once it is encoded every
    # real question fails in the engine straight after it started, the race that used to shut the app down
    from streamchat.stream import Stream
    from streamchat.video import VideoSource

    probe = Stream(tiny, VideoSource(app_clip, config().sampling), config())
    fill = config().max_new_tokens + 32_768 - probe.engine.planned_tokens
    app, gate = make_app(tiny, app_clip, allow=None, cfg=config(max_new_tokens=fill))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state == "done", what="encoding done")
        for turn in (1, 2):
            await ask(pilot, "What is red?")
            await until(pilot, lambda: app.turns[turn].figures.has_class("error"), what=f"failure {turn}")
            line = str(app.turns[turn].figures.render())
            assert line.startswith("✖ the question is") and "fit beside the cache's" in line
            assert app.is_running and app.state == "done"
    row, chunks, turns = session_row()
    assert len(chunks) == 4 and turns == []


@aio
async def test_sessions_rm_refuses_a_session_the_app_has_open(tiny, app_clip, capsys):
    import asyncio
    import os
    import subprocess
    import sys

    from streamchat.cli import main

    def rm() -> subprocess.CompletedProcess:  # from another process, as a user in a second terminal would
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": root}
        return subprocess.run([sys.executable, "-m", "streamchat", "sessions", "rm", "app-test"], env=env,
                              capture_output=True, text=True, timeout=120)

    app, gate = make_app(tiny, app_clip, allow=1)
    async with app.run_test(size=SIZE) as pilot:
        await pause_after(pilot, app, gate, 2)
        done = await asyncio.to_thread(rm)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr == (f"streamchat: error: session app-test is open in `streamchat chat` (process {os.getpid()}); "
                               "quit the app first, then remove it\n")
        await ask(pilot, "Still logged?")
        await until(pilot, lambda: app.last_answer is not None, what="answer")
    row, _, turns = session_row()
    assert len(turns) == 1
    from streamchat.inuse import holder

    t0 = time.monotonic()
    while holder(row["id"]) is not None:  # the engine thread lets go of the session as it ends
        assert time.monotonic() - t0 < 10, "the closed app still holds the session"
        time.sleep(0.02)
    assert main(["sessions", "rm", "app-test"]) == 0


@aio
async def test_a_session_removed_under_the_app_is_an_error_line_not_a_crash(tiny, app_clip):
    app, gate = make_app(tiny, app_clip, allow=1)
    async with app.run_test(size=SIZE) as pilot:
        await pause_after(pilot, app, gate, 2)
        with Store() as store:
            store.delete_session("app-test")  # what `sessions rm` did before it checked for the app
        for turn in (1, 2):
            await ask(pilot, "What is red?")
            await until(pilot, lambda: app.turns[turn].figures.has_class("error"), what=f"error {turn}")
            line = str(app.turns[turn].figures.render())
            assert line == ("✖ session app-test is no longer in the store (removed while the app had it open?), "
                            "so nothing more is logged; start a new session to keep a log")
            assert app.turns[turn].written and app.turns[turn].answer.source == app.turns[turn].written  # shown
        await pilot.press("f2")  # encoding goes on until the next chunk cannot be logged
        await until(pilot, lambda: any("encoding stopped: session app-test is no longer" in t for t in chat_texts(app)),
                    what="encoding error")
        assert app.is_running and app.state == "paused"


@aio
async def test_picking_a_session_that_cannot_open_keeps_the_current_one(tiny, app_clip, tmp_path):
    import os
    import shutil

    from textual.widgets import DataTable

    from streamchat.app.screens import SessionsScreen

    moved = tmp_path / "moved.mp4"
    shutil.copy(app_clip, moved)
    app, gate = make_app(tiny, moved, allow=1, name="gone-video")
    async with app.run_test(size=SIZE) as pilot:
        await pause_after(pilot, app, gate, 2)
        await pilot.press("f3")
        await until(pilot, lambda: not app.unsaved, what="snapshot saved")
    os.remove(moved)
    app, gate = make_app(tiny, app_clip, allow=1, name="current")
    async with app.run_test(size=SIZE) as pilot:
        await pause_after(pilot, app, gate, 2)
        engine = app.engine
        await pilot.press("f5")
        await until(pilot, lambda: isinstance(app.screen, SessionsScreen))
        assert app.screen.query_one(DataTable).get_row_at(0)[0] == "gone-video"
        await pilot.press("enter")
        await until(pilot, lambda: any("cannot open session gone-video" in t for t in chat_texts(app)), what="refusal")
        line = next(t for t in chat_texts(app) if "cannot open session gone-video" in t)
        assert f"the video of session gone-video is no longer at {moved}" in line
        assert app.engine is engine and app.info.session == "current" and app.state == "paused"
        await ask(pilot, "Still here?")
        await until(pilot, lambda: app.last_answer is not None, what="answer in the current session")
    assert len(session_row("current")[2]) == 1
