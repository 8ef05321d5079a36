"""The streaming engine: chunks of frames appended to Qwen2.5-VL's KV cache, questions answered on top.

The token layout is streamchat/layout.py's; the cache is streamchat/kvcache.py's, and under a bounded
memory policy (streamchat/memory.py) old pages leave it for the archive and questions bring back the
pages they need. Text that is known but not yet needed (the prompt's head, a kept answer's closing
tokens) waits in `pending` and is prefilled together with the next chunk or question. The `transcript` records every
token and frame in order, so the offline runner can rebuild exactly the prompt a turn saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import hf
from .archive import PageArchive
from .config import SessionConfig
from .context import model_context
from .errors import UserError
from .kvcache import KVCache
from .layout import (  # noqa: F401 - re-exported: the layout's names were the engine's before layout.py
    Segment,
    TextSeg,
    VideoSeg,
    Vocab,
    check_question,
    copy_segments,
    segments_from_json,
    segments_to_json,
)
from .memory import Budget, mean_queries, page_scores, resolve, select_pages
from .metrics import gpu_memory, now, reset_peak, sync
from .models import Loaded
from .pages import PageBook, PageInfo
from .positions import Cursor, temporal_interval, text_positions
from .state import EngineState


class ContextFull(UserError):
    """Exact memory cannot take the next chunk; everything encoded so far stays askable."""


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
    evicted_pages: int = 0  # pages this chunk pushed out of the working set into the archive
    archive_bytes: int = 0  # host + disk bytes of the archive after the chunk
    warning: str | None = None  # something the user should hear of once (a spill that failed: a full disk)


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
    retrieved: list[dict] = field(default_factory=list)  # bounded memory: the archived time spans brought back
    retrieval_s: float = 0.0  # bounded memory: scoring and bringing back pages (inside ttft_s)

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
            "retrieved": self.retrieved,
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
            "retrieved": self.retrieved,
            "retrieval_ms": round(self.retrieval_s * 1000, 3),
        }


RESERVE_MARGIN = 256  # buffer room kept beyond the planned stream, so a longer question rarely moves the buffers
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
        embeds = hf.embed_tokens(model, torch.tensor([out[-1]], device=hf.input_device(model)))
        hidden = hf.lm_forward(model, embeds, cursor.text(1), cache)
        step_logits = hf.lm_head(model, hidden)
        margin(step_logits)
        if emit(int(torch.argmax(step_logits))):
            return out, stamps


def _state_field(name: str) -> property:
    return property(lambda self: getattr(self.state, name), lambda self, value: setattr(self.state, name, value))


class StreamEngine:
    """One stream: encode chunks into the cache, answer questions on a branch, keep or roll back.

    `plan` sizes the cache for the stream and resolves the memory policy; without it the engine is
    exact up to the model's context."""

    def __init__(self, loaded: Loaded, config: SessionConfig, fps: float, *, spill_dir: Path | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.config = config.validate()
        self.fps = fps
        self.spill_dir = spill_dir  # where archive pages spill past --host-kv-budget (a session's folder)
        self.vocab = Vocab(loaded.tokenizer, config.system_prompt)
        vc = hf.vision_config(self.model)
        self.merge = vc.spatial_merge_size
        self.interval = temporal_interval(fps, vc.tokens_per_second, vc.temporal_patch_size)
        tc = hf.text_config(self.model)
        self.max_context = model_context(loaded)
        self.kv_heads = int(tc.num_key_value_heads)
        head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
        self.bytes_per_token = 2 * tc.num_hidden_layers * self.kv_heads * head_dim * loaded.model.dtype.itemsize
        self.budget = Budget("exact", self.max_context, self.max_context, self.max_context, 0, 0)
        # called as hook(chunk_index, frames) when a chunk starts, before any model work (the app shows
        # the frame; tests hold the engine inside a chunk here)
        self.chunk_hook: Callable[[int, np.ndarray], None] | None = None
        self.reset()

    # --- state --------------------------------------------------------------------------------

    planned_frames: int | None = None  # frames the stream will encode in all (plan): sizes an exact cache

    cursor = _state_field("cursor")
    pending = _state_field("pending")
    transcript = _state_field("transcript")
    block_frames = _state_field("block_frames")
    frames_seen = _state_field("frames_seen")
    chunks_encoded = _state_field("chunks_encoded")
    turns = _state_field("turns")

    def reset(self) -> None:
        self.cache = KVCache(self.model)
        self.state = EngineState.start(self.vocab.stream_start())
        self.book = PageBook(PageArchive(self.budget.host_bytes, self.spill_dir, pin=self.loaded.device.type == "cuda"))

    @property
    def bounded(self) -> bool:
        return self.budget.mode == "bounded"

    @property
    def cache_tokens(self) -> int:
        return self.cache.length

    def _answer_room(self) -> int:
        """What a question needs beside the stream at the least: the shortest question (closing the
        video block, one token, opening the answer) and the longest answer. A stream planned with this
        room can always be asked something; a longer question is refused at ask time with the numbers."""
        return self.config.max_new_tokens + len(self.vocab.question("?", block_open=True))

    # --- planning -----------------------------------------------------------------------------

    def pair_tokens(self, height: int, width: int) -> int:
        """Cache tokens of one temporal patch (2 frames) of height x width (resized): the merged grid."""
        vc = hf.vision_config(self.model)
        unit = vc.patch_size * vc.spatial_merge_size
        return (height // unit) * (width // unit)

    def resolve_budget(self, total_frames: int, height: int, width: int) -> Budget:
        """The memory policy resolved for a stream of `total_frames` frames of height x width (resized),
        with no allocation: exact memory that cannot hold the stream, and budgets that cannot work,
        are refused here, before any work (the app checks this before it opens)."""
        per_pair = self.pair_tokens(height, width)
        planned = len(self.pending) + -(-total_frames // 2) * per_pair + self._answer_room()
        self.planned_tokens = planned  # the whole stream, the shortest question and the longest answer
        budget = resolve(self.config.memory, bytes_per_token=self.bytes_per_token, max_context=self.max_context,
                         planned_tokens=planned, chunk_tokens=self.config.chunk_frames // 2 * per_pair,
                         answer_room=self._answer_room() + RESERVE_MARGIN)  # bounded: room for real questions
        if budget.mode == "exact" and planned > budget.working_tokens:
            seconds = total_frames / self.fps
            fit = max((budget.working_tokens - self._answer_room() - len(self.pending)) // per_pair * 2, 0)
            raise UserError(
                f"exact memory cannot hold this stream: {total_frames} frames ({seconds:.0f} s at {self.fps:g} fps, "
                f"{per_pair} tokens a frame pair) need {planned:,} cache tokens, over the limit of {budget.working_tokens:,} "
                f"(model context {self.max_context:,}, --gpu-kv-budget {self.config.memory.gpu_kv_budget}); about {fit} frames fit. "
                f"Use --memory bounded (or auto), a lower --fps, --max-pixels, --max-frames or --duration"
            )
        return budget

    @torch.inference_mode()
    def plan(self, total_frames: int, height: int, width: int) -> Budget:
        """Resolve the memory policy (`resolve_budget`), size the cache for the stream (the whole video,
        or the GPU budget when bounded) before the first chunk, and on a GPU prepare everything tied to
        the cache's buffers: the question and chunk graphs, cuDNN's plans for every prefix block, the
        vision tower's graph. Buffers that never move keep all of it valid, and it is paid at load
        (about 1 s for the 3B model, H200), not in the first chunks."""
        vc = hf.vision_config(self.model)
        chunk_tokens = self.config.chunk_frames // 2 * self.pair_tokens(height, width)
        self.budget = self.resolve_budget(total_frames, height, width)
        planned = self.planned_tokens
        self.book.archive.host_budget = self.budget.host_bytes
        self.planned_frames = total_frames if self.budget.mode == "exact" else None
        if self.bounded:
            self.book.reserve(-(-total_frames // 2), hf.text_config(self.model), self.loaded.device)
        tokens = min(planned + RESERVE_MARGIN, self.max_context + RESERVE_MARGIN) if self.budget.mode == "exact" else self.budget.gpu_tokens
        self.cache.reserve(tokens)
        if self.loaded.device.type == "cuda":
            self._prepare_buffers(chunk_tokens)
            patch = vc.patch_size
            grid = torch.tensor([[self.config.chunk_frames // vc.temporal_patch_size, height // patch, width // patch]])
            pixels = (int(grid.prod()), vc.in_channels * vc.temporal_patch_size * patch * patch)
            graph = hf.vision_graph(self.model, grid, pixels, self.cache.graphs)
            if graph is not None:
                graph.run()  # captured now, replayed per chunk
        return self.budget

    @torch.inference_mode()  # no autograd graph may hold the capture's activations
    def _prepare_buffers(self, chunk_tokens: int) -> None:
        """Everything tied to the cache's buffers, done now for chunks of `chunk_tokens` tokens: the
        question graphs for the common lengths (longer ones are captured on first use), the chunk
        graphs, and cuDNN's plans for every prefix block up to the buffers' capacity."""
        table = self.cache.graphs
        for bucket in range(QUESTION_BUCKET, CAPTURED_QUESTION_TOKENS + 1, QUESTION_BUCKET):
            graphs = hf.question_prefill(self.model, self.cache.hf, bucket, table)
            if graphs is not None:
                graphs.capture(self.cache_tokens)
        appender = hf.chunk_append(self.model, self.cache.hf, chunk_tokens, table)
        if appender is not None:
            appender.capture(self.cache_tokens)
        hf.warm_split_plans(self.model, self.cache.hf, chunk_tokens, self.cache.capacity)

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
        pixels, grid = prepared if prepared is not None else self.preprocess(frames)
        t_count, gh, gw = (int(x) for x in grid[0])
        h, w = gh // self.merge, gw // self.merge
        if not self.pending or self.pending[-1] != self.vocab.vision_start:
            if self.block_frames == 0 and self.cursor.block_start is None:
                self._add_pending(self.vocab.video_turn_open())  # history=keep after a turn
        incoming = len(self.pending) + t_count * h * w
        evicted = self._make_room(incoming) if self.bounded else 0
        if not self.bounded and self.cache_tokens + incoming + self._answer_room() > self.budget.working_tokens:
            raise ContextFull(
                f"exact memory is full: {self.cache_tokens:,} cache tokens hold frames 0-{self.frames_seen - 1} "
                f"(up to {timestamps[0]:.1f} s) and the next chunk needs {incoming:,} more, over the limit of "
                f"{self.budget.working_tokens:,} tokens; what is encoded stays askable. Use --memory bounded to go on"
            )
        if self.chunk_hook is not None:
            self.chunk_hook(self.chunks_encoded, frames)
        dev = self.loaded.device
        hf.use_stream_attention(self.model, self.config.stream_attention)
        sync(self.loaded.devices)
        t0 = now()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if dev.type == "cuda" else None
        if marks:
            marks[0].record()
        graphs = self.cache.graphs if dev.type == "cuda" else None
        video = hf.embed_video(self.model, pixels, grid, graphs)  # [t*h*w, D]
        if marks:  # an event, not a sync: the GPU goes straight on to the language model
            marks[1].record()
        vision_s = now() - t0
        text_ids = self.pending
        parts, positions = [], []
        if text_ids:
            parts.append(hf.embed_tokens(self.model, torch.tensor(text_ids, device=dev)))
            positions.append(self.cursor.text(len(text_ids)))
        parts.append(video.unsqueeze(0).to(parts[0].dtype if parts else video.dtype))
        video_pos = self.cursor.video(t_count, h, w, self.interval)
        positions.append(video_pos)
        appender = None
        if not text_ids and self.config.stream_attention:
            appender = hf.chunk_append(self.model, self.cache.hf, video.shape[0], self.cache.graphs)
        if appender is not None:  # a chunk of video tokens only: the layers as CUDA graphs
            appender.run(parts[0], positions[0], video.shape[0])
        else:
            hf.lm_forward(self.model, torch.cat(parts, dim=1), torch.cat(positions, dim=1), self.cache.hf)
        n_real = len(frames) - (1 if padded else 0)
        if self.planned_frames:
            # the whole video's cache at once: buffers that never move keep the decode graph and cuDNN's
            # plans valid, and the peak is what the finished cache needs anyway
            pairs_left = -(-max(self.planned_frames - (first + n_real), 0) // 2)
            need = self.cache_tokens + pairs_left * h * w + self._answer_room() + RESERVE_MARGIN
            if self.cache.reserve(min(need, self.max_context + RESERVE_MARGIN)) and dev.type == "cuda":
                self._prepare_buffers(video.shape[0])  # new buffers (a restored snapshot, say)
        plan = list(range(first, first + n_real)) + ([first + n_real - 1] if padded else [])
        self._note_chunk(len(text_ids), plan, t_count, h * w, timestamps, video_pos)
        sync(self.loaded.devices)
        encode_s = now() - t0
        if marks:
            vision_s = marks[0].elapsed_time(marks[1]) / 1000  # GPU time from the chunk's start to the tower's end

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
            cache_bytes=self.cache.nbytes,
            encode_s=encode_s,
            vision_s=vision_s,
            memory=gpu_memory(self.loaded.devices),
            evicted_pages=evicted,
            archive_bytes=self.book.archive.host_bytes + self.book.archive.disk_bytes,
            warning=self.book.archive.news(),
        )
        self.chunks_encoded += 1
        return stats

    def _note_chunk(self, text_tokens: int, plan: list[int], t_count: int, per_page: int, timestamps, video_pos) -> None:
        """Record the chunk's rows as spans (its text, then one page per temporal patch); under bounded
        memory also each page's retention score and mean pre-RoPE key."""
        self.cache.note(text_tokens)
        first_id = len(self.book.pages)
        stamps = [float(t) for t in timestamps]
        infos = []
        for k in range(t_count):
            a, b = plan[2 * k], plan[2 * k + 1]
            if len(stamps) == len(plan):
                t0, t1 = stamps[2 * k], stamps[2 * k + 1]
            else:  # chunk bounds only: spread the pages evenly
                t0 = stamps[0] + (stamps[-1] - stamps[0]) * (2 * k) / max(len(plan) - 1, 1)
                t1 = stamps[0] + (stamps[-1] - stamps[0]) * (2 * k + 1) / max(len(plan) - 1, 1)
            infos.append(PageInfo(first_id + k, (a, b), t0, t1, per_page))
            self.cache.note(per_page, first_id + k)
        if not self.bounded:
            self.book.pages.extend(infos)
            return
        end = self.cache_tokens
        keys, values = self.cache.stacked(end - t_count * per_page, end, self.loaded.device)  # [L, H_kv, T*N, Dh], rotated
        cos, sin = hf.rotary(self.model, video_pos, keys)
        keys = hf.unrotate(keys, cos, sin)
        shape = (keys.shape[0], keys.shape[1], t_count, per_page, keys.shape[-1])
        self.book.add(infos, keys.view(shape), values.view(shape))

    def _make_room(self, incoming: int) -> int:
        """Bounded memory: archive pages until `incoming` more tokens fit the working set. The pages
        outside the recent window go first, lowest retention score first (older on ties); then, if
        that is not enough, the oldest pages of the window. Returns the pages archived."""
        over = self.cache_tokens + incoming - self.budget.working_tokens
        if over <= 0:
            return 0
        starts = {s.page: (start, s.tokens) for start, s in zip(self.cache.starts(), self.cache.spans) if s.page is not None}
        newest_first = sorted(starts, reverse=True)
        window, used = set(), 0
        for page in newest_first:
            if used + starts[page][1] > self.budget.window_tokens:
                break
            window.add(page)
            used += starts[page][1]
        older = sorted((p for p in starts if p not in window), key=lambda p: (self.book.scores[p], p))
        order = older + sorted(window)
        leaving, freed = [], 0
        for page in order:
            if freed >= over:
                break
            leaving.append(page)
            freed += starts[page][1]
        for page in leaving:
            start, n = starts[page]
            self.book.archive.put(page, *self.cache.stacked(start, start + n, self.loaded.device))
        self.cache.drop_pages(set(leaving))
        return len(leaving)

    @torch.inference_mode()
    def evict_to(self, tokens: int, retrieve_tokens: int | None = None) -> int:
        """Bounded memory: shrink the working set to `tokens` now, archiving pages as a chunk would, and
        keep that limit (tools and tests: a stream encoded whole, then bounded). Returns the pages archived."""
        if not self.bounded:
            raise UserError("evict_to needs a stream encoded under bounded memory (pages need their index)")
        b = self.budget
        retrieve = b.retrieve_tokens if retrieve_tokens is None else retrieve_tokens
        self.budget = Budget("bounded", b.gpu_tokens, tokens, min(b.window_tokens, tokens), retrieve, b.host_bytes)
        return self._make_room(0)

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
        saved = (self.cache, self.state, self.book, self.budget, self.chunk_hook, self.planned_frames, self.config.history)
        try:
            self.chunk_hook = None
            self.planned_frames = None
            self.config.history = "drop"
            self.budget = Budget("exact", self.max_context, self.max_context, self.max_context, 0, 0)
            self.reset()
            if frames is None:
                frames = np.zeros((2, 56, 56, 3), dtype=np.uint8)
            self.encode(frames[:2], 0)
            self.ask("warm up", max_new_tokens=3)
        finally:
            (self.cache, self.state, self.book, self.budget, self.chunk_hook, self.planned_frames, self.config.history) = saved

    # --- questions ----------------------------------------------------------------------------

    def question_ids(self, question: str) -> list[int]:
        """The tokens a question adds after the transcript: close the block (or open a text turn), ask."""
        q = check_question(question)
        if self.block_frames:
            block_open = True
        elif self.cursor.block_start is None and (not self.pending or self.pending[-1] != self.vocab.vision_start):
            block_open = False  # history=keep, no new frames since the last answer
        else:
            raise UserError("no frames are encoded yet; wait for the first chunk (or ask with a later --at)")
        ids = self.vocab.question(q, block_open=block_open)
        limit = self.budget.gpu_tokens if self.bounded else self.budget.working_tokens
        room = min(limit, self.max_context) - self.cache_tokens - len(self.pending) - self.config.max_new_tokens - self.budget.retrieve_tokens
        if len(ids) > room:
            raise UserError(
                f"the question is {len(ids)} tokens but only {max(room, 0)} fit beside the cache's {self.cache_tokens:,} tokens "
                f"and a {self.config.max_new_tokens}-token answer (limit {min(limit, self.max_context):,}); "
                + ("ask a shorter question" if room > 0 else "lower --max-new-tokens, or use --memory bounded")
            )
        return ids

    def prompt_with(self, q_ids: list[int]) -> list[Segment]:
        """A copy of the transcript followed by the question's tokens: exactly what a turn sees."""
        return copy_segments(self.transcript) + [TextSeg(list(q_ids))]

    def _prefill(self, feed: list[int], cursor: Cursor, keep_queries: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append a question's tokens to the cache at `cursor`; return the next token's logits and,
        with `keep_queries`, every layer's queries before the rotary embedding [L, H, T, Dh].

        With streamchat's attention the tokens are padded to a multiple of QUESTION_BUCKET and the pad
        is cut from the cache straight after: the pad comes after the real tokens, so causal attention
        keeps it out of their results, and a GPU meets a handful of shapes (graphs captured at load)
        instead of a new one per question length (9-13 ms of kernel selection the first time, H200).
        """
        dev = self.loaded.device
        n = len(feed)
        positions = cursor.text(n)
        pad = -n % QUESTION_BUCKET
        prefill = hf.question_prefill(self.model, self.cache.hf, n + pad, self.cache.graphs) if self.config.stream_attention else None
        if prefill is None:  # stock attention (for comparisons), the stock cache, a model over several devices
            embeds = hf.embed_tokens(self.model, torch.tensor(feed, device=dev))
            if keep_queries:
                return None, hf.question_queries(self.model, embeds, positions, self.cache.hf)
            return hf.lm_head(self.model, hf.lm_forward(self.model, embeds, positions, self.cache.hf)), None
        ids = torch.tensor(feed + [self.vocab.im_end] * pad)
        positions = torch.cat([positions, text_positions(cursor.next_pos, pad)], dim=1)
        prefill.keep_queries = keep_queries
        try:
            logits = prefill.run(ids, positions, n)
        finally:
            prefill.keep_queries = False
        return logits, prefill.queries_before_rope(n) if keep_queries else None

    def _retrieve(self, feed: list[int]) -> list[int]:
        """Bounded memory: score the archived pages against the question's pre-RoPE queries (one pass
        of the question over the working set, rolled back) and append the best ones to the cache."""
        archived = self.book.archived(set(self.cache.pages()))
        if not archived or self.budget.retrieve_tokens <= 0:
            return []
        base = self.cache_tokens
        _, queries = self._prefill(feed, self.cursor.copy(), keep_queries=True)
        self.cache.truncate(base)
        # every page scored in place (no gather of the index), then the archived ones picked out
        scores = page_scores(self.book.index[: len(self.book.pages)], mean_queries(queries, self.kv_heads))
        scores = scores[torch.tensor(archived, device=scores.device)]
        chosen = select_pages(scores, archived, [self.book.pages[p].tokens for p in archived], self.budget.retrieve_tokens)
        pages = [(p, *self.book.archive.get(p)) for p in chosen]
        self.cache.append_pages(pages, self.loaded.device)
        return chosen

    @torch.inference_mode()
    def ask(self, question: str, on_token: Callable[[int], None] | None = None, max_new_tokens: int | None = None) -> Answer:
        """Answer on top of the cache; then roll back (history=drop) or keep the turn (history=keep).
        Under bounded memory the archived pages that best match the question join the cache first."""
        max_new = max_new_tokens or self.config.max_new_tokens
        hf.use_stream_attention(self.model, self.config.stream_attention)
        reset_peak(self.loaded.devices)
        sync(self.loaded.devices)
        t0 = now()
        q_ids = self.question_ids(question)
        prompt = self.prompt_with(q_ids)
        cache_before = self.cache_tokens
        saved_cursor = self.cursor.copy()
        feed = self.pending + q_ids
        retrieved: list[int] = []
        retrieval_s = 0.0
        try:
            if self.bounded:
                retrieved = self._retrieve(feed)
                sync(self.loaded.devices)
                retrieval_s = now() - t0
            logits, _ = self._prefill(feed, self.cursor)
            first_logits = logits.detach().to("cpu", copy=True)  # a copy: on the CPU the prefill returns its reused buffer
            decoder = hf.static_decoder(self.model, self.cache.hf, self.cache.graphs) if self.config.static_decode else None
            gen, stamps = greedy_decode(self.model, self.cache.hf, self.cursor, logits, max_new, self.vocab.eos, on_token, decoder)
            sync(self.loaded.devices)
        except BaseException:
            # an interrupted answer (stop, error, Ctrl-C) leaves the stream as it was before the question
            self.cache.truncate(cache_before)
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
            peak_bytes=gpu_memory(self.loaded.devices)["peak_bytes"],
            first_logits=first_logits,
            prompt=prompt,
            retrieved=self.book.spans(retrieved),
            retrieval_s=retrieval_s,
        )
        self.turns += 1
        if self.config.history == "drop":
            self.cache.truncate(cache_before)
            self.cursor = saved_cursor
        else:
            if retrieved:
                self.cache.drop_pages(set(retrieved))
            self.cache.note(self.cache_tokens - self.cache.span_tokens)  # the question and the answer so far
            kept, tail = self.vocab.kept_answer(gen)
            self.transcript.append(TextSeg(q_ids + kept))
            self.pending = tail
            self.block_frames = 0
        return answer
