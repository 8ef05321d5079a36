"""The engine's KV cache: fixed buffers per layer (on each layer's device), a table of spans saying
what every row holds, and the CUDA graphs tied to the buffers.

A span is a run of rows: text (prompt head, questions, kept turns) or one page, a 2-frame temporal
patch of video (merged grid H x W rows). Rows keep their rotated keys, so their M-RoPE positions are
baked in: spans can be dropped from the middle, or brought back at the end, and attention over them
is the same (attention is order-free over the cache; only the new tokens' causal mask matters).

Graphs and cuDNN plans over the buffers live in `graphs`, a table owned here (never hung on
transformers' objects); when the buffers move, `generation` goes up and the table is emptied, so a
stale graph never outlives its buffers, and dropping the KVCache frees everything by refcount.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hf


@dataclass
class Span:
    tokens: int
    page: int | None = None  # the page id for a video page, None for text

    def to_json(self) -> list:
        return [self.tokens, self.page]


class KVCache:
    def __init__(self, model):
        self.model = model
        self.hf = hf.new_cache(model)  # the object transformers' forward appends to
        self.spans: list[Span] = []
        self.generation = 0
        self._graphs: dict = {}
        self._key: tuple = ()

    # --- sizes ------------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        return hf.cache_len(self.hf)

    @property
    def capacity(self) -> int:
        return hf.cache_capacity(self.hf)

    @property
    def nbytes(self) -> int:
        return hf.cache_bytes(self.hf)

    def reserve(self, tokens: int) -> bool:
        """Room for `tokens` rows in every layer, with no spare; True if the buffers moved."""
        hf.allocate_cache(self.model, self.hf, tokens)
        return self._check_generation()

    def _check_generation(self) -> bool:
        key = hf.buffers_key(self.hf)
        if key == self._key:
            return False
        self._key = key
        self.generation += 1
        self._graphs = {}
        return True

    @property
    def graphs(self) -> dict:
        """The graph table for the current buffers (emptied when they moved)."""
        self._check_generation()
        return self._graphs

    # --- spans ------------------------------------------------------------------------------------

    @property
    def span_tokens(self) -> int:
        return sum(s.tokens for s in self.spans)

    def note(self, tokens: int, page: int | None = None) -> None:
        """Record that the last `tokens` rows appended are text (page None) or page `page`."""
        if tokens > 0:
            self.spans.append(Span(tokens, page))

    def starts(self) -> list[int]:
        out, at = [], 0
        for s in self.spans:
            out.append(at)
            at += s.tokens
        return out

    def pages(self) -> list[int]:
        return [s.page for s in self.spans if s.page is not None]

    # --- changing rows ----------------------------------------------------------------------------

    def truncate(self, length: int) -> None:
        """Drop every row from `length` on (and the spans beyond it; a text span may be cut)."""
        hf.cache_drop_tail(self.hf, self.length - length)
        at, kept = 0, []
        for s in self.spans:
            if at >= length:
                break
            kept.append(Span(min(s.tokens, length - at), s.page) if s.page is None else s)
            at += s.tokens
        self.spans = kept

    def rows(self, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return hf.cache_rows(self.hf, start, end)

    def stacked(self, start: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [start, end) of every layer as keys and values [L, H_kv, end - start, Dh] on `device`."""
        rows = self.rows(start, end)
        return torch.stack([k[0].to(device) for k, _ in rows]), torch.stack([v[0].to(device) for _, v in rows])

    def drop_pages(self, pages: set[int]) -> None:
        """Remove the rows of `pages`, moving the rest up in place (the buffers never move)."""
        keep, kept_spans = [], []
        for start, s in zip(self.starts(), self.spans):
            if s.page is not None and s.page in pages:
                continue
            keep.append(torch.arange(start, start + s.tokens))
            kept_spans.append(s)
        tail = self.length - self.span_tokens  # rows not yet noted (a question on a branch)
        if tail:
            keep.append(torch.arange(self.span_tokens, self.length))
        hf.cache_keep_rows(self.hf, torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long))
        self.spans = kept_spans

    def append_pages(self, pages: list[tuple[int, torch.Tensor, torch.Tensor]], device) -> None:
        """Append pages (id, keys, values [L, H_kv, N, Dh]) at the end, after every noted span."""
        hf.cache_append_pages(self.hf, [(k, v) for _, k, v in pages], device)
        for page, keys, _ in pages:
            self.note(keys.shape[-2], page)
