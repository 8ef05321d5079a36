"""The KV cache: a growing layer that appends in place, sized up front for a whole video."""

from __future__ import annotations

import torch


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


def layer_devices(model) -> list[torch.device]:
    """Where each decoder layer's attention computes, so where its K/V are made (accelerate may spread
    the layers over several devices; an offloaded layer's weights read `meta` but it runs on its hook's
    device)."""
    from .devices import execution_device

    return [execution_device(layer.self_attn.k_proj) for layer in model.model.language_model.layers]


def allocate_cache(model, cache, tokens: int) -> None:
    """Room for `tokens` in every growing layer of an empty or partly filled cache, now and with no
    spare (the decode graph and cuDNN's plans are tied to buffer addresses and strides: buffers sized
    once never move). Each layer's buffers live on that layer's device. No-op for other caches and
    where the room is already there."""
    cfg = model.config.text_config
    dh = cfg.hidden_size // cfg.num_attention_heads
    dtype = model.model.language_model.embed_tokens.weight.dtype
    for layer, device in zip(cache.layers, layer_devices(model)):
        if not hasattr(layer, "_reserve"):
            continue
        if not layer.is_initialized:
            empty = torch.empty(1, cfg.num_key_value_heads, 0, dh, dtype=dtype, device=device)
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
    """Per-layer (keys, values), each [B, H_kv, S, D]; empty layers (none yet, or sized but unfilled) are skipped."""
    return [(layer.keys, layer.values) for layer in cache.layers
            if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0]


def cache_len(cache) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


def cache_bytes(cache) -> int:
    """The real size of the cache's tensors (the prototype printed 0.0 MB here)."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cache_layers(cache))


def cache_drop_tail(cache, n: int) -> None:
    """Remove the last `n` tokens from every layer (5.x: a negative count removes tokens)."""
    if n > 0:
        cache.crop(-n)


def buffers_key(cache) -> tuple:
    """What graphs and plans over `cache` are tied to: each growing layer's buffer address and capacity."""
    return tuple((layer._k.data_ptr(), layer._k.shape[-2]) for layer in cache.layers if getattr(layer, "_k", None) is not None)


def cache_rows(cache, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Views of rows [start, end) of every layer: (keys, values), each [B, H_kv, end - start, D]."""
    return [(layer.keys[..., start:end, :], layer.values[..., start:end, :]) for layer in cache.layers]


def cache_keep_rows(cache, keep: torch.Tensor) -> None:
    """Keep only the rows `keep` (sorted indices), moved to the front in place: the buffers never move,
    so graphs and plans over them stay valid. Keys keep their rotation: positions are baked in."""
    for layer in cache.layers:
        idx = keep.to(layer._k.device)
        n = idx.numel()
        # index_select makes a copy first, so the overlapping move is safe
        layer._k[..., :n, :].copy_(layer._k.index_select(2, idx))
        layer._v[..., :n, :].copy_(layer._v.index_select(2, idx))
        layer._len = n
        layer._views()


def cache_append_rows(cache, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Append per-layer (keys, values) [B, H_kv, n, D] at the end of every layer (copied to its device)."""
    for layer, (k, v) in zip(cache.layers, rows):
        dev = layer._k.device if getattr(layer, "_k", None) is not None else k.device
        layer.update(k.to(dev, non_blocking=True), v.to(dev, non_blocking=True))


def cache_append_pages(cache, pages: list[tuple[torch.Tensor, torch.Tensor]], device, group: int = 8) -> None:
    """Append whole pages (keys, values) [L, H_kv, N, Dh] (host memory, pinned for speed) after every
    layer's rows: a few pages at a time, one host-to-device copy per page and one append per layer
    (not one per page and layer: 32 pages x 36 layers of small copies cost ~60 ms of host time)."""
    for at in range(0, len(pages), group):
        batch = pages[at : at + group]
        k_dev = torch.stack([k.to(device, non_blocking=True) for k, _ in batch])  # [P, L, H_kv, N, Dh]
        v_dev = torch.stack([v.to(device, non_blocking=True) for _, v in batch])
        p, layers, h_kv, n, dh = k_dev.shape
        for i, layer in enumerate(cache.layers):
            # [P, H_kv, N, Dh] -> [1, H_kv, P*N, Dh], pages in order
            k = k_dev[:, i].permute(1, 0, 2, 3).reshape(1, h_kv, p * n, dh)
            v = v_dev[:, i].permute(1, 0, 2, 3).reshape(1, h_kv, p * n, dh)
            dev = layer._k.device if getattr(layer, "_k", None) is not None else device
            layer.update(k.to(dev), v.to(dev))
