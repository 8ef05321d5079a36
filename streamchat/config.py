"""A session's settings in one dataclass, saved with every session row and every snapshot."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from .errors import UserError
from .memory import MemoryConfig
from .video import Sampling

HISTORY_MODES = ("drop", "keep")


@dataclass
class SessionConfig:
    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    sampling: Sampling = field(default_factory=Sampling)
    chunk_frames: int = 4  # frames appended per step; even, since Qwen2.5-VL packs frames in pairs
    history: str = "drop"  # drop: each answer is rolled back; keep: answers stay as dialogue
    max_new_tokens: int = 64  # enough for a sentence or two
    system_prompt: str = "You are a helpful assistant."  # Qwen2.5-VL's default system prompt
    stream_attention: bool = True  # lower-right causal SDPA without a mask (streamchat/hf/attention.py); False = stock sdpa
    static_decode: bool = True  # decode steps on fixed-shape buffers, one CUDA graph per step on a GPU
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # exact / bounded / auto, and the KV budgets

    def validate(self) -> "SessionConfig":
        if self.chunk_frames < 2 or self.chunk_frames % 2:
            raise UserError(
                f"--chunk-frames must be even and at least 2 (Qwen2.5-VL packs frames in pairs); got {self.chunk_frames}"
            )
        if self.history not in HISTORY_MODES:
            raise UserError(f"--history must be one of {', '.join(HISTORY_MODES)}; got {self.history}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1; got {self.max_new_tokens}")
        self.memory.validate()
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SessionConfig":
        d = dict(d)
        d["sampling"] = Sampling(**d.get("sampling", {}))
        d["memory"] = MemoryConfig(**d.get("memory", {}))  # sessions logged before memory policies: the defaults
        return cls(**d)

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
