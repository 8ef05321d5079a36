"""Checks from outside the code under test: streamchat's token layout against the chat template.

The expectation is built only from transformers' real Qwen2.5-VL processor (`apply_chat_template`,
then `processor(text=..., videos=...)`) and the published Qwen2.5-VL Instruct chat template
(tests/reference_qwen.py), for multi-turn dialogues in both history modes. No streamchat layout code
builds it.

Deliberate breakages (issue 11) and the tests that fail on each; every one was made for real in the
lead-owned code (edit, run these four files, revert), and the lists are what failed:

  (a) drop `<|im_start|>user\n` before a kept turn's video (StreamEngine.encode opening the next turn)
      test_independent_layout.py::test_keep_mode_dialogue_matches_the_chat_template[video-every-turn]
      test_independent_layout.py::test_keep_mode_dialogue_matches_the_chat_template[text-turn-between]
      test_independent_positions.py::test_positions_match_the_reference_rule[keep-several-blocks-fps-2]
  (b) drop `<|im_end|>\n` after a kept answer (StreamEngine.ask: the pending tail and the transcript)
      test_independent_layout.py::test_keep_mode_dialogue_matches_the_chat_template[video-every-turn]
      test_independent_layout.py::test_keep_mode_dialogue_matches_the_chat_template[text-turn-between]
      test_independent_layout.py::test_a_text_only_keep_turn_matches_the_chat_template
      test_independent_positions.py::test_positions_match_the_reference_rule[keep-several-blocks-fps-2]
  (c) the out-of-memory retry never doubles the stride (offline.answer_with_retry without
      `prompt = halve(prompt); factor *= 2`)
      test_independent_faults.py::test_out_of_memory_retry_doubles_the_stride_until_it_fits
      test_independent_faults.py::test_out_of_memory_at_every_stride_gives_up_after_four_attempts
      (halving the frames but keeping the old fps for the positions fails the first one too)
  (d) no sampling check at restore (snapshots.Snapshot.restore's fps / frame-count check removed)
      test_independent_faults.py::test_restore_refuses_a_stream_sampled_at_another_fps
  (e) transformers 5.x's position rule: text after a video resumes at s + max(H, W)
      test_independent_positions.py::test_positions_match_the_reference_rule[every case]
      test_independent_positions.py::test_fractional_fps_spreads_temporal_positions
  (f) the temporal interval truncated to an integer (tokens_per_second * int(2 / fps))
      test_independent_positions.py::test_positions_match_the_reference_rule[stride-10-fps-2.4]
      test_independent_positions.py::test_positions_match_the_reference_rule[odd-frames-fps-4]
      test_independent_positions.py::test_fractional_fps_spreads_temporal_positions
"""

from __future__ import annotations

import pytest

from streamchat.config import SessionConfig
from streamchat.engine import TextSeg, VideoSeg
from streamchat.stream import Stream
from streamchat.video import Sampling, VideoSource

from reference_qwen import client_text, processor_inputs as reference, user

ANSWER_TOKENS = 3  # short enough that tiny-random's kept answers survive a text round trip (client_text)


def rendered(prompt, video_pad: int) -> list[int]:
    """A turn's prompt (engine segments) as the token ids the model sees: pads for each video's tokens."""
    ids: list[int] = []
    for seg in prompt:
        if isinstance(seg, TextSeg):
            ids += seg.ids
        else:
            assert isinstance(seg, VideoSeg)
            ids += [video_pad] * (len(seg.frames) // 2 * seg.grid_h * seg.grid_w)
    return ids


def new_stream(tiny, clip, history: str, system: str | None = None, **sampling) -> Stream:
    config = SessionConfig(model="tiny-random", sampling=Sampling(**sampling), chunk_frames=4, history=history,
                           max_new_tokens=ANSWER_TOKENS)
    if system is not None:
        config.system_prompt = system
    return Stream(tiny, VideoSource(clip, config.sampling), config)


# (frames encoded before the question, question); None frames = no new frames since the last answer
DIALOGUES = {
    "video-every-turn": [(8, "What color is the square?"), (16, "Where is the disc?"), (24, "Is there anything blue?")],
    "text-turn-between": [(8, "What color is the square?"), (None, "Are you sure?"), (20, "And now?")],
}


@pytest.mark.parametrize("name", list(DIALOGUES))
def test_keep_mode_dialogue_matches_the_chat_template(tiny, clip_24fps, name):
    """history=keep: every turn's prompt is the template's rendering of the whole dialogue so far, with
    one video per user turn holding the frames since the last answer."""
    system = "Answer in a few words."
    stream = new_stream(tiny, clip_24fps, "keep", system=system, fps=8.0)
    tok, vocab = tiny.processor.tokenizer, stream.engine.vocab
    messages: list[dict] = [{"role": "system", "content": system}]
    videos, shown = [], 0
    for frames, q in DIALOGUES[name]:
        if frames is not None:
            stream.encode_until(frames)
            videos.append(stream.source.read(shown, frames - shown))
            shown = frames
        messages.append(user(q, frames is not None))
        ans = stream.engine.ask(q)
        expected = reference(tiny.processor, messages, videos, fps=8.0)
        assert rendered(ans.prompt, vocab.video_pad) == expected["input_ids"][0].tolist(), (name, q)
        grids = [[len(s.frames) // 2, s.grid_h * 2, s.grid_w * 2] for s in ans.prompt if isinstance(s, VideoSeg)]
        assert grids == expected["video_grid_thw"].tolist()
        messages.append({"role": "assistant", "content": client_text(tok, ans.token_ids, vocab.eos)})
    assert len(videos) == sum(f is not None for f, _ in DIALOGUES[name])


def test_a_text_only_keep_turn_matches_the_chat_template(tiny, clip_24fps):
    """Two questions in a row with no frames between: the second is a text-only user turn, and the
    default system prompt is the template's implicit one."""
    stream = new_stream(tiny, clip_24fps, "keep", fps=8.0)
    stream.encode_until(12)
    first = stream.engine.ask("What is moving?")
    again = stream.engine.ask("Say it again.")
    a1 = client_text(tiny.processor.tokenizer, first.token_ids, stream.engine.vocab.eos)
    messages = [user("What is moving?", True), {"role": "assistant", "content": a1}, user("Say it again.", False)]
    expected = reference(tiny.processor, messages, [stream.source.read(0, 12)], fps=8.0)
    assert rendered(again.prompt, stream.engine.vocab.video_pad) == expected["input_ids"][0].tolist()


def test_drop_mode_turns_match_the_chat_template(tiny, clip_24fps):
    """history=drop: each turn is one user message with every frame so far; answers leave no trace."""
    stream = new_stream(tiny, clip_24fps, "drop", fps=8.0)
    for frames, q in [(8, "What color is the square?"), (16, "Where is the disc?"), (16, "Is there anything blue?")]:
        stream.encode_until(frames)
        ans = stream.engine.ask(q)
        expected = reference(tiny.processor, [user(q, True)], [stream.source.read(0, frames)], fps=8.0)
        assert rendered(ans.prompt, stream.engine.vocab.video_pad) == expected["input_ids"][0].tolist(), q
        assert expected["video_grid_thw"].tolist() == [[frames // 2, 8, 8]]


def test_odd_frame_count_is_padded_as_the_processor_pads(tiny, clip_24fps):
    """7 frames at the video's end: the processor repeats the last frame to make a pair; so does streamchat."""
    stream = new_stream(tiny, clip_24fps, "drop", fps=8.0, max_frames=7)
    stream.encode_until(stream.total_frames)
    ans = stream.engine.ask("What happened?")
    frames = stream.source.read(0, 7)
    assert len(frames) == 7
    expected = reference(tiny.processor, [user("What happened?", True)], [frames], fps=8.0)
    assert expected["video_grid_thw"].tolist() == [[4, 8, 8]]
    assert rendered(ans.prompt, stream.engine.vocab.video_pad) == expected["input_ids"][0].tolist()
