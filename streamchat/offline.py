"""The offline runner: the whole prompt (every frame and every earlier turn) in one prefill, then greedy.

This is what a plain transformers user does: the real processor patchifies each video segment whole,
one `model(...)` call prefills everything, generation follows. It uses the same frames, the same
token layout and the same explicit M-RoPE positions as the streaming engine, so on the CPU in
float32 both give the same tokens. Out of memory is caught and retried with the stride doubled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import hf
from .context import model_context
from .engine import Answer, greedy_decode
from .layout import Segment, VideoSeg, Vocab, frame_count, halve, prompt_tokens, render
from .metrics import gpu_memory, now, reset_peak, sync
from .models import Loaded
from .positions import Cursor, temporal_interval

FrameReader = Callable[[list[int]], np.ndarray]  # plan positions -> uint8 [N, H, W, 3]


@dataclass
class Attempt:
    stride_factor: int
    frames: int
    ok: bool
    error: str | None = None

    def to_json(self) -> dict:
        return {"stride_factor": self.stride_factor, "frames": self.frames, "ok": self.ok, "error": self.error}


@torch.inference_mode()
def answer_offline(
    loaded: Loaded,
    prompt: list[Segment],
    read_frames: FrameReader,
    fps: float,
    question: str,
    max_new_tokens: int,
    vocab: Vocab,
    on_token: Callable[[int], None] | None = None,
) -> Answer:
    """One prefill of `prompt` (segments ending in the question's tokens), then greedy decoding."""
    model = loaded.model
    hf.use_stream_attention(model, False)  # the plain transformers path: stock sdpa
    vc = hf.vision_config(model)
    interval = temporal_interval(fps, vc.tokens_per_second, vc.temporal_patch_size)
    frames = [read_frames(seg.frames) for seg in prompt if isinstance(seg, VideoSeg)]
    reset_peak(loaded.devices)
    sync(loaded.devices)
    t0 = now()
    pixels, grids, merged = [], [], []
    for clip in frames:
        pv, grid = hf.video_pixels(loaded.processor, clip)
        t_count, gh, gw = (int(x) for x in grid[0])
        merged.append((t_count, gh // vc.spatial_merge_size, gw // vc.spatial_merge_size))
        pixels.append(pv)
        grids.append(grid)
    ids, positions = render(prompt, vocab, merged, interval)
    cursor = Cursor(next_pos=int(positions.max()) + 1)  # decoding goes on after the prompt's largest position
    cache = hf.new_cache(model, growing=False)  # the stock DynamicCache, as a plain user has
    logits = hf.full_forward(
        model,
        torch.tensor(ids),
        torch.cat(pixels) if pixels else None,
        torch.cat(grids) if grids else None,
        positions,
        cache,
    )
    sync(loaded.devices)
    prefill_s = now() - t0
    first_logits = logits.detach().cpu()
    margins: list[float] = []
    gen, stamps = greedy_decode(model, cache, cursor, logits, max_new_tokens, vocab.eos, on_token, margins=margins)
    frames_seen = max((max(s.frames) + 1 for s in prompt if isinstance(s, VideoSeg)), default=0)
    answer = Answer(
        question=question,
        text=vocab.decode(gen),
        token_ids=gen,
        ttft_s=stamps[0] - t0,
        latency_s=stamps[-1] - t0,
        frames_seen=frames_seen,
        cache_tokens=len(ids),
        peak_bytes=gpu_memory(loaded.devices)["peak_bytes"],
        first_logits=first_logits,
        prompt=prompt,
        prefill_s=prefill_s,
        margins=margins,
    )
    del cache
    return answer


def answer_with_retry(
    loaded: Loaded,
    prompt: list[Segment],
    read_frames: FrameReader,
    fps: float,
    question: str,
    max_new_tokens: int,
    vocab: Vocab,
    max_attempts: int = 4,
    context: int | None = None,
) -> tuple[Answer | None, list[Attempt]]:
    """Offline answer with the stride doubled while the prompt does not fit the model's context
    (`context`, default its max_position_embeddings: a long bounded session's whole video) and, up to
    `max_attempts` times, after running out of memory. Every attempt is reported."""
    if context is None:
        context = model_context(loaded)
    attempts: list[Attempt] = []
    factor, out_of_memory = 1, 0
    while out_of_memory < max_attempts:
        need = prompt_tokens(prompt) + max_new_tokens
        if need > context and frame_count(prompt) > 2:
            attempts.append(Attempt(factor, frame_count(prompt), False, f"{need:,} tokens do not fit the model's context of {context:,}"))
        else:
            try:
                ans = answer_offline(loaded, prompt, read_frames, fps / factor, question, max_new_tokens, vocab)
                attempts.append(Attempt(factor, frame_count(prompt), True))
                return ans, attempts
            except torch.OutOfMemoryError as exc:
                attempts.append(Attempt(factor, frame_count(prompt), False, f"out of memory: {str(exc).splitlines()[0]}"))
                out_of_memory += 1
                if loaded.device.type == "cuda":
                    torch.cuda.empty_cache()
        if frame_count(prompt) <= 2:
            break
        prompt = halve(prompt)
        factor *= 2
    return None, attempts
