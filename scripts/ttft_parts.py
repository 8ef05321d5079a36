"""Where a question's time to first token goes, on a GPU: the question prefill through transformers'
text model against streamchat's graphs (QuestionPrefill), then a profile of one whole `ask`.

    python scripts/ttft_parts.py --frames 64 --width 1288 --height 728
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from streamchat import hf
from streamchat.config import SessionConfig
from streamchat.engine import StreamEngine
from streamchat.models import load
from streamchat.positions import text_positions


def wall_ms(fn, reps: int = 15) -> tuple[float, float]:
    """(median wall ms with a device sync, median host ms to return without one)."""
    walls, hosts = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        hosts.append((t1 - t0) * 1e3)
        walls.append((t2 - t0) * 1e3)
    return statistics.median(walls), statistics.median(hosts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="random:qwen2.5-vl-3b")
    ap.add_argument("--width", type=int, default=1288)
    ap.add_argument("--height", type=int, default=728)
    ap.add_argument("--frames", type=int, default=64, help="frames in the cache before the questions (default: 64)")
    ap.add_argument("--tokens", type=int, default=32, help="question prefill length (default: 32)")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    loaded = load(args.model)
    engine = StreamEngine(loaded, SessionConfig(model=args.model, chunk_frames=4, max_new_tokens=4), fps=2.0)
    frames = np.random.default_rng(0).integers(0, 255, (4, args.height, args.width, 3), dtype=np.uint8)
    engine.warmup(frames)
    for first in range(0, args.frames, 4):
        engine.encode(frames, first)
    torch.cuda.synchronize()
    model, cache = loaded.model, engine.cache.hf
    n = args.tokens
    ids = torch.full((n,), engine.vocab.im_end, device=loaded.device)
    start = engine.cursor.next_pos + 100
    pos = text_positions(start, n)
    print(f"cache {engine.cache_tokens} tokens, prefill of {n} tokens")
    with torch.inference_mode():
        hf.use_stream_attention(model, True)

        def stock():
            hidden = hf.lm_forward(model, hf.embed_tokens(model, ids), pos, cache)
            hf.lm_head(model, hidden)
            hf.cache_drop_tail(cache, n)

        qp = hf.question_prefill(model, cache, n, {})

        def graphs():
            qp.run(ids.cpu(), pos, n)
            hf.cache_drop_tail(cache, n)

        ref = hf.lm_head(model, hf.lm_forward(model, hf.embed_tokens(model, ids), pos, cache)).clone()
        hf.cache_drop_tail(cache, n)
        got = qp.run(ids.cpu(), pos, n).clone()
        hf.cache_drop_tail(cache, n)
        print(f"graphs vs transformers: max |logit diff| {float((got - ref).abs().max()):.4g}, "
              f"same argmax {int(got.argmax()) == int(ref.argmax())}")
        for name, fn in [("transformers text model", stock), ("graphs", graphs),
                         ("transformers again", stock), ("graphs again", graphs)]:
            w, h = wall_ms(fn)
            print(f"{name:26s} wall {w:6.2f} ms  host {h:6.2f} ms")
        for q in ["What happens?", "What happens?"]:
            a = engine.ask(q)
            print(f"ask: ttft {a.ttft_s * 1e3:.1f} ms")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            a = engine.ask("What happens?", max_new_tokens=2)
            torch.cuda.synchronize()
        print(f"profiled ask: ttft {a.ttft_s * 1e3:.1f} ms")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
