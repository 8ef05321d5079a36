"""Independent references for Qwen2.5-VL, written from the published formats and algorithms: the
Instruct chat template, transformers' own processor, and M-RoPE positions by Qwen's rule. Nothing
here calls streamchat, so tests can hold streamchat's layout and positions against it."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

# Qwen2-VL-7B-Instruct's and Qwen2.5-VL-*-Instruct's chat template (chat_template.json on the Hub).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def user(q: str, video: bool) -> dict:
    return {"role": "user", "content": ([{"type": "video"}] if video else []) + [{"type": "text", "text": q}]}


def client_text(tokenizer, token_ids: list[int], eos: set[int]) -> str:
    """An answer as a chat client sends it back: text. Kept answers must survive the round trip for the
    template to reproduce streamchat's ids (which keep the generated tokens); tiny-random's longer
    answers hold byte pieces that decode to U+FFFD and re-encode otherwise, so tests keep them short."""
    ids = [t for t in token_ids if t not in eos]
    text = tokenizer.decode(ids)
    assert tokenizer.encode(text, add_special_tokens=False) == ids, ("answer does not survive a text round trip", ids)
    return text


def processor_inputs(processor, messages: list[dict], videos: list, fps: float) -> dict:
    """What transformers' processor makes of the messages and their videos (uint8 frames, already
    resized: streamchat and this reference see the same pixels)."""
    text = processor.apply_chat_template(messages, chat_template=QWEN_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False)
    own = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert own == text, "tiny-random's chat template renders these messages unlike Qwen's"
    kwargs = dict(text=[text], return_tensors="pt")
    if videos:
        # frames already sampled at `fps`: the metadata says so (5.17 takes second_per_grid_ts from the
        # metadata's sampled fps, 24 when none is given; a plain `fps=` kwarg does not reach it)
        metadata = [{"total_num_frames": len(v), "fps": fps, "frames_indices": list(range(len(v)))} for v in videos]
        kwargs.update(videos=videos, videos_kwargs=dict(video_metadata=metadata, do_sample_frames=False, do_resize=False,
                                                        cap_pixels_per_frame=False))
    out = processor(**kwargs)
    if videos:
        spg = torch.as_tensor(out["second_per_grid_ts"]).tolist()
        assert all(abs(x - 2 / fps) < 1e-6 for x in spg) and len(spg) == len(videos), spg
    return out


def reference_positions(input_ids: list[int], grids: list[list[int]], second_per_grid: list[Fraction], *,
                        video_pad: int, merge: int = 2, tokens_per_second: int = 2) -> torch.Tensor:
    """[3, L] M-RoPE positions of one sequence by Qwen2.5-VL's rule (Qwen's release, vLLM, transformers
    up to 5.2), in exact arithmetic.

    Text tokens get (p, p, p) with p rising by one. A video of grid (T, gh, gw) (before the spatial
    merge) starting at running position s: temporal patch k, merged row i, column j get
        t = s + floor(k * tokens_per_second * second_per_grid_t),  h = s + i,  w = s + j.
    What follows the video starts at the largest position used so far + 1.
    """
    out: list[tuple[int, int, int]] = []
    nxt = 0  # the next text position
    cursor = 0  # index into input_ids
    for (t_count, gh, gw), spg in zip(grids, second_per_grid):
        start = input_ids.index(video_pad, cursor)
        for _ in range(start - cursor):
            out.append((nxt, nxt, nxt))
            nxt += 1
        h, w, s = gh // merge, gw // merge, nxt
        for k in range(t_count):
            t = s + math.floor(k * tokens_per_second * spg)
            out += [(t, s + i, s + j) for i in range(h) for j in range(w)]
        n = t_count * h * w
        assert input_ids[start : start + n] == [video_pad] * n, "video pads do not match the grid"
        cursor = start + n
        nxt = max(max(p) for p in out) + 1
    for _ in range(len(input_ids) - cursor):
        out.append((nxt, nxt, nxt))
        nxt += 1
    return torch.tensor(out, dtype=torch.long).T
