"""M-RoPE positions pinned by hand-computed expectations (the reference rule in qwen25vl.md)."""

from __future__ import annotations

from fractions import Fraction

import torch

from streamchat.config import SessionConfig
from streamchat.engine import QUESTION_BUCKET
from streamchat.positions import Cursor, temporal_interval, video_block_max, video_positions
from streamchat.stream import Stream
from streamchat.video import Sampling, VideoSource


def test_interval_is_exact_for_24_and_2_fps():
    assert temporal_interval(24.0, 2) == Fraction(1, 6)
    assert temporal_interval(2.0, 2) == Fraction(2)
    assert temporal_interval(29.97, 2) == Fraction(400, 2997)  # 2 * 2 / 29.97


def test_short_clip_at_24fps_hand_computed():
    # block starts at s=10, 8 temporal patches of a 2x3 merged grid, 1/6 position per patch:
    # t = 10 + floor(k/6) -> six patches at 10, then 11, 11
    pos = video_positions(10, 0, 8, 2, 3, Fraction(1, 6))
    t, h, w = pos.view(3, 8, 2, 3)
    assert t[:, 0, 0].tolist() == [10, 10, 10, 10, 10, 10, 11, 11]
    assert h[0, :, 0].tolist() == [10, 11]
    assert w[0, 0, :].tolist() == [10, 11, 12]
    assert video_block_max(10, 8, 2, 3, Fraction(1, 6)) == 12  # the width wins
    c = Cursor(next_pos=10)
    c.video(8, 2, 3, Fraction(1, 6))
    assert c.text(2).tolist() == [[13, 14]] * 3  # text resumes at max + 1


def test_long_clip_at_2fps_text_resumes_after_temporal_extent():
    # 20 patches at 2 fps: t = 5 + 2k reaches 43, far past the spatial extent (5 + 2 = 7).
    # transformers 5.x would resume text at s + max(H, W) = 8, reusing the video's positions.
    pos = video_positions(5, 0, 20, 2, 3, Fraction(2))
    assert pos[0].view(20, 6)[:, 0].tolist() == [5 + 2 * k for k in range(20)]
    c = Cursor(next_pos=5)
    c.video(20, 2, 3, Fraction(2))
    assert c.text(1)[:, 0].tolist() == [44, 44, 44]


def test_chunked_positions_equal_whole_block():
    whole = video_positions(7, 0, 12, 3, 4, Fraction(1, 6))
    c = Cursor(next_pos=7)
    parts = [c.video(n, 3, 4, Fraction(1, 6)) for n in (1, 2, 4, 5)]
    assert torch.equal(torch.cat(parts, dim=1), whole)


def _capture_positions(loaded, seen: list):
    """Record the [3, L] position ids of every rotary-embedding call of the language model: each chunk
    append, question prefill (transformers' forward or streamchat's lean loop) and decode step."""

    def hook(mod, args, kw):
        pos = kw["position_ids"] if "position_ids" in kw else args[1]
        seen.append(pos[:, 0].clone())

    return loaded.model.model.language_model.rotary_emb.register_forward_pre_hook(hook, with_kwargs=True)


def test_engine_feeds_the_reference_positions(tiny, clip_long):
    """Capture the position ids the language model receives while streaming the long clip at 2 fps."""
    seen = []
    handle = _capture_positions(tiny, seen)
    try:
        config = SessionConfig(model="tiny-random", sampling=Sampling(fps=2.0), chunk_frames=4, max_new_tokens=2,
                               static_decode=False)  # decode through the language model, so the hook sees it
        stream = Stream(tiny, VideoSource(clip_long, config.sampling), config)
        stream.encode_until(12)  # 3 chunks of 4 frames: 6 temporal patches of a 4x4 merged grid (112 px)
        n_question = len(stream.engine.pending) + len(stream.engine.question_ids("What happened?"))
        stream.engine.ask("What happened?")
    finally:
        handle.remove()
    prefix = len(stream.engine.vocab.head) + len(stream.engine.vocab.user_open) + 1  # ... <|vision_start|>
    s = prefix  # the video block starts right after <|vision_start|>
    first = seen[0]
    assert first[:, :prefix].tolist() == [list(range(prefix))] * 3
    chunk0 = first[:, prefix:]
    assert chunk0.shape[1] == 2 * 16
    assert chunk0[0].tolist() == [s] * 16 + [s + 2] * 16  # t = s + 2k
    assert chunk0[1].view(2, 4, 4)[0, :, 0].tolist() == [s, s + 1, s + 2, s + 3]
    chunk2 = seen[2]
    assert chunk2[0].tolist() == [s + 8] * 16 + [s + 10] * 16  # patches k = 4, 5 continue the block
    question = seen[3]
    assert question[:, 0].tolist() == [s + 11] * 3  # <|vision_end|> at max (s + 10) + 1
    # the prefill is padded to a multiple of QUESTION_BUCKET; the pad continues the positions (and is cut)
    assert question.shape[1] % QUESTION_BUCKET == 0 and question.shape[1] - n_question < QUESTION_BUCKET
    assert question[0].tolist() == list(range(s + 11, s + 11 + question.shape[1]))
    decode = seen[4]
    assert decode[:, 0].tolist() == [s + 11 + n_question] * 3  # first answer token: last real one + 1


def test_engine_positions_for_a_short_clip_at_24fps(tiny, clip_24fps):
    """16 frames at 24 fps = 8 temporal patches, 1/6 position each: t = s for k < 6, s + 1 for k = 6, 7."""
    seen = []
    handle = _capture_positions(tiny, seen)
    try:
        config = SessionConfig(model="tiny-random", sampling=Sampling(fps=24.0), chunk_frames=4, max_new_tokens=1)
        stream = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
        stream.encode_until(16)
        stream.engine.ask("What happened?")
    finally:
        handle.remove()
    s = len(stream.engine.vocab.head) + len(stream.engine.vocab.user_open) + 1
    t_rows = [seen[0][0, s:]] + [c[0] for c in seen[1:4]]  # the first call also holds the prompt's head
    assert [row.view(2, 16)[:, 0].tolist() for row in t_rows] == [[s, s], [s, s], [s, s], [s + 1, s + 1]]
    assert seen[3][2].view(2, 4, 4)[0, 0].tolist() == [s, s + 1, s + 2, s + 3]  # w = s + j
    # the block's largest position is the spatial s + 3 (4x4 merged grid), so text resumes at s + 4
    assert seen[4][:, 0].tolist() == [s + 4] * 3
