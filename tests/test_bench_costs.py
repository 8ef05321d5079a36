"""The benchmark's floors (bench.Costs) against FLOPs and bytes counted by hand for tiny-random, and
against torch's own FLOP counter running the model's real forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from streamchat import hf
from streamchat.bench import Costs
from streamchat.positions import text_positions

# tiny-random (streamchat/tiny.py): text D=64, I=128, 2 layers, 4 heads, 2 KV heads, head_dim 16;
# vision D=64, I=128, depth 2 (block 1 full attention), patch 14, temporal patch 2, merge 2, window 112 px
LLM_MATRICES = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)  # q, k, v, o, gate, up, down: 73,728
EMBED = 64 * 3 * 2 * 14 * 14  # Conv3d 3 -> 64 over a 2x14x14 patch: 75,264
BLOCKS = 2 * (64 * 192 + 64 * 64 + 3 * 64 * 128)  # qkv, proj, gate, up, down: 81,920
MERGER = 256 * 256 + 256 * 64  # 4 merged patches x 64 -> 256 -> 64: 81,920
VISION_ALL = EMBED + 2 * (64 * 192 + 192 + 64 * 64 + 64 + 2 * (64 * 128 + 128) + 128 * 64 + 64 + 2 * 64) + MERGER + 256 + 64 + 64


@pytest.fixture(scope="module")
def costs(tiny):
    return Costs.of(tiny.model, torch.float32)


def test_parameter_counts_are_the_hand_counted_ones(costs):
    assert (costs.llm_linear_params, costs.vision_embed_params, costs.vision_block_params, costs.vision_merger_params) == (
        73_728, 75_264, 81_920, 81_920) == (LLM_MATRICES, EMBED, BLOCKS, MERGER)
    assert costs.vision_params == VISION_ALL == 240_896
    assert costs.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4 == 512  # K and V, 2 layers, 2 KV heads, 16 wide, float32
    assert (costs.window_merged, costs.merge, costs.patch, costs.vision_full_blocks) == (4, 2, 14, 1)


def test_llm_flops_count_every_matrix_and_every_causal_pair(costs):
    n, c = 3, 10
    pairs = sum(c + i + 1 for i in range(n))  # query i sees the cache and the new tokens up to itself: 36
    by_hand = 2 * LLM_MATRICES * n + 2 * 4 * pairs * (2 * 16 + 2 * 16)  # layers x heads x pairs x (QK^T + PV)
    assert costs.llm_flops(n, c) == by_hand == 460_800
    assert costs.llm_flops(1, 0) == 2 * LLM_MATRICES + 2 * 4 * 64  # one token attends to itself


def test_llm_matrix_flops_match_torchs_counter_on_the_real_forward(tiny, costs):
    n = 7
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        hf.lm_forward(tiny.model, hf.embed_tokens(tiny.model, torch.arange(n)), text_positions(0, n), hf.new_cache(tiny.model))
    counts = {str(op): f for op, f in counter.get_flop_counts()["Global"].items()}
    rotary = 2 * 3 * 8 * n  # the M-RoPE tables: inv_freq [3, 8, 1] @ positions [3, 1, n], an outer product as a bmm
    assert counts.pop("aten.bmm") == rotary
    assert sum(counts.values()) == 2 * costs.llm_linear_params * n  # the linear layers; attention has no counter on the CPU


@pytest.mark.parametrize("height,width", [(112, 112), (140, 112), (252, 196)])
def test_vision_flops_match_the_towers_real_work(tiny, costs, height, width):
    """Matrices from torch's FLOP counter over the tower's real forward; attention pairs from the window
    bounds transformers itself computes for the grid; and one case counted fully by hand."""
    from transformers.vision_utils import get_vision_window_index

    hf.use_stream_attention(tiny.model, True)
    frames = np.random.default_rng(0).integers(0, 255, (4, height, width, 3), dtype=np.uint8)
    pixels, grid = hf.video_pixels(tiny.processor, frames)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        hf.embed_video(tiny.model, pixels, grid)
    counts = {str(op): f for op, f in counter.get_flop_counts()["Global"].items()}
    matrices = counts["aten.convolution"] + counts["aten.addmm"]
    vc = tiny.model.config.vision_config
    _, cu_window = get_vision_window_index(grid, spatial_merge_size=2, window_size=vc.window_size, patch_size=14)
    lengths = (cu_window[1:] - cu_window[:-1]).tolist()
    n = (height // 14) * (width // 14)
    pairs = sum(x * x for x in lengths) + 2 * n * n  # window block over both temporal patches, full block per patch
    assert costs.vision_flops(4, height, width) == matrices + 4 * 64 * pairs
    assert costs.window_pairs(height, width) * 2 == sum(x * x for x in lengths)
    if (height, width) == (140, 112):
        # 10 x 8 patches = 80; merged 5 x 4: windows of 4x4 and 1x4 merged tokens = 64 and 16 patches
        per_pair = 2 * 80 * (EMBED + BLOCKS) + 2 * 20 * MERGER + 4 * 64 * ((64**2 + 16**2) + 80**2)
        assert costs.vision_flops(4, height, width) == 2 * per_pair == 62_357_504


def test_pass_bytes_and_floor(costs):
    # every decoder matrix and the head (V x D) once in float32, then the K and V of 100 cached tokens
    assert costs.pass_bytes(100) == (LLM_MATRICES + 384 * 64) * 4 + 512 * 100
    rates = {"matmul_flop_per_s": 1e6, "copy_bytes_per_s": 1e6}
    assert costs.floor_s(2e6, 1e6, rates) == 2.0 and costs.floor_s(1e6, 3e6, rates) == 3.0


def test_padded_vision_mlp_counts_at_its_real_width(tiny):
    import copy

    model = copy.deepcopy(tiny.model)
    before = Costs.of(model, torch.float32)
    assert hf.pad_vision_mlp(model, multiple=96) == 192  # 128 -> 192 zero units per block
    after = Costs.of(model, torch.float32)
    assert after == before
    assert math.isclose(after.vision_flops(4, 112, 112), before.vision_flops(4, 112, 112))
