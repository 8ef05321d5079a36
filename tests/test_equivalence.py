"""Streaming and offline are the same computation: same greedy tokens, first-step logits within 1e-4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streamchat import hf
from streamchat.cli import main
from streamchat.compare import match, run_compare
from streamchat.config import SessionConfig
from streamchat.engine import TextSeg, VideoSeg
from streamchat.offline import answer_offline
from streamchat.stream import Stream
from streamchat.video import Sampling, VideoSource

TOL = 1e-4


@pytest.mark.parametrize("chunk", [2, 4, 8])
@pytest.mark.parametrize("fps,max_frames,clip", [(24.0, 31, "clip_24fps"), (2.0, 23, "clip_long")])
def test_streaming_matches_offline_token_for_token(tiny, request, chunk, fps, max_frames, clip):
    # 31 and 23 frames: not a multiple of any chunk size, and odd, so the last pair is padded
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=fps, max_frames=max_frames), chunk_frames=chunk, max_new_tokens=16)
    report = run_compare(tiny, VideoSource(request.getfixturevalue(clip), config.sampling), config, "What is moving?")
    # `frames` counts the video's frames on both sides; the padded pair's repeat is no frame of its own
    assert report["streaming"]["frames"] == report["offline"]["frames"] == max_frames
    assert report["attempts"][0]["frames"] == max_frames
    assert report["streaming"]["chunks"] == -(-(max_frames + 1) // chunk)
    assert report["match"]["identical"] is True
    assert report["match"]["first_divergence"] is None
    assert report["match"]["max_logit_diff"] <= TOL
    assert report["streaming"]["token_ids"] == report["offline"]["token_ids"]
    assert len(report["streaming"]["token_ids"]) >= 1


@pytest.mark.parametrize("history", ["keep", "drop"])
def test_three_questions_at_different_times_match_offline(tiny, clip_24fps, history):
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4, history=history, max_new_tokens=10)
    stream = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    questions = [(0.9, "What color is the square?"), (1.7, "Where is the disc?"), (2.9, "Is there anything blue?")]
    for at, q in questions:
        stream.encode_until(stream.frames_at(at))
        ans = stream.engine.ask(q)
        off = answer_offline(tiny, ans.prompt, stream.read_frames, stream.fps, q, 10, stream.engine.vocab)
        m = match(ans, off)
        assert m["identical"], (history, at, m)
        assert m["max_logit_diff"] <= TOL
    videos = [s for s in ans.prompt if isinstance(s, VideoSeg)]
    # keep: one video segment per user turn; drop: one block growing across the session
    assert len(videos) == (3 if history == "keep" else 1)
    assert sum(len(v.frames) for v in videos) == stream.frames_at(2.9) // 2 * 2


def test_keep_turn_without_new_frames_is_a_text_turn(tiny, clip_24fps):
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4, history="keep", max_new_tokens=6)
    stream = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    stream.encode_until(8)
    stream.engine.ask("First?")
    ans = stream.engine.ask("And again?")  # no frames since the last answer
    off = answer_offline(tiny, ans.prompt, stream.read_frames, stream.fps, ans.question, 6, stream.engine.vocab)
    assert match(ans, off)["identical"]
    assert isinstance(ans.prompt[-1], TextSeg) and isinstance(ans.prompt[-2], TextSeg)


def test_layout_matches_the_processor_and_chat_template(tiny, clip_24fps):
    """streamchat's token layout and pixels are what the real processor makes for the same frames."""
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4, max_new_tokens=4)
    source = VideoSource(clip_24fps, config.sampling)
    stream = Stream(tiny, source, config)
    stream.encode_until(12)
    q = "What color is the square?"
    prompt = stream.engine.prompt_with(stream.engine.question_ids(q))
    ids = []
    for seg in prompt:
        ids += seg.ids if isinstance(seg, TextSeg) else [stream.engine.vocab.video_pad] * seg.tokens
    frames = source.read(0, 12)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}]
    text = tiny.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = hf.processor_prompt_ids(tiny.processor, text, [frames], fps=8.0)
    assert out["input_ids"][0].tolist() == ids
    whole, grid = hf.video_pixels(tiny.processor, frames)
    chunks = [hf.video_pixels(tiny.processor, frames[i : i + 4])[0] for i in range(0, 12, 4)]
    assert torch.equal(torch.cat(chunks), whole)  # per-chunk preprocessing is exact
    assert torch.equal(out["pixel_values_videos"], whole)
    assert grid[0].tolist() == [6, 8, 8]


def test_compare_cli_json(tiny, clip_24fps, capsys):
    rc = main(["compare", str(clip_24fps), "--model", "tiny-random", "--fps", "8", "--chunk-frames", "4",
               "--max-new-tokens", "6", "--question", "What is moving?", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    for mode in ("streaming", "offline"):
        for key in ("frames", "answer", "token_ids", "ttft_s", "latency_s", "cache_tokens", "peak_bytes"):
            assert key in doc[mode], (mode, key)
    assert "encode_s" in doc["streaming"] and "prefill_s" in doc["offline"]
    assert doc["match"]["identical"] is True and doc["match"]["max_logit_diff"] <= TOL
    assert doc["attempts"] == [{"stride_factor": 1, "frames": 24, "ok": True, "error": None}]
    # the cache's real size: 512 bytes per token for tiny-random in float32
    assert doc["streaming"]["cache_bytes"] == doc["streaming"]["per_chunk"][-1]["cache_tokens"] * 512


def test_compare_json_counts_an_odd_clip_the_same_on_both_sides(tiny, clip_24fps, capsys):
    """7 frames: offline prefills a padded pair (8 frames' worth), yet both sides report 7 frames."""
    rc = main(["compare", str(clip_24fps), "--model", "tiny-random", "--fps", "8", "--max-frames", "7",
               "--chunk-frames", "4", "--max-new-tokens", "3", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["streaming"]["frames"] == doc["offline"]["frames"] == 7
    assert [a["frames"] for a in doc["attempts"]] == [7]
    assert doc["streaming"]["chunks"] == 2  # frames 0-3, then 4-6 and the pad


def test_compare_report_writes_markdown_and_png(tiny, clip_24fps, tmp_path, capsys):
    report = tmp_path / "cmp.md"
    rc = main(["compare", str(clip_24fps), "--model", "tiny-random", "--fps", "4", "--max-new-tokens", "4", "--report", str(report)])
    assert rc == 0
    md = report.read_text()
    assert "| TTFT |" in md and "identical = True" in md and "![" in md
    png = report.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "identical: True" in out


def test_rollback_leaves_cache_bit_identical(tiny, clip_24fps):
    """Ask, roll back, keep streaming: the cache equals one that never saw the question."""
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4, history="drop", max_new_tokens=8)
    a = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    b = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    a.encode_until(12)
    before = [(k.clone(), v.clone()) for k, v in hf.cache_layers(a.engine.cache.hf)]
    a.engine.ask("What color is the square?")
    after = hf.cache_layers(a.engine.cache.hf)
    assert all(torch.equal(k0, k1) and torch.equal(v0, v1) for (k0, v0), (k1, v1) in zip(before, after))
    a.encode_until(24)
    b.encode_until(24)
    la, lb = hf.cache_layers(a.engine.cache.hf), hf.cache_layers(b.engine.cache.hf)
    assert len(la) == len(lb) == 2
    for (ka, va), (kb, vb) in zip(la, lb):
        assert ka.shape == kb.shape
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert a.engine.cursor == b.engine.cursor
    assert a.engine.ask("Where?").token_ids == b.engine.ask("Where?").token_ids


def test_cache_bytes_is_the_real_tensor_size(tiny, clip_24fps):
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4)
    stream = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    stats = stream.encode_until(8)
    tc = tiny.model.config.text_config
    per_token = tc.num_hidden_layers * 2 * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 4
    assert per_token == 512  # 2 layers x (K + V) x 2 heads x 16 dims x 4 bytes
    assert stats[-1].cache_bytes == stats[-1].cache_tokens * per_token > 0


def test_warmup_leaves_the_stream_untouched(tiny, clip_24fps):
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4, history="keep", max_new_tokens=6)
    a = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    b = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    a.encode_until(8)
    b.encode_until(8)
    a.engine.warmup()
    assert a.engine.cache_tokens == b.engine.cache_tokens and a.engine.cursor == b.engine.cursor
    assert a.engine.config.history == "keep"
    assert a.engine.ask("Where?").token_ids == b.engine.ask("Where?").token_ids


@pytest.mark.parametrize("history", ["keep", "drop"])
def test_interrupted_answer_leaves_the_stream_as_before(tiny, clip_24fps, history):
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4, history=history, max_new_tokens=8)
    a = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    b = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    a.encode_until(8)
    b.encode_until(8)

    def stop_after_three(token, seen=[]):
        seen.append(token)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        a.engine.ask("What color?", on_token=stop_after_three)
    assert a.engine.cache_tokens == b.engine.cache_tokens and a.engine.cursor == b.engine.cursor
    a.encode_until(16)
    b.encode_until(16)
    assert a.engine.ask("Where?").token_ids == b.engine.ask("Where?").token_ids


def test_offline_answer_records_how_close_each_greedy_call_was(tiny, clip_24fps):
    """The offline path keeps each step's top-1 minus top-2 logit; `match` reports it where two answers
    part (how bf16 runs on a GPU tell a rounding call from a different computation)."""
    import dataclasses

    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4, max_new_tokens=8)
    stream = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    stream.encode_until(8)
    ans = stream.engine.ask("What is moving?")
    off = answer_offline(tiny, ans.prompt, stream.read_frames, stream.fps, ans.question, 8, stream.engine.vocab)
    assert len(off.margins) == len(off.token_ids) and all(m >= 0 for m in off.margins)
    top = torch.topk(off.first_logits, 2).values
    assert off.margins[0] == pytest.approx(float(top[0] - top[1]), abs=1e-6)
    assert match(ans, off)["margin_at_divergence"] is None  # identical answers
    other = dataclasses.replace(ans, token_ids=ans.token_ids[:2] + [ans.token_ids[2] + 1] + ans.token_ids[3:])
    m = match(other, off)
    assert m["first_divergence"] == 2 and m["margin_at_divergence"] == off.margins[2]
