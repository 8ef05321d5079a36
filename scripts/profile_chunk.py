"""Profile one streaming chunk (vision tower, LLM append) and one decode step on a GPU.

    python scripts/profile_chunk.py --frames-before 48 --width 1288 --height 728

Prints torch.profiler tables (top kernels by GPU time) so a speed change starts from data.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from streamchat import hf
from streamchat.config import SessionConfig
from streamchat.engine import StreamEngine
from streamchat.models import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="random:qwen2.5-vl-3b")
    ap.add_argument("--width", type=int, default=1288)
    ap.add_argument("--height", type=int, default=728)
    ap.add_argument("--frames-before", type=int, default=48, help="frames encoded before the profiled chunk (default: 48)")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    loaded = load(args.model)
    engine = StreamEngine(loaded, SessionConfig(model=args.model, chunk_frames=4, max_new_tokens=4), fps=2.0)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (4, args.height, args.width, 3), dtype=np.uint8)
    for first in range(0, args.frames_before, 4):
        engine.encode(frames, first)
    prepared = engine.preprocess(frames)
    torch.cuda.synchronize()
    print(f"cache {engine.cache_tokens} tokens")
    pixels, grid = prepared
    with torch.inference_mode():
        hf.use_stream_attention(loaded.model, True)
        for name, fn in [
            ("vision tower, one 4-frame chunk", lambda: hf.embed_video(loaded.model, pixels, grid)),
            ("whole chunk encode (vision + LLM append)", lambda: engine.encode(frames, args.frames_before, prepared=prepared)),
        ]:
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            print(f"\n=== {name} ===")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.ask("What happens?", max_new_tokens=4)
            torch.cuda.synchronize()
        print("\n=== ask: question prefill + 3 decode steps ===")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
