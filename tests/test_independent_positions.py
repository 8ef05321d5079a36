"""The positions the language model receives, against an independent implementation of Qwen's rule.

The engine's positions are captured where the model consumes them (the rotary embedding), placed at
the cache row they were written to (so rolled-back questions and padding are overwritten as in the
cache), and compared with `reference_qwen.reference_positions` run on transformers' processor output
for the same dialogue. Nothing here calls streamchat/positions.py.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from streamchat import hf
from streamchat.config import SessionConfig
from streamchat.stream import Stream
from streamchat.video import Sampling, VideoSource

from reference_qwen import client_text, processor_inputs, reference_positions, user


class Recorder:
    """Position ids [3, L] of every rotary-embedding call of the language model, written at the cache row
    the call appends to; a later call at an earlier row overwrites (a rollback, a question's padding)."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.rows: list[list[int]] = []
        rotary = stream.loaded.model.model.language_model.rotary_emb
        self.handle = rotary.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        pos = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
        at = self.stream.engine.cache_tokens
        self.rows = self.rows[:at] + pos[:, 0].T.tolist()

    def positions(self, n: int) -> torch.Tensor:
        assert len(self.rows) >= n
        return torch.tensor(self.rows[:n], dtype=torch.long).T

    def close(self) -> None:
        self.handle.remove()


def exact_fps(sampling: Sampling, native_fps: float) -> Fraction:
    return Fraction(sampling.fps) if sampling.fps is not None else Fraction(native_fps) / sampling.stride


# name: (clip fixture, history, sampling, turns); a turn = (frames encoded before it or None for no new
# frames, question). Each case catches transformers 5.x's resume rule: some block's temporal extent
# passes its spatial one (T at 2 fps >= 3; 2.4 fps: 4 patches reach s + 5; 4 fps: 5 patches reach s + 4).
CASES = {
    "keep-several-blocks-fps-2": ("clip_long", "keep", Sampling(fps=2.0), [(6, "What is red?"), (12, "Where is it now?"), (None, "Sure?"), (18, "And the disc?")]),
    "drop-fps-2": ("clip_long", "drop", Sampling(fps=2.0), [(6, "What is red?"), (14, "Where is it now?")]),
    "stride-10-fps-2.4": ("clip_24fps", "drop", Sampling(fps=None, stride=10), [(4, "What is red?"), (8, "What moved?")]),
    "odd-frames-fps-4": ("clip_24fps", "drop", Sampling(fps=4.0, max_frames=9), [(4, "What is red?"), (9, "What moved?")]),
}


def run_case(tiny, request, case: str):
    """Stream a case's dialogue with positions recorded; return (engine positions, reference positions,
    the stream) for the last turn's prompt and every answer token that went into the cache."""
    clip, history, sampling, turns = CASES[case]
    config = SessionConfig(model="tiny-random", sampling=sampling, chunk_frames=4, history=history, max_new_tokens=3,
                           static_decode=False)  # decode steps through the language model, where the hook sees them
    stream = Stream(tiny, VideoSource(request.getfixturevalue(clip), sampling), config)
    fps = exact_fps(sampling, stream.source.info.native_fps)
    assert float(fps) == pytest.approx(stream.fps)
    tok, vocab = tiny.processor.tokenizer, stream.engine.vocab
    recorder = Recorder(stream)
    messages, videos, shown = [], [], 0
    try:
        for frames, q in turns:
            if frames is not None:
                stream.encode_until(frames)
            if history == "keep":
                if frames is not None:
                    videos.append(stream.source.read(shown, frames - shown))
                    shown = frames
                messages.append(user(q, frames is not None))
            else:  # one user message with every frame so far
                videos, messages = [stream.source.read(0, stream.next_frame)], [user(q, True)]
            ans = stream.engine.ask(q)
            if history == "keep":
                messages.append({"role": "assistant", "content": client_text(tok, ans.token_ids, vocab.eos)})
    finally:
        recorder.close()
    inputs = processor_inputs(tiny.processor, messages[:-1] if history == "keep" else messages, videos, float(fps))
    grids = inputs["video_grid_thw"].tolist()
    # the answer's tokens follow the prompt as text; the last one never enters the cache
    ids = inputs["input_ids"][0].tolist() + ans.token_ids[:-1]
    expected = reference_positions(ids, grids, [2 / fps] * len(grids), video_pad=vocab.video_pad)
    return recorder.positions(len(ids)), expected, stream, grids


@pytest.mark.parametrize("case", list(CASES))
def test_positions_match_the_reference_rule(tiny, request, case):
    got, expected, stream, grids = run_case(tiny, request, case)
    assert got.shape == expected.shape
    first_bad = next((i for i in range(got.shape[1]) if not torch.equal(got[:, i], expected[:, i])), None)
    assert first_bad is None, (case, first_bad, got[:, first_bad].tolist(), expected[:, first_bad].tolist())
    if case.startswith("keep"):
        assert len(grids) == 3  # three video blocks, one per user turn with new frames
    # the case means what it says: a video block's temporal extent passes its spatial one
    spg = 2 / exact_fps(CASES[case][2], stream.source.info.native_fps)
    assert any((t - 1) * 2 * spg >= max(gh, gw) // 2 for t, gh, gw in grids), grids


def test_fractional_fps_spreads_temporal_positions(tiny, request):
    """Stride 10 on a 24 fps clip: 2.4 fps, 5/3 of a position per temporal patch. The last turn's 8
    frames are 4 patches at t = s + floor(5k/3) = s, s+1, s+3, s+5 (hand-computed), and the text after
    them starts at s + 6 (transformers 5.17 would give s, s, s, s and s + 4)."""
    got, expected, stream, grids = run_case(tiny, request, "stride-10-fps-2.4")
    assert grids == [[4, 8, 8]]
    s = len(stream.engine.vocab.head) + len(stream.engine.vocab.user_open) + 1  # after <|vision_start|>
    video = got[:, s : s + 4 * 16]
    assert video[0].view(4, 16)[:, 0].tolist() == [s, s + 1, s + 3, s + 5]
    assert video[1].view(4, 4, 4)[0, :, 0].tolist() == [s, s + 1, s + 2, s + 3]
    assert got[:, s + 64].tolist() == [s + 6] * 3  # <|vision_end|>
    assert torch.equal(got, expected)


def test_reference_rule_reproduces_the_documented_example():
    """The reference itself, on the example in Qwen's docstring: 3 temporal patches of a 2x2 merged grid
    at fps 1 with tokens_per_second 25 give t = 0, 50, 100; the text after starts at 101."""
    pad = 9
    ids = [1, 2] + [pad] * 12 + [3]
    pos = reference_positions(ids, [[3, 4, 4]], [Fraction(2)], video_pad=pad, tokens_per_second=25)
    assert pos[0].tolist() == [0, 1] + [2] * 4 + [52] * 4 + [102] * 4 + [103]
    assert pos[1, 2:14].tolist() == [2, 2, 3, 3] * 3 and pos[2, 2:14].tolist() == [2, 3, 2, 3] * 3
