"""SVG snapshots of the app (pytest-textual-snapshot): the main screen mid-stream and the sessions screen.

Deterministic on purpose: a fixed terminal size, no cursor blink, the engine's and the worker's
clocks replaced by a counter (so every figure is the same on every run), the store's wall-clock
time frozen, and a ChunkGate that holds the engine at a known chunk. Update with
`pytest tests/test_app_snapshots.py --snapshot-update` after looking at the report.
"""

from __future__ import annotations

import threading
import time

import pytest
from textual.widgets import Input

from streamchat.app import ChatApp, ChunkGate, Launch
from streamchat.app.screens import SessionsScreen
from streamchat.config import SessionConfig
from streamchat.store import Store
from streamchat.video import Sampling

SIZE = (120, 40)
FROZEN_UTC = "2026-01-02T03:04:05.000000+00:00"


class CountingClock:
    """perf_counter's stand-in: each call advances by a step that cycles, so durations vary but repeat."""

    def __init__(self):
        self.t, self.n = 100.0, 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.n += 1
            self.t += 0.001 * (1 + self.n % 5)
            return self.t


@pytest.fixture(scope="module")
def snap_clip(tmp_path_factory):
    from streamchat.clips import make_clip

    return make_clip(tmp_path_factory.mktemp("snap") / "clip.mp4", seconds=2.0, fps=24.0, width=112, height=112)


@pytest.fixture
def frozen(monkeypatch):
    clock = CountingClock()
    monkeypatch.setattr("streamchat.engine.now", clock)
    monkeypatch.setattr("streamchat.store.utcnow", lambda: FROZEN_UTC)
    return clock


def make_app(tiny, clip, clock, allow: int, name: str) -> tuple[ChatApp, ChunkGate]:
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=4.0), chunk_frames=2, history="keep", max_new_tokens=12)
    gate = ChunkGate(allow)
    launch = Launch(video=str(clip), config=config, device="cpu", dtype="float32", loaded=tiny, name=name)
    return ChatApp(launch, gate=gate, clock=clock), gate


async def until(pilot, cond, timeout: float = 15.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        await pilot.pause(0.01)


def test_main_screen_mid_stream(snap_compare, tiny, snap_clip, frozen):
    """Two chunks in the cache, the third held mid-encode, one question answered after chunk 2."""
    app, gate = make_app(tiny, snap_clip, frozen, allow=1, name="snapshot-main")

    async def run_before(pilot) -> None:
        box = app.query_one("#question", Input)
        box.cursor_blink = False
        await until(pilot, lambda: gate.waiting == 1)
        await pilot.press("f2")  # pause once chunk 1 is in
        gate.allow(2)
        await until(pilot, lambda: app.state == "paused")
        await pilot.click("#question")
        await pilot.press(*"What moves?", "enter")
        await until(pilot, lambda: app.last_answer is not None and app.state == "paused")
        await pilot.press("f2")  # resume: chunk 2 starts and is held
        await until(pilot, lambda: gate.waiting == 2 and app.state == "encoding")
        await pilot.press(*"and the blue bar")  # a half-typed question
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_main_screen_at_80x24(snap_compare, tiny, snap_clip, frozen):
    """The smallest common terminal: state in the header, every key in the footer, the placeholder whole."""
    app, gate = make_app(tiny, snap_clip, frozen, allow=1, name="2026-01-02-clip-1a2b")

    async def run_before(pilot) -> None:
        app.query_one("#question", Input).cursor_blink = False
        await until(pilot, lambda: gate.waiting == 1)
        await pilot.press("f2")  # paused once chunk 1 is in: the header must say so at 80 columns
        gate.allow(None)
        await until(pilot, lambda: app.state == "paused")
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_sessions_screen(snap_compare, tiny, snap_clip, frozen):
    with Store() as store:
        for name, model in (("2026-01-01-street-1a2b", "Qwen/Qwen2.5-VL-3B-Instruct"), ("kitchen", "tiny-random")):
            row = store.create_session(video_path=f"/videos/{name}.mp4", video_sha256="0" * 64, model_id=model,
                                       config={}, history="keep", name=name)
            for i in range(3):
                store.log_chunk(row["id"], chunk_index=i, encode_ms=10.0)
            store.log_turn(row["id"], question="What is on the table?", answer="A cup.")
            store.log_snapshot(row["id"], path=f"/sessions/{name}/snapshot-1.safetensors", bytes=1, sha256="0" * 64,
                               chunks=3, cache_tokens=100, frames=6)  # listed: F5 shows only sessions with a snapshot
    app, gate = make_app(tiny, snap_clip, frozen, allow=0, name="current")

    async def run_before(pilot) -> None:
        await until(pilot, lambda: gate.waiting == 0 and app.info is not None)
        await pilot.press("f5")
        await until(pilot, lambda: isinstance(app.screen, SessionsScreen))
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
