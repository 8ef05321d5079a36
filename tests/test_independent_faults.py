"""Faults injected from outside: out of memory in the offline prefill, and a snapshot restored into a
stream that samples the video at another rate. Breakages (c) and (d) of issue 11 (see
test_independent_layout.py for the whole list)."""

from __future__ import annotations

import pytest
import torch

from streamchat import snapshots
from streamchat.clips import make_clip
from streamchat.compare import match
from streamchat.config import SessionConfig
from streamchat.engine import VideoSeg
from streamchat.offline import answer_with_retry
from streamchat.snapshots import SnapshotError
from streamchat.stream import Stream
from streamchat.video import Sampling, VideoSource


class FramesBudget:
    """The model's forward raises torch.OutOfMemoryError for any prompt holding more than `limit` video
    frames (2 per temporal patch): a GPU that fits `limit` frames, on the CPU. Records what it was asked."""

    def __init__(self, model, limit: int):
        self.model, self.limit, self.asked = model, limit, []
        self.forward = model.forward

    def __call__(self, *args, video_grid_thw=None, **kwargs):
        frames = 0 if video_grid_thw is None else int(video_grid_thw[:, 0].sum()) * 2
        self.asked.append(frames)
        if frames > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {frames} frames' worth (injected)")
        return self.forward(*args, video_grid_thw=video_grid_thw, **kwargs)


@pytest.fixture
def budget(tiny, monkeypatch):
    def install(limit: int) -> FramesBudget:
        fault = FramesBudget(tiny.model, limit)
        monkeypatch.setattr(tiny.model, "forward", fault)  # an instance attribute: nn.Module.__call__ finds it
        return fault

    return install


def streamed(tiny, clip, fps: float, frames: int, question: str, max_new: int = 6):
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=fps), chunk_frames=4, max_new_tokens=max_new)
    stream = Stream(tiny, VideoSource(clip, config.sampling), config)
    stream.encode_until(frames)
    return stream, stream.engine.ask(question)


def test_out_of_memory_retry_doubles_the_stride_until_it_fits(tiny, clip_24fps, budget):
    """24 frames at 8 fps on a budget of 8 frames: 24 and 12 run out of memory, 6 (stride x4, 2 fps)
    fit. The answer is the one a stream sampled at 2 fps gives for the same 6 frames."""
    q = "What is moving?"
    stream, ans = streamed(tiny, clip_24fps, 8.0, 24, q)
    fault = budget(8)
    off, attempts = answer_with_retry(tiny, ans.prompt, stream.read_frames, stream.fps, q, 6, stream.engine.vocab)
    assert [(a.stride_factor, a.frames, a.ok) for a in attempts] == [(1, 24, False), (2, 12, False), (4, 6, True)]
    assert all("out of memory" in a.error for a in attempts[:2]) and attempts[2].error is None
    assert fault.asked == [24, 12, 6]
    assert off is not None
    assert [s.frames for s in off.prompt if isinstance(s, VideoSeg)] == [[0, 4, 8, 12, 16, 20]]
    # the retry is a real answer at the new stride: fps / 4 for the positions, the same frames
    slow, slow_ans = streamed(tiny, clip_24fps, 2.0, 6, q)
    assert slow.fps == stream.fps / 4
    assert torch.equal(torch.from_numpy(slow.read_frames(list(range(6)))), torch.from_numpy(stream.read_frames([0, 4, 8, 12, 16, 20])))
    m = match(slow_ans, off)
    assert m["identical"], m
    assert m["max_logit_diff"] <= 1e-4


def test_out_of_memory_at_every_stride_gives_up_after_four_attempts(tiny, clip_24fps, budget):
    q = "What is moving?"
    stream, ans = streamed(tiny, clip_24fps, 8.0, 24, q)
    fault = budget(2)
    off, attempts = answer_with_retry(tiny, ans.prompt, stream.read_frames, stream.fps, q, 6, stream.engine.vocab)
    assert off is None
    # 24 -> 12 -> 6 -> 3 frames (the last a padded pair: 4 frames' worth asked for)
    assert [(a.stride_factor, a.frames, a.ok) for a in attempts] == [(1, 24, False), (2, 12, False), (4, 6, False), (8, 3, False)]
    assert fault.asked == [24, 12, 6, 4]


@pytest.fixture(scope="module")
def clip_20fps(tmp_path_factory):
    """3.6 s at 20 fps: 72 frames, as many as clip_24fps, so stride 10 samples 8 frames from both."""
    return make_clip(tmp_path_factory.mktemp("clips") / "clip20.mp4", seconds=3.6, fps=20.0, width=112, height=112)


def test_restore_refuses_a_stream_sampled_at_another_fps(tiny, clip_24fps, clip_20fps, tmp_path):
    """The same session settings (stride 10) over a video re-encoded at 20 fps: 8 frames either way,
    but 2.0 instead of 2.4 frames per second, so every cached temporal position would be wrong. The
    model and config checks pass; restore itself must refuse, and change nothing."""
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=None, stride=10), chunk_frames=4, max_new_tokens=4)
    made = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    made.encode_until(4)
    written = snapshots.save(made, tmp_path / "s.safetensors", video_path=str(clip_24fps), video_sha256="x")

    other = Stream(tiny, VideoSource(clip_20fps, config.sampling), config)
    assert other.total_frames == made.total_frames == 8
    assert (made.fps, other.fps) == (pytest.approx(2.4), pytest.approx(2.0))
    snap = snapshots.read(written.path, expected_sha256=written.sha256)
    snap.check(tiny, config=config)  # nothing else tells them apart
    before = (other.engine.cache_tokens, other.engine.cursor.copy(), list(other.engine.pending), other.next_frame)
    with pytest.raises(SnapshotError, match=r"at 2\.4 fps.*at 2\.0.*sampling changed"):
        snap.restore(other)
    with pytest.raises(SnapshotError, match="sampling changed"):
        snapshots.load(written.path, other, expected_sha256=written.sha256)
    assert (other.engine.cache_tokens, other.engine.cursor, other.engine.pending, other.next_frame) == before

    same = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    snapshots.load(written.path, same, expected_sha256=written.sha256)  # the check refuses only what differs
    assert same.engine.cache_tokens == made.engine.cache_tokens > 0


def test_a_prompt_over_the_models_context_is_answered_at_the_stride_that_fits(tiny, clip_24fps):
    """A long bounded session's whole video can exceed the model's context (an hour of 448² is 921k
    tokens): offline doubles the stride until the prompt fits, and says so, before running anything.
    Here a context of 120 tokens: 24 frames (12 pages of 16) and 12 frames do not fit, 6 do."""
    from streamchat.layout import prompt_tokens

    q = "What is moving?"
    stream, ans = streamed(tiny, clip_24fps, 8.0, 24, q)
    assert prompt_tokens(ans.prompt) == ans.cache_tokens + len(ans.prompt[-1].ids)  # the layout counts the cache's tokens
    off, attempts = answer_with_retry(tiny, ans.prompt, stream.read_frames, stream.fps, q, 6, stream.engine.vocab, context=120)
    assert [(a.stride_factor, a.frames, a.ok) for a in attempts] == [(1, 24, False), (2, 12, False), (4, 6, True)]
    assert attempts[0].error.endswith("tokens do not fit the model's context of 120")
    assert off is not None and prompt_tokens(off.prompt) + 6 <= 120
