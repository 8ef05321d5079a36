"""Does the first question of a new length pay a one-time cost? Asks questions of several lengths, each twice.

    python scripts/ttft_shapes.py
"""

import numpy as np
import torch

from streamchat.config import SessionConfig
from streamchat.engine import StreamEngine
from streamchat.models import load

loaded = load("random:qwen2.5-vl-3b")
engine = StreamEngine(loaded, SessionConfig(model="random:qwen2.5-vl-3b", chunk_frames=4, max_new_tokens=4), fps=2.0)
frames = np.random.default_rng(0).integers(0, 255, (4, 728, 1288, 3), dtype=np.uint8)
engine.warmup(frames)
for first in range(0, 16, 4):
    engine.encode(frames, first)
torch.cuda.synchronize()
questions = ["What happens?", "What happens in the video right now, and who is there?",
             "Describe the scene " + "in detail " * 8, "Why?", "What happens?"]
for q in questions:
    for rep in range(2):
        a = engine.ask(q)
        print(f"q_tokens={len(engine.vocab.user_text(q)):3d} rep={rep} ttft_ms={a.ttft_s * 1000:6.1f} latency_ms={a.latency_s * 1000:6.1f}")
