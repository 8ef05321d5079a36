"""The streaming engine: chunks of frames appended to Qwen2.5-VL's KV cache, questions answered on top.

Token layout (the same one the chat template renders for one video per user turn):

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|> [video ...]
    <|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|> [video since the last question ...] ...   (history=keep)

Text that is known but not yet needed (the prompt's head, a kept answer's closing tokens) waits in
`pending` and is prefilled together with the next chunk or question. The `transcript` records every
token and frame in order, so the offline runner can rebuild exactly the prompt a turn saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import hf
from .config import SessionConfig
from .errors import UserError
from .metrics import gpu_memory, now, reset_peak, sync
from .models import Loaded
from .positions import Cursor, temporal_interval, text_positions


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


@dataclass
class ChunkStats:
    index: int
    frame_first: int  # plan positions [frame_first, frame_last]
    frame_last: int
    t_start_s: float
    t_end_s: float
    tokens: int  # tokens this chunk added to the cache (video + pending text)
    cache_tokens: int  # after the chunk
    cache_bytes: int
    encode_s: float
    vision_s: float
    memory: dict


@dataclass
class Answer:
    question: str
    text: str
    token_ids: list[int]
    ttft_s: float
    latency_s: float
    frames_seen: int
    cache_tokens: int  # cache length when the question was asked (video + earlier turns)
    peak_bytes: int
    first_logits: torch.Tensor | None = field(default=None, repr=False)
    prompt: list[Segment] = field(default_factory=list, repr=False)  # exactly what this turn saw
    prefill_s: float | None = None  # offline only
    margins: list[float] = field(default_factory=list, repr=False)  # offline only: top-1 minus top-2 logit per token

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.latency_s - self.ttft_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0

    def turn_fields(self) -> dict:
        """The figures a logged turn stores (store.log_turn), in the store's units."""
        return {
            "frames_seen": self.frames_seen,
            "question": self.question,
            "answer": self.text,
            "token_ids": self.token_ids,
            "ttft_ms": self.ttft_s * 1000,
            "latency_ms": self.latency_s * 1000,
            "new_tokens": self.new_tokens,
            "tokens_per_s": self.tokens_per_s,
            "cache_tokens": self.cache_tokens,
            "peak_bytes": self.peak_bytes,
        }

    def to_json(self) -> dict:
        return {
            "question": self.question,
            "answer": self.text,
            "token_ids": self.token_ids,
            "ttft_s": round(self.ttft_s, 6),
            "latency_s": round(self.latency_s, 6),
            "new_tokens": self.new_tokens,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "frames_seen": self.frames_seen,
            "cache_tokens": self.cache_tokens,
            "peak_bytes": self.peak_bytes,
        }


class Vocab:
    """The token ids and fixed token pieces of the layout, from the model's tokenizer."""

    def __init__(self, tokenizer, config: SessionConfig):
        self.tok = tokenizer
        cid = tokenizer.convert_tokens_to_ids
        self.vision_start, self.vision_end = cid("<|vision_start|>"), cid("<|vision_end|>")
        self.video_pad, self.im_end = cid("<|video_pad|>"), cid("<|im_end|>")
        self.eos = {self.im_end, cid("<|endoftext|>")}
        self.head = self.ids(f"<|im_start|>system\n{config.system_prompt}<|im_end|>\n")
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


RESERVE_MARGIN = 256  # cache room kept beyond the planned video for a question and its answer
CAPTURED_QUESTION_TOKENS = 128  # question graphs captured when the cache is sized (longer: on first use)
QUESTION_BUCKET = 16  # question prefills are padded to a multiple of this many tokens (see StreamEngine._prefill)


def greedy_decode(
    model,
    cache,
    cursor: Cursor,
    logits: torch.Tensor,
    max_new_tokens: int,
    eos: set[int],
    on_token: Callable[[int], None] | None = None,
    decoder: "hf.StaticDecoder | None" = None,
    margins: list[float] | None = None,
) -> tuple[list[int], list[float]]:
    """Greedy generation from `logits`; every token but the last is appended to `cache` at `cursor`.

    With a `decoder` (hf.StaticDecoder) the steps run as one CUDA graph each on a GPU. Returns the
    tokens and the host time each one was ready (after a device sync), for TTFT and latency. Without a
    decoder, `margins` (if given) receives each step's top-1 minus top-2 logit: how close a call it was.
    """
    out: list[int] = []
    stamps: list[float] = []

    def margin(step_logits: torch.Tensor) -> None:
        if margins is not None:
            top = torch.topk(step_logits.float(), 2).values
            margins.append(float(top[0] - top[1]))

    def emit(token: int) -> bool:
        stamps.append(now())
        out.append(token)
        if on_token is not None:
            on_token(token)
        return token in eos or len(out) >= max_new_tokens

    margin(logits)
    if emit(int(torch.argmax(logits))):  # int() waits for the device
        return out, stamps
    if decoder is not None:
        decoder.prepare(out[-1], cursor.next_pos, max_new_tokens)
        fed = 0
        try:
            while True:
                decoder.run()
                fed += 1
                if emit(int(decoder.token)):
                    return out, stamps
        finally:
            decoder.commit(fed)
            cursor.text(fed)
    while True:
        embeds = hf.embed_tokens(model, torch.tensor([out[-1]], device=model.device))
        hidden = hf.lm_forward(model, embeds, cursor.text(1), cache)
        step_logits = hf.lm_head(model, hidden)
        margin(step_logits)
        if emit(int(torch.argmax(step_logits))):
            return out, stamps


class StreamEngine:
    """One stream: encode chunks into the cache, answer questions on a branch, keep or roll back."""

    def __init__(self, loaded: Loaded, config: SessionConfig, fps: float):
        self.loaded = loaded
        self.model = loaded.model
        self.config = config.validate()
        self.fps = fps
        self.vocab = Vocab(loaded.tokenizer, config)
        vc = hf.vision_config(self.model)
        self.merge = vc.spatial_merge_size
        self.interval = temporal_interval(fps, vc.tokens_per_second, vc.temporal_patch_size)
        self.max_context = int(getattr(hf.text_config(self.model), "max_position_embeddings", 32768))
        # called as hook(chunk_index, frames) when a chunk starts, before any model work (the app shows
        # the frame; tests hold the engine inside a chunk here)
        self.chunk_hook: Callable[[int, np.ndarray], None] | None = None
        self.reset()

    # --- state --------------------------------------------------------------------------------

    planned_frames: int | None = None  # frames the stream will encode in all (plan_cache): sizes the cache

    def reset(self) -> None:
        self.cache = hf.new_cache(self.model)
        self.cursor = Cursor()
        self.pending: list[int] = self.vocab.head + self.vocab.user_open + [self.vocab.vision_start]
        self.transcript: list[Segment] = [TextSeg(list(self.pending))]
        self.block_frames = 0  # frames in the open video block
        self.frames_seen = 0  # plan frames encoded so far (pads not counted)
        self.chunks_encoded = 0
        self.turns = 0

    @property
    def cache_tokens(self) -> int:
        return hf.cache_len(self.cache)

    # --- encoding -----------------------------------------------------------------------------

    def preprocess(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU work for a chunk (normalise, patchify): safe to run ahead in another thread."""
        pixels, grid = hf.video_pixels(self.loaded.processor, frames)
        if self.loaded.device.type == "cuda":
            pixels = pixels.pin_memory()  # lets the copy to the GPU overlap
        return pixels, grid

    @torch.inference_mode()
    def encode(self, frames: np.ndarray, first: int, padded: bool = False, timestamps=(0.0, 0.0),
               prepared: tuple[torch.Tensor, torch.Tensor] | None = None) -> ChunkStats:
        """Append a chunk of frames (uint8 [N, H, W, 3], N even) that start at plan position `first`.

        `prepared` is `preprocess(frames)` done ahead of time (the stream does it in its decode thread).
        """
        if len(frames) == 0 or len(frames) % 2:
            raise UserError(f"a chunk must hold an even number of frames; got {len(frames)}")
        if self.chunk_hook is not None:
            self.chunk_hook(self.chunks_encoded, frames)
        dev = self.loaded.device
        hf.use_stream_attention(self.model, self.config.stream_attention)
        sync(dev)
        t0 = now()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if dev.type == "cuda" else None
        if marks:
            marks[0].record()
        if not self.pending or self.pending[-1] != self.vocab.vision_start:
            if self.block_frames == 0 and self.cursor.block_start is None:
                # history=keep after a turn: open the next user turn's video block
                self._add_pending(self.vocab.user_open + [self.vocab.vision_start])
        pixels, grid = prepared if prepared is not None else self.preprocess(frames)
        t_count, gh, gw = (int(x) for x in grid[0])
        h, w = gh // self.merge, gw // self.merge
        video = hf.embed_video(self.model, pixels, grid)  # [t*h*w, D]
        if marks:  # an event, not a sync: the GPU goes straight on to the language model
            marks[1].record()
        vision_s = now() - t0
        text_ids = self.pending
        parts, positions = [], []
        if text_ids:
            parts.append(hf.embed_tokens(self.model, torch.tensor(text_ids, device=dev)))
            positions.append(self.cursor.text(len(text_ids)))
        parts.append(video.unsqueeze(0).to(parts[0].dtype if parts else video.dtype))
        positions.append(self.cursor.video(t_count, h, w, self.interval))
        graphs = None if text_ids or not self.config.stream_attention else hf.chunk_append(self.model, self.cache, video.shape[0])
        if graphs is not None:  # a chunk of video tokens only: the layers as CUDA graphs
            graphs.run(parts[0], positions[0], video.shape[0])
        else:
            hf.lm_forward(self.model, torch.cat(parts, dim=1), torch.cat(positions, dim=1), self.cache)
        n_real = len(frames) - (1 if padded else 0)
        if self.planned_frames:
            # the whole video's cache at once: buffers that never move keep the decode graph and cuDNN's
            # plans valid, and the peak is what the finished cache needs anyway
            pairs_left = -(-max(self.planned_frames - (first + n_real), 0) // 2)
            before = hf.cache_capacity(self.cache)
            need = self.cache_tokens + pairs_left * h * w + self.config.max_new_tokens + RESERVE_MARGIN
            hf.allocate_cache(self.model, self.cache, min(need, self.max_context + RESERVE_MARGIN))
            if dev.type == "cuda" and hf.cache_capacity(self.cache) != before:
                self._prepare_buffers(video.shape[0])  # new buffers (a restored snapshot, say)
        sync(dev)
        encode_s = now() - t0
        if marks:
            vision_s = marks[0].elapsed_time(marks[1]) / 1000  # GPU time from the chunk's start to the tower's end

        plan = list(range(first, first + n_real)) + ([first + n_real - 1] if padded else [])
        self.pending = []
        last = self.transcript[-1]
        if isinstance(last, VideoSeg) and self.block_frames:
            last.frames.extend(plan)
        else:
            self.transcript.append(VideoSeg(plan, h, w))
        self.block_frames += len(plan)
        self.frames_seen = max(self.frames_seen, first + n_real)
        stats = ChunkStats(
            index=self.chunks_encoded,
            frame_first=first,
            frame_last=first + n_real - 1,
            t_start_s=float(timestamps[0]),
            t_end_s=float(timestamps[-1]),
            tokens=len(text_ids) + video.shape[0],
            cache_tokens=self.cache_tokens,
            cache_bytes=hf.cache_bytes(self.cache),
            encode_s=encode_s,
            vision_s=vision_s,
            memory=gpu_memory(dev),
        )
        self.chunks_encoded += 1
        return stats

    def _add_pending(self, ids: list[int]) -> None:
        self.pending.extend(ids)
        last = self.transcript[-1]
        if isinstance(last, TextSeg):
            last.ids.extend(ids)
        else:
            self.transcript.append(TextSeg(list(ids)))

    def warmup(self, frames: np.ndarray | None = None) -> None:
        """Run the engine's kernels once on a throwaway cache (a chunk if frames are given, and a short
        question), so the first real chunk and question pay no one-time GPU setup (CUDA module loading,
        kernel selection). The live state is untouched."""
        saved = (self.cache, self.cursor, self.pending, self.transcript, self.block_frames, self.frames_seen,
                 self.chunks_encoded, self.turns, self.chunk_hook)
        history, planned = self.config.history, self.planned_frames
        try:
            self.chunk_hook = None
            self.planned_frames = None
            self.config.history = "drop"
            self.reset()
            if frames is None:
                frames = np.zeros((2, 56, 56, 3), dtype=np.uint8)
            self.encode(frames[:2], 0)
            self.ask("warm up", max_new_tokens=3)
        finally:
            self.config.history, self.planned_frames = history, planned
            (self.cache, self.cursor, self.pending, self.transcript, self.block_frames, self.frames_seen,
             self.chunks_encoded, self.turns, self.chunk_hook) = saved

    # --- questions ----------------------------------------------------------------------------

    def question_ids(self, question: str) -> list[int]:
        """The tokens a question adds after the transcript: close the block (or open a text turn), ask."""
        q = question.strip()
        if not q:
            raise UserError("the question is empty; type a question about the video")
        if self.block_frames:
            head = [self.vocab.vision_end]
        elif self.cursor.block_start is None and (not self.pending or self.pending[-1] != self.vocab.vision_start):
            head = self.vocab.user_open  # history=keep, no new frames since the last answer
        else:
            raise UserError("no frames are encoded yet; wait for the first chunk (or ask with a later --at)")
        ids = head + self.vocab.user_text(q) + self.vocab.turn_end + self.vocab.assistant_open
        room = self.max_context - self.cache_tokens - len(self.pending) - self.config.max_new_tokens
        if len(ids) > room:
            raise UserError(
                f"the question is {len(ids)} tokens but only {max(room, 0)} fit in the model's context "
                f"({self.max_context} tokens, {self.cache_tokens} in the cache); ask a shorter question"
            )
        return ids

    def prompt_with(self, q_ids: list[int]) -> list[Segment]:
        """A copy of the transcript followed by the question's tokens: exactly what a turn sees."""
        copy = [TextSeg(list(s.ids)) if isinstance(s, TextSeg) else VideoSeg(list(s.frames), s.grid_h, s.grid_w) for s in self.transcript]
        return copy + [TextSeg(list(q_ids))]

    @torch.inference_mode()
    def plan_cache(self, total_frames: int, height: int, width: int) -> None:
        """Size the cache for a whole video of `total_frames` frames of height x width (resized) before
        the first chunk (at most the model's context), and on a GPU prepare everything tied to its
        buffers: the question and chunk graphs, cuDNN's plans for every prefix block, the vision
        tower's graph. Buffers that never move keep all of it valid, and it is paid at load (about
        1 s for the 3B model, H200), not in the first chunks."""
        self.planned_frames = total_frames
        vc = hf.vision_config(self.model)
        unit = vc.patch_size * vc.spatial_merge_size
        per_pair = (height // unit) * (width // unit)
        tokens = len(self.pending) + -(-total_frames // 2) * per_pair + self.config.max_new_tokens + RESERVE_MARGIN
        tokens = min(tokens, self.max_context + RESERVE_MARGIN)
        hf.allocate_cache(self.model, self.cache, tokens)
        if self.loaded.device.type == "cuda":
            self._prepare_buffers(self.config.chunk_frames // 2 * per_pair)
            patch = vc.patch_size
            grid = torch.tensor([[self.config.chunk_frames // vc.temporal_patch_size, height // patch, width // patch]])
            pixels = (int(grid.prod()), vc.in_channels * vc.temporal_patch_size * patch * patch)
            hf.vision_graph(self.model, grid, pixels).run()  # captured now, replayed per chunk

    @torch.inference_mode()  # no autograd graph may hold the capture's activations
    def _prepare_buffers(self, chunk_tokens: int) -> None:
        """Everything tied to the cache's buffers, done now for chunks of `chunk_tokens` tokens: the
        question graphs for the common lengths (longer ones are captured on first use), the chunk
        graphs, and cuDNN's plans for every prefix block up to the buffers' capacity."""
        for bucket in range(QUESTION_BUCKET, CAPTURED_QUESTION_TOKENS + 1, QUESTION_BUCKET):
            graphs = hf.question_prefill(self.model, self.cache, bucket)
            if graphs is not None:
                graphs.capture(self.cache_tokens)
        appender = hf.chunk_append(self.model, self.cache, chunk_tokens)
        if appender is not None:
            appender.capture(self.cache_tokens)
        hf.warm_split_plans(self.model, self.cache, chunk_tokens, hf.cache_capacity(self.cache))

    def _prefill(self, feed: list[int]) -> torch.Tensor:
        """Append a question's tokens to the cache and return the next token's logits.

        With streamchat's attention the tokens are padded to a multiple of QUESTION_BUCKET and the pad
        is cut from the cache straight after: the pad comes after the real tokens, so causal attention
        keeps it out of their results, and a GPU meets a handful of shapes (graphs captured at load)
        instead of a new one per question length (9-13 ms of kernel selection the first time, H200).
        """
        dev = self.loaded.device
        n = len(feed)
        positions = self.cursor.text(n)
        pad = -n % QUESTION_BUCKET
        prefill = hf.question_prefill(self.model, self.cache, n + pad) if self.config.stream_attention else None
        if prefill is None:  # stock attention (for comparisons), the stock cache, a model over several devices
            embeds = hf.embed_tokens(self.model, torch.tensor(feed, device=dev))
            return hf.lm_head(self.model, hf.lm_forward(self.model, embeds, positions, self.cache))
        ids = torch.tensor(feed + [self.vocab.im_end] * pad)
        positions = torch.cat([positions, text_positions(self.cursor.next_pos, pad)], dim=1)
        return prefill.run(ids, positions, n)

    @torch.inference_mode()
    def ask(self, question: str, on_token: Callable[[int], None] | None = None, max_new_tokens: int | None = None) -> Answer:
        """Answer on top of the cache; then roll back (history=drop) or keep the turn (history=keep)."""
        dev = self.loaded.device
        max_new = max_new_tokens or self.config.max_new_tokens
        hf.use_stream_attention(self.model, self.config.stream_attention)
        reset_peak(dev)
        sync(dev)
        t0 = now()
        q_ids = self.question_ids(question)
        prompt = self.prompt_with(q_ids)
        cache_before = self.cache_tokens
        saved_cursor = self.cursor.copy()
        feed = self.pending + q_ids
        try:
            logits = self._prefill(feed)
            first_logits = logits.detach().cpu()
            decoder = hf.static_decoder(self.model, self.cache) if self.config.static_decode else None
            gen, stamps = greedy_decode(self.model, self.cache, self.cursor, logits, max_new, self.vocab.eos, on_token, decoder)
            sync(dev)
        except BaseException:
            # an interrupted answer (stop, error, Ctrl-C) leaves the stream as it was before the question
            hf.cache_drop_tail(self.cache, self.cache_tokens - cache_before)
            self.cursor = saved_cursor
            raise
        answer = Answer(
            question=question.strip(),
            text=self.vocab.decode(gen),
            token_ids=gen,
            ttft_s=stamps[0] - t0,
            latency_s=stamps[-1] - t0,
            frames_seen=self.frames_seen,
            cache_tokens=cache_before + len(self.pending),
            peak_bytes=gpu_memory(dev)["peak_bytes"],
            first_logits=first_logits,
            prompt=prompt,
        )
        self.turns += 1
        if self.config.history == "drop":
            hf.cache_drop_tail(self.cache, self.cache_tokens - cache_before)
            self.cursor = saved_cursor
        else:
            self.pending = []
            answer_ids = [t for t in gen if t not in self.vocab.eos]
            self.transcript.append(TextSeg(q_ids + answer_ids))
            tail = ([] if gen[-1] in self.vocab.eos else [gen[-1]]) + self.vocab.turn_end
            self.pending = tail
            self.transcript[-1].ids.extend(self.vocab.turn_end)
            self.block_frames = 0
        return answer
