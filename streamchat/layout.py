"""The prompt layout, as pure data: segments, the layout's vocabulary, the turn grammar, and the token
ids and M-RoPE positions a prompt renders to. No model and no cache: the engine, the offline runner
and replay all build prompts from here, so offline never needs a streaming engine.

One video block per user turn, the way the chat template renders a video message:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|> [video ...]
    <|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|> [video since the last question ...] ...   (history=keep)

A turn with no new frames since the last kept answer is a text-only user turn:
    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from .errors import UserError
from .positions import Cursor


@dataclass
class TextSeg:
    ids: list[int]


@dataclass
class VideoSeg:
    frames: list[int]  # positions in the sampling plan; a padded pair repeats the last one
    grid_h: int  # merged (LLM) grid height
    grid_w: int

    @property
    def tokens(self) -> int:
        return len(self.frames) // 2 * self.grid_h * self.grid_w


Segment = TextSeg | VideoSeg


def segments_to_json(segs: list[Segment]) -> list[dict]:
    return [
        {"text": s.ids} if isinstance(s, TextSeg) else {"frames": s.frames, "grid": [s.grid_h, s.grid_w]} for s in segs
    ]


def segments_from_json(data: list[dict]) -> list[Segment]:
    return [TextSeg(list(d["text"])) if "text" in d else VideoSeg(list(d["frames"]), *d["grid"]) for d in data]


def copy_segments(segs: list[Segment]) -> list[Segment]:
    return [TextSeg(list(s.ids)) if isinstance(s, TextSeg) else VideoSeg(list(s.frames), s.grid_h, s.grid_w) for s in segs]


def frame_count(prompt: list[Segment]) -> int:
    """Video frames the prompt shows: distinct sampled frames (a padded pair's repeat is no new frame),
    what streaming and offline both report as `frames`."""
    return len({f for s in prompt if isinstance(s, VideoSeg) for f in s.frames})


def prompt_tokens(prompt: list[Segment]) -> int:
    """Tokens the prompt takes in the cache: its text and its videos' merged patches."""
    return sum(len(s.ids) if isinstance(s, TextSeg) else s.tokens for s in prompt)


def halve(prompt: list[Segment]) -> list[Segment]:
    """The same prompt with every other frame of each video segment (stride doubled), pairs kept even."""
    out: list[Segment] = []
    for seg in prompt:
        if isinstance(seg, VideoSeg):
            frames = seg.frames[::2]
            if len(frames) % 2:
                frames = frames + frames[-1:]
            out.append(VideoSeg(frames, seg.grid_h, seg.grid_w))
        else:
            out.append(seg)
    return out


class Vocab:
    """The token ids and fixed token pieces of the layout, from the model's tokenizer."""

    def __init__(self, tokenizer, system_prompt: str):
        self.tok = tokenizer
        cid = tokenizer.convert_tokens_to_ids
        self.vision_start, self.vision_end = cid("<|vision_start|>"), cid("<|vision_end|>")
        self.video_pad, self.im_end = cid("<|video_pad|>"), cid("<|im_end|>")
        self.eos = {self.im_end, cid("<|endoftext|>")}
        self.head = self.ids(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")
        self.user_open = self.ids("<|im_start|>user\n")
        self.turn_end = self.ids("<|im_end|>\n")
        self.assistant_open = self.ids("<|im_start|>assistant\n")

    def ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def user_text(self, text: str) -> list[int]:
        """A user's text; special-token strings typed by a user stay plain text."""
        return list(self.tok.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in self.eos], skip_special_tokens=True)

    # --- the turn grammar -------------------------------------------------------------------------

    def stream_start(self) -> list[int]:
        """What a stream opens with: the system turn and the first user turn's video block."""
        return self.head + self.user_open + [self.vision_start]

    def video_turn_open(self) -> list[int]:
        """Opens the next user turn's video block after a kept answer."""
        return self.user_open + [self.vision_start]

    def question(self, text: str, *, block_open: bool) -> list[int]:
        """The tokens a question adds: close the open video block, or open a text-only user turn."""
        head = [self.vision_end] if block_open else self.user_open
        return head + self.user_text(text) + self.turn_end + self.assistant_open

    def kept_answer(self, answer_ids: list[int]) -> tuple[list[int], list[int]]:
        """A kept turn's answer as the transcript records it, and the tokens still to prefill after the
        generated ones (the last generated token, unless it ended the turn, and `<|im_end|>\\n`)."""
        text = [t for t in answer_ids if t not in self.eos]
        tail = ([] if answer_ids and answer_ids[-1] in self.eos else answer_ids[-1:]) + self.turn_end
        return text + self.turn_end, tail


def one_turn(vocab: Vocab, frames: int, grid_h: int, grid_w: int, question: str) -> list[Segment]:
    """The prompt of a single question after plan frames 0..frames-1 (an odd last frame repeated, as
    the stream pads the end of what it encodes): what `ask` sees in either mode."""
    plan = list(range(frames)) + ([frames - 1] if frames % 2 else [])
    return [TextSeg(vocab.stream_start()), VideoSeg(plan, grid_h, grid_w),
            TextSeg(vocab.question(check_question(question), block_open=True))]


def check_question(text: str) -> str:
    q = text.strip()
    if not q:
        raise UserError("the question is empty; type a question about the video")
    return q


def render(prompt: list[Segment], vocab: Vocab, video_grids: list[tuple[int, int, int]], interval: Fraction) -> tuple[list[int], torch.Tensor]:
    """The token ids and [3, L] M-RoPE positions of `prompt`, whose k-th video segment has the merged
    grid video_grids[k] = (T, H, W) (what the processor made of its frames)."""
    ids: list[int] = []
    positions = []
    cursor = Cursor()
    grids = iter(video_grids)
    for seg in prompt:
        if isinstance(seg, TextSeg):
            ids.extend(seg.ids)
            positions.append(cursor.text(len(seg.ids)))
        else:
            t_count, h, w = next(grids)
            ids.extend([vocab.video_pad] * (t_count * h * w))
            positions.append(cursor.video(t_count, h, w, interval))
    return ids, torch.cat(positions, dim=1)
