"""Every call into transformers internals, in one place (pinned: transformers 5.17.0).

An upgrade should touch this file alone. What 5.17 does that we rely on or work around:
- positions: we always pass explicit (3, B, L) M-RoPE position ids, so `get_rope_index`,
  `compute_3d_position_ids` and the stateful `model.model.rope_deltas` are never used
  (5.x resumes text after a video at s + max(H, W) and truncates fractional intervals; see qwen25vl.md);
- the forward argument is `past_key_values` (5.24 renames it `cache`);
- `DynamicLayer.crop(n)` removes tokens when n is negative; a positive n is the deprecated old meaning;
- a prefilled `DynamicCache` is built with `DynamicCache(ddp_cache_data=[(k, v), ...], config=...)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

TRANSFORMERS_PINNED = "5.17.0"


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def quiet() -> None:
    """Silence transformers' warnings (the CLI's stderr is for one-line errors and the progress bar)."""
    from transformers.utils import logging

    logging.set_verbosity_error()


# --- loading ------------------------------------------------------------------------------------


def load_pretrained(source: str, *, dtype: torch.dtype, device_map: Any, local_only: bool):
    """Load the real model class and processor from a hub id or a local directory."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        source, dtype=dtype, device_map=device_map, local_files_only=local_only, attn_implementation="sdpa"
    )
    processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
    return model, processor


def build_from_config(config, *, dtype: torch.dtype, device: str):
    """A model of `config`'s architecture with random weights (for `random:<arch>`)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def new_model(config):
    """A freshly initialised model of `config` (default init, float32, CPU)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration(config)


def tokenizer_from_dir(path: str):
    """Qwen2's tokenizer class over a local tokenizer.json (5.x: one class, no slow/fast split)."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast.from_pretrained(path)


def qwen25vl_config(**kwargs):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(**kwargs)


def default_processor(tokenizer, chat_template: str | None = None):
    """transformers' Qwen2.5-VL processor around `tokenizer`, with the stock image/video processors."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=chat_template,
    )


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
        from . import kernels

        return kernels.rotary_vision(q, cos, sin), kernels.rotary_vision(k, cos, sin)
    return _STOCK_VISION_ROTARY[0](q, k, cos, sin)


def use_fast_vision_rotary() -> None:
    """Route the vision tower's rotary embedding through `_vision_rotary` (needs Triton; process-wide)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    from . import kernels

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


# --- preprocessing ------------------------------------------------------------------------------


def video_pixels(processor, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise and patchify already-resized uint8 frames [N, H, W, 3] with the real video processor.

    Returns pixel_values [N/2 * gh * gw, C*2*14*14] (float32) and grid_thw [1, 3].
    """
    out = processor.video_processor(
        videos=[frames],
        do_resize=False,  # streamchat resized the frames; both modes see the same pixels
        do_sample_frames=False,
        cap_pixels_per_frame=False,
        return_tensors="pt",
    )
    return out["pixel_values_videos"], out["video_grid_thw"]


def processor_prompt_ids(processor, text: str, videos: list[np.ndarray], fps: float) -> dict:
    """The processor's own output for a rendered prompt and its videos (to check streamchat's layout)."""
    return processor(
        text=[text],
        videos=videos,
        videos_kwargs=dict(fps=fps, do_sample_frames=False, do_resize=False, cap_pixels_per_frame=False),
        return_tensors="pt",
    )


# CUDA graphs are captured in "thread_local" mode: the stream's frame thread pins host memory while the
# engine captures, and the pinned-memory allocator's event queries from that thread would invalidate a
# capture in the default "global" mode (seen on an H200: the decode graph's capture failed at 720p).
CAPTURE_MODE = "thread_local"


# --- forward passes -----------------------------------------------------------------------------


def embed_tokens(model, ids: torch.Tensor) -> torch.Tensor:
    """ids [L] -> embeddings [1, L, D]."""
    return model.model.get_input_embeddings()(ids.view(1, -1))


def embed_video(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """Run the vision tower: pixel patches -> merged video embeddings [tokens, D].

    On a GPU each frame grid's tower runs as one CUDA graph (`VisionGraph`)."""
    graph = vision_graph(model, grid_thw, pixel_values.shape)
    if graph is not None:
        return graph.run(pixel_values)
    out = model.model.get_video_features(pixel_values.to(model.device, non_blocking=True), grid_thw.to(model.device))
    return torch.cat(out.pooler_output, dim=0)


def vision_graph(model, grid_thw: torch.Tensor, pixel_shape) -> "VisionGraph | None":
    """The VisionGraph for one video's grid [1, 3] (made on first use), or None off the GPU or for a
    model spread over several devices."""
    if model.device.type != "cuda" or len(grid_thw) != 1 or getattr(model, "hf_device_map", None) is not None:
        return None
    key = tuple(int(x) for x in grid_thw[0])
    graphs = model.__dict__.setdefault("_streamchat_vision_graphs", {})
    if key not in graphs:
        graphs[key] = VisionGraph(model, grid_thw, pixel_shape)
    return graphs[key]


class VisionGraph:
    """The vision tower for one frame grid: its index tables computed once, then (GPU) one CUDA graph.

    The stock forward recomputes rotary positions, window order and sequence bounds from the grid on
    every call, with host syncs among them, then launches ~30 kernels per block: at 448x448 a chunk's
    tower was ~17 ms of host time for ~5 ms of GPU work (H200). The tables go in as transformers'
    precomputed kwargs, so the tower's own forward runs unchanged, and on a GPU that forward is
    captured once and replayed per chunk with the pixels copied into a fixed input buffer.
    """

    def __init__(self, model, grid_thw: torch.Tensor, pixel_shape) -> None:
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

        vis = model.model.visual
        dev = model.device
        grid = grid_thw.to(dev)
        cu, _ = get_vision_attention_seqlens(grid, vis.config, kwargs={"max_seqlen": 0})
        window_index, cu_window = get_vision_window_index(
            grid, spatial_merge_size=vis.spatial_merge_size, window_size=vis.window_size, patch_size=vis.patch_size
        )
        self.kwargs = dict(
            position_ids=get_vision_position_ids(grid, vis.spatial_merge_size),
            cu_seqlens=cu,
            max_seqlen=int((cu[1:] - cu[:-1]).max()),
            window_index=window_index.to(dev),
            cu_window_seqlens=cu_window,
            max_window_seqlen=int((cu_window[1:] - cu_window[:-1]).max()),
        )
        self.vis, self.grid = vis, grid
        self.pixels = torch.zeros(tuple(pixel_shape), dtype=vis.dtype, device=dev)
        self.out = None
        self.graph = None

    def forward(self) -> torch.Tensor:
        """The stock tower on `self.pixels` with the precomputed tables (it pops them: pass a copy)."""
        return self.vis(self.pixels, grid_thw=self.grid, **dict(self.kwargs)).pooler_output

    @torch.inference_mode()
    def run(self, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The tower's embeddings [tokens, D] of `pixel_values` (None: of whatever the buffer holds)."""
        if pixel_values is not None:
            self.pixels.copy_(pixel_values, non_blocking=True)
        if self.pixels.device.type != "cuda":
            return self.forward()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.forward()  # warm-up (Triton compiles, cuBLAS picks kernels) off the capture
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode=CAPTURE_MODE):
                self.out = self.forward()
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites `out`


def lm_forward(model, embeds: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
    """Append `embeds` [1, L, D] at `position_ids` [3, L] to `cache`; return the last hidden state [1, D]."""
    lm = model.model.language_model
    # with streamchat's attention the mask is implied (batch 1, no padding): skip building an [L, S+L] mask
    mask = {"full_attention": None} if lm.config._attn_implementation == STREAM_ATTENTION else None
    out = lm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=position_ids.view(3, 1, -1).to(embeds.device),
        past_key_values=cache,
        use_cache=True,
    )
    return out.last_hidden_state[:, -1]


def text_prefill(model, cache, ids: torch.Tensor, position_ids: torch.Tensor, last: int) -> torch.Tensor:
    """Append text tokens `ids` [T] at `position_ids` [3, T] to `cache`; return the hidden state of token
    `last` after the final norm [1, D].

    The same layers and arithmetic as `lm_forward` with streamchat's attention, in a lean loop: the
    stock text model spends ~0.6 ms of Python per layer on a question (mask building, kwargs,
    output classes), ~22 ms for the 3B model's 36 layers against a GPU time of 3-11 ms (H200).
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    lm = model.model.language_model
    hidden = lm.embed_tokens(ids.view(1, -1))  # [1, T, D]
    t = hidden.shape[1]
    cos, sin = lm.rotary_emb(hidden, position_ids.view(3, 1, -1).to(hidden.device))
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        residual = hidden
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(1, t, -1, attn.head_dim).transpose(1, 2)  # [1, H, T, Dh]
        k = attn.k_proj(x).view(1, t, -1, attn.head_dim).transpose(1, 2)  # [1, H_kv, T, Dh]
        v = attn.v_proj(x).view(1, t, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = cache.update(k, v, i)
        out, _ = _stream_sdpa(attn, q, k, v, None, scaling=attn.scaling)  # [1, T, H, Dh]
        hidden = residual + attn.o_proj(out.reshape(1, t, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return lm.norm(hidden[:, last])


def lm_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """Last hidden state [1, D] -> logits [V] in float32."""
    return model.lm_head(hidden)[0].float()


def full_forward(model, input_ids, pixel_values, grid_thw, position_ids, cache) -> torch.Tensor:
    """The plain transformers path: one `model(...)` call over the whole prompt, logits of the last token only."""
    dev = model.device
    out = model(
        input_ids=input_ids.view(1, -1).to(dev),
        pixel_values_videos=None if pixel_values is None else pixel_values.to(dev),
        video_grid_thw=None if grid_thw is None else grid_thw.to(dev),
        position_ids=position_ids.view(3, 1, -1).to(dev),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,  # full-sequence logits would be 17.5 GB in fp32 at 29k tokens
    )
    return out.logits[0, -1].float()


# --- attention ---------------------------------------------------------------------------------

STREAM_ATTENTION = "streamchat_sdpa"


# A chunk appended to a long cache attends to the cache in two parts, merged by log-sum-exp: the
# cache's prefix in whole blocks of PREFIX_BLOCK tokens with no mask (cuDNN on a GPU, ~540-610 TFLOP/s
# on an H200 against ~265 for flash attention's lower-right causal kernel), and the rest (the last
# partial block and the chunk itself) with the lower-right causal mask (flash attention). The prefix's
# shape changes once per block, so cuDNN needs a new plan (~35 ms of host time) once per block, not per
# chunk, and `warm_split_plans` builds them all at load.
PREFIX_BLOCK = 8192  # 4096 stalled 720p streams (22.7 against 25.3 frames/s, H200), +2% at 448x448
SPLIT_MIN_QUERIES = 512  # 448x448 chunks (512 tokens) gain (H200); questions (<= 256 tokens) would only pay plans
SPLIT_ON_CPU = False  # tests turn the split on for the CPU, where it runs in plain torch


def _split_applies(query, prefix: int) -> bool:
    if prefix <= 0 or query.shape[2] < SPLIT_MIN_QUERIES:
        return False
    if query.is_cuda:
        return query.dtype in (torch.bfloat16, torch.float16)
    return SPLIT_ON_CPU


KEY_PARTS = 2  # the unmasked prefix's keys go in this many parts, folded into the batch ...
KEY_PARTS_MAX_QUERIES = 1024  # ... for chunks of at most this many tokens (720p's 2392 ran slower at some lengths)


def _attend_lse(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [1, H, L, D] over k/v [1, H_kv, S, D], and its log-sum-exp [1, H, L] (float32).

    Without a mask the keys are cut into KEY_PARTS parts, laid side by side in the batch (views, no
    copies) and the parts merged by log-sum-exp: twice the thread blocks for cuDNN, which for a
    512-token chunk has too few rows to fill the GPU (H200: 344 -> 540-590 TFLOP/s at 49-98k keys,
    `scripts/attn_probe.py --part splitk`). Longer chunks fill it already: for 2392-token chunks the
    probe gained 11%, but in the stream cuDNN's plans for some part lengths ran slower (24.1 against
    25.9 frames/s at 720p), so they go in one part.
    """
    s = k.shape[2]
    if causal or KEY_PARTS < 2 or s % KEY_PARTS or q.shape[2] > KEY_PARTS_MAX_QUERIES or not (q.is_cuda or SPLIT_ON_CPU):
        return _attend_lse_one(q, k, v, causal, scale)
    b, h, n, d = q.shape
    hk, p = k.shape[1], KEY_PARTS

    def parts(t):  # [1, H_kv, S, D] -> [P, H_kv, S/P, D], a view
        return t.view(b, hk, p, s // p, d).permute(0, 2, 1, 3, 4).reshape(b * p, hk, s // p, d)

    o, lse = _attend_lse_one(q.expand(p, h, n, d), parts(k), parts(v), False, scale)  # [P, H, L, D], [P, H, L]
    total = torch.logsumexp(lse, dim=0, keepdim=True)  # [1, H, L]
    w = torch.exp(lse - total).unsqueeze(-1)
    return (o.float() * w).sum(0, keepdim=True), total


def _attend_lse_one(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, L, D] over k/v [B, H_kv, S, D], and its log-sum-exp [B, H, L] (float32).

    `causal` is the lower-right causal mask (query i sees keys up to S - L + i); otherwise no mask.
    The G = H / H_kv query heads of each KV head are folded into rows ([B, H_kv, G*L, D]): exact
    without a mask, and no copies of the keys.
    """
    b, h, n, d = q.shape
    hk = k.shape[1]
    if q.is_cuda:
        if causal:  # flash attention's causal mask is aligned to the bottom right when n != S
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[:2]
            return out, lse
        qf = q.reshape(b, hk, (h // hk) * n, d)  # a copy: q is strided (and expanded for key parts)
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qf, k, v, None, True, 0.0, False, False, scale=scale)[:2]
        return out.reshape(b, h, n, d), lse.reshape(b, h, n)
    qf = q.reshape(b, hk, (h // hk) * n, d)
    scores = torch.matmul(qf, k.transpose(-1, -2)).float() * scale  # [B, H_kv, G*L, S]
    if causal:
        s = k.shape[2]
        q_pos = (s - n) + torch.arange(n).repeat(h // hk)
        scores.masked_fill_(torch.arange(s).view(1, -1) > q_pos.view(-1, 1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]).to(v.dtype), v)
    return out.reshape(b, h, n, d), lse.reshape(b, h, n)


def _split_attention(query, key, value, prefix: int, scale: float) -> torch.Tensor:
    """Lower-right causal attention as prefix (no mask) + tail (causal), merged; returns [B, L, H, D]."""
    o1, l1 = _attend_lse(query, key[:, :, :prefix], value[:, :, :prefix], False, scale)
    o2, l2 = _attend_lse(query, key[:, :, prefix:], value[:, :, prefix:], True, scale)
    # softmax over both parts: o = (e^l1 o1 + e^l2 o2) / (e^l1 + e^l2) = o2 + (o1 - o2) * sigmoid(l1 - l2)
    w = torch.sigmoid(l1 - l2).unsqueeze(-1)
    out = torch.lerp(o2.float(), o1.float(), w)
    return out.to(query.dtype).transpose(1, 2).contiguous()


def warm_split_attention(model) -> None:
    """Run the split's kernels once on small tensors: cuDNN's first call loads its engines (~0.6 s)."""
    dev = model.device
    if dev.type != "cuda" or model.dtype not in (torch.bfloat16, torch.float16):
        return
    cfg = model.config.text_config
    d = cfg.hidden_size // cfg.num_attention_heads
    q = torch.randn(1, cfg.num_attention_heads, SPLIT_MIN_QUERIES, d, device=dev, dtype=model.dtype)
    kv = torch.randn(1, cfg.num_key_value_heads, PREFIX_BLOCK + SPLIT_MIN_QUERIES, d, device=dev, dtype=model.dtype)
    _split_attention(q, kv, kv, PREFIX_BLOCK, d**-0.5)


def warm_split_plans(model, cache, queries: int, tokens: int) -> int:
    """Build cuDNN's plans now for every prefix length that appends of `queries` tokens will meet on
    `cache` up to `tokens` cached tokens (one per PREFIX_BLOCK, ~35 ms of host time each, H200), so the
    stream does not stall on them. Needs the cache's buffers allocated; returns the plans built."""
    layer = cache.layers[0] if cache.layers else None
    k, v = getattr(layer, "_k", None), getattr(layer, "_v", None)
    if k is None or queries < SPLIT_MIN_QUERIES or not k.is_cuda or k.dtype not in (torch.bfloat16, torch.float16):
        return 0
    cfg = model.config.text_config
    d = cfg.hidden_size // cfg.num_attention_heads
    q = torch.randn(1, cfg.num_attention_heads, queries, d, device=k.device, dtype=k.dtype)
    built = 0
    for prefix in range(PREFIX_BLOCK, min(tokens, k.shape[-2]) - queries + 1, PREFIX_BLOCK):
        _attend_lse(q, k[..., :prefix, :], v[..., :prefix, :], False, d**-0.5)
        built += 1
    return built


def _stream_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA for appending to a cache: lower-right causal without a materialised mask, GQA without copies.

    transformers' sdpa path, for a chunk of L new tokens on a cache of S, builds an [L, S+L] mask and
    repeats the KV heads (copying the whole cache per layer), which forces the slow masked kernel.
    Here: q_len == 1 needs no mask; q_len == kv_len is plain causal; a long chunk on a long cache is
    split (`_split_attention`); otherwise the causal mask is aligned to the bottom right
    (`causal_lower_right`), which flash/efficient kernels take as is.
    streamchat never pads (batch 1), so `attention_mask` carries no extra information.
    """
    from torch.nn.attention.bias import causal_lower_right

    q_len, kv_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    prefix = (kv_len - q_len) // PREFIX_BLOCK * PREFIX_BLOCK
    if _split_applies(query, prefix):
        return _split_attention(query, key, value, prefix, scale), None
    gqa = query.shape[1] != key.shape[1]
    if q_len == 1:
        mask, causal = None, False
    elif q_len == kv_len:
        mask, causal = None, True
    else:
        mask, causal = causal_lower_right(q_len, kv_len), False
    # query: [B, H, L, D]; key/value: [B, H_kv, S, D]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )
    return out.transpose(1, 2).contiguous(), None


# "flash" in the name makes the vision tower hand us cu_seqlens in one call (its varlen path)
# instead of looping over the windows itself: one SDPA call per window, 4,712 per 720p chunk.
WINDOW_ATTENTION = "streamchat_flash_windows"
_groups_memo: list = [None, None]  # (cu_seqlens tensor, groups): the 28 window blocks share one tensor


def _window_groups(cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Token indices [n_windows, L] for each distinct window length L."""
    if _groups_memo[0] is cu_seqlens:
        return _groups_memo[1]
    bounds = cu_seqlens.tolist()
    by_len: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            by_len.setdefault(end - start, []).append(start)
    dev = cu_seqlens.device
    groups = [
        torch.tensor(starts, device=dev).view(-1, 1) + torch.arange(length, device=dev).view(1, -1)
        for length, starts in by_len.items()
    ]
    _groups_memo[0], _groups_memo[1] = cu_seqlens, groups
    return groups


def _window_sdpa(module, query, key, value, attention_mask=None, scaling=None, cu_seq_lens_q=None,
                 max_length_q=None, **kwargs):
    """Vision attention within windows: one flash varlen call on a GPU; on the CPU, windows of equal
    length batched into one SDPA call each."""
    # query/key/value: [1, H, N, D] -> output [1, N, H, D]
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        # no gathers: the tower already lays windows out contiguously, cu_seqlens bounds them
        # (H200, 720p chunk: the gathers and scatters were ~8.6 of 64 GPU-ms)
        cu = cu_seq_lens_q.to(torch.int32)
        longest = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, H, D]
        out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0, False, False, scale=scaling)[0]
        return out.unsqueeze(0), None
    out = torch.empty_like(query[0])  # [H, N, D]
    for idx in _window_groups(cu_seq_lens_q):
        q, k, v = (t[0][:, idx].transpose(0, 1) for t in (query, key, value))  # [W, H, L, D]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)
        out[:, idx] = o.transpose(0, 1)
    return out.transpose(0, 1).unsqueeze(0), None


def use_stream_attention(model, enabled: bool = True) -> None:
    """Switch between streamchat's attention (text and vision) and transformers' stock sdpa."""
    from transformers import AttentionInterface

    if STREAM_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(STREAM_ATTENTION, _stream_sdpa)
        AttentionInterface.register(WINDOW_ATTENTION, _window_sdpa)
    model.config.text_config._attn_implementation = STREAM_ATTENTION if enabled else "sdpa"
    model.config.vision_config._attn_implementation = WINDOW_ATTENTION if enabled else "sdpa"
    if model.device.type == "cuda":
        # cuDNN attention builds a new plan for every new sequence length (~40 ms of CPU per shape,
        # 400+ ms on a first decode step); flash attention needs none.
        torch.backends.cuda.enable_cudnn_sdp(False)


# --- the KV cache -------------------------------------------------------------------------------


BLOCK_TOKENS = 1024  # cache capacity comes in blocks of this many tokens


def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A cache layer whose keys/values are views into buffers with spare room.

        `DynamicLayer.update` concatenates, copying the layer's whole cache on every append and every
        decoded token (~2.8 ms per step at 57k tokens for the 3B model). Here appends write in place;
        the buffers grow by at most GROW_TOKENS at a time, so the spare room stays small
        (8k tokens = 0.3 GB for the 3B model, well under the "weights + cache + 1 GiB" budget).
        """

        GROW_TOKENS = 8192

        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self._k = self._v = None
            self._len = 0

        def _reserve(self, need: int, like_k, like_v, spare: bool = True) -> None:
            cap = 0 if self._k is None else self._k.shape[-2]
            if need <= cap:
                return
            new_cap = need + (min(max(need // 4, 1024), self.GROW_TOKENS) if spare else 0)
            new_cap = -(-new_cap // BLOCK_TOKENS) * BLOCK_TOKENS  # whole blocks: StaticDecoder splits by them
            # buffers: [B, H_kv, capacity, D]
            # zeros, not empty: StaticDecoder reads the whole buffer (masked), and NaN garbage survives a mask
            k = like_k.new_zeros(*like_k.shape[:-2], new_cap, like_k.shape[-1])
            v = like_v.new_zeros(*like_v.shape[:-2], new_cap, like_v.shape[-1])
            if self._len:
                k[..., : self._len, :].copy_(self._k[..., : self._len, :])
                v[..., : self._len, :].copy_(self._v[..., : self._len, :])
            self._k, self._v = k, v

        def _views(self) -> None:
            self.keys = self._k[..., : self._len, :]
            self.values = self._v[..., : self._len, :]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            self._reserve(self._len + n, key_states, value_states)
            self._k[..., self._len : self._len + n, :].copy_(key_states)
            self._v[..., self._len : self._len + n, :].copy_(value_states)
            self._len += n
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._len if self.is_initialized else 0

        def crop(self, tokens_to_remove: int) -> None:
            if not self.is_initialized or tokens_to_remove == 0:
                return
            keep = self._len - abs(tokens_to_remove) if tokens_to_remove < 0 else min(tokens_to_remove, self._len)
            self._len = max(keep, 0)
            self._views()

    return GrowingLayer


_GROWING = None


def new_cache(model, growing: bool = True):
    """An empty cache for `model`: one growing layer per decoder layer, or transformers' stock one."""
    global _GROWING
    from transformers import DynamicCache

    if not growing:
        return DynamicCache(config=model.config)
    if _GROWING is None:
        _GROWING = _growing_layer_class()
    cache = DynamicCache(config=model.config)
    cache.layers[:] = [_GROWING() for _ in cache.layers]
    return cache


def reserve_cache(cache, tokens: int) -> None:
    """Give every growing layer room for `tokens` now, so the buffers are not reallocated later (the
    decode graph and cuDNN's plans are tied to buffer addresses and strides). No-op for other caches."""
    for layer in cache.layers:
        if hasattr(layer, "_reserve") and layer.is_initialized:
            layer._reserve(tokens, layer._k, layer._v, spare=False)


def allocate_cache(model, cache, tokens: int) -> None:
    """Allocate room for `tokens` in every growing layer of an empty or partly filled cache."""
    cfg = model.config.text_config
    dh = cfg.hidden_size // cfg.num_attention_heads
    dtype = model.model.language_model.embed_tokens.weight.dtype
    for layer in cache.layers:
        if not hasattr(layer, "_reserve"):
            continue
        if not layer.is_initialized:
            empty = torch.empty(1, cfg.num_key_value_heads, 0, dh, dtype=dtype, device=model.device)
            layer.lazy_initialization(empty, empty)
            layer._reserve(tokens, empty, empty, spare=False)
            layer._views()
        else:
            layer._reserve(tokens, layer._k, layer._v, spare=False)


def cache_capacity(cache) -> int:
    layer = cache.layers[0] if cache.layers else None
    return layer._k.shape[-2] if getattr(layer, "_k", None) is not None else 0


def cache_from_layers(model, layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A cache holding the given per-layer (keys, values), each [B, H_kv, S, D]."""
    cache = new_cache(model)
    for layer, (k, v) in zip(cache.layers, layers):
        layer.update(k, v)
    return cache


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values), each [B, H_kv, S, D]; empty layers are skipped."""
    return [(layer.keys, layer.values) for layer in cache.layers if getattr(layer, "keys", None) is not None]


def cache_len(cache) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


def cache_bytes(cache) -> int:
    """The real size of the cache's tensors (the prototype printed 0.0 MB here)."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cache_layers(cache))


def cache_drop_tail(cache, n: int) -> None:
    """Remove the last `n` tokens from every layer (5.x: a negative count removes tokens)."""
    if n > 0:
        cache.crop(-n)


def text_config(model):
    return model.config.text_config


def vision_config(model):
    return model.config.vision_config


# --- submodules (parameter counts for the benchmark's floors) ------------------------------------


def language_model(model):
    """The text decoder: embeddings and layers, no lm_head (5.x: `model.model.language_model`)."""
    return model.model.language_model


def vision_tower(model):
    """The vision transformer with its patch embedding and merger (5.x: `model.model.visual`)."""
    return model.model.visual


# --- decode steps as one CUDA graph --------------------------------------------------------------


class StaticDecoder:
    """Greedy decode steps over the growing cache's fixed-capacity buffers.

    A step in eager transformers is ~900 small kernels and ~20 ms of Python for the 3B model, 8x its
    memory floor. Here a step reads and writes only fixed-shape tensors: the token, its position and
    the cache length live in device buffers, the new K/V go in with `index_copy_`, and attention runs
    over the whole buffer with a mask of the filled part (grouped heads as a batched matmul, no KV
    copies). That makes a step capturable once as a CUDA graph and replayed per token; the graph is
    captured again only when the cache's buffers are reallocated. On the CPU `step()` runs eagerly.

    On a GPU in bf16/fp16 attention is flash attention's varlen entry point instead of the masked
    product: it reads the cache length from a device tensor (`cu_k`), so it sits in the graph, and for
    one query with grouped KV heads it splits the cache across the GPU (H200, 115k tokens: 0.08 ms a
    layer against 0.33 for the masked product, `scripts/attn_probe.py`).
    """

    def __init__(self, model, cache):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import rotate_half

        self._rotate_half = rotate_half
        self.model, self.cache = model, cache
        self.lm = model.model.language_model
        dev = model.device
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # text position of `token`
        self.length = torch.zeros(1, dtype=torch.long, device=dev)  # cache tokens before `token`
        self.mask = None  # [capacity]: 0 where filled, -inf beyond (the masked path)
        self.flash = dev.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)
        self.cu_q = torch.tensor([0, 1], dtype=torch.int32, device=dev)  # varlen bounds: one query ...
        self.cu_k = torch.zeros(2, dtype=torch.int32, device=dev)  # ... over cu_k[1] keys (length + 1)
        self.graph = None
        self._graph_key = None

    def _capacity_key(self):
        return tuple((layer._k.data_ptr(), layer._k.shape[-2]) for layer in self.cache.layers)

    def prepare(self, token: int, pos: int, max_steps: int) -> None:
        """Room for `max_steps` more tokens, and the step inputs set for feeding `token` at `pos`."""
        n = self.cache.get_seq_length()
        for layer in self.cache.layers:
            layer._reserve(n + max_steps, layer._k, layer._v)
        cap = self.cache.layers[0]._k.shape[-2]
        if self.mask is None or self.mask.shape[0] != cap:
            self.mask = torch.empty(cap, dtype=self.cache.layers[0]._k.dtype, device=self.token.device)
        self.mask.fill_(float("-inf"))
        self.mask[:n] = 0.0
        self.token.fill_(token)
        self.pos.fill_(pos)
        self.length.fill_(n)

    def step(self) -> None:
        """Feed `token` at `pos`: append its K/V at `length`, write the next greedy token into `token`."""
        lm = self.lm
        hidden = lm.embed_tokens(self.token.view(1, 1))  # [1, 1, D]
        cos, sin = lm.rotary_emb(hidden, self.pos.view(1, 1, 1).expand(3, 1, 1))
        if self.flash:
            self.cu_k[1:].copy_(self.length + 1)
        else:
            self.mask.index_fill_(0, self.length, 0.0)
        for layer, kv in zip(lm.layers, self.cache.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q, k, v = _qkv(attn, x)
            q = q.view(1, 1, -1, attn.head_dim).transpose(1, 2)  # [1, H, 1, Dh]
            k = k.view(1, 1, -1, attn.head_dim).transpose(1, 2)  # [1, H_kv, 1, Dh]
            v = v.view(1, 1, -1, attn.head_dim).transpose(1, 2)
            # rotary on q and k in one pass (the stock pair of calls is 10 small kernels, 5 here)
            qk = torch.cat([q, k], dim=1)  # [1, H + H_kv, 1, Dh]
            qk = qk * cos.unsqueeze(1) + self._rotate_half(qk) * sin.unsqueeze(1)
            q, k = qk[:, : q.shape[1]], qk[:, q.shape[1] :]
            kv._k.index_copy_(2, self.length, k)
            kv._v.index_copy_(2, self.length, v)
            if self.flash:
                out = torch.ops.aten._flash_attention_forward(
                    q[0].transpose(0, 1).contiguous(), kv._k[0].transpose(0, 1), kv._v[0].transpose(0, 1),
                    self.cu_q, self.cu_k, 1, kv._k.shape[-2], 0.0, False, False, scale=attn.scaling,
                )[0]  # [1, H, Dh]
                hidden = residual + attn.o_proj(out.reshape(1, 1, -1))
                hidden = hidden + _mlp(layer.mlp, layer.post_attention_layernorm(hidden))
                continue
            h_kv = kv._k.shape[1]
            qg = q.reshape(1, h_kv, -1, attn.head_dim)  # [1, H_kv, G, Dh]: heads grouped by their KV head
            scores = torch.matmul(qg, kv._k.transpose(-1, -2)).float() * attn.scaling + self.mask  # [1, H_kv, G, C]
            probs = torch.softmax(scores, dim=-1).to(kv._v.dtype)
            # probs @ V reduces over the whole capacity with only G rows: split it into blocks so the GPU
            # runs one small product per block instead of a few long ones (split-K), then sum the blocks
            g, cap = probs.shape[2], probs.shape[3]
            blocks = cap // BLOCK_TOKENS
            p_blk = probs.view(1, h_kv, g, blocks, BLOCK_TOKENS).transpose(2, 3)  # [1, H_kv, S, G, B]
            v_blk = kv._v.view(1, h_kv, blocks, BLOCK_TOKENS, attn.head_dim)  # [1, H_kv, S, B, Dh]
            out = torch.matmul(p_blk, v_blk).float().sum(2).to(kv._v.dtype)  # [1, H_kv, G, Dh]
            out = out.reshape(1, 1, -1)  # [1, 1, H * Dh]
            hidden = residual + attn.o_proj(out)
            hidden = hidden + _mlp(layer.mlp, layer.post_attention_layernorm(hidden))
        logits = self.model.lm_head(lm.norm(hidden))[0, -1]
        self.token.copy_(torch.argmax(logits).view(1))
        self.length.add_(1)
        self.pos.add_(1)

    def run(self) -> None:
        """One step: a CUDA graph replay on the GPU (captured on first use per buffer set), eager on the CPU."""
        if self.token.device.type != "cuda":
            self.step()
            return
        key = self._capacity_key()
        if self.graph is None or key != self._graph_key:
            saved = (self.token.clone(), self.pos.clone(), self.length.clone(), self.mask.clone())
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.step()  # warm-up on a side stream, as CUDA graph capture requires
            torch.cuda.current_stream().wait_stream(stream)
            for buf, val in zip((self.token, self.pos, self.length, self.mask), saved):
                buf.copy_(val)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode=CAPTURE_MODE):
                self.step()
            for buf, val in zip((self.token, self.pos, self.length, self.mask), saved):
                buf.copy_(val)  # capture ran the step's kernels once more; undo, then replay for real
            self._graph_key = key
        self.graph.replay()

    def commit(self, steps: int) -> None:
        """Tell the cache layers how many tokens the steps appended."""
        for layer in self.cache.layers:
            layer._len += steps
            layer._views()


class QuestionPrefill:
    """A question's prefill for one length bucket as CUDA graphs, attention run eagerly between them.

    An eager prefill of a 32-token question is ~740 kernel launches and ~16 ms of host time for the 3B
    model (H200), more than its GPU time, and the stream's frame thread competes for the same host.
    Here the work between two attention calls (the o-projection, MLP and norms of layer i, then the
    q/k/v projections and rotary of layer i+1, with K/V written into the cache buffers at `slot`) is
    one graph: 37 replays and 36 flash calls per question. Attention stays eager because its length
    changes with the cache. Inputs are fixed-shape buffers (`ids`, `pos`, `slot`, `last`), so the
    graphs are captured once per cache buffer set. On the CPU the same segments run eagerly.

    With `chunk=True` the same graphs append a video chunk: the input is the chunk's embeddings
    (copied into `hidden`) at its M-RoPE positions, and nothing after the last layer's attention is
    computed (only the K/V a chunk leaves in the cache matter).
    """

    def __init__(self, model, cache, bucket: int, chunk: bool = False):
        lm = model.model.language_model
        self.model, self.cache, self.lm, self.t, self.chunk = model, cache, lm, bucket, chunk
        dev, dt = model.device, lm.embed_tokens.weight.dtype
        cfg = lm.config
        self.dh = cfg.hidden_size // cfg.num_attention_heads
        self.ids = torch.zeros(bucket, dtype=torch.long, device=dev)
        self.pos = torch.zeros(3, bucket, dtype=torch.long, device=dev)
        self.arange = torch.arange(bucket, device=dev)
        self.slot = torch.zeros(bucket, dtype=torch.long, device=dev)  # cache rows the bucket's K/V go to
        self.last = torch.zeros(1, dtype=torch.long, device=dev)  # the last real token
        self.hidden = torch.zeros(1, bucket, cfg.hidden_size, dtype=dt, device=dev)
        self.q = torch.zeros(1, cfg.num_attention_heads, bucket, self.dh, dtype=dt, device=dev)
        self.attn_out = torch.zeros(1, bucket, cfg.num_attention_heads * self.dh, dtype=dt, device=dev)
        self.logits = torch.zeros(model.lm_head.out_features, dtype=torch.float32, device=dev)
        self.cos = self.sin = None
        self.graphs: list | None = None
        self._graph_key = None
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

        self._rope = apply_rotary_pos_emb

    def _segment(self, i: int) -> None:
        """Layer i-1's second half (i > 0) and layer i's first half (i < layers); the head at the end."""
        lm, t = self.lm, self.t
        if i == 0:
            if not self.chunk:
                self.hidden.copy_(lm.embed_tokens(self.ids.view(1, -1)))
            cos, sin = lm.rotary_emb(self.hidden, self.pos.view(3, 1, -1))
            if self.cos is None:  # the first (eager) run allocates them outside any graph
                self.cos, self.sin = torch.empty_like(cos), torch.empty_like(sin)
            self.cos.copy_(cos)
            self.sin.copy_(sin)
        else:
            layer = lm.layers[i - 1]
            hidden = self.hidden + layer.self_attn.o_proj(self.attn_out)
            self.hidden.copy_(hidden + _mlp(layer.mlp, layer.post_attention_layernorm(hidden)))
        if i < len(lm.layers):
            layer, kv = lm.layers[i], self.cache.layers[i]
            attn = layer.self_attn
            x = layer.input_layernorm(self.hidden)
            q, k, v = _qkv(attn, x)
            q = q.view(1, t, -1, self.dh).transpose(1, 2)  # [1, H, T, Dh]
            k = k.view(1, t, -1, self.dh).transpose(1, 2)  # [1, H_kv, T, Dh]
            v = v.view(1, t, -1, self.dh).transpose(1, 2)
            q, k = self._rope(q, k, self.cos, self.sin)
            kv._k.index_copy_(2, self.slot, k)
            kv._v.index_copy_(2, self.slot, v)
            self.q.copy_(q)
        else:
            hidden = lm.norm(self.hidden.index_select(1, self.last))  # [1, 1, D]
            self.logits.copy_(self.model.lm_head(hidden)[0, 0].float())

    def _attend(self, i: int, n: int) -> None:
        """Layer i's attention: the bucket's queries over the cache's first n tokens and the bucket."""
        kv = self.cache.layers[i]
        k, v = kv._k[..., : n + self.t, :], kv._v[..., : n + self.t, :]
        out, _ = _stream_sdpa(None, self.q, k, v, None, scaling=self.lm.layers[i].self_attn.scaling)
        self.attn_out.copy_(out.view(1, self.t, -1))

    @property
    def segments(self) -> int:
        return len(self.lm.layers) + (0 if self.chunk else 1)

    def _eager(self, n: int) -> None:
        layers = len(self.lm.layers)
        for i in range(self.segments):
            self._segment(i)
            if i < layers:
                self._attend(i, n)

    def _key(self):
        return tuple((layer._k.data_ptr(), layer._k.shape[-2]) for layer in self.cache.layers)

    @torch.inference_mode()
    def capture(self, n: int) -> None:
        """Capture the segments' graphs (GPU only); runs them once eagerly first, writing K/V rows
        [n, n + bucket) beyond the cache's length, which the next append or prefill overwrites."""
        if self.hidden.device.type != "cuda":
            return
        torch.add(self.arange, n, out=self.slot)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._eager(n)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        for i in range(self.segments):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, capture_error_mode=CAPTURE_MODE):
                self._segment(i)
            graphs.append(g)
        self.graphs, self._graph_key = graphs, self._key()

    def _inputs(self, ids, positions, n: int, n_real: int) -> None:
        if self.chunk:
            self.hidden.copy_(ids)
        else:
            self.ids.copy_(ids, non_blocking=True)
        self.pos.copy_(positions, non_blocking=True)
        torch.add(self.arange, n, out=self.slot)
        self.last.fill_(n_real - 1)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, n_real: int) -> torch.Tensor:
        """Prefill `ids` [bucket] (the first n_real real, the rest padding) at `positions` [3, bucket]
        after the cache's tokens; the cache keeps the n_real real ones. Returns the logits [V] of the
        last real token. For a chunk `ids` are the embeddings [1, bucket, D] and nothing is returned."""
        n = self.cache.get_seq_length()
        for layer in self.cache.layers:
            layer._reserve(n + self.t, layer._k, layer._v)
        self._inputs(ids, positions, n, n_real)
        if self.hidden.device.type == "cuda":
            if self.graphs is None or self._graph_key != self._key():
                self.capture(n)
                self._inputs(ids, positions, n, n_real)
            layers = len(self.lm.layers)
            for i, graph in enumerate(self.graphs):
                graph.replay()
                if i < layers:
                    self._attend(i, n)
        else:
            self._eager(n)
        for layer in self.cache.layers:
            layer._len = n + n_real
            layer._views()
        return self.logits


MAX_GRAPH_BUCKET = 256  # longer questions prefill eagerly (text_prefill)


def question_prefill(model, cache, bucket: int) -> QuestionPrefill | None:
    """The QuestionPrefill for `bucket` tokens on `cache` (made on first use), or None where it does not
    apply (a bucket over MAX_GRAPH_BUCKET, the stock cache, a model spread over several devices)."""
    if bucket > MAX_GRAPH_BUCKET or static_decoder(model, cache) is None:
        return None
    table = cache.__dict__.setdefault("_streamchat_prefill", {})
    if bucket not in table:
        table[bucket] = QuestionPrefill(model, cache, bucket)
    return table[bucket]


SEGMENTS_ON_CPU = False  # tests run chunk appends through the graphs' segments (eagerly) on the CPU
MAX_CHUNK_GRAPH = 1024  # larger chunks are GPU-bound: eager (their graphs would hold 100s of MB)


def chunk_append(model, cache, tokens: int) -> QuestionPrefill | None:
    """The graphs appending a video chunk of `tokens` tokens to `cache` (see QuestionPrefill), or None
    where they do not apply (not a GPU, a chunk over MAX_CHUNK_GRAPH, the stock cache, several devices)."""
    if (model.device.type != "cuda" and not SEGMENTS_ON_CPU) or tokens > MAX_CHUNK_GRAPH or static_decoder(model, cache) is None:
        return None
    table = cache.__dict__.setdefault("_streamchat_chunks", {})
    if tokens not in table:
        table[tokens] = QuestionPrefill(model, cache, tokens, chunk=True)
    return table[tokens]


def static_decoder(model, cache) -> StaticDecoder | None:
    """A StaticDecoder for `cache`, or None where it does not apply (the stock cache, a model spread
    over several devices by accelerate)."""
    if len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1:
        return None
    if not cache.layers or not hasattr(cache.layers[0], "_reserve") or not cache.layers[0].is_initialized:
        return None
    dec = getattr(cache, "_streamchat_decoder", None)
    if dec is None:
        dec = StaticDecoder(model, cache)
        cache._streamchat_decoder = dec
    return dec
