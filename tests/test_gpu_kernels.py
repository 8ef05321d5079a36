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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("heads,kv_heads,queries,cached", [(28, 4, 37, 20000), (40, 8, 64, 9000), (16, 2, 1, 5000)])
def test_folded_short_block_attention_matches_float32(dtype, heads, kv_heads, queries, cached):
    """A question on a long cache (the 7B's, the 32B's and the 3B's head groups): the cache part through
    flash attention with the grouped heads folded into rows, the block causal, merged by log-sum-exp,
    against the lower-right causal attention written out in float32."""
    from streamchat.hf import attention

    g = torch.Generator(device="cuda").manual_seed(queries)
    q = torch.randn(1, heads, queries, 128, device="cuda", generator=g)
    k = torch.randn(1, kv_heads, cached + queries, 128, device="cuda", generator=g)
    v = torch.randn(1, kv_heads, cached + queries, 128, device="cuda", generator=g)
    out = attention._split_attention(q.to(dtype), k.to(dtype), v.to(dtype), cached, 128**-0.5, flash=True)  # [1, L, H, D]
    kr, vr = (t.to(dtype).float().repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    scores = q.to(dtype).float() @ kr.transpose(-1, -2) * 128**-0.5  # [1, H, L, S]
    allowed = torch.arange(cached + queries, device="cuda").view(1, -1) <= (cached + torch.arange(queries, device="cuda")).view(-1, 1)
    want = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ vr
    err = (out.float().transpose(1, 2) - want).norm() / want.norm()
    assert err < 1e-2, err


def test_training_patchifies_frames_on_the_gpu_as_the_workers_do():
    """`streamchat.train` on a GPU: batch workers send uint8 frames and the processor runs on the GPU;
    the pixel values must be the workers' CPU ones (float32 normalisation, rounding at most)."""
    import tempfile
    from pathlib import Path

    from streamchat import tinyshapes, train
    from streamchat.layout import Vocab

    _, processor = tinyshapes.new_model_and_processor(0, Path(tempfile.mkdtemp()))
    vocab = Vocab(processor.tokenizer, tinyshapes.SYSTEM_PROMPT)
    made = train.make_batch(4, 1, 2, 3, processor, vocab, seconds=(2, 3))
    sent = train.make_batch(4, 1, 2, 3, processor, vocab, seconds=(2, 3), frames_only=True)
    got = train.pixels(sent, processor, torch.device("cuda"))
    assert got.is_cuda and got.shape == made["pixel_values"].shape
    torch.testing.assert_close(got.cpu(), made["pixel_values"], rtol=1e-6, atol=1e-6)
