"""`streamchat bench --minutes N`: a long synthetic stream under a memory policy, minute by minute.

Streams N minutes of synthetic frames (bench.SyntheticVideo) at the chosen fps and size through one
engine, asks questions at the end of every minute and a batch at the end, and reports per minute:
encode frames/s, the KV on the GPU, the archive in host memory and on disk, GPU peak and reserved
memory, TTFT with the retrieval inside it, and decode ms/token. A chart of those against stream time
goes beside the Markdown report.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# questions about different things, so retrieval meets different queries
QUESTIONS = (
    "What is happening in the video?", "What colour was the background at the start?", "Did anything flash?",
    "What moved from left to right?", "How many shapes are there?", "What changed in the last minute?",
    "Was there a red circle?", "Describe the first seconds.", "What is in the top left corner?",
    "Which object appeared most recently?",
)


@dataclass
class LongSettings:
    minutes: float = 10.0
    width: int = 448
    height: int = 448
    fps: float = 2.0
    chunk_frames: int = 4
    max_new_tokens: int = 16
    questions_per_minute: int = 1
    final_questions: int = 20  # percentiles at the full stream come from at least this many

    @property
    def frames(self) -> int:
        return int(round(self.minutes * 60 * self.fps)) // 2 * 2


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 3)


def run_long(loaded, s: LongSettings, memory, on_chunk: Callable[[int], None] | None = None) -> dict:
    """The long stream under `memory` (a MemoryConfig); every figure in one JSON-able dict."""
    import torch

    from .bench import SyntheticVideo, _decode_ms, _free, chunk_plan, prefetch
    from .config import SessionConfig
    from .engine import StreamEngine
    from .metrics import gpu_memory, now, reset_peak, sync

    dev = loaded.device
    config = SessionConfig(model=loaded.model_id, chunk_frames=s.chunk_frames, max_new_tokens=s.max_new_tokens, memory=memory).validate()
    video, plan = SyntheticVideo(s.width, s.height, s.frames), chunk_plan(s.frames, s.chunk_frames)
    with tempfile.TemporaryDirectory(prefix="streamchat-bench-archive-") as spill:
        engine = StreamEngine(loaded, config, s.fps, spill_dir=Path(spill))
        if dev.type == "cuda":
            engine.warmup(video.chunk(*plan[0])[0])
            _free(dev)
        weights = gpu_memory(loaded.devices)["allocated_bytes"]
        t0 = now()
        budget = engine.plan(s.frames, s.height, s.width)
        plan_s = now() - t0
        frames_per_minute = int(round(60 * s.fps))
        rows, minute = [], None
        qi = 0

        def ask(n: int) -> list:
            nonlocal qi
            out = []
            for _ in range(n):
                ans = engine.ask(QUESTIONS[qi % len(QUESTIONS)], max_new_tokens=s.max_new_tokens)
                qi += 1
                out.append(ans)
            return out

        def close_minute(m: dict, answers: list) -> None:
            a = engine.book.archive
            mem = gpu_memory(loaded.devices)
            m.update(
                frames_per_s=round(m["frames"] / m["encode_s"], 2) if m["encode_s"] else None,
                cache_tokens=engine.cache_tokens,
                gpu_kv_bytes=engine.cache.nbytes,
                gpu_kv_capacity_bytes=engine.cache.capacity * engine.bytes_per_token,
                host_bytes=a.host_bytes,
                disk_bytes=a.disk_bytes,
                archived_pages=len(a),
                gpu_peak_bytes=mem["peak_bytes"] if dev.type == "cuda" else None,
                gpu_reserved_bytes=torch.cuda.memory_reserved(dev) if dev.type == "cuda" else None,
                ttft_ms=_pct([x.ttft_s * 1000 for x in answers], 0.5),
                retrieval_ms=_pct([x.retrieval_s * 1000 for x in answers], 0.5),
                decode_ms_per_token=_pct([d for d in (_decode_ms(x) for x in answers) if d is not None], 0.5),
                encode_s=round(m["encode_s"], 3),
            )
            rows.append(m)

        frames_iter = prefetch(video, plan, engine.preprocess)
        reset_peak(loaded.devices)
        try:
            for first, n, frames, padded, prepared in frames_iter:
                this = first // frames_per_minute + 1
                if minute is not None and this != minute["minute"]:
                    close_minute(minute, ask(s.questions_per_minute))
                    reset_peak(loaded.devices)
                if minute is None or this != minute["minute"]:
                    minute = {"minute": this, "frames": 0, "encode_s": 0.0, "evicted_pages": 0}
                st = engine.encode(frames, first, padded, (first / s.fps, (first + n - 1) / s.fps), prepared=prepared)
                minute["frames"] += n
                minute["encode_s"] += st.encode_s
                minute["evicted_pages"] += st.evicted_pages
                if on_chunk is not None:
                    on_chunk(first + n)
        finally:
            frames_iter.close()
        final = ask(s.final_questions)
        close_minute(minute, final)
        sync(loaded.devices)
        ttft = [x.ttft_s * 1000 for x in final]
        report = {
            "model": loaded.model_id, "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "dtype": str(loaded.dtype).replace("torch.", ""), "settings": s.__dict__ | {"frames": s.frames},
            "memory": budget.to_json(), "bytes_per_token": engine.bytes_per_token, "weights_bytes": weights if dev.type == "cuda" else None,
            "plan_s": round(plan_s, 3), "minutes": rows,
            "final": {
                "questions": len(final), "ttft_p50_ms": _pct(ttft, 0.5), "ttft_p95_ms": _pct(ttft, 0.95), "ttft_max_ms": _pct(ttft, 1.0),
                "retrieval_p50_ms": _pct([x.retrieval_s * 1000 for x in final], 0.5),
                "retrieval_p95_ms": _pct([x.retrieval_s * 1000 for x in final], 0.95),
                "decode_ms_per_token": _pct([d for d in (_decode_ms(x) for x in final) if d is not None], 0.5),
                "retrieved_spans_p50": statistics.median(len(x.retrieved) for x in final) if final else None,
            },
            "spill_error": engine.book.archive.spill_error,
        }
        engine = None  # the cache, its graphs and the archive go before the spill folder does
        _free(dev)
    return report


def _gib(x) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f}"


def _f(x, fmt=".1f") -> str:
    return "n/a" if x is None else format(x, fmt)


def text_table(r: dict) -> str:
    s, b = r["settings"], r["memory"]
    head = (f"{r['model']} on {r['gpu'] or r['device']} ({r['dtype']}): {s['minutes']:g} min at {s['width']}x{s['height']}, "
            f"{s['fps']:g} fps, {s['chunk_frames']}-frame chunks; memory {b['mode']}: GPU KV budget {b['gpu_tokens']:,} tokens "
            f"({b['gpu_tokens'] * r['bytes_per_token'] / 2**30:.2f} GiB), working set {b['working_tokens']:,}, "
            f"retrieval {b['retrieve_tokens']:,} tokens a question, host budget {b['host_bytes'] / 2**30:.1f} GiB")
    cols = ["min", "frames/s", "cache tok", "GPU KV GiB", "host GiB", "disk GiB", "peak GiB", "reserved GiB", "TTFT ms",
            "retrieval ms", "decode ms/tok"]
    lines = [head, "", " | ".join(cols), " | ".join("-" * len(c) for c in cols)]
    for m in r["minutes"]:
        lines.append(" | ".join([
            str(m["minute"]), _f(m["frames_per_s"]), f"{m['cache_tokens']:,}", _gib(m["gpu_kv_bytes"]), _gib(m["host_bytes"]),
            _gib(m["disk_bytes"]), _gib(m["gpu_peak_bytes"]), _gib(m["gpu_reserved_bytes"]), _f(m["ttft_ms"]),
            _f(m["retrieval_ms"]), _f(m["decode_ms_per_token"], ".2f"),
        ]))
    f = r["final"]
    lines += ["", f"at the end, {f['questions']} questions: TTFT p50 {_f(f['ttft_p50_ms'])} ms, p95 {_f(f['ttft_p95_ms'])} ms "
              f"(retrieval p50 {_f(f['retrieval_p50_ms'])}, p95 {_f(f['retrieval_p95_ms'])} ms, inside TTFT), "
              f"decode {_f(f['decode_ms_per_token'], '.2f')} ms/token; weights {_gib(r['weights_bytes'])} GiB"]
    if r.get("spill_error"):
        lines.append(f"spill: {r['spill_error']}")
    return "\n".join(lines)


def write_report(r: dict, path: Path) -> list[Path]:
    """Markdown at `path` with the table, and the chart against stream time beside it."""
    from .plots import long_stream_plot

    png = long_stream_plot(r["minutes"], path.with_name(path.stem + "-minutes.png"))
    path.write_text(f"# streamchat bench --minutes {r['settings']['minutes']:g}\n\n```text\n{text_table(r)}\n```\n\n"
                    f"![encode rate, memory and TTFT against stream time]({png.name})\n")
    return [path, png]
