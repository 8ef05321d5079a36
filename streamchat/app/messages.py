"""What the engine worker tells the UI: small dataclass messages, posted from the worker thread.

`post_message` is thread-safe; the UI updates itself in the handlers. High-rate messages define
`can_replace`, so when the UI falls behind only the latest one is handled (toolong's pattern).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from textual.message import Message

from ..engine import ChunkStats


@dataclass
class EngineReady(Message):
    """The model is loaded and the session is open (new or resumed)."""

    session: str  # the session's name in the store
    video: str
    model: str
    device: str
    total_frames: int
    chunk_frames: int
    sampled_fps: float
    frames_done: int  # > 0 when resumed from a snapshot
    position_s: float = 0.0  # video second of the last frame in the cache
    end_s: float = 0.0  # video second of the last sampled frame
    frame: np.ndarray | None = None  # the last frame in the cache (resumed), for the preview
    cache_tokens: int = 0  # the cache as restored (video and kept turns)
    cache_bytes: int = 0
    history: list[dict] = field(default_factory=list)  # earlier turns of a resumed session
    chunks: list[dict] = field(default_factory=list)  # earlier chunks of a resumed session (store rows)


@dataclass
class EngineState(Message):
    """encoding | paused | answering | comparing | saving | done | failed."""

    state: str


@dataclass
class ChunkStarted(Message):
    """A chunk's frames are decoded and go into the model; `frame` is its last frame [H, W, 3]."""

    index: int
    frame: np.ndarray

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, ChunkStarted)


@dataclass
class ChunkEncoded(Message):
    """A chunk is in the cache."""

    stats: ChunkStats
    frames_done: int  # plan frames encoded so far
    wall_s: float  # decode + encode of this chunk, as the user waited for it


@dataclass
class AnswerStarted(Message):
    turn: int
    at_s: float  # stream position the question is answered at
    frames: int


@dataclass
class AnswerToken(Message):
    """The answer so far (decoded whole, so a replaced message loses nothing)."""

    turn: int
    text: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, AnswerToken) and message.turn == self.turn


@dataclass
class AnswerDone(Message):
    turn: int
    text: str
    figures: dict  # ttft_ms, tokens_per_s, new_tokens, cache_tokens, latency_ms, at_s, cache_tokens_after, cache_bytes_after


@dataclass
class AnswerFailed(Message):
    turn: int
    error: str


@dataclass
class EngineFailed(Message):
    """The engine raised; the session stays logged and the app keeps running."""

    error: str
    fatal: bool = False  # True when no session could be opened at all


@dataclass
class Notice(Message):
    """A line for the chat pane: a snapshot saved, a comparison's result, ..."""

    text: str
    kind: str = "info"  # info | compare | error


@dataclass
class SnapshotSaved(Message):
    path: str
    bytes: int
