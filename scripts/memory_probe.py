"""What holds GPU memory while streaming: allocated bytes after each step, and the largest live
allocations at the end with the code that made them.

    python scripts/memory_probe.py --frames 24 --width 1288 --height 728
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from streamchat.config import SessionConfig
from streamchat.engine import StreamEngine
from streamchat.models import load


def gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="random:qwen2.5-vl-3b")
    ap.add_argument("--width", type=int, default=1288)
    ap.add_argument("--height", type=int, default=728)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.cuda.memory._record_memory_history(max_entries=200000)
    loaded = load(args.model)
    steps = [("loaded", torch.cuda.memory_allocated())]
    config = SessionConfig(model=args.model, chunk_frames=4, max_new_tokens=8)
    frames = np.random.default_rng(0).integers(0, 255, (4, args.height, args.width, 3), dtype=np.uint8)
    StreamEngine(loaded, config, 2.0).warmup(frames)
    steps.append(("after warm-up", torch.cuda.memory_allocated()))
    engine = StreamEngine(loaded, config, 2.0)
    engine.plan(args.frames, args.height, args.width)
    steps.append(("after plan", torch.cuda.memory_allocated()))
    for first in range(0, args.frames, 4):
        engine.encode(frames, first)
        if first == 0:
            steps.append(("after chunk 0", torch.cuda.memory_allocated()))
    steps.append(("after all chunks", torch.cuda.memory_allocated()))
    engine.ask("What happens?")
    steps.append(("after a question", torch.cuda.memory_allocated()))
    for name, n in steps:
        print(f"{name:20s} {gib(n)}")
    print(f"peak {gib(torch.cuda.max_memory_allocated())}")
    snap = torch.cuda.memory._snapshot()
    blocks = []
    for seg in snap["segments"]:
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                frames_ = b.get("frames") or []
                where = " <- ".join(f"{f['filename'].split('/')[-1]}:{f['line']}:{f['name']}" for f in frames_
                                    if "streamchat" in f["filename"] or "transformers" in f["filename"])[:400]
                blocks.append((b["size"], seg.get("segment_pool_id"), where))
    blocks.sort(reverse=True)
    by_site: dict = {}
    for size, pool, where in blocks:
        by_site.setdefault((where, pool), [0, 0])
        by_site[(where, pool)][0] += size
        by_site[(where, pool)][1] += 1
    for (where, pool), (size, count) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{gib(size)} in {count} blocks, pool {pool}: {where or '(no python frames)'}")


if __name__ == "__main__":
    main()
