"""A stream's KV cache lives exactly as long as the stream: dropping a Stream or a LiveSession frees
its buffers by reference counting alone (no cycle for the garbage collector to find later), and a
resumed stream fills the buffers its plan allocated instead of allocating a second cache."""

from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager

import pytest

from streamchat import hf, snapshots
from streamchat.config import SessionConfig
from streamchat.stream import Stream
from streamchat.video import Sampling, VideoSource


@contextmanager
def no_collector():
    """The collector off, so an object freed here was freed by its reference count."""
    was = gc.isenabled()
    gc.collect()  # earlier tests' garbage is not ours to count
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _buffers(engine) -> list[weakref.ref]:
    """Weak references to every KV buffer, the cache objects and the graph tables' contents."""
    refs = [weakref.ref(engine.cache), weakref.ref(engine.cache.hf)]
    for layer in engine.cache.hf.layers:
        refs += [weakref.ref(layer._k), weakref.ref(layer._v)]
    refs += [weakref.ref(g) for g in engine.cache.graphs.values()]
    return refs


@pytest.mark.parametrize("history", ["drop", "keep"])
def test_dropping_a_stream_frees_its_cache_without_the_collector(tiny, clip_24fps, history):
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4, history=history, max_new_tokens=6)
    with no_collector():
        stream = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
        stream.encode_until(8)
        stream.engine.ask("What is moving?")  # the question and decode tables are made on first use
        stream.encode_until(12)
        refs = _buffers(stream.engine)
        assert len(stream.engine.cache.graphs) >= 2  # decoder + a question bucket at least: the tables are exercised
        kv_bytes = stream.engine.cache.hf.layers[0]._k.untyped_storage().nbytes()
        assert kv_bytes > 0
        stream.source.close()
        del stream
        alive = [r() for r in refs if r() is not None]
        assert alive == [], f"{len(alive)} of {len(refs)} cache objects outlived the stream: {[type(a).__name__ for a in alive]}"


def test_dropping_a_live_session_frees_its_cache_without_the_collector(tiny, clip_24fps):
    from streamchat.session import LiveSession

    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4, max_new_tokens=6)
    with no_collector():
        live = LiveSession.create(tiny, VideoSource(clip_24fps, config.sampling), config, name="lifetime")
        live.encode_to(1.0)
        live.ask("What is moving?")
        refs = _buffers(live.engine)
        live.close()
        del live
        alive = [r() for r in refs if r() is not None]
        assert alive == [], f"{len(alive)} of {len(refs)} cache objects outlived the session: {[type(a).__name__ for a in alive]}"


@pytest.mark.parametrize("history", ["drop", "keep"])
def test_resume_fills_the_planned_buffers_and_keeps_them(tiny, clip_24fps, tmp_path, history):
    """snapshots.load copies the saved rows into the buffers the new Stream planned: the same data_ptr
    and capacity before and after the load, the same cache generation (no graph recapture), and the
    chunks after it stay in those buffers up to the end of the video."""
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4, history=history, max_new_tokens=6)
    first = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    first.encode_until(8)
    first.engine.ask("What is moving?")
    first.encode_until(12)
    path = tmp_path / "snap.safetensors"
    snapshots.save(first, path, video_path=str(clip_24fps), video_sha256="x")
    saved_tokens = first.engine.cache_tokens
    del first

    resumed = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    cache = resumed.engine.cache
    planned = hf.buffers_key(cache.hf)
    generation = cache.generation
    assert planned and all(cap >= saved_tokens for _, cap in planned)
    snapshots.load(path, resumed)
    assert resumed.engine.cache_tokens == saved_tokens
    assert hf.buffers_key(cache.hf) == planned, "restore allocated a second cache"
    assert cache.generation == generation and resumed.engine.cache is cache
    resumed.encode_until(resumed.total_frames)
    assert hf.buffers_key(cache.hf) == planned, "the chunks after a restore moved the buffers (every graph recaptured)"
    assert cache.generation == generation
    resumed.engine.ask("And now?")
    assert hf.buffers_key(cache.hf) == planned
