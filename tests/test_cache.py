"""streamchat's growing cache layer holds exactly what transformers' DynamicCache holds."""

from __future__ import annotations

import torch

from streamchat import hf
from streamchat.config import SessionConfig
from streamchat.stream import Stream
from streamchat.video import Sampling, VideoSource


def test_growing_cache_equals_stock_cache_through_appends_and_rollbacks(tiny):
    ours, stock = hf.new_cache(tiny.model), hf.new_cache(tiny.model, growing=False)
    gen = torch.Generator().manual_seed(0)
    steps = [700, 1, 1, -2, 3000, 5, -5, 1, 20000]  # > 0: append that many tokens; < 0: roll back
    for step in steps:
        for idx, (a, b) in enumerate(zip(ours.layers, stock.layers)):
            if step > 0:
                k = torch.randn(1, 2, step, 16, generator=gen)
                v = torch.randn(1, 2, step, 16, generator=gen)
                ka, va = a.update(k, v)
                kb, vb = b.update(k, v)
                assert torch.equal(ka, kb) and torch.equal(va, vb)
        if step < 0:
            hf.cache_drop_tail(ours, -step)
            hf.cache_drop_tail(stock, -step)
        assert hf.cache_len(ours) == hf.cache_len(stock)
    assert hf.cache_len(ours) == 700 + 1 + 1 - 2 + 3000 + 5 - 5 + 1 + 20000
    assert hf.cache_bytes(ours) == hf.cache_bytes(stock) == hf.cache_len(ours) * 512
    layer = ours.layers[0]
    spare = layer._k.shape[-2] - hf.cache_len(ours)
    assert 0 <= spare <= layer.GROW_TOKENS + hf.BLOCK_TOKENS  # the room kept ahead stays bounded
    assert layer._k.shape[-2] % hf.BLOCK_TOKENS == 0  # capacity in whole blocks (StaticDecoder splits by them)


def test_static_decoder_matches_eager_decode(tiny, clip_24fps):
    """Decode steps on fixed-shape buffers (the CUDA-graph path) give the eager path's tokens and cache."""
    from streamchat.config import SessionConfig
    from streamchat.stream import Stream
    from streamchat.video import Sampling, VideoSource

    runs = {}
    for static in (True, False):
        config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4, history="keep",
                               max_new_tokens=24, static_decode=static)
        stream = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
        stream.encode_until(8)
        first = stream.engine.ask("What color is the square?")
        stream.encode_until(16)  # keep: the answer stayed in the cache; streaming goes on after it
        second = stream.engine.ask("And now?")
        runs[static] = (first.token_ids, second.token_ids, stream.engine.cursor, hf.cache_layers(stream.engine.cache.hf))
    (a1, a2, ca, la), (b1, b2, cb, lb) = runs[True], runs[False]
    assert len(a1) == 24 and a1 == b1 and a2 == b2
    assert ca == cb
    for (ka, va), (kb, vb) in zip(la, lb):
        assert ka.shape == kb.shape
        assert float((ka - kb).abs().max()) <= 1e-5 and float((va - vb).abs().max()) <= 1e-5


def test_cache_planned_for_the_whole_video_never_moves_and_matches_offline(tiny, clip_24fps):
    """Stream sizes the buffers once, at construction (StreamEngine.plan; the GPU's graphs and cuDNN
    plans are tied to them): streaming the whole clip and answering stays inside them, with the same
    answer as the offline path."""
    from streamchat.compare import match
    from streamchat.offline import answer_offline

    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=24.0, max_frames=31), chunk_frames=4, max_new_tokens=8)
    source = VideoSource(clip_24fps, config.sampling)
    stream = Stream(tiny, source, config)
    assert stream.engine.planned_frames == stream.total_frames == 31
    layer = stream.engine.cache.hf.layers[0]
    capacity, address = hf.cache_capacity(stream.engine.cache.hf), layer._k.data_ptr()
    assert capacity >= 16 * 16  # 16 frame pairs of 16 merged tokens (112 px)
    stream.encode_until(stream.total_frames)
    ans = stream.engine.ask("What is moving?")
    assert hf.cache_capacity(stream.engine.cache.hf) == capacity and layer._k.data_ptr() == address
    off = answer_offline(tiny, ans.prompt, stream.read_frames, stream.fps, ans.question, 8, stream.engine.vocab)
    assert match(ans, off)["identical"]
