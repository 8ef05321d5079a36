"""Drives a video source through the engine: chunk by chunk up to a time, with a hook per chunk.

Shared by the headless commands, the app and the benchmark, so they all cut the video the same way:
chunks of `chunk_frames`; an odd frame waits for its pair, except where a question needs it (every
frame up to the question's time: session.frames_up_to) and at the end of what will ever be encoded,
where it is repeated once, as the HF video processor pads.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .config import SessionConfig
from .engine import ChunkStats, StreamEngine
from .models import Loaded
from .video import VideoSource


class Stream:
    """A video source driven through an engine. `frames` is how many plan frames the caller means to
    encode (default: all); the memory policy is resolved for that many, so exact memory that cannot
    hold them is refused before any work. `spill_dir` is where a bounded stream's archive spills."""

    def __init__(self, loaded: Loaded, source: VideoSource, config: SessionConfig, *, frames: int | None = None,
                 spill_dir: Path | None = None):
        self.loaded = loaded
        self.source = source
        self.config = config
        self.fps = config.sampling.sampled_fps(source.info.native_fps)
        self.engine = StreamEngine(loaded, config, self.fps, spill_dir=spill_dir)
        h, w = source.info.resized_height, source.info.resized_width
        self.planned = self.total_frames if frames is None else max(min(frames, self.total_frames), 0)
        if loaded.device.type == "cuda":
            # pay CUDA's one-time setup now, not on the first chunk or the first question
            self.engine.warmup(np.zeros((2, h, w, 3), dtype=np.uint8))
        self.budget = self.engine.plan(self.planned, h, w)
        self.next_frame = 0  # plan position of the next frame to encode
        self._cache: dict[int, np.ndarray] = {}

    def spill_to(self, folder: Path) -> None:
        """Where a bounded stream's archive pages spill (a session's folder, known once its row exists)."""
        self.engine.spill_dir = folder
        self.engine.book.archive.spill_dir = folder

    @property
    def total_frames(self) -> int:
        return len(self.source.plan)

    @property
    def done(self) -> bool:
        return self.next_frame >= self.total_frames

    def frames_at(self, seconds: float | None) -> int:
        """Plan frames with timestamp <= seconds (all when None)."""
        return self.total_frames if seconds is None else self.source.frames_until(seconds)

    def encode_until(
        self,
        frames: int,
        *,
        pad_tail: bool = False,
        on_chunk: Callable[[ChunkStats], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[ChunkStats]:
        """Encode plan frames [next_frame, frames); an odd remainder waits unless pad_tail or the video ends."""
        frames = min(frames, self.total_frames)
        pad = pad_tail or frames >= self.total_frames
        last = frames if pad else self.next_frame + (frames - self.next_frame) // 2 * 2
        out: list[ChunkStats] = []
        if last <= self.next_frame:
            return out
        chunks = self.source.prefetch_chunks(self.config.chunk_frames, first=self.next_frame, last=last)
        for chunk, prepared in self._prepared(chunks):
            stats = self.engine.encode(chunk.frames, chunk.first, chunk.padded, chunk.timestamps, prepared=prepared)
            self.next_frame = chunk.first + len(chunk.frames) - (1 if chunk.padded else 0)
            out.append(stats)
            if on_chunk is not None:
                on_chunk(stats)
            if should_stop is not None and should_stop():
                break
        return out

    def _prepared(self, chunks: Iterator, depth: int = 2) -> Iterator:
        """Yield (chunk, preprocess(chunk)) with the CPU preprocessing of the next chunks running ahead,
        so decoding and patchifying never stall the GPU."""
        with ThreadPoolExecutor(1, thread_name_prefix="streamchat-prep") as pool:
            ahead: deque = deque()
            try:
                for chunk in chunks:
                    ahead.append((chunk, pool.submit(self.engine.preprocess, chunk.frames)))
                    if len(ahead) > depth:
                        head, fut = ahead.popleft()
                        yield head, fut.result()
                while ahead:
                    head, fut = ahead.popleft()
                    yield head, fut.result()
            finally:
                for _, fut in ahead:
                    fut.cancel()
                if hasattr(chunks, "close"):
                    chunks.close()

    def read_frames(self, positions: list[int]) -> np.ndarray:
        return read_frames(self.source, positions)


def read_frames(source: VideoSource, positions: list[int]) -> np.ndarray:
    """Frames at plan positions (for the offline runner); decoded again, so no frame stays in memory."""
    lo, hi = min(positions), max(positions)
    block = source.read(lo, hi - lo + 1)
    return block[[p - lo for p in positions]]
