"""The benchmark's fair baseline and its extra rows: a whole-video prefill on streamchat's kernels,
device memory beyond the allocator, percentiles, and how fast decord really decodes.

The stock whole-video path (`offline.answer_offline`) is what plain transformers gives: sdpa, a vision
tower that loops over its windows in Python, the stock cache. Against it the streaming tax mixes two
things, streaming and kernels. `answer_fair` takes the kernels out: the same prompt in one prefill, but
with the kernels the streaming path uses (the tower's windows in one varlen call per block,
streamchat's attention, the growing cache sized once, the CUDA-graph decode step), so the tax against
it is what streaming itself costs.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Callable


def percentiles(values: list[float]) -> dict:
    """n, mean, p50, p90, p99 (nearest rank) and max; Nones when there are no values."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 3)

    return {"n": len(values), "mean": round(statistics.fmean(values), 3), "p50": rank(0.5), "p90": rank(0.9),
            "p99": rank(0.99), "max": round(ordered[-1], 3)}


def device_memory(device) -> dict:
    """Allocator figures and what the device holds outside them (None off CUDA).

    `outside_allocator_bytes` = device memory in use (cudaMemGetInfo) minus what torch's allocator has
    reserved: the CUDA context, kernels' modules, and library workspaces made outside the allocator;
    it assumes no other process uses the GPU."""
    import torch

    if device.type != "cuda":
        return {"allocated_bytes": None, "reserved_bytes": None, "max_allocated_bytes": None, "max_reserved_bytes": None,
                "device_used_bytes": None, "device_total_bytes": None, "outside_allocator_bytes": None}
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    return {
        "allocated_bytes": torch.cuda.memory_allocated(device), "reserved_bytes": reserved,
        "max_allocated_bytes": torch.cuda.max_memory_allocated(device), "max_reserved_bytes": torch.cuda.max_memory_reserved(device),
        "device_used_bytes": total - free, "device_total_bytes": total, "outside_allocator_bytes": total - free - reserved,
    }


def answer_fair(loaded, prompt, read_frames: Callable, fps: float, question: str, max_new_tokens: int, vocab):
    """The whole prompt in one prefill on streaming's kernels, then greedy decoding with the static
    decoder. Returns (Answer, figures): host preprocessing is timed apart from the GPU prefill."""
    import torch

    from . import hf
    from .engine import Answer, greedy_decode
    from .kvcache import KVCache
    from .layout import VideoSeg, render
    from .metrics import gpu_memory, now, reset_peak, sync
    from .positions import Cursor, temporal_interval

    model, dev = loaded.model, loaded.device
    cuda = dev.type == "cuda"
    hf.use_stream_attention(model, True)
    vc = hf.vision_config(model)
    interval = temporal_interval(fps, vc.tokens_per_second, vc.temporal_patch_size)
    clips = [read_frames(seg.frames) for seg in prompt if isinstance(seg, VideoSeg)]
    with torch.inference_mode():
        t0 = now()
        prepared = []
        for clip in clips:  # the same host work as the engine's preprocess: normalise, patchify, pin
            pixels, grid = hf.video_pixels(loaded.processor, clip)
            prepared.append((pixels.pin_memory() if cuda else pixels, grid))
        preprocess_s = now() - t0
        del clips
        m = vc.spatial_merge_size
        merged = [(int(g[0, 0]), int(g[0, 1]) // m, int(g[0, 2]) // m) for _, g in prepared]
        ids, positions = render(prompt, vocab, merged, interval)
        cache = KVCache(model)
        cache.reserve(len(ids) + max_new_tokens + 1)  # sized once, as the stream's plan does
        reset_peak(dev)
        sync(dev)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None
        t1 = now()
        if marks:
            marks[0].record()
        # the stock tower's forward with the window attention streaming uses: every block is one
        # varlen call over the whole video (windows and temporal patches bounded by cu_seqlens)
        video = [hf.embed_video(model, pixels, grid) for pixels, grid in prepared]
        if marks:
            marks[1].record()
        vision_host_s = now() - t1
        ids_dev = torch.tensor(ids, device=dev)
        embeds = hf.embed_tokens(model, ids_dev)  # [1, L, D]
        if video:
            embeds[0, ids_dev == vocab.video_pad] = torch.cat(video).to(embeds.dtype)
        del video
        logits = hf.lm_head(model, hf.lm_forward(model, embeds, positions, cache.hf))
        del embeds
        sync(dev)
        prefill_s = now() - t1
        vision_s = marks[0].elapsed_time(marks[1]) / 1000 if marks else vision_host_s
        first_logits = logits.detach().cpu()
        peak = gpu_memory(dev)["peak_bytes"]
        reserved_peak = torch.cuda.max_memory_reserved(dev) if cuda else None
        decoder = hf.static_decoder(model, cache.hf, cache.graphs)
        cursor = Cursor(next_pos=int(positions.max()) + 1)
        gen, stamps = greedy_decode(model, cache.hf, cursor, logits, max_new_tokens, vocab.eos, decoder=decoder)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    answer = Answer(
        question=question, text=vocab.decode(gen), token_ids=gen, ttft_s=stamps[0] - t1, latency_s=stamps[-1] - t1,
        frames_seen=max((max(s.frames) + 1 for s in prompt if isinstance(s, VideoSeg)), default=0),
        cache_tokens=len(ids), peak_bytes=peak, first_logits=first_logits, prompt=prompt, prefill_s=prefill_s,
    )
    figures = {
        "prompt_tokens": len(ids), "preprocess_s": round(preprocess_s, 6), "vision_s": round(vision_s, 6),
        "prefill_s": round(prefill_s, 6), "ttft_s": round(answer.ttft_s, 6),
        # the median step: the first step on new buffers includes the decode graph's capture
        "decode_ms_per_token": round(statistics.median(steps[1:] or steps) * 1000, 3) if steps else None,
        "new_tokens": len(gen), "peak_bytes": peak if cuda else None, "max_reserved_bytes": reserved_peak,
    }
    del cache, decoder
    return answer, figures


def decode_rate(width: int, height: int, fps: float, seconds: float, chunk_frames: int, folder: Path,
                native_fps: float = 30.0) -> dict:
    """decord's real decoding rate through VideoSource (decode, resize to width x height, chunking) on a
    generated H.264 clip of `seconds` at `native_fps`, made at the size a camera would record that
    becomes width x height after the model's resize (1288x728 <- 1280x720)."""
    from .clips import make_clip
    from .metrics import now
    from .video import Sampling, VideoSource

    native_w, native_h = width // 16 * 16, height // 16 * 16
    path = make_clip(folder / f"decode-{native_w}x{native_h}.mp4", seconds=seconds, fps=native_fps, width=native_w, height=native_h)
    sampling = Sampling(fps=fps, max_pixels=width * height, min_pixels=min(width * height, 4 * 28 * 28))
    with VideoSource(path, sampling) as source:
        t0 = now()
        frames = 0
        for chunk in source.prefetch_chunks(chunk_frames):  # the stream's own reader: decord in a thread, ahead
            frames += len(chunk.frames) - (1 if chunk.padded else 0)
        wall = now() - t0
        native_frames = source.plan[-1][0] + 1 if source.plan else 0
        size = (source.info.resized_width, source.info.resized_height)
    return {
        "clip": f"{native_w}x{native_h} H.264 (libx264 ultrafast, crf 18), {seconds:g} s at {native_fps:g} fps",
        "resized_to": f"{size[0]}x{size[1]}", "sampled_fps": fps, "sampled_frames": frames, "native_frames_decoded": native_frames,
        "wall_s": round(wall, 6), "sampled_frames_per_s": round(frames / wall, 3) if wall > 0 else None,
        "native_frames_per_s": round(native_frames / wall, 3) if wall > 0 else None,
        "realtime_frames_per_s": fps,  # sampled frames a live source delivers per second
    }
