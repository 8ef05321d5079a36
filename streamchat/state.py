"""The engine's state besides the cache, as one dataclass: what reset starts from, what warm-up sets
aside, and what a snapshot saves and restore puts back (with a versioned JSON form)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .layout import Segment, TextSeg, segments_from_json, segments_to_json
from .positions import Cursor

STATE_VERSION = 2


@dataclass
class EngineState:
    cursor: Cursor = field(default_factory=Cursor)
    pending: list[int] = field(default_factory=list)  # known tokens not yet in the cache
    transcript: list[Segment] = field(default_factory=list)  # every token and frame, in order
    block_frames: int = 0  # frames in the open video block
    frames_seen: int = 0  # plan frames encoded so far (pads not counted)
    chunks_encoded: int = 0
    turns: int = 0

    @classmethod
    def start(cls, opening: list[int]) -> "EngineState":
        """A fresh stream: `opening` (the system turn and the first video block's start) pending."""
        return cls(pending=list(opening), transcript=[TextSeg(list(opening))])

    def copy(self) -> "EngineState":
        return copy.deepcopy(self)

    def to_json(self) -> dict:
        c = self.cursor
        return {
            "version": STATE_VERSION,
            "cursor": {"next_pos": c.next_pos, "block_start": c.block_start, "block_patches": c.block_patches, "block_max": c.block_max},
            "pending": list(self.pending),
            "transcript": segments_to_json(self.transcript),
            "block_frames": self.block_frames,
            "frames_seen": self.frames_seen,
            "chunks_encoded": self.chunks_encoded,
            "turns": self.turns,
        }

    @classmethod
    def from_json(cls, d: dict) -> "EngineState":
        """Version 1 (streamchat's first snapshots) had the same fields without a version."""
        version = int(d.get("version", 1))
        if version > STATE_VERSION:
            raise ValueError(f"engine state version {version} is newer than this streamchat's {STATE_VERSION}")
        c = d["cursor"]
        return cls(
            cursor=Cursor(c["next_pos"], c["block_start"], c["block_patches"], c["block_max"]),
            pending=list(d["pending"]),
            transcript=segments_from_json(d["transcript"]),
            block_frames=int(d["block_frames"]),
            frames_seen=int(d["frames_seen"]),
            chunks_encoded=int(d["chunks_encoded"]),
            turns=int(d["turns"]),
        )
