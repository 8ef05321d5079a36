"""The stream's pages (one 2-frame temporal patch each): where and when each one is, its retention
score, its mean pre-RoPE key (the retrieval index, on the GPU) and the archive that holds the pages
no longer in the working set."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .archive import PageArchive
from .memory import retention_scores


@dataclass
class PageInfo:
    id: int
    frames: tuple[int, int]  # plan positions of its two frames (a padded pair repeats the last)
    t_start_s: float
    t_end_s: float
    tokens: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "PageInfo":
        return cls(int(d["id"]), tuple(d["frames"]), float(d["t_start_s"]), float(d["t_end_s"]), int(d["tokens"]))


@dataclass
class PageBook:
    archive: PageArchive
    pages: list[PageInfo] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # retention score per page
    index: torch.Tensor | None = None  # [capacity, L, H_kv, Dh] float32: mean pre-RoPE key per page
    last_keys: torch.Tensor | None = None  # [L, H_kv, N, Dh]: the newest page's pre-RoPE keys

    def reserve(self, pages: int, text_config, device) -> None:
        """Room in the index for a stream of `pages` pages, allocated once (it grows only past that)."""
        if self.index is not None and self.index.shape[0] >= pages:
            return
        dh = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads)
        shape = (pages, text_config.num_hidden_layers, text_config.num_key_value_heads, dh)
        grown = torch.zeros(shape, dtype=torch.float32, device=device)
        if self.index is not None:
            grown[: len(self.pages)] = self.index[: len(self.pages)]
        self.index = grown

    def add(self, infos: list[PageInfo], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Pages appended to the stream, with their pre-RoPE keys and values [L, H_kv, P, N, Dh]."""
        previous = self.last_keys if self.last_keys is not None and self.last_keys.shape == keys[:, :, 0].shape else None
        self.scores.extend(float(s) for s in retention_scores(keys, values, previous))
        means = keys.float().mean(dim=3).permute(2, 0, 1, 3)  # [P, L, H_kv, Dh]
        n = len(self.pages)
        if self.index is None or self.index.shape[0] < n + len(infos):
            grown = torch.zeros((max(64, 2 * (n + len(infos))),) + tuple(means.shape[1:]), dtype=torch.float32, device=means.device)
            if self.index is not None:
                grown[:n] = self.index[:n]
            self.index = grown
        self.index[n : n + len(infos)] = means
        self.pages.extend(infos)
        self.last_keys = keys[:, :, -1].clone()

    def archived(self, exclude: set[int]) -> list[int]:
        """Archived page ids not in `exclude` (the ones in the working set), in stream order."""
        return sorted(p for p in self.archive.pages if p not in exclude)

    def spans(self, ids: list[int]) -> list[dict]:
        """Time spans covered by pages `ids`, runs of consecutive pages merged."""
        out: list[dict] = []
        for i in sorted(ids):
            p = self.pages[i]
            if out and out[-1]["last_page"] == i - 1:
                out[-1].update(last_page=i, t_end_s=p.t_end_s, frame_last=p.frames[1])
            else:
                out.append({"first_page": i, "last_page": i, "t_start_s": p.t_start_s, "t_end_s": p.t_end_s,
                            "frame_first": p.frames[0], "frame_last": p.frames[1]})
        return [{**s, "t_start_s": round(s["t_start_s"], 3), "t_end_s": round(s["t_end_s"], 3)} for s in out]
