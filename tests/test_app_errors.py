"""The app under failure: questions that fail, sessions that go away or cannot be opened, start-up
checks before the app opens. Real model (tiny-random), real store, real Textual app via Pilot."""

from __future__ import annotations

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
        assert line.startswith("✖ the question is") and "fit in the model's context (32768 tokens" in line
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
    # --max-new-tokens 32760 leaves no room in tiny-random's 32,768-token context: every question fails
    # in the engine straight after it started, the race that used to shut the whole app down
    app, gate = make_app(tiny, app_clip, allow=1, cfg=config(max_new_tokens=32_760))
    async with app.run_test(size=SIZE) as pilot:
        await pause_after(pilot, app, gate, 2)
        for turn in (1, 2):
            await ask(pilot, "What is red?")
            await until(pilot, lambda: app.turns[turn].figures.has_class("error"), what=f"failure {turn}")
            line = str(app.turns[turn].figures.render())
            assert line.startswith("✖ the question is") and "tokens but only 0 fit" in line
            assert app.is_running and app.state == "paused"
        await pilot.press("f2")
        await until(pilot, lambda: app.state == "done", what="encoding goes on after the failures")
    row, chunks, turns = session_row()
    assert len(chunks) == 4 and turns == []
