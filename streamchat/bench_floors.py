"""The benchmark's floors: a matrix-product rate and a copy rate measured now, and the model's paper costs.

Floors are paper counts (`Costs`), each max(FLOPs / matmul rate, bytes / copy rate):
  LLM, n new tokens over c cached:  2·P·n + 4·L·H·d·(n·c + n(n+1)/2)   P: matrix weights of the decoder; causal
  lm_head, one row:                 2·V·D
  vision, per 2-frame temporal patch of N patches:
      2·N·(P_embed + P_blocks) + 2·(N/m²)·P_merger + 4·D_vis·((depth − F)·Σ_windows len² + F·N²)
                                    F full-attention blocks see the pair's N patches, the rest their window
                                    (windows of w x w merged tokens, m x m patches each; edge windows shorter)
  bytes read per LLM pass:          (P + V·D)·e + kv·c             weights once, then the KV cache
The copy rate counts bytes read plus bytes written, so a pass that only reads X bytes takes X / rate.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable


def _median_s(fn: Callable[[], object], device, warmup: int, reps: int) -> float:
    """Median seconds of fn(): CUDA events on the GPU, the host clock on the CPU."""
    import torch

    from .metrics import now, sync

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = now()
            fn()
            times.append(now() - t0)
    return statistics.median(times)


def measure_rates(device, dtype) -> dict:
    """Matrix-product FLOP/s in the run's dtype and copy bytes/s (read + write), measured now on this device."""
    import torch

    cuda = device.type == "cuda"
    n = 8192 if cuda else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    mm_s = _median_s(lambda: a @ b, device, warmup=3, reps=10 if cuda else 5)
    nbytes = (1 << 30) if cuda else (64 << 20)  # far beyond L2 (50 MB on an H100)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = _median_s(lambda: dst.copy_(src), device, warmup=2, reps=10 if cuda else 5)
    del a, b, src, dst
    if cuda:
        torch.cuda.empty_cache()
    return {"matmul_n": n, "matmul_flop_per_s": 2 * n**3 / mm_s, "copy_bytes": nbytes, "copy_bytes_per_s": 2 * nbytes / copy_s}


@dataclass
class Costs:
    """Paper FLOP and byte counts of the model (formulas in the module docstring). Parameter counts are
    the model's own (a vision MLP padded for the GPU's kernels counts at its real width)."""

    llm_linear_params: int  # the decoder's matrix weights (q, k, v, o, gate, up, down), no embedding or head
    vision_params: int  # every weight of the tower (read once per chunk)
    vision_embed_params: int  # the patch embedding's matrix (a 3-D convolution over one patch)
    vision_block_params: int  # the blocks' matrix weights, all blocks
    vision_merger_params: int  # the merger's matrix weights, applied to merged tokens
    vocab: int
    hidden: int
    layers: int
    heads: int
    head_dim: int
    kv_bytes_per_token: int
    vision_hidden: int
    vision_depth: int
    vision_full_blocks: int
    window_merged: int  # a window's side in merged tokens (window_size / merge / patch)
    merge: int
    patch: int
    elt: int

    @classmethod
    def of(cls, model, dtype) -> Costs:
        import torch

        from . import hf

        tc, vc = hf.text_config(model), hf.vision_config(model)
        tower = hf.vision_tower(model)

        def matrices(module) -> int:
            return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)))

        # hf.pad_vision_mlp widens gate/up (rows, with biases) and down (columns) with zeros on a GPU
        pad = sum((b.mlp.gate_proj.out_features - vc.intermediate_size) for b in tower.blocks) * vc.hidden_size
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        elt = torch.empty((), dtype=dtype).element_size()
        return cls(
            llm_linear_params=matrices(hf.language_model(model)),
            vision_params=sum(p.numel() for p in tower.parameters()) - 3 * pad - 2 * pad // vc.hidden_size,
            vision_embed_params=matrices(tower.patch_embed),
            vision_block_params=matrices(tower.blocks) - 3 * pad,
            vision_merger_params=matrices(tower.merger),
            vocab=tc.vocab_size,
            hidden=tc.hidden_size,
            layers=tc.num_hidden_layers,
            heads=tc.num_attention_heads,
            head_dim=head_dim,
            kv_bytes_per_token=2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * elt,
            vision_hidden=vc.hidden_size,
            vision_depth=vc.depth,
            vision_full_blocks=sum(1 for i in getattr(vc, "fullatt_block_indexes", []) if i < vc.depth),
            window_merged=vc.window_size // vc.spatial_merge_size // vc.patch_size,
            merge=vc.spatial_merge_size,
            patch=vc.patch_size,
            elt=elt,
        )

    def llm_flops(self, new: int, context: int) -> float:
        """n new tokens over c cached: every matrix once per token, and causal attention's n*c + n(n+1)/2
        query-key pairs, each 2*d for the scores and 2*d for the values, in every head and layer."""
        return 2 * self.llm_linear_params * new + 4 * self.layers * self.heads * self.head_dim * (new * context + new * (new + 1) / 2)

    def window_pairs(self, height: int, width: int) -> int:
        """Query-key pairs of one windowed block over one temporal patch: the merged grid is cut into
        windows of window_merged x window_merged (the last row and column of windows shorter), each
        window's patches attend to each other."""
        def bands(k: int) -> list[int]:
            full, rest = divmod(k, self.window_merged)
            return [self.window_merged] * full + ([rest] if rest else [])

        mh, mw = height // self.patch // self.merge, width // self.patch // self.merge
        return sum((r * c * self.merge**2) ** 2 for r in bands(mh) for c in bands(mw))

    def vision_flops(self, frames: int, height: int, width: int) -> float:
        """Per 2-frame temporal patch of N patches: the embedding and the blocks' matrices on N rows, the
        merger's on N / merge² rows, and attention: full blocks over all N² pairs, the rest within windows."""
        n = (height // self.patch) * (width // self.patch)
        linear = 2 * n * (self.vision_embed_params + self.vision_block_params) + 2 * (n // self.merge**2) * self.vision_merger_params
        pairs = (self.vision_depth - self.vision_full_blocks) * self.window_pairs(height, width) + self.vision_full_blocks * n * n
        return math.ceil(frames / 2) * (linear + 4 * self.vision_hidden * pairs)

    def pass_bytes(self, context: int) -> float:
        """Bytes one LLM pass reads: the decoder's matrices and the head once, then `context` cached tokens' K and V."""
        return (self.llm_linear_params + self.vocab * self.hidden) * self.elt + self.kv_bytes_per_token * context

    def floor_s(self, flops: float, nbytes: float, rates: dict) -> float:
        return max(flops / rates["matmul_flop_per_s"], nbytes / rates["copy_bytes_per_s"])
