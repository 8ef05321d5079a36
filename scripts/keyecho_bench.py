"""Key-to-echo delay in the app while the engine worker is encoding.

Opens the real app headless (App.run_test) on a generated clip, lets the worker encode freely, and
types into the question box through the Pilot's driver: for each key, the time from sending the key
event to the Input's value showing it. Only keys sent while the header says "encoding" count.

Pilot.press itself is not timed: after each key it waits until the *process* is idle, which never
happens while the worker encodes, so it would measure its own one-second give-up. The key event is
built and sent exactly as Pilot.press does, without that wait.

    .venv/bin/python scripts/keyecho_bench.py                      # tiny-random on the CPU
    .venv/bin/python scripts/keyecho_bench.py --model random:qwen2.5-vl-3b --device cuda

Prints p50/p95/max in ms and, last, one line of JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def send_key(app, char: str) -> None:
    """What Pilot.press sends for one printable key, minus its wait for an idle process."""
    from textual import events

    event = events.Key(char, char)
    event.set_sender(app)
    app._driver.send_message(event)


async def measure(args) -> dict:
    from textual.widgets import Input

    from streamchat.app import ChatApp, Launch
    from streamchat.clips import make_clip
    from streamchat.config import SessionConfig
    from streamchat.models import load
    from streamchat.video import Sampling

    if args.clip:
        clip = Path(args.clip)
    else:
        clip = make_clip(Path(os.environ["STREAMCHAT_HOME"]) / "bench.mp4", seconds=args.seconds, fps=24.0,
                         width=args.size, height=args.size)
    loaded = load(args.model, device=args.device, dtype=args.dtype)
    config = SessionConfig(model=args.model, sampling=Sampling(fps=args.fps), chunk_frames=args.chunk_frames)
    app = ChatApp(Launch(video=str(clip), config=config, device=args.device, dtype=args.dtype, loaded=loaded))
    delays: list[float] = []
    async with app.run_test(size=(120, 40)):
        t0 = time.monotonic()
        while not (app.state == "encoding" and app.timeline.cached >= 1):
            if time.monotonic() - t0 > 120:
                raise SystemExit(f"the engine did not start encoding (state {app.state})")
            await asyncio.sleep(0.01)
        box = app.query_one("#question", Input)
        box.focus()
        chunks_before = app.timeline.cached
        started = time.perf_counter()
        for i in range(args.keys):
            if app.state != "encoding":
                break
            if len(box.value) >= 60:
                box.value = ""
                await asyncio.sleep(0.005)
            before, char = box.value, "abcdefghijklmnopqrstuvwxyz"[i % 26]
            sent = time.perf_counter()
            send_key(app, char)
            while box.value == before:
                if time.perf_counter() - sent > 5:
                    raise SystemExit("a key was not echoed within 5 s")
                await asyncio.sleep(0.0005)  # poll: ~0.5-1 ms granularity
            delays.append(time.perf_counter() - sent)
            await asyncio.sleep(args.gap_ms / 1000)
        elapsed = time.perf_counter() - started
        chunks_during = app.timeline.cached - chunks_before
        app.engine.stop()
    if len(delays) < 20:
        raise SystemExit(f"only {len(delays)} keys while encoding; use a longer clip (--seconds)")
    ms = [d * 1000 for d in delays]
    return {
        "bench": "keyecho",
        "model": args.model,
        "device": str(loaded.device),
        "clip": (args.clip or f"{args.seconds:g}s {args.size}x{args.size}") + f" @ {args.fps:g} fps, {args.chunk_frames} frames/chunk",
        "keys": len(ms),
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p95_ms": round(percentile(ms, 0.95), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "chunks_encoded_meanwhile": chunks_during,
        "seconds": round(elapsed, 2),
        "cpus": os.cpu_count(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-random", help="model to encode with (default: tiny-random)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--dtype", default="auto", help="dtype (default: auto)")
    p.add_argument("--seconds", type=float, default=90.0, help="clip length; the worker must outlast the keys (default: 90)")
    p.add_argument("--size", type=int, default=224, help="clip width and height in pixels (default: 224)")
    p.add_argument("--fps", type=float, default=8.0, help="sampled frames per second (default: 8)")
    p.add_argument("--chunk-frames", type=int, default=4, help="frames per chunk (default: 4)")
    p.add_argument("--clip", default=None, help="use this video instead of generating one (default: generate)")
    p.add_argument("--keys", type=int, default=300, help="keys to type (default: 300)")
    p.add_argument("--gap-ms", type=float, default=10.0, help="pause between keys, like a fast typist (default: 10)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="keyecho-") as home:
        os.environ["STREAMCHAT_HOME"] = home
        result = asyncio.run(measure(args))
    print(f"key-to-echo while encoding ({result['model']} on {result['device']}, {result['keys']} keys, "
          f"{result['chunks_encoded_meanwhile']} chunks encoded meanwhile): "
          f"p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms, max {result['max_ms']:.1f} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
