"""Qwen2.5-VL M-RoPE position ids, computed by streamchat itself (the reference rule, qwen25vl.md).

Every token has a (t, h, w) position. Text gets (p, p, p) with p rising by one. A video block of
merged grid (T, H, W) that starts at running position s gets, for temporal patch k, row i, column j:

    t = s + floor(k * tokens_per_second * second_per_grid_t),  h = s + i,  w = s + j

with second_per_grid_t = temporal_patch_size / fps. Text after the block resumes at the largest
position used so far + 1. This is Qwen's own rule and vLLM's; transformers 5.x deviates (it resumes
at s + max(H, W) and truncates fractional intervals), which is why we never let it compute positions.

The arithmetic is exact (`Fraction`), so k * interval never lands just below an integer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch


def temporal_interval(fps: float, tokens_per_second: float, temporal_patch_size: int = 2) -> Fraction:
    """Position units per temporal patch: tokens_per_second * temporal_patch_size / fps."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    fps_q = Fraction(str(fps)).limit_denominator(1_000_000)
    return Fraction(str(tokens_per_second)) * temporal_patch_size / fps_q


def text_positions(start: int, n: int) -> torch.Tensor:
    """[3, n]: (p, p, p) for p in start..start+n-1."""
    return torch.arange(start, start + n, dtype=torch.long).view(1, -1).expand(3, -1).clone()


def video_positions(s: int, k0: int, t_count: int, h: int, w: int, interval: Fraction) -> torch.Tensor:
    """[3, t_count*h*w] for temporal patches k0..k0+t_count-1 of a block starting at s (merged grid h x w)."""
    t_vals = torch.tensor([s + math.floor(k * interval) for k in range(k0, k0 + t_count)], dtype=torch.long)
    t_idx = t_vals.view(-1, 1, 1).expand(t_count, h, w)
    h_idx = (s + torch.arange(h, dtype=torch.long)).view(1, -1, 1).expand(t_count, h, w)
    w_idx = (s + torch.arange(w, dtype=torch.long)).view(1, 1, -1).expand(t_count, h, w)
    return torch.stack([t_idx.reshape(-1), h_idx.reshape(-1), w_idx.reshape(-1)])


def video_block_max(s: int, t_count: int, h: int, w: int, interval: Fraction) -> int:
    """Largest position a block of t_count temporal patches uses."""
    return max(s + math.floor((t_count - 1) * interval), s + h - 1, s + w - 1)


@dataclass
class Cursor:
    """Where the next token goes: the running text position and the open video block, if any."""

    next_pos: int = 0  # position of the next text token (largest used so far + 1)
    block_start: int | None = None  # s of the open video block
    block_patches: int = 0  # temporal patches already in the open block
    block_max: int = -1  # largest position used inside the open block

    def text(self, n: int) -> torch.Tensor:
        """Positions for n text tokens; closes an open video block first."""
        self.close_block()
        pos = text_positions(self.next_pos, n)
        self.next_pos += n
        return pos

    def video(self, t_count: int, h: int, w: int, interval: Fraction) -> torch.Tensor:
        """Positions for t_count more temporal patches of the open block (opening one if needed)."""
        if self.block_start is None:
            self.block_start = self.next_pos
            self.block_patches = 0
            self.block_max = self.next_pos - 1
        s, k0 = self.block_start, self.block_patches
        pos = video_positions(s, k0, t_count, h, w, interval)
        self.block_patches += t_count
        self.block_max = max(self.block_max, int(pos.max()))
        return pos

    def close_block(self) -> None:
        if self.block_start is not None:
            self.next_pos = max(self.next_pos, self.block_max + 1)
            self.block_start = None
            self.block_patches = 0
            self.block_max = -1

    def copy(self) -> "Cursor":
        return Cursor(self.next_pos, self.block_start, self.block_patches, self.block_max)
