"""`streamchat bench`: streaming against the whole video, side by side, on the same synthetic frames.

One process, one model, in this order: measure a matrix-product rate and a copy rate (the floors'
denominators); warm the encode path (optional); stream every chunk, with the next chunk's frames made
and preprocessed in a thread meanwhile, asking at the chosen frame counts and then `--questions` times
at the full cache (percentiles); then two whole-video prefills + greedy on exactly the prompt of the
last streaming question: the stock transformers path (`offline.answer_offline`: sdpa, a vision tower
that loops over its windows in Python) and the same prompt on streaming's kernels
(`bench_fair.answer_fair`), each warmed on a short prompt first; then agreement, a real-decoding row
(decord on a generated clip) and floors. Host preprocessing is timed apart on every side, and the
streaming tax (encode / GPU prefill) is given against both whole-video paths. The whole-video paths
run second, so their decode meets KV lengths that the streaming questions already built cuDNN graphs
for: that bias favours them.

The comparison defaults to exact memory with a GPU KV budget of the model's context, so streaming is
the whole-video computation; `--memory bounded` (or auto with a small budget) measures a policy instead.

Floors are paper counts of FLOPs and bytes over measured rates (bench_floors.py).
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

from .bench_floors import Costs, measure_rates

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
    questions: int = 20  # questions at the full cache, for TTFT and decode percentiles
    decode_seconds: float = 10.0  # generated clip for the real-decoding row (0: skip it)

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
        if self.questions < 0:
            raise UserError(f"--questions must be 0 or more; got {self.questions}")
        if not self.decode_seconds >= 0:
            raise UserError(f"--decode-seconds must be 0 (skip) or more; got {self.decode_seconds:g}")
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


def comparison_memory(loaded, gpu_kv_budget: str | None = None):
    """The comparison's memory policy: exact, with a GPU KV budget that holds the whole video (the
    model's context unless given). Bounded memory would make streaming a different computation from
    the whole-video prefill, and the agreement meaningless."""
    from .context import model_context
    from .memory import MemoryConfig

    budget = gpu_kv_budget or str(model_context(loaded))
    return MemoryConfig(mode="exact", gpu_kv_budget=budget).validate()


def _whole_video(fn, warm_prompt, warmup: bool, dev) -> tuple:
    """(answer or None, figures) of one whole-video path; warmed on the first question's short prompt
    first (as streaming is warmed on one frame pair); out of memory is reported, not raised."""
    import torch

    try:
        if warmup:
            fn(warm_prompt, 2)
            _free(dev)
        return fn(None, None)
    except torch.OutOfMemoryError as exc:
        _free(dev)
        return None, {"ok": False, "error": "out of memory: " + str(exc).strip().splitlines()[0]}


def run_bench(loaded, s: BenchSettings, on_chunk: Callable[[int], None] | None = None, memory=None) -> dict:
    """Streaming, then the two whole-video paths, on the same synthetic frames; every figure in one JSON-able dict."""
    import tempfile

    import torch

    from . import hf
    from .bench_fair import answer_fair, decode_rate, device_memory, percentiles
    from .bench_long import QUESTIONS
    from .compare import match
    from .config import SessionConfig
    from .engine import StreamEngine
    from .metrics import gpu_memory, now, reset_peak

    s.validate()
    dev, cuda = loaded.device, loaded.device.type == "cuda"
    # The engine turns cuDNN SDPA off for the whole process (hf.use_stream_attention); the plain path
    # runs with what torch had before that, since that is what users of plain transformers get.
    cudnn_default = torch.backends.cuda.cudnn_sdp_enabled()
    _free(dev)
    at_load = device_memory(dev)  # weights only: what the device holds beyond the allocator is the CUDA context

    config = SessionConfig(model=loaded.model_id, chunk_frames=s.chunk_frames, max_new_tokens=s.max_new_tokens,
                           memory=memory or comparison_memory(loaded)).validate()
    video, plan = SyntheticVideo(s.width, s.height, s.frames), chunk_plan(s.frames, s.chunk_frames)
    rates, costs = measure_rates(dev, loaded.dtype), Costs.of(loaded.model, loaded.dtype)
    first_frames = video.chunk(*plan[0])[0]

    warmup_s = None
    if s.warmup:
        t0 = now()
        StreamEngine(loaded, config, s.fps).warmup(first_frames)
        warmup_s = now() - t0
        _free(dev)

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
    prep_times: list[float] = []

    def timed_prep(frames):  # the engine's host preprocessing, run ahead in the frame thread
        t = now()
        out = engine.preprocess(frames)
        prep_times.append(now() - t)
        return out

    sampler = BusySampler(dev)
    chunks, questions, answers = [], [], []
    wall = wait = 0.0
    encode_peak, steady, reserved_peak = 0, 0, 0
    mem_samples = [weights_mem]  # for the per-device figures with several GPUs
    frames_iter = prefetch(video, plan, timed_prep)
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
            reserved_peak = max(reserved_peak, device_memory(dev)["max_reserved_bytes"] or 0)
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
                reserved_peak = max(reserved_peak, device_memory(dev)["max_reserved_bytes"] or 0)
                reset_peak(loaded.devices)  # chunk peaks stay encode-only
    finally:
        busy = sampler.close()
        frames_iter.close()
    # percentiles at the full cache: questions of different lengths (different question buckets), each rolled back
    ttfts, decodes = [], []
    for k in range(s.questions):
        a = engine.ask(QUESTIONS[k % len(QUESTIONS)], max_new_tokens=s.max_new_tokens)
        ttfts.append(a.ttft_s * 1000)
        if _decode_ms(a) is not None:
            decodes.append(_decode_ms(a))
    reserved_peak = max(reserved_peak, device_memory(dev)["max_reserved_bytes"] or 0)
    streaming_memory = device_memory(dev)
    encode_s = sum(c["encode_ms"] for c in chunks) / 1000
    vision_s = sum(c["vision_ms"] for c in chunks) / 1000
    cache_tokens, cache_bytes = chunks[-1]["cache_after"], chunks[-1]["cache_bytes"]
    del engine
    _free(dev)

    # --- the whole-video paths: exactly the prompt the last streaming question saw ---
    last, warm_prompt = answers[-1], answers[0].prompt
    offline = fair = agreement = agreement_fair = None
    if s.offline:
        from .layout import VideoSeg
        from .offline import answer_offline

        clips = [video.read(seg.frames) for seg in last.prompt if isinstance(seg, VideoSeg)]

        def patchify_s() -> float:  # the host patchify answer_offline does inside its prefill
            t0 = now()
            for frames in clips:
                hf.video_pixels(loaded.processor, frames)
            return now() - t0

        # subtracted from a prefill timed once: the fastest of three where it is short (a busy host
        # made a tiny model's one-off figure exceed its whole prefill), once where it takes seconds
        offline_prep_s = patchify_s()
        if offline_prep_s < 0.3:
            offline_prep_s = min(offline_prep_s, patchify_s(), patchify_s())
        del clips

        def stock(prompt, new):
            reset_peak(dev)
            ans = answer_offline(loaded, prompt or last.prompt, video.read, s.fps, QUESTION, new or s.max_new_tokens, vocab)
            return ans, {
                "ok": True, "error": None, "prompt_tokens": ans.cache_tokens, "prefill_s": round(ans.prefill_s, 6),
                "preprocess_s": round(offline_prep_s, 6), "gpu_prefill_s": round(max(ans.prefill_s - offline_prep_s, 0.0), 6),
                "ttft_s": round(ans.ttft_s, 6), "decode_ms_per_token": _decode_ms(ans), "new_tokens": ans.new_tokens,
                "peak_bytes": _mem(dev, ans.peak_bytes), "max_reserved_bytes": device_memory(dev)["max_reserved_bytes"],
            }

        def fast(prompt, new):
            ans, figures = answer_fair(loaded, prompt or last.prompt, video.read, s.fps, QUESTION, new or s.max_new_tokens, vocab)
            return ans, {"ok": True, "error": None, **figures}

        cudnn_streaming = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(cudnn_default)
        try:
            o_ans, offline = _whole_video(stock, warm_prompt, s.warmup, dev)
        finally:
            torch.backends.cuda.enable_cudnn_sdp(cudnn_streaming)
        offline["cudnn_sdp"] = bool(cuda and cudnn_default)
        _free(dev)
        f_ans, fair = _whole_video(fast, warm_prompt, s.warmup, dev)
        _free(dev)
        if o_ans is not None:
            agreement = {**match(last, o_ans), "frames": last.frames_seen, "tokens": min(len(last.token_ids), len(o_ans.token_ids))}
        if f_ans is not None:
            agreement_fair = {**match(last, f_ans), "frames": last.frames_seen, "tokens": min(len(last.token_ids), len(f_ans.token_ids))}

    decoding = None
    if s.decode_seconds > 0:
        with tempfile.TemporaryDirectory(prefix="streamchat-bench-") as tmp:
            decoding = decode_rate(s.width, s.height, s.fps, s.decode_seconds, s.chunk_frames, Path(tmp))
        decoding["stream_frames_per_s"] = round(s.frames / encode_s, 3)
        decoding["keeps_up_with_stream"] = decoding["sampled_frames_per_s"] >= decoding["stream_frames_per_s"]
        decoding["keeps_up_with_realtime"] = decoding["sampled_frames_per_s"] >= s.fps

    whole = last.cache_tokens + questions[-1]["question_tokens"]
    prefill_floor = costs.floor_s(costs.vision_flops(sum(c["encoded_frames"] for c in chunks), s.height, s.width)
                                  + costs.llm_flops(whole, 0) + 2 * costs.vocab * costs.hidden, costs.pass_bytes(whole), rates)
    encode_floor = sum(c["floor_ms"] for c in chunks) / 1000
    stock_gpu = offline["gpu_prefill_s"] if offline and offline["ok"] else None
    fair_prefill = fair["prefill_s"] if fair and fair["ok"] else None
    prep_s = sum(prep_times)
    return {
        "config": {
            "model": loaded.model_id, "device": str(dev), "devices": [str(d) for d in loaded.devices],
            "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
            "dtype": str(loaded.dtype).replace("torch.", ""), **asdict(s), "question": QUESTION, "history": config.history,
            "torch": torch.__version__, "transformers": hf.transformers_version(),
            "cudnn_sdp_streaming": bool(cuda and torch.backends.cuda.cudnn_sdp_enabled()),
            "memory": budget.to_json(), "memory_config": config.memory.to_dict(),
        },
        "warmup": {"ran": s.warmup, "s": None if warmup_s is None else round(warmup_s, 6), "warms": WARMUP_WARMS if s.warmup else None,
                   "plan_cache_s": round(plan_cache_s, 6),
                   "whole_video": "each whole-video path ran once on the first question's prompt before its timed run" if s.warmup else None},
        "rates": rates,
        "costs": asdict(costs),
        "memory": {
            "at_load": at_load, "after_streaming": streaming_memory,
            "cuda_context_bytes": at_load["outside_allocator_bytes"],  # device use beyond torch's allocator, weights loaded, nothing run
        },
        "streaming": {
            "chunks": chunks, "n_chunks": len(chunks), "frames": s.frames,
            "encode_s": round(encode_s, 6), "vision_s": round(vision_s, 6), "append_s": round(encode_s - vision_s, 6),
            "wall_s": round(wall, 6), "frame_wait_s": round(wait, 6),
            "frames_per_s": round(s.frames / encode_s, 3), "wall_frames_per_s": round(s.frames / wall, 3),
            "streaming_tax_stock": round(encode_s / stock_gpu, 3) if stock_gpu else None,
            "streaming_tax_fair": round(encode_s / fair_prefill, 3) if fair_prefill else None,
            "gpu_busy_pct": busy, "gpu_busy_source": sampler.source,
            "preprocess_s": round(prep_s, 6), "preprocess_ms_per_chunk": round(prep_s / len(plan) * 1000, 3),
            "preprocess_pct_of_wall": round(100 * prep_s / wall, 2),
            "weights_bytes": _mem(dev, weights_bytes), "encode_peak_bytes": _mem(dev, encode_peak),
            "peak_bytes": _mem(dev, max([encode_peak] + [q["peak_bytes"] or 0 for q in questions])),
            "max_reserved_bytes": _mem(dev, reserved_peak),
            "steady_bytes": _mem(dev, steady), "cache_tokens": cache_tokens, "cache_bytes": cache_bytes,
            "cache_bytes_per_token": round(cache_bytes / cache_tokens, 1),
            "devices": per_device_memory(mem_samples),
        },
        "questions": questions,
        "full_cache_questions": {"n": s.questions, "cache_tokens": cache_tokens, "ttft_ms": percentiles(ttfts),
                                 "decode_ms_per_token": percentiles(decodes)},
        "offline": offline,
        "fair": fair,
        "agreement": agreement,
        "agreement_fair": agreement_fair,
        "decoding": decoding,
        "floors": {
            "encode_s": round(encode_floor, 6), "encode_frames_per_s": round(s.frames / encode_floor, 3),
            "offline_prefill_s": round(prefill_floor, 6),
            "ttft_ms": questions[-1]["floor_ttft_ms"], "decode_ms_per_token": questions[-1]["floor_decode_ms_per_token"],
        },
    }


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
    p.add_argument("--questions", type=int, default=d.questions, help=f"questions of different lengths asked at the full cache, "
                   f"each rolled back, for TTFT and decode percentiles (default: {d.questions})")
    p.add_argument("--decode-seconds", type=float, default=d.decode_seconds, help="length of the generated H.264 clip (30 fps, "
                   "recorded at the frame size before the model's resize: 1280x720 for 1288x728) whose real decoding rate through "
                   f"decord is set against the rate the stream needs; 0 skips it (default: {d.decode_seconds:g})")
    p.add_argument("--minutes", type=float, default=None, help="stream this many minutes of synthetic frames at --fps under "
                   "the memory policy, with per-minute rows (encode rate, GPU/host/disk KV, TTFT, retrieval, decode) instead of "
                   "the comparison with the whole-video path (default: off); sizes default to 448x448 there")
    p.add_argument("--questions-per-minute", type=int, default=1, help="with --minutes: questions asked at the end of each minute (default: 1)")
    p.add_argument("--final-questions", type=int, default=20, help="with --minutes: questions at the end, for TTFT percentiles (default: 20)")
    from .cli import add_memory_options

    add_memory_options(p)
    # the comparison needs streaming to be the whole-video computation: exact memory with a budget
    # that holds the video, unless asked otherwise (None below); --minutes keeps the stream's defaults
    for flag, mode_help in (
        ("--memory", "(default: exact for the comparison with the whole-video path, so both sides compute the same "
                     "thing; auto with --minutes)"),
        ("--gpu-kv-budget", "(default: the model's context for the comparison, so exact memory holds the whole video; "
                            "65536 tokens with --minutes)"),
    ):
        action = p._option_string_actions[flag]
        action.default = None
        action.help = action.help[: action.help.rindex("(default:")] + mode_help
    p.add_argument("--out", default=None, help="where to write the JSON (default: $STREAMCHAT_HOME/bench-<UTC time>.json)")
    p.add_argument("--report", default=None, help="also write Markdown here, with PNG charts beside it (default: none)")
    add_output_options(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .bench_report import text_table, write_report
    from .cli import load_model, memory_from, progress_for
    from .metrics import now

    if args.minutes is not None:
        return _cmd_bench_long(args)

    settings = BenchSettings(
        width=args.width or BenchSettings.width, height=args.height or BenchSettings.height, frames=args.frames, chunk_frames=args.chunk_frames, fps=args.fps,
        questions_at=args.questions_at, max_new_tokens=args.max_new_tokens, offline=args.offline, warmup=args.warmup,
        repeat_questions=args.repeat_questions, questions=args.questions, decode_seconds=args.decode_seconds,
    ).validate()
    if args.memory not in (None, "exact") or args.gpu_kv_budget is not None:
        memory_from(_with_stream_defaults(args))  # a bad size is refused before the model loads
    t0 = now()
    loaded = load_model(args)
    load_s = now() - t0
    bar = progress_for(args, settings.frames, "streaming")
    if args.memory is None or args.memory == "exact":
        memory = comparison_memory(loaded, args.gpu_kv_budget)
    else:
        memory = memory_from(_with_stream_defaults(args))
    report = run_bench(loaded, settings, on_chunk=bar.update, memory=memory)
    bar.close()
    report["load_s"] = round(load_s, 3)
    return _keep(args, report, "bench", write_report, text_table)


def _keep(args, report: dict, kind: str, write_report: Callable, text_table: Callable) -> int:
    """Log the run in the store, write its JSON (and the Markdown report if asked), print the table."""
    import json

    from .cli import emit
    from .store import Store, home

    out = Path(args.out) if args.out else home() / f"{kind}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report["json_path"] = str(out)
    with Store() as store:
        report["run_id"] = store.log_run(kind, report)
    out.write_text(json.dumps(report, indent=2))
    if args.report:
        write_report(report, Path(args.report))
    emit(args, report, text_table(report) + f"\n\nJSON: {out}")
    return 0


def _with_stream_defaults(args):
    """args with --memory / --gpu-kv-budget left unset filled in with the stream's own defaults."""
    from .memory import MemoryConfig

    d = MemoryConfig()
    return argparse.Namespace(**{**vars(args), "memory": args.memory or d.mode, "gpu_kv_budget": args.gpu_kv_budget or d.gpu_kv_budget})


def _cmd_bench_long(args) -> int:
    from . import bench_long
    from .cli import load_model, memory_from, progress_for
    from .errors import UserError

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
    memory = memory_from(_with_stream_defaults(args))
    loaded = load_model(args)
    bar = progress_for(args, s.frames, "streaming")
    report = bench_long.run_long(loaded, s, memory, on_chunk=bar.update)
    bar.close()
    return _keep(args, report, "bench-long", bench_long.write_report, bench_long.text_table)
