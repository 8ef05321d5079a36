"""The GPU speed paths compute the same function: split attention merged by log-sum-exp, the padded
vision MLP. On the CPU they run in plain torch; these tests pin their arithmetic against the stock
computation and, end to end, streaming with the split against the offline path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from streamchat import hf
from streamchat.hf import attention, graphs
from streamchat.compare import run_compare
from streamchat.config import SessionConfig
from streamchat.video import Sampling, VideoSource


def _qkv(n: int, s: int, seed: int, h: int = 4, hk: int = 2, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, h, n, d, generator=g), torch.randn(1, hk, s, d, generator=g), torch.randn(1, hk, s, d, generator=g))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,s", [(1, 9), (7, 23), (12, 12)])
def test_attend_lse_is_sdpa_with_its_log_sum_exp(causal, n, s):
    q, k, v = _qkv(n, s, seed=n * 100 + s)
    out, lse = attention._attend_lse(q, k, v, causal, 0.25)
    mask = causal_lower_right(n, s) if causal else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    assert torch.allclose(out, ref, atol=1e-6)
    # the log-sum-exp by hand, head by head: head h reads KV head h // 2
    scores = torch.einsum("hnd,hsd->hns", q[0], k[0].repeat_interleave(2, dim=0)) * 0.25
    if causal:
        allowed = torch.arange(s).view(1, -1) <= (s - n + torch.arange(n)).view(-1, 1)
        scores = scores.masked_fill(~allowed, float("-inf"))
    assert torch.allclose(lse[0], torch.logsumexp(scores, dim=-1), atol=1e-5)


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("prefix", [8, 16, 40])
def test_split_attention_is_one_lower_right_call(prefix, flash):
    n, s = 12, 52  # 40 cached tokens + 12 new ones
    q, k, v = _qkv(n, s, seed=prefix)
    out = attention._split_attention(q, k, v, prefix, 0.25, flash=flash)  # [1, n, H, D]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, s), scale=0.25, enable_gqa=True)
    assert out.shape == (1, n, 4, 16)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6)


def test_split_applies_only_to_long_appends_on_a_long_cache(monkeypatch):
    monkeypatch.setattr(attention, "SPLIT_ON_CPU", True)
    q = torch.zeros(1, 4, attention.SPLIT_MIN_QUERIES, 16)
    assert attention._split_applies(q, attention.PREFIX_BLOCK)
    assert not attention._split_applies(q, 0)  # the cache is shorter than one block
    assert not attention._split_applies(q[:, :, :1], attention.PREFIX_BLOCK)  # a decode step or a short question
    monkeypatch.setattr(attention, "SPLIT_ON_CPU", False)
    assert not attention._split_applies(q, attention.PREFIX_BLOCK)


def test_fold_applies_only_to_short_blocks_with_grouped_heads_on_a_long_cache(monkeypatch):
    monkeypatch.setattr(attention, "SPLIT_ON_CPU", True)
    cache = attention.FOLD_MIN_PREFIX
    q, k = torch.zeros(1, 4, 30, 16), torch.zeros(1, 2, cache + 30, 16)
    assert attention._fold_applies(q, k)
    assert not attention._fold_applies(q, k[:, :, 1:])  # the cache is one token short
    assert not attention._fold_applies(q, k.repeat(1, 2, 1, 1))  # no grouped heads: nothing to fold
    assert not attention._fold_applies(q[:, :, :1], k[:, :, : cache + 1])  # a decode step: flash folds it itself
    assert not attention._fold_applies(torch.zeros(1, 4, attention.SPLIT_MIN_QUERIES, 16), k)  # a long append splits
    monkeypatch.setattr(attention, "SPLIT_ON_CPU", False)
    assert not attention._fold_applies(q, k)


def _stream_counting_splits(tiny, clip, monkeypatch, **settings) -> list[tuple[int, int, int, bool]]:
    """Stream the clip against offline with `attention` settings patched (split or fold thresholds, on
    the CPU); assert equal answers and return every `_split_attention` call: (queries, keys, prefix, flash)."""
    calls = []
    real = attention._split_attention

    def counted(query, key, value, prefix, scale, flash=False):
        calls.append((query.shape[2], key.shape[2], prefix, flash))
        return real(query, key, value, prefix, scale, flash)

    for name, value in {**settings, "SPLIT_ON_CPU": True, "_split_attention": counted}.items():
        monkeypatch.setattr(attention, name, value)
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=24.0, max_frames=31), chunk_frames=4, max_new_tokens=12)
    report = run_compare(tiny, VideoSource(clip, config.sampling), config, "What is moving?")
    assert report["match"]["identical"] is True
    assert report["match"]["max_logit_diff"] <= 1e-4
    return calls


def test_streaming_with_folded_short_blocks_matches_offline(tiny, clip_24fps, monkeypatch):
    """Chunks and the question are short blocks on a cache past FOLD_MIN_PREFIX (here 40 tokens): the
    cache part of their attention goes through the folded call, and the stream still equals offline."""
    calls = _stream_counting_splits(tiny, clip_24fps, monkeypatch, FOLD_MIN_PREFIX=40)
    assert calls and all(flash for *_, flash in calls)
    assert all(prefix == kv - q >= 40 for q, kv, prefix, _ in calls)  # the whole cache before the block
    assert any(1 < q < 32 for q, _, _, _ in calls)  # the question, not only the chunks


def test_streaming_with_split_attention_matches_offline(tiny, clip_24fps, monkeypatch):
    """Blocks of 32 tokens and appends of 16+ tokens: every chunk after the first and the question split."""
    calls = _stream_counting_splits(tiny, clip_24fps, monkeypatch, PREFIX_BLOCK=32, SPLIT_MIN_QUERIES=16)
    layers = hf.text_config(tiny.model).num_hidden_layers
    assert len(calls) >= 7 * layers  # chunks 2..8 at least
    assert not any(flash for *_, flash in calls)
    assert {prefix % 32 for _, _, prefix, _ in calls} == {0}
    assert all(kv - q - prefix < 32 for q, kv, prefix, _ in calls)  # the tail is less than one block


def test_padded_vision_mlp_is_the_same_function(tiny):
    config = copy.deepcopy(tiny.model.config)
    config.vision_config.intermediate_size = 100  # not a multiple of 64, like the 3B model's 3420
    torch.manual_seed(0)
    model = hf.new_model(config).eval()
    patch = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size**2
    grid = torch.tensor([[2, 4, 6]])
    pixels = torch.randn(int(grid.prod()), patch)
    with torch.inference_mode():
        before = hf.embed_video(model, pixels, grid)
        assert hf.pad_vision_mlp(model) == 128
        after = hf.embed_video(model, pixels, grid)
    assert model.model.visual.blocks[0].mlp.up_proj.out_features == 128
    assert model.config.vision_config.intermediate_size == 100  # the config (and fingerprints) keep the real width
    assert torch.allclose(before, after, atol=1e-6)
    assert hf.pad_vision_mlp(model) == 128  # already aligned: nothing changes


def test_fused_rms_norms_are_the_same_function(tiny):
    config = copy.deepcopy(tiny.model.config)
    torch.manual_seed(1)
    model = hf.new_model(config).eval()
    for module in model.modules():  # non-trivial weights: the default init is all ones
        if hasattr(module, "variance_epsilon"):
            module.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, config.text_config.vocab_size, (1, 9))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        switched = hf.fuse_rms_norms(model)
        after = model(input_ids=ids).logits
    layers = config.text_config.num_hidden_layers
    depth = config.vision_config.depth
    assert switched == 2 * layers + 1 + 2 * depth + 1  # text layers, final norm, vision blocks, merger
    assert torch.allclose(before, after, atol=1e-5)
    assert hf.fuse_rms_norms(model) == 0


def test_fused_projections_stream_equal_to_offline(clip_24fps):
    """q/k/v and gate/up laid out as one tensor each (the GPU's layout): the modules still compute the
    same, and streaming through the fused products (question graphs, decode steps) matches offline."""
    from streamchat.models import load

    loaded = load("tiny-random", device="cpu", dtype="float32")
    layer = loaded.model.model.language_model.layers[0]
    before = [p.clone() for p in (layer.self_attn.k_proj.weight, layer.mlp.up_proj.weight)]
    hf.fuse_projections(loaded.model)
    w, b = layer.self_attn._streamchat_qkv
    assert layer.self_attn.k_proj.weight.data_ptr() == w[layer.self_attn.q_proj.out_features].data_ptr()  # a view
    assert torch.equal(layer.self_attn.k_proj.weight, before[0]) and torch.equal(layer.mlp.up_proj.weight, before[1])
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=24.0, max_frames=15), chunk_frames=4, max_new_tokens=12)
    report = run_compare(loaded, VideoSource(clip_24fps, config.sampling), config, "What is moving?")
    assert report["match"]["identical"] is True
    assert report["match"]["max_logit_diff"] <= 1e-4


def test_vision_graph_tables_give_the_stock_tower(tiny, clip_24fps):
    """VisionGraph's precomputed tables fed to the tower's own forward give the stock embeddings (the
    GPU then captures exactly this forward as a graph)."""
    from streamchat.engine import StreamEngine

    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=24.0), chunk_frames=4)
    engine = StreamEngine(tiny, config, fps=24.0)
    frames = VideoSource(clip_24fps, config.sampling).read(0, 4)
    pixels, grid = engine.preprocess(frames)
    with torch.inference_mode():
        stock = hf.embed_video(tiny.model, pixels, grid)
        graph = hf.VisionGraph(tiny.model, grid, pixels.shape)
        got = graph.run(pixels)
        again = graph.run(pixels)
    assert torch.equal(got, stock) and torch.equal(again, stock)
    assert graph.kwargs["window_index"].shape[0] == stock.shape[0]


def test_chunk_appends_through_the_layer_segments_match_offline(tiny, clip_24fps, monkeypatch):
    """The GPU appends pure-video chunks through QuestionPrefill's segments (as CUDA graphs); on the CPU
    the same segments run eagerly: the stream still equals the offline path."""
    runs = []
    real = hf.QuestionPrefill.run

    def counted(self, ids, positions, n_real):
        runs.append((self.chunk, n_real))
        return real(self, ids, positions, n_real)

    monkeypatch.setattr(graphs, "SEGMENTS_ON_CPU", True)
    monkeypatch.setattr(hf.QuestionPrefill, "run", counted)
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=24.0, max_frames=31), chunk_frames=4, max_new_tokens=12)
    report = run_compare(tiny, VideoSource(clip_24fps, config.sampling), config, "What is moving?")
    assert report["match"]["identical"] is True
    assert report["match"]["max_logit_diff"] <= 1e-4
    assert runs.count((True, 32)) == 7  # chunks 2..8 (the first also carries the prompt's text)
    assert (False, runs[-1][1]) == runs[-1]  # and the question


@pytest.mark.parametrize("parts", [2, 4])
def test_prefix_keys_in_parts_merge_to_one_call(parts, monkeypatch):
    monkeypatch.setattr(attention, "SPLIT_ON_CPU", True)
    monkeypatch.setattr(attention, "KEY_PARTS", parts)
    q, k, v = _qkv(9, 24, seed=parts)
    out, lse = attention._attend_lse(q, k, v, False, 0.25)
    ref_out, ref_lse = attention._attend_lse_one(q, k, v, False, 0.25)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(lse, ref_lse, atol=1e-5)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True), atol=1e-6)


def test_vision_graph_makes_its_window_tables_before_capture(tiny, monkeypatch):
    """A float32 or float16 tower on a GPU takes the windowed path of `_window_sdpa`, whose index tables
    copy device->host and host->device: inside a CUDA graph capture that is the error `compare --dtype
    float32` died of ("Cannot copy between CPU and CUDA tensors during CUDA graph capture"). The graph's
    sequence here is the GPU's: one warm run, then the captured run, in which every such copy fails."""
    import numpy as np

    hf.use_stream_attention(tiny.model, True)
    frames = np.random.default_rng(0).integers(0, 255, (4, 112, 112, 3), dtype=np.uint8)
    pixels, grid = hf.video_pixels(tiny.processor, frames)
    vision = graphs.VisionGraph(tiny.model, grid, pixels.shape)
    vision.pixels.copy_(pixels)
    with torch.inference_mode():
        warm = vision.forward()  # _warm_on_side_stream's run

        def refused(*args, **kwargs):
            raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture unless the CPU tensor is pinned")

        with monkeypatch.context() as m:  # the capture: no host<->device copy may happen
            m.setattr(torch.Tensor, "tolist", refused)
            m.setattr(torch, "tensor", refused)
            captured = vision.forward()
    assert torch.equal(captured, warm)
    assert len(vision.window_groups) == 2 and all(len(g) >= 1 for g in vision.window_groups)
    with torch.inference_mode():
        stock = torch.cat(tiny.model.model.get_video_features(pixels, grid).pooler_output)
    assert float((captured - stock).abs().max()) <= 1e-5
