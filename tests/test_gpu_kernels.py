"""streamchat's Triton kernels against the torch code they replace. GPU only: skipped on the CPU (CI);
run on a GPU machine with `pytest tests/test_gpu_kernels.py`."""

from __future__ import annotations

import pytest
import torch

from streamchat import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs a CUDA GPU and Triton")


@pytest.mark.parametrize("tokens,heads,dim", [(9568, 16, 80), (37, 3, 80), (100, 4, 64)])
def test_rotary_vision_matches_the_stock_float32_arithmetic(tokens, heads, dim):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    from streamchat.hf import rewrites

    stock = rewrites._STOCK_VISION_ROTARY[0] if rewrites._STOCK_VISION_ROTARY else apply_rotary_pos_emb_vision
    g = torch.Generator(device="cuda").manual_seed(tokens)
    # q and k as the vision attention makes them: strided views into one qkv tensor
    qkv = torch.randn(tokens, 3, heads, dim, device="cuda", generator=g).to(torch.bfloat16)
    q, k, _ = qkv.permute(1, 0, 2, 3).unbind(0)
    angles = torch.rand(tokens, dim // 2, device="cuda", generator=g) * 50
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    ref_q, ref_k = stock(q, k, cos, sin)
    got_q, got_k = kernels.rotary_vision(q, cos, sin), kernels.rotary_vision(k, cos, sin)
    for got, ref in ((got_q, ref_q), (got_k, ref_k)):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        # float32 inside, one bf16 rounding at the end: equal, or one bf16 step apart where an FMA rounds differently
        diff = (got.float() - ref.float()).abs()
        assert float(diff.max()) <= float(ref.float().abs().max()) * 2**-7
        assert float((diff > 0).float().mean()) < 0.01
