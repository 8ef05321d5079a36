"""`streamchat bench`: the plain whole-video path and the streaming path, side by side, on the same synthetic frames.

One process, one model, in this order: measure a matrix-product rate and a copy rate (the floors'
denominators); warm the encode path (optional); stream every chunk, with the next chunk's frames made
in a thread meanwhile, asking at the chosen frame counts; then the whole-video prefill + greedy on
exactly the prompt of the last streaming question; then agreement and floors. Offline runs second,
so its decode meets KV lengths that the last streaming question already built cuDNN graphs for: that
bias favours offline.

Floors are paper counts (`Costs`), each max(FLOPs / matmul rate, bytes / copy rate):
  LLM, n new tokens over c cached:  2·P·n + 4·L·H·d·(n·c + n²/2)   P: linear weights of the decoder; causal
  lm_head, one row:                 2·V·D
  vision, per 2-frame temporal patch of N patches:  N·(2·P_vis + 4·D_vis·((depth − F)·min(W, N) + F·N))
                                    F full-attention blocks see the pair's N patches, the rest windows of W
  bytes read per LLM pass:          (P + V·D)·e + kv·c             weights once, then the KV cache
The copy rate counts bytes read plus bytes written, so a pass that only reads X bytes takes X / rate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import queue
import statistics
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

QUESTION = "What is happening in the video?"
WARMUP_WARMS = ("the engine's own warm-up (StreamEngine.warmup: one frame pair and a 3-token question on a throwaway "
                "cache), as the CLI and the app run it at load on a GPU")
_asked_in_process = False  # the first question of a process pays one-time costs; the table flags it


@dataclass
class BenchSettings:
    width: int = 1288  # 720p resized to multiples of 28 (patch 14 x merge 2)
    height: int = 728
    frames: int = 192
    chunk_frames: int = 4
    fps: float = 2.0  # what Qwen2.5-VL saw in training; sets temporal positions only
    questions_at: list[int] = field(default_factory=list)  # frame counts; empty: first chunk, 1/4, 1/2, all
    max_new_tokens: int = 32
    offline: bool = True
    warmup: bool = True
    repeat_questions: bool = True  # a second ask at the same length shows what per-shape setup cost the first

    def validate(self) -> BenchSettings:
        from .errors import UserError

        if self.width < 28 or self.height < 28 or self.width % 28 or self.height % 28:
            raise UserError(f"--width and --height must be multiples of 28 (patch 14 x merge 2); got {self.width}x{self.height}")
        if self.frames < 2:
            raise UserError(f"--frames must be at least 2; got {self.frames}")
        if self.fps <= 0:
            raise UserError(f"--fps must be positive; got {self.fps}")
        if self.chunk_frames < 2 or self.chunk_frames % 2:
            raise UserError(f"--chunk-frames must be even and at least 2 (Qwen2.5-VL packs frames in pairs); got {self.chunk_frames}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1; got {self.max_new_tokens}")
        bad = [a for a in self.questions_at if not 1 <= a <= self.frames]
        if bad:
            raise UserError(f"--questions-at {bad} is outside 1..{self.frames} frames")
        at = self.questions_at or [min(self.chunk_frames, self.frames), max(1, self.frames // 4), max(1, self.frames // 2)]
        self.questions_at = sorted(set(at) | {self.frames})  # the whole video is always asked, to compare with offline
        return self


class SyntheticVideo:
    """Deterministic uint8 frames [H, W, 3]: fixed noise (numpy seed 0) under gradients that move with the frame index."""

    def __init__(self, width: int, height: int, frames: int, seed: int = 0):
        import numpy as np

        self.frames = frames
        self.noise = np.random.default_rng(seed).integers(0, 64, (height, width, 3), dtype=np.uint8)
        self.x = np.arange(width, dtype=np.int32)[None, :]  # [1, W]
        self.y = np.arange(height, dtype=np.int32)[:, None]  # [H, 1]

    def frame(self, i: int):
        import numpy as np

        r, g, b = np.broadcast_arrays((self.x + 8 * i) % 192, (self.y + 4 * i) % 192, (self.x + self.y + 16 * i) % 192)
        return (np.stack([r, g, b], axis=-1) + self.noise).astype(np.uint8)  # values stay below 256

    def read(self, positions) -> "np.ndarray":  # noqa: F821 - numpy is imported lazily
        """Frames at these positions, [N, H, W, 3] (what the offline runner's `read_frames` takes)."""
        import numpy as np

        return np.stack([self.frame(p) for p in positions])

    def chunk(self, first: int, n: int):
        """(frames, padded): an odd count repeats its last frame, as the HF video processor does."""
        positions = list(range(first, first + n))
        return self.read(positions + positions[-1:] * (n % 2)), n % 2 == 1


def chunk_plan(frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """(first frame, real frames) of every chunk."""
    return [(first, min(chunk_frames, frames - first)) for first in range(0, frames, chunk_frames)]


def prefetch(video: SyntheticVideo, plan: list[tuple[int, int]], prep: Callable, depth: int = 2) -> Iterator[tuple]:
    """Chunks made and preprocessed (`prep`: the engine's patchify) in a thread, `depth` ahead, so host
    work overlaps the GPU work of the chunk before, as the stream does for real videos."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for first, n in plan:
                frames, padded = video.chunk(first, n)
                item = (first, n, frames, padded, prep(frames))
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            ready.put(exc)

    threading.Thread(target=work, name="streamchat-bench-frames", daemon=True).start()
    try:
        for _ in plan:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _median_s(fn: Callable[[], object], device, warmup: int, reps: int) -> float:
    """Median seconds of fn(): CUDA events on the GPU, the host clock on the CPU."""
    import torch

    from .metrics import now, sync

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = now()
            fn()
            times.append(now() - t0)
    return statistics.median(times)


def measure_rates(device, dtype) -> dict:
    """Matrix-product FLOP/s in the run's dtype and copy bytes/s (read + write), measured now on this device."""
    import torch

    cuda = device.type == "cuda"
    n = 8192 if cuda else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    mm_s = _median_s(lambda: a @ b, device, warmup=3, reps=10 if cuda else 5)
    nbytes = (1 << 30) if cuda else (64 << 20)  # far beyond L2 (50 MB on an H100)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = _median_s(lambda: dst.copy_(src), device, warmup=2, reps=10 if cuda else 5)
    del a, b, src, dst
    _free(device)
    return {"matmul_n": n, "matmul_flop_per_s": 2 * n**3 / mm_s, "copy_bytes": nbytes, "copy_bytes_per_s": 2 * nbytes / copy_s}


@dataclass
class Costs:
    """Paper FLOP and byte counts of the model (formulas in the module docstring)."""

    llm_linear_params: int
    vision_params: int
    vocab: int
    hidden: int
    layers: int
    heads: int
    head_dim: int
    kv_bytes_per_token: int
    vision_hidden: int
    vision_depth: int
    vision_full_blocks: int
    window_patches: int
    patch: int
    elt: int

    @classmethod
    def of(cls, model, dtype) -> Costs:
        import torch

        from . import hf

        tc, vc = hf.text_config(model), hf.vision_config(model)
        linear = sum(m.weight.numel() for m in hf.language_model(model).modules() if isinstance(m, torch.nn.Linear))
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        elt = torch.empty((), dtype=dtype).element_size()
        return cls(
            llm_linear_params=linear,
            vision_params=sum(p.numel() for p in hf.vision_tower(model).parameters()),
            vocab=tc.vocab_size,
            hidden=tc.hidden_size,
            layers=tc.num_hidden_layers,
            heads=tc.num_attention_heads,
            head_dim=head_dim,
            kv_bytes_per_token=2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * elt,
            vision_hidden=vc.hidden_size,
            vision_depth=vc.depth,
            vision_full_blocks=sum(1 for i in getattr(vc, "fullatt_block_indexes", []) if i < vc.depth),
            window_patches=(vc.window_size // vc.patch_size) ** 2,
            patch=vc.patch_size,
            elt=elt,
        )

    def llm_flops(self, new: int, context: int) -> float:
        return 2 * self.llm_linear_params * new + 4 * self.layers * self.heads * self.head_dim * (new * context + new * new / 2)

    def vision_flops(self, frames: int, height: int, width: int) -> float:
        n = (height // self.patch) * (width // self.patch)  # patches per 2-frame temporal patch
        attended = (self.vision_depth - self.vision_full_blocks) * min(self.window_patches, n) + self.vision_full_blocks * n
        return math.ceil(frames / 2) * n * (2 * self.vision_params + 4 * self.vision_hidden * attended)

    def pass_bytes(self, context: int) -> float:
        return (self.llm_linear_params + self.vocab * self.hidden) * self.elt + self.kv_bytes_per_token * context

    def floor_s(self, flops: float, nbytes: float, rates: dict) -> float:
        return max(flops / rates["matmul_flop_per_s"], nbytes / rates["copy_bytes_per_s"])


class BusySampler:
    """GPU busy % from NVML (share of the driver's sample period, about 1/6 s, in which a kernel ran),
    polled while `active`. Unlike host timers it sees the gaps inside a chunk: the preprocessing the
    engine does before its first launch and launch-bound stretches of the vision tower."""

    def __init__(self, device, period_s: float = 0.05):
        import torch

        self.device, self.period_s, self.active, self.samples = device, period_s, False, []
        self.source = "nvml"
        if device.type != "cuda":
            self.source = "none: not a CUDA device"
        else:
            try:
                torch.cuda.utilization(device)
            except Exception as exc:  # noqa: BLE001 - pynvml missing or NVML not answering
                self.source = f"none: NVML unavailable ({type(exc).__name__})"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamchat-bench-busy", daemon=True)
        if self.source == "nvml":
            self._thread.start()

    def _run(self) -> None:
        import torch

        while not self._stop.wait(self.period_s):
            if self.active:
                self.samples.append(torch.cuda.utilization(self.device))

    def close(self) -> float | None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return round(statistics.mean(self.samples), 1) if self.samples else None


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _mem(device, value: int) -> int | None:
    return value if device.type == "cuda" else None  # torch reports no allocator figures on the CPU


def per_device_memory(samples: list[dict]) -> dict | None:
    """{"cuda:N": {weights_bytes, steady_bytes, peak_bytes}} from metrics.gpu_memory figures taken at
    load (first), after each chunk and after each question; None unless several GPUs are involved."""
    per = [m.get("devices") for m in samples]
    if not per or per[0] is None:
        return None
    out = {}
    for d in per[0]:
        seen = [p[d] for p in per if p is not None and d in p]
        out[d] = {"weights_bytes": per[0][d]["allocated_bytes"], "steady_bytes": seen[-1]["allocated_bytes"],
                  "peak_bytes": max(m["peak_bytes"] for m in seen)}
    return out


def _decode_ms(answer) -> float | None:
    n = answer.new_tokens
    return round((answer.latency_s - answer.ttft_s) / (n - 1) * 1000, 3) if n > 1 else None


def _ask(engine, s: BenchSettings, costs: Costs, rates: dict):
    """One question (twice with repeat_questions) on top of the cache; history=drop rolls each back."""
    global _asked_in_process
    first = not _asked_in_process
    answer = engine.ask(QUESTION, max_new_tokens=s.max_new_tokens)
    _asked_in_process = True
    q, c = len(answer.prompt[-1].ids), answer.cache_tokens
    row = {
        "frames": answer.frames_seen,
        "cache_tokens": c,
        "question_tokens": q,
        "first_of_process": first,
        "ttft_ms": round(answer.ttft_s * 1000, 3),
        "decode_ms_per_token": _decode_ms(answer),
        "new_tokens": answer.new_tokens,
        "peak_bytes": _mem(engine.loaded.device, answer.peak_bytes),
        "floor_ttft_ms": round(costs.floor_s(costs.llm_flops(q, c) + 2 * costs.vocab * costs.hidden, costs.pass_bytes(c + q), rates) * 1000, 3),
        "floor_decode_ms_per_token": round(costs.floor_s(costs.llm_flops(1, c + q), costs.pass_bytes(c + q), rates) * 1000, 3),
    }
    if s.repeat_questions:
        again = engine.ask(QUESTION, max_new_tokens=s.max_new_tokens)
        row.update(ttft_ms_again=round(again.ttft_s * 1000, 3), decode_ms_per_token_again=_decode_ms(again),
                   again_identical=again.token_ids == answer.token_ids)
    return row, answer


def run_bench(loaded, s: BenchSettings, on_chunk: Callable[[int], None] | None = None, memory=None) -> dict:
    """Streaming, then offline, on the same synthetic frames; every figure in one JSON-able dict."""
    import torch

    from . import hf
    from .compare import match
    from .config import SessionConfig
    from .engine import StreamEngine
    from .metrics import gpu_memory, now, reset_peak
    from .offline import answer_offline

    s.validate()
    dev, cuda = loaded.device, loaded.device.type == "cuda"
    # The engine turns cuDNN SDPA off for the whole process (hf.use_stream_attention); the plain path
    # runs with what torch had before that, since that is what users of plain transformers get.
    cudnn_default = torch.backends.cuda.cudnn_sdp_enabled()
    from .memory import MemoryConfig

    config = SessionConfig(model=loaded.model_id, chunk_frames=s.chunk_frames, max_new_tokens=s.max_new_tokens,
                           memory=memory or MemoryConfig()).validate()
    video, plan = SyntheticVideo(s.width, s.height, s.frames), chunk_plan(s.frames, s.chunk_frames)
    rates, costs = measure_rates(dev, loaded.dtype), Costs.of(loaded.model, loaded.dtype)
    first_frames = video.chunk(*plan[0])[0]

    warmup_s = None
    if s.warmup:
        t0 = now()
        StreamEngine(loaded, config, s.fps).warmup(first_frames)
        warmup_s = now() - t0
        _free(dev)
    prep_s = _median_s(lambda: hf.video_pixels(loaded.processor, first_frames), torch.device("cpu"), warmup=1, reps=3)

    # --- streaming ---
    engine = StreamEngine(loaded, config, s.fps)
    vocab = engine.vocab
    ask_after = {math.ceil(a / s.chunk_frames) - 1 for a in s.questions_at}
    weights_mem = gpu_memory(loaded.devices)
    weights_bytes = weights_mem["allocated_bytes"]
    reset_peak(loaded.devices)
    t0 = now()
    budget = engine.plan(s.frames, s.height, s.width)  # as Stream does at load: the cache sized, graphs captured
    plan_cache_s = now() - t0
    sampler = BusySampler(dev)
    chunks, questions, answers = [], [], []
    wall = wait = 0.0
    encode_peak, steady = 0, 0
    mem_samples = [weights_mem]  # for the per-device figures with several GPUs
    frames_iter = prefetch(video, plan, engine.preprocess)
    try:
        for i in range(len(plan)):
            sampler.active = True
            t0 = now()
            first, n, frames, padded, prepared = next(frames_iter)
            got = now()
            before = engine.cache_tokens
            st = engine.encode(frames, first, padded, (first / s.fps, (first + n - 1) / s.fps), prepared=prepared)
            wall += now() - t0
            wait += got - t0
            sampler.active = False
            encode_peak = max(encode_peak, st.memory["peak_bytes"])
            steady = st.memory["allocated_bytes"]  # weights + cache, between chunks
            mem_samples.append(st.memory)
            chunks.append({
                "chunk": i, "frames": first + n, "encoded_frames": len(frames), "cache_before": before,
                "cache_after": st.cache_tokens, "vision_ms": round(st.vision_s * 1000, 3),
                "append_ms": round((st.encode_s - st.vision_s) * 1000, 3), "encode_ms": round(st.encode_s * 1000, 3),
                "wait_ms": round((got - t0) * 1000, 3), "frames_per_s": round(n / st.encode_s, 3),
                "cache_bytes": st.cache_bytes,
                "floor_ms": round(costs.floor_s(
                    costs.vision_flops(len(frames), s.height, s.width) + costs.llm_flops(st.cache_tokens - before, before),
                    costs.pass_bytes(st.cache_tokens) + costs.vision_params * costs.elt, rates) * 1000, 3),
            })
            if on_chunk is not None:
                on_chunk(first + n)
            if i in ask_after:
                row, answer = _ask(engine, s, costs, rates)
                questions.append(row)
                answers.append(answer)
                mem_samples.append(gpu_memory(loaded.devices))  # the question's peak
                reset_peak(loaded.devices)  # chunk peaks stay encode-only
    finally:
        busy = sampler.close()
        frames_iter.close()
    encode_s = sum(c["encode_ms"] for c in chunks) / 1000
    vision_s = sum(c["vision_ms"] for c in chunks) / 1000
    cache_tokens, cache_bytes = chunks[-1]["cache_after"], chunks[-1]["cache_bytes"]
    del engine
    _free(dev)

    # --- offline: exactly the prompt the last streaming question saw ---
    last, offline, o_ans = answers[-1], None, None
    if s.offline:
        from .engine import VideoSeg

        videos = [video.read(seg.frames) for seg in last.prompt if isinstance(seg, VideoSeg)]
        t0 = now()
        for frames in videos:
            hf.video_pixels(loaded.processor, frames)  # the host patchify answer_offline does inside its prefill
        offline_prep_s = now() - t0
        del videos
        cudnn_streaming = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(cudnn_default)
        try:
            o_ans = answer_offline(loaded, last.prompt, video.read, s.fps, QUESTION, s.max_new_tokens, vocab)
            offline = {
                "ok": True, "error": None, "prompt_tokens": o_ans.cache_tokens, "prefill_s": round(o_ans.prefill_s, 6),
                "ttft_s": round(o_ans.ttft_s, 6), "decode_ms_per_token": _decode_ms(o_ans), "new_tokens": o_ans.new_tokens,
                "peak_bytes": _mem(dev, o_ans.peak_bytes),
                "preprocess_s": round(offline_prep_s, 6), "cudnn_sdp": bool(cuda and cudnn_default),
            }
        except torch.OutOfMemoryError as exc:
            o_ans = None
            _free(dev)
            offline = {"ok": False, "error": "out of memory: " + str(exc).strip().splitlines()[0], "cudnn_sdp": bool(cuda and cudnn_default)}
        finally:
            torch.backends.cuda.enable_cudnn_sdp(cudnn_streaming)
    agreement = None
    if o_ans is not None:
        agreement = {**match(last, o_ans), "frames": last.frames_seen, "tokens": min(len(last.token_ids), len(o_ans.token_ids))}

    whole = last.cache_tokens + questions[-1]["question_tokens"]
    prefill_floor = costs.floor_s(costs.vision_flops(sum(c["encoded_frames"] for c in chunks), s.height, s.width)
                                  + costs.llm_flops(whole, 0) + 2 * costs.vocab * costs.hidden, costs.pass_bytes(whole), rates)
    encode_floor = sum(c["floor_ms"] for c in chunks) / 1000
    prefill = offline["prefill_s"] if offline and offline["ok"] else None
    return {
        "config": {
            "model": loaded.model_id, "device": str(dev), "devices": [str(d) for d in loaded.devices],
            "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
            "dtype": str(loaded.dtype).replace("torch.", ""), **asdict(s), "question": QUESTION, "history": config.history,
            "torch": torch.__version__, "transformers": hf.transformers_version(),
            "cudnn_sdp_streaming": bool(cuda and torch.backends.cuda.cudnn_sdp_enabled()),
            "memory": budget.to_json(),
        },
        "warmup": {"ran": s.warmup, "s": None if warmup_s is None else round(warmup_s, 6), "warms": WARMUP_WARMS if s.warmup else None,
                   "plan_cache_s": round(plan_cache_s, 6)},
        "rates": rates,
        "costs": asdict(costs),
        "streaming": {
            "chunks": chunks, "n_chunks": len(chunks), "frames": s.frames,
            "encode_s": round(encode_s, 6), "vision_s": round(vision_s, 6), "append_s": round(encode_s - vision_s, 6),
            "wall_s": round(wall, 6), "frame_wait_s": round(wait, 6),
            "frames_per_s": round(s.frames / encode_s, 3), "wall_frames_per_s": round(s.frames / wall, 3),
            "streaming_tax": round(encode_s / prefill, 3) if prefill else None,
            "gpu_busy_pct": busy, "gpu_busy_source": sampler.source,
            "preprocess_ms_per_chunk": round(prep_s * 1000, 3), "preprocess_pct_of_wall": round(100 * prep_s * len(plan) / wall, 2),
            "weights_bytes": _mem(dev, weights_bytes), "encode_peak_bytes": _mem(dev, encode_peak),
            "peak_bytes": _mem(dev, max([encode_peak] + [q["peak_bytes"] or 0 for q in questions])),
            "steady_bytes": _mem(dev, steady), "cache_tokens": cache_tokens, "cache_bytes": cache_bytes,
            "cache_bytes_per_token": round(cache_bytes / cache_tokens, 1),
            "devices": per_device_memory(mem_samples),
        },
        "questions": questions,
        "offline": offline,
        "agreement": agreement,
        "floors": {
            "encode_s": round(encode_floor, 6), "encode_frames_per_s": round(s.frames / encode_floor, 3),
            "offline_prefill_s": round(prefill_floor, 6),
            "ttft_ms": questions[-1]["floor_ttft_ms"], "decode_ms_per_token": questions[-1]["floor_decode_ms_per_token"],
        },
    }


# --- the table and the report ----------------------------------------------------------------------


def _f(x, fmt: str = ".1f", unit: str = "") -> str:
    return "—" if x is None else f"{x:{fmt}}{unit}"


def _gib(x) -> str:
    return _f(None if x is None else x / 2**30, ".2f", " GiB")


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]


def text_table(r: dict) -> str:
    c, st, of, ag, fl, ra = r["config"], r["streaming"], r["offline"], r["agreement"], r["floors"], r["rates"]
    out = [
        f"streamchat bench — {c['model']} on {c['device']} ({c['device_name']}), {c['dtype']}"
        + (f"; layers spread over {', '.join(c['devices'])}" if len(c.get("devices") or []) > 1 else ""),
        f"  {c['frames']} synthetic frames of {c['width']}x{c['height']}, chunks of {c['chunk_frames']}, positions at "
        f"{c['fps']:g} fps, {c['max_new_tokens']} new tokens; cuDNN SDPA {'on' if c['cudnn_sdp_streaming'] else 'off'} for streaming"
        + (f", {'on' if of['cudnn_sdp'] else 'off'} for offline (torch's setting before the engine ran)" if of else ""),
        f"  warmup: {r['warmup']['warms'] + ' (' + _f(r['warmup']['s'], '.2f', ' s') + ')' if r['warmup']['ran'] else 'off'}",
        f"  memory: {c['memory']['mode']}" + (f" (working set {c['memory']['working_tokens']:,} tokens: streaming is not the whole-video "
        f"computation, so the agreement below measures the policy; --memory exact for the exact engine)" if c['memory']['mode'] == 'bounded' else ""),
        f"  cache sized for the whole video and question graphs captured before the first chunk "
        f"(StreamEngine.plan_cache, as at load): {_f(r['warmup'].get('plan_cache_s'), '.2f', ' s')}",
        "",
        "Offline (whole video: one prefill, then greedy)",
    ]
    if of is None:
        out.append("  not run (--no-offline)")
    elif not of["ok"]:
        out.append(f"  failed: {of['error']}")
    else:
        out.append(f"  {of['prompt_tokens']} tokens: prefill {of['prefill_s']:.3f} s (host preprocessing {of['preprocess_s']:.2f} s of it), "
                   f"TTFT {of['ttft_s']:.3f} s, decode {_f(of['decode_ms_per_token'], '.1f', ' ms/token')}, peak {_gib(of['peak_bytes'])}")
    step = max(1, len(st["chunks"]) // 12)
    shown = [ch for ch in st["chunks"] if ch["chunk"] % step == 0 or ch["chunk"] == st["n_chunks"] - 1]
    out += ["", "Streaming, per chunk" + (f" (every {step}th and the last)" if step > 1 else "")]
    out += _grid(["chunk", "frames", "cache before", "vision ms", "append ms", "total ms", "frames/s", "floor ms"],
                 [[str(ch["chunk"]), str(ch["frames"]), str(ch["cache_before"]), _f(ch["vision_ms"]), _f(ch["append_ms"]),
                   _f(ch["encode_ms"]), _f(ch["frames_per_s"], ".2f"), _f(ch["floor_ms"], ".2f")] for ch in shown])
    busy = _f(st["gpu_busy_pct"], ".0f", "% of encode wall") + f" ({st['gpu_busy_source']})"
    out += [
        "",
        "Streaming totals",
        f"  encode {st['encode_s']:.3f} s (vision + preprocessing {st['vision_s']:.3f}, LLM append {st['append_s']:.3f}) = "
        f"{st['frames_per_s']:.2f} frames/s; wall {st['wall_s']:.3f} s, {st['frame_wait_s'] * 1000:.1f} ms of it waiting for frames",
        f"  streaming tax {_f(st['streaming_tax'], '.2f', 'x')} (streaming encode / whole-video prefill)",
        f"  GPU busy {busy}; host preprocessing {st['preprocess_ms_per_chunk']:.1f} ms/chunk "
        f"({st['preprocess_pct_of_wall']:.1f}% of wall) runs ahead in the frame thread, off the GPU's path",
        f"  memory: weights {_gib(st['weights_bytes'])}, peak {_gib(st['peak_bytes'])} (encode {_gib(st['encode_peak_bytes'])}), "
        f"steady {_gib(st['steady_bytes'])}; cache {_gib(st['cache_bytes'])} = {st['cache_tokens']} tokens x {st['cache_bytes_per_token']:.0f} B",
        *[f"    {d}: weights {_gib(m['weights_bytes'])}, steady {_gib(m['steady_bytes'])}, peak {_gib(m['peak_bytes'])}"
          for d, m in (st.get("devices") or {}).items()],
        "",
        "Questions (each rolled back; 'again' = the same question at the same length straight after)",
    ]
    out += _grid(["frames", "cache tokens", "TTFT ms", "again", "floor", "decode ms/tok", "again", "floor"],
                 [[str(q["frames"]) + (" *" if q["first_of_process"] else ""), str(q["cache_tokens"]), _f(q["ttft_ms"]),
                   _f(q.get("ttft_ms_again")), _f(q["floor_ttft_ms"], ".2f"), _f(q["decode_ms_per_token"], ".2f"),
                   _f(q.get("decode_ms_per_token_again"), ".2f"), _f(q["floor_decode_ms_per_token"], ".2f")] for q in r["questions"]])
    if any(q["first_of_process"] for q in r["questions"]):
        out.append("  * the process's first question")
    out += ["", "Agreement (last streaming question vs offline, same prompt and frames)"]
    if ag is None:
        out.append("  — (no offline answer)")
    else:
        out.append(f"  tokens identical: {'yes' if ag['identical'] else 'no'}, first divergence {_f(ag['first_divergence'], 'd')}, "
                   f"max first-step logit diff {_f(ag['max_logit_diff'], '.3g')}")
        if ag.get("margin_at_divergence") is not None:
            out.append(f"  where they part, offline's top two logits were {ag['margin_at_divergence']:.3g} apart "
                       "(a gap under the logit differences above is a rounding call, not a different computation)")
    out += [
        "",
        f"Floors (measured now: {ra['matmul_n']}³ matmul {ra['matmul_flop_per_s'] / 1e12:.1f} TFLOP/s, "
        f"copy {ra['copy_bytes_per_s'] / 1e9:.0f} GB/s read+write)",
    ]
    last = r["questions"][-1]
    out += _grid(["", "measured", "floor"], [
        ["streaming encode frames/s", _f(st["frames_per_s"], ".2f"), _f(fl["encode_frames_per_s"], ".2f")],
        ["offline prefill s", _f(of["prefill_s"] if of and of["ok"] else None, ".3f"), _f(fl["offline_prefill_s"], ".3f")],
        [f"TTFT ms at {last['cache_tokens']} tokens", _f(last["ttft_ms"]), _f(fl["ttft_ms"], ".2f")],
        ["decode ms/token there", _f(last["decode_ms_per_token"], ".2f"), _f(fl["decode_ms_per_token"], ".2f")],
    ])
    return "\n".join(out)


def write_report(r: dict, path: Path) -> list[Path]:
    """Markdown at `path` with the table, and two PNG charts beside it."""
    from .plots import encode_plot, ttft_plot

    encode_png = encode_plot([(c["cache_after"], c["encode_ms"]) for c in r["streaming"]["chunks"]], path.with_name(path.stem + "-encode.png"))
    ttft_png = ttft_plot([(q["cache_tokens"], q["ttft_ms"]) for q in r["questions"]], path.with_name(path.stem + "-ttft.png"))
    path.write_text(
        f"# streamchat bench\n\n```text\n{text_table(r)}\n```\n\n"
        f"![encode time per chunk against cache length]({encode_png.name})\n\n![TTFT against cache size]({ttft_png.name})\n"
    )
    return [path, encode_png, ttft_png]


# --- command line ---------------------------------------------------------------------------------


def _frame_counts(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected frame counts separated by commas, like 4,48,96; got {text!r}") from None


def register(sub) -> None:
    from .cli import add_output_options

    d = BenchSettings()
    p = sub.add_parser("bench", help="benchmark streaming against the whole-video path on synthetic frames",
                       description="Run the plain transformers whole-video path and streamchat's streaming path side by side "
                       "on the same synthetic frames; print a table, write JSON, log the run in the store.")
    p.add_argument("--model", default="random:qwen2.5-vl-3b", help="Hugging Face id, local directory, 'tiny-random' or 'random:qwen2.5-vl-3b' (also -7b, -32b, -72b) (default: random:qwen2.5-vl-3b)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto = cuda if present)")
    from .cli import add_device_map_option

    add_device_map_option(p)
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default: auto = bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--width", type=int, default=None, help=f"frame width, a multiple of 28 (default: {d.width}, 720p resized; 448 with --minutes)")
    p.add_argument("--height", type=int, default=None, help=f"frame height, a multiple of 28 (default: {d.height}; 448 with --minutes)")
    p.add_argument("--frames", type=int, default=d.frames, help=f"synthetic frames to stream (default: {d.frames})")
    p.add_argument("--chunk-frames", type=int, default=d.chunk_frames, help=f"frames per chunk, even (default: {d.chunk_frames})")
    p.add_argument("--fps", type=float, default=d.fps, help=f"sampled fps the temporal positions assume (default: {d.fps:g})")
    p.add_argument("--questions-at", type=_frame_counts, default=[], help="frame counts after which to ask, comma-separated; the whole video is always added (default: the first chunk, 1/4, 1/2 and all frames)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"tokens generated per question (default: {d.max_new_tokens})")
    p.add_argument("--offline", dest="offline", action="store_true", default=True, help="also run the whole-video path; out of memory is reported, not fatal (default: on)")
    p.add_argument("--no-offline", dest="offline", action="store_false", help="skip the whole-video path (default: off)")
    p.add_argument("--warmup", dest="warmup", action="store_true", default=True, help=f"before timing, warm {WARMUP_WARMS} (default: on)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="time the first chunk cold (default: off)")
    p.add_argument("--no-repeat-questions", dest="repeat_questions", action="store_false", default=True, help="ask each question once, not twice (default: twice)")
    p.add_argument("--minutes", type=float, default=None, help="stream this many minutes of synthetic frames at --fps under "
                   "the memory policy, with per-minute rows (encode rate, GPU/host/disk KV, TTFT, retrieval, decode) instead of "
                   "the comparison with the whole-video path (default: off); sizes default to 448x448 there")
    p.add_argument("--questions-per-minute", type=int, default=1, help="with --minutes: questions asked at the end of each minute (default: 1)")
    p.add_argument("--final-questions", type=int, default=20, help="with --minutes: questions at the end, for TTFT percentiles (default: 20)")
    from .cli import add_memory_options

    add_memory_options(p)
    p.add_argument("--out", default=None, help="where to write the JSON (default: $STREAMCHAT_HOME/bench-<UTC time>.json)")
    p.add_argument("--report", default=None, help="also write Markdown here, with PNG charts beside it (default: none)")
    add_output_options(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import json

    from .cli import emit, load_model, memory_from, progress_for
    from .metrics import now
    from .store import Store, home

    if args.minutes is not None:
        return _cmd_bench_long(args)

    settings = BenchSettings(
        width=args.width or BenchSettings.width, height=args.height or BenchSettings.height, frames=args.frames, chunk_frames=args.chunk_frames, fps=args.fps,
        questions_at=args.questions_at, max_new_tokens=args.max_new_tokens, offline=args.offline, warmup=args.warmup,
        repeat_questions=args.repeat_questions,
    ).validate()
    t0 = now()
    loaded = load_model(args)
    load_s = now() - t0
    bar = progress_for(args, settings.frames, "streaming")
    report = run_bench(loaded, settings, on_chunk=bar.update, memory=memory_from(args))
    bar.close()
    report["load_s"] = round(load_s, 3)
    out = Path(args.out) if args.out else home() / f"bench-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report["json_path"] = str(out)
    with Store() as store:
        report["run_id"] = store.log_run("bench", report)
    out.write_text(json.dumps(report, indent=2))
    if args.report:
        write_report(report, Path(args.report))
    emit(args, report, text_table(report) + f"\n\nJSON: {out}")
    return 0


def _cmd_bench_long(args) -> int:
    import json

    from . import bench_long
    from .cli import emit, load_model, memory_from, progress_for
    from .errors import UserError
    from .store import Store, home

    width, height = args.width or 448, args.height or 448
    s = bench_long.LongSettings(minutes=args.minutes, width=width, height=height, fps=args.fps, chunk_frames=args.chunk_frames,
                                max_new_tokens=args.max_new_tokens, questions_per_minute=args.questions_per_minute,
                                final_questions=args.final_questions)
    BenchSettings(width=width, height=height, frames=max(s.frames, 2), chunk_frames=s.chunk_frames, fps=s.fps,
                  max_new_tokens=s.max_new_tokens).validate()
    if args.minutes <= 0 or s.frames < s.chunk_frames:
        raise UserError(f"--minutes {args.minutes:g} gives {s.frames} frames at {s.fps:g} fps; stream at least one chunk")
    if s.questions_per_minute < 0 or s.final_questions < 1:
        raise UserError("--questions-per-minute must be 0 or more and --final-questions at least 1")
    memory = memory_from(args)
    loaded = load_model(args)
    bar = progress_for(args, s.frames, "streaming")
    report = bench_long.run_long(loaded, s, memory, on_chunk=bar.update)
    bar.close()
    out = Path(args.out) if args.out else home() / f"bench-long-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report["json_path"] = str(out)
    with Store() as store:
        report["run_id"] = store.log_run("bench-long", report)
    out.write_text(json.dumps(report, indent=2))
    if args.report:
        bench_long.write_report(report, Path(args.report))
    emit(args, report, bench_long.text_table(report) + f"\n\nJSON: {out}")
    return 0
