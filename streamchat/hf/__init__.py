"""Every call into transformers internals, in this package alone (pinned: transformers 5.17.0).

One module per job: `loading` (model, processor, preprocessing), `attention` (streamchat's
attention functions), `cache` (the growing KV cache), `devices` (accelerate's device maps), `forward` (forward passes), `graphs` (CUDA
graphs for decode steps, questions, short chunks and the vision tower), `rewrites` (same-function
layer rewrites for the GPU). The rest of streamchat imports the names below from `streamchat.hf`.

An upgrade should touch this package alone. What 5.17 does that we rely on or work around:
- positions: we always pass explicit (3, B, L) M-RoPE position ids, so `get_rope_index`,
  `compute_3d_position_ids` and the stateful `model.model.rope_deltas` are never used
  (5.x resumes text after a video at s + max(H, W) and truncates fractional intervals; see qwen25vl.md);
- the forward argument is `past_key_values` (5.24 renames it `cache`);
- `DynamicLayer.crop(n)` removes tokens when n is negative; a positive n is the deprecated old meaning;
- a prefilled `DynamicCache` is built with `DynamicCache(ddp_cache_data=[(k, v), ...], config=...)`.
"""

from .attention import (
    STREAM_ATTENTION,
    WINDOW_ATTENTION,
    use_stream_attention,
    use_training_attention,
    warm_split_plans,
)
from .cache import (
    BLOCK_TOKENS,
    allocate_cache,
    cache_bytes,
    cache_capacity,
    buffers_key,
    cache_append_pages,
    cache_append_rows,
    cache_drop_tail,
    cache_from_layers,
    cache_keep_rows,
    cache_layers,
    cache_len,
    cache_rows,
    layer_devices,
    new_cache,
)
from .devices import (
    build_on_map,
    dispatch,
    execution_device,
    input_device,
    is_split,
    model_devices,
    named_weights,
    resolve_map,
    vision_device,
)
from .forward import batch_logits, embed_tokens, embed_video, full_forward, lm_forward, lm_head, question_queries, rotary, unrotate
from .graphs import (
    QuestionPrefill,
    StaticDecoder,
    VisionGraph,
    chunk_append,
    question_prefill,
    static_decoder,
    vision_graph,
)
from .loading import (
    TRANSFORMERS_PINNED,
    build_from_config,
    default_processor,
    language_model,
    load_pretrained,
    new_model,
    processor_prompt_ids,
    quiet,
    qwen25vl_config,
    text_config,
    tokenizer_from_dir,
    transformers_version,
    video_pixels,
    vision_config,
    vision_tower,
)
from .rewrites import fuse_projections, fuse_rms_norms, pad_vision_mlp, speed_up, use_fast_vision_rotary

__all__ = [
    "BLOCK_TOKENS", "STREAM_ATTENTION", "TRANSFORMERS_PINNED", "WINDOW_ATTENTION", "QuestionPrefill",
    "StaticDecoder", "VisionGraph", "batch_logits", "allocate_cache", "buffers_key", "cache_append_pages", "cache_append_rows", "cache_keep_rows",
    "cache_rows", "layer_devices", "question_queries", "rotary", "unrotate", "build_from_config", "cache_bytes", "cache_capacity",
    "cache_drop_tail", "cache_from_layers", "cache_layers", "cache_len", "chunk_append", "default_processor",
    "embed_tokens", "embed_video", "full_forward", "fuse_projections", "fuse_rms_norms", "language_model",
    "lm_forward", "lm_head", "load_pretrained", "new_cache", "new_model", "pad_vision_mlp",
    "processor_prompt_ids", "question_prefill", "quiet", "qwen25vl_config", "speed_up",
    "static_decoder", "text_config", "tokenizer_from_dir", "transformers_version",
    "use_fast_vision_rotary", "use_stream_attention", "use_training_attention", "video_pixels", "vision_config", "vision_graph",
    "vision_tower", "warm_split_plans", "build_on_map", "dispatch", "execution_device", "input_device", "is_split",
    "model_devices", "named_weights", "resolve_map", "vision_device",
]
