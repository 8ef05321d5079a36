"""Forward passes: embeddings, the vision tower, appending to the cache, the head, the whole prompt."""

from __future__ import annotations

import torch


from .attention import STREAM_ATTENTION
from .devices import execution_device, input_device, vision_device
from .graphs import vision_graph


def embed_tokens(model, ids: torch.Tensor) -> torch.Tensor:
    """ids [L] -> embeddings [1, L, D] (on the embeddings' device)."""
    return model.model.get_input_embeddings()(ids.view(1, -1).to(input_device(model)))


def embed_video(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor, graphs: dict | None = None) -> torch.Tensor:
    """Run the vision tower: pixel patches -> merged video embeddings [tokens, D].

    On a GPU, given a graph table, each frame grid's tower runs as one CUDA graph (`VisionGraph`)."""
    graph = vision_graph(model, grid_thw, pixel_values.shape, graphs)
    if graph is not None:
        return graph.run(pixel_values)
    dev = vision_device(model)  # the tower's device, not model.device (meta when the tower is offloaded)
    out = model.model.get_video_features(pixel_values.to(dev, non_blocking=True), grid_thw.to(dev))
    return torch.cat(out.pooler_output, dim=0)


def _append(model, embeds: torch.Tensor, position_ids: torch.Tensor, cache, **kwargs):
    """The text model over `embeds` [1, L, D] at `position_ids` [3, L], appending to `cache`."""
    lm = model.model.language_model
    # with streamchat's attention the mask is implied (batch 1, no padding): skip building an [L, S+L] mask
    mask = {"full_attention": None} if lm.config._attn_implementation == STREAM_ATTENTION else None
    return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids.view(3, 1, -1).to(embeds.device),
              past_key_values=cache, use_cache=True, **kwargs)


def lm_forward(model, embeds: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
    """Append `embeds` [1, L, D] at `position_ids` [3, L] to `cache`; return the last hidden state [1, D]."""
    return _append(model, embeds, position_ids, cache).last_hidden_state[:, -1]


def lm_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """Last hidden state [1, D] -> logits [V] in float32."""
    return model.lm_head(hidden)[0].float()


def full_forward(model, input_ids, pixel_values, grid_thw, position_ids, cache) -> torch.Tensor:
    """The plain transformers path: one `model(...)` call over the whole prompt, logits of the last token only."""
    dev = input_device(model)
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


def rotary(model, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [1, L, Dh] of the text model's M-RoPE at `positions` [3, L] (sections merged)."""
    lm = model.model.language_model
    return lm.rotary_emb(like, positions.view(3, 1, -1).to(like.device))


def unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo the rotary embedding of keys [..., H, L, Dh] rotated with cos/sin [1, L, Dh]: rotation by -theta."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import rotate_half

    # the rotary module may sit on another device than the keys when accelerate spread the model
    cos, sin = cos.unsqueeze(-3).to(keys.device, keys.dtype), sin.unsqueeze(-3).to(keys.device, keys.dtype)
    return keys * cos - rotate_half(keys) * sin


def question_queries(model, embeds: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
    """Append `embeds` [1, T, D] at `position_ids` [3, T] to `cache` and return every layer's queries
    before the rotary embedding, [layers, H, T, Dh] (the caller rolls the cache back)."""
    from .rewrites import _qkv

    lm = model.model.language_model
    out = _append(model, embeds, position_ids, cache, output_hidden_states=True)
    queries = []
    for layer, hidden in zip(lm.layers, out.hidden_states):  # hidden_states[i] is layer i's input
        attn = layer.self_attn
        q = _qkv(attn, layer.input_layernorm(hidden.to(execution_device(layer.input_layernorm))))[0]
        queries.append(q.view(hidden.shape[1], -1, attn.head_dim).transpose(0, 1).to(embeds.device))  # [H, T, Dh]
    return torch.stack(queries)


def batch_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 pixel_values: torch.Tensor, grid_thw: torch.Tensor, clip_of: list[int], rows: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """Training's forward: a padded batch of sequences ids [B, L] (an attention mask [B, L] of padding,
    or [B, 1, L, L] of who sees whom; M-RoPE positions [3, B, L]) whose b-th sequence shows video
    clip_of[b] of the clips in pixel_values/grid_thw (the tower runs once per clip); returns logits
    [N, V] at the N (rows[n], cols[n]) token positions only."""
    features = model.model.get_video_features(pixel_values, grid_thw).pooler_output  # one [T*H*W, D] per clip
    embeds = model.model.get_input_embeddings()(ids)
    video = torch.cat([features[c] for c in clip_of]).to(embeds.dtype)
    slots = (ids == model.config.video_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(slots, video)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                        use_cache=False).last_hidden_state
    return model.lm_head(hidden[rows, cols])
