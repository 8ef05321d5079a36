"""streamchat's attention functions, registered with transformers' AttentionInterface: appends to a
long cache (split prefix + causal tail, merged by log-sum-exp) and the vision tower's windows."""

from __future__ import annotations

import torch


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

# A short query block (a question, a small chunk) on a long cache with grouped KV heads: flash
# attention runs one thread block per query head, so each KV head's cache is read once per query head
# it serves (G = 7 times for the 7B, 5 for the 32B: 32B TTFT grew 4.9x faster with the cache than its
# bytes). With the G heads folded into the rows, the cache before the block goes through one unmasked
# flash call on [1, H_kv, G*L, D] (no plans to build, unlike cuDNN), the block itself through the
# causal call, merged by log-sum-exp as for long appends. H200: 7B TTFT at 115k tokens 18.6 -> 15.1 ms;
# the 32B's cache still costs 3.2x its bytes (each block of G*L rows re-reads the keys it splits over).
FOLD_MIN_PREFIX = 2048  # below this, reading the cache G times costs less than the fold's extra kernels (estimated, not measured)


def _split_applies(query, prefix: int) -> bool:
    if prefix <= 0 or query.shape[2] < SPLIT_MIN_QUERIES:
        return False
    return _fast_kernels(query)


def _fold_applies(query, key) -> bool:
    """A short query block with grouped KV heads on a long cache (see FOLD_MIN_PREFIX)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if not 1 < q_len < SPLIT_MIN_QUERIES or kv_len - q_len < FOLD_MIN_PREFIX or query.shape[1] == key.shape[1]:
        return False
    return _fast_kernels(query)


def _fast_kernels(query) -> bool:
    if query.is_cuda:
        return query.dtype in (torch.bfloat16, torch.float16)
    return SPLIT_ON_CPU


KEY_PARTS = 2  # the unmasked prefix's keys go in this many parts, folded into the batch ...
KEY_PARTS_MAX_QUERIES = 1024  # ... for chunks of at most this many tokens (720p's 2392 ran slower at some lengths)


def _attend_lse(q, k, v, causal: bool, scale: float, flash: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [1, H, L, D] over k/v [1, H_kv, S, D], and its log-sum-exp [1, H, L] (float32).

    Without a mask the keys are cut into KEY_PARTS parts, laid side by side in the batch (views, no
    copies) and the parts merged by log-sum-exp: twice the thread blocks for cuDNN, which for a
    512-token chunk has too few rows to fill the GPU (H200: 344 -> 540-590 TFLOP/s at 49-98k keys,
    `scripts/attn_probe.py --part splitk`). Longer chunks fill it already: for 2392-token chunks the
    probe gained 11%, but in the stream cuDNN's plans for some part lengths ran slower (24.1 against
    25.9 frames/s at 720p), so they go in one part. `flash`: flash attention instead of cuDNN for the
    unmasked call (short query blocks: flash splits the keys itself, and needs no plan per length).
    """
    s = k.shape[2]
    if flash:
        return _attend_lse_one(q, k, v, causal, scale, flash=True)
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


def _attend_lse_one(q, k, v, causal: bool, scale: float, flash: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, L, D] over k/v [B, H_kv, S, D], and its log-sum-exp [B, H, L] (float32).

    `causal` is the lower-right causal mask (query i sees keys up to S - L + i); otherwise no mask.
    The G = H / H_kv query heads of each KV head are folded into rows ([B, H_kv, G*L, D]): exact
    without a mask, and no copies of the keys. `flash`: the folded rows go to flash attention, not cuDNN.
    """
    b, h, n, d = q.shape
    hk = k.shape[1]
    if q.is_cuda:
        if causal:  # flash attention's causal mask is aligned to the bottom right when n != S
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[:2]
            return out, lse
        qf = q.reshape(b, hk, (h // hk) * n, d)  # a view where q is contiguous, else a copy
        if flash:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qf, k, v, 0.0, False, False, scale=scale)[:2]
        else:
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


def _split_attention(query, key, value, prefix: int, scale: float, flash: bool = False) -> torch.Tensor:
    """Lower-right causal attention as prefix (no mask) + tail (causal), merged; returns [B, L, H, D].
    `flash`: the prefix through flash attention (short query blocks), not cuDNN."""
    o1, l1 = _attend_lse(query, key[:, :, :prefix], value[:, :, :prefix], False, scale, flash)
    o2, l2 = _attend_lse(query, key[:, :, prefix:], value[:, :, prefix:], True, scale)
    # softmax over both parts: o = (e^l1 o1 + e^l2 o2) / (e^l1 + e^l2) = o2 + (o1 - o2) * sigmoid(l1 - l2)
    w = torch.sigmoid(l1 - l2).unsqueeze(-1)
    out = torch.lerp(o2.float(), o1.float(), w)
    return out.to(query.dtype).transpose(1, 2).contiguous()


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
    split (`_split_attention`), as is a short block with grouped KV heads on a long cache (its cache
    part through flash attention with the heads folded into rows); otherwise the causal mask is aligned
    to the bottom right (`causal_lower_right`), which flash/efficient kernels take as is.
    streamchat never pads (batch 1), so `attention_mask` carries no extra information.
    """
    from torch.nn.attention.bias import causal_lower_right

    q_len, kv_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    prefix = (kv_len - q_len) // PREFIX_BLOCK * PREFIX_BLOCK
    if _split_applies(query, prefix):
        return _split_attention(query, key, value, prefix, scale), None
    if _fold_applies(query, key):  # the cache before the block once, not once per query head
        return _split_attention(query, key, value, kv_len - q_len, scale, flash=True), None
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
# id(cu_seqlens) -> (weak reference to it, groups), dropped when the tensor dies. A tower's window
# blocks share one cu_seqlens tensor and its full blocks another, so both stay memoised; a VisionGraph
# primes both before capture, because computing groups copies device to host and host to device,
# which CUDA graph capture refuses (float32/float16 towers take this path on a GPU).
_groups_memo: dict[int, tuple] = {}


def _window_groups(cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Token indices [n_windows, L] for each distinct window length L."""
    import weakref

    hit = _groups_memo.get(id(cu_seqlens))
    if hit is not None and hit[0]() is cu_seqlens:
        return hit[1]
    if cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("streamchat: vision windows met for the first time inside a CUDA graph capture; "
                           "prime them with _window_groups(cu_seqlens) before capturing (VisionGraph does)")
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
    key = id(cu_seqlens)
    _groups_memo[key] = (weakref.ref(cu_seqlens), groups)
    weakref.finalize(cu_seqlens, _groups_memo.pop, key, None)
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
    from .devices import input_device

    if input_device(model).type == "cuda":
        # cuDNN attention builds a new plan for every new sequence length (~40 ms of CPU per shape,
        # 400+ ms on a first decode step); flash attention needs none.
        torch.backends.cuda.enable_cudnn_sdp(False)


def use_training_attention(model) -> None:
    """Attention for training on padded batches: the text model on stock sdpa (it builds the padding
    mask); the vision tower's windows in one flash varlen call on a GPU (it has a backward), stock sdpa
    on the CPU."""
    use_stream_attention(model, model.device.type == "cuda")
    model.config.text_config._attn_implementation = "sdpa"
