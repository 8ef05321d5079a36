"""Same-function rewrites of the model's layers for the GPU: padded vision MLP, fused norms,
fused projections, the vision rotary through a Triton kernel."""

from __future__ import annotations

import torch


def pad_vision_mlp(model, multiple: int = 64) -> int:
    """Widen the vision MLP's hidden layer to a multiple of `multiple` with zero weights; returns the new width.

    Qwen2.5-VL's vision MLP is 3420 wide, not a multiple of 8, so cuBLAS cannot use Hopper's kernels
    for it (H200: 234 TFLOP/s at 3420 against 633-680 at 3424-3456, `scripts/attn_probe.py`). The extra
    units have zero gate, up and down weights and zero biases: silu(0) * 0 = 0 adds nothing, so the
    function is unchanged. The config keeps the real width (snapshots and fingerprints see no change).
    """
    width = 0
    for block in model.model.visual.blocks:
        mlp = block.mlp
        width = mlp.gate_proj.out_features
        extra = -width % multiple
        if not extra:
            continue
        with torch.no_grad():
            for name in ("gate_proj", "up_proj"):
                lin = getattr(mlp, name)
                new = torch.nn.Linear(lin.in_features, width + extra, bias=lin.bias is not None,
                                      device=lin.weight.device, dtype=lin.weight.dtype)
                new.weight.zero_()
                new.weight[:width].copy_(lin.weight)
                if lin.bias is not None:
                    new.bias.zero_()
                    new.bias[:width].copy_(lin.bias)
                setattr(mlp, name, new)
            down = mlp.down_proj
            new = torch.nn.Linear(width + extra, down.out_features, bias=down.bias is not None,
                                  device=down.weight.device, dtype=down.weight.dtype)
            new.weight.zero_()
            new.weight[:, :width].copy_(down.weight)
            if down.bias is not None:
                new.bias.copy_(down.bias)
            mlp.down_proj = new
        width += extra
    return width


def _fused_norm_class():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    class FusedRMSNorm(Qwen2_5_VLRMSNorm):
        """The same RMSNorm through torch's one-kernel `rms_norm` (float32 inside, like the stock one).

        The stock forward is 7 kernels over float32 copies; on a 720p chunk the vision tower's 64 norms
        moved ~40 GB. The weight is applied before the cast back to bf16 instead of after: a rounding
        difference, not a different function."""

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)

    return Qwen2_5_VLRMSNorm, FusedRMSNorm


def fuse_rms_norms(model) -> int:
    """Switch every RMSNorm of `model` to `FusedRMSNorm` in place; returns how many were switched."""
    stock, fused = _fused_norm_class()
    count = 0
    for module in model.modules():
        if type(module) is stock:
            module.__class__ = fused
            count += 1
    return count


_STOCK_VISION_ROTARY: list = []


def _vision_rotary(q, k, cos, sin):
    """apply_rotary_pos_emb_vision through one Triton kernel per tensor on a GPU (stock: 7 kernels over
    float32 copies per tensor, ~20 of a 720p chunk's 64 vision GPU-ms on an H200); the stock code elsewhere."""
    if q.is_cuda:
        from .. import kernels

        return kernels.rotary_vision(q, cos, sin), kernels.rotary_vision(k, cos, sin)
    return _STOCK_VISION_ROTARY[0](q, k, cos, sin)


def use_fast_vision_rotary() -> None:
    """Route the vision tower's rotary embedding through `_vision_rotary` (needs Triton; process-wide)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    from .. import kernels

    if not _STOCK_VISION_ROTARY and kernels.available():
        _STOCK_VISION_ROTARY.append(m.apply_rotary_pos_emb_vision)
        m.apply_rotary_pos_emb_vision = _vision_rotary


def fuse_projections(model) -> None:
    """Lay each text layer's q/k/v weights (and biases) out as one tensor, and gate/up as another, with
    the modules' weights becoming views into them: no extra memory, the modules compute as before, and
    the decode step and question graphs make one matrix-vector product where they made three (two).
    """
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if getattr(attn, "_streamchat_qkv", None) is None:
                projs = (attn.q_proj, attn.k_proj, attn.v_proj)
                w = torch.cat([p.weight for p in projs])
                b = torch.cat([p.bias for p in projs])
                start = 0
                for p in projs:
                    rows = p.weight.shape[0]
                    p.weight = torch.nn.Parameter(w[start : start + rows], requires_grad=False)
                    p.bias = torch.nn.Parameter(b[start : start + rows], requires_grad=False)
                    start += rows
                attn._streamchat_qkv = (w, b)
            if getattr(mlp, "_streamchat_gate_up", None) is None:
                w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                rows = mlp.gate_proj.weight.shape[0]
                mlp.gate_proj.weight = torch.nn.Parameter(w[:rows], requires_grad=False)
                mlp.up_proj.weight = torch.nn.Parameter(w[rows:], requires_grad=False)
                mlp._streamchat_gate_up = w


def _qkv(attn, x):
    """q, k, v projections of x [1, T, D], through the fused weights when `fuse_projections` ran."""
    fused = getattr(attn, "_streamchat_qkv", None)
    if fused is None:
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    out = torch.nn.functional.linear(x, fused[0], fused[1])
    nq, nk = attn.q_proj.out_features, attn.k_proj.out_features
    return out[..., :nq], out[..., nq : nq + nk], out[..., nq + nk :]


def _mlp(mlp, x):
    """The gated MLP of x, gate and up in one product when `fuse_projections` ran."""
    fused = getattr(mlp, "_streamchat_gate_up", None)
    if fused is None:
        return mlp(x)
    gu = torch.nn.functional.linear(x, fused)
    rows = mlp.gate_proj.out_features
    return mlp.down_proj(mlp.act_fn(gu[..., :rows]) * gu[..., rows:])


def speed_up(model) -> None:
    """The GPU's same-function rewrites of the model's layers (see `pad_vision_mlp`, `fuse_rms_norms`,
    `_vision_rotary`)."""
    pad_vision_mlp(model)
    fuse_rms_norms(model)
    fuse_projections(model)
    use_fast_vision_rotary()
