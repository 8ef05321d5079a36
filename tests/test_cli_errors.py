"""Bad input: one clear line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import pytest

from streamchat.cli import main


def run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc, out, err, *needles):
    assert rc == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("streamchat: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])


TINY = ["--model", "tiny-random", "--max-new-tokens", "4"]


def test_missing_file(capsys, tmp_path):
    assert_one_line_error(*run(["ask", str(tmp_path / "nope.mp4"), "What?", *TINY], capsys), "nope.mp4")


def test_empty_file(capsys, tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    assert_one_line_error(*run(["ask", str(p), "What?", *TINY], capsys), "empty")


def test_text_file_named_mp4(capsys, tmp_path):
    p = tmp_path / "notes.mp4"
    p.write_text("these are not frames\n" * 50)
    assert_one_line_error(*run(["ask", str(p), "What?", *TINY], capsys), "notes.mp4")


def test_truncated_video(capsys, tmp_path, clip_24fps):
    p = tmp_path / "cut.mp4"
    p.write_bytes(clip_24fps.read_bytes()[: clip_24fps.stat().st_size // 3])
    assert_one_line_error(*run(["ask", str(p), "What?", *TINY], capsys), "cut.mp4")


def test_odd_chunk_frames(capsys, clip_24fps):
    assert_one_line_error(*run(["ask", str(clip_24fps), "What?", "--chunk-frames", "3", *TINY], capsys), "--chunk-frames", "even")


def test_at_past_the_end(capsys, clip_24fps):
    assert_one_line_error(*run(["ask", str(clip_24fps), "What?", "--at", "99", *TINY], capsys), "--at")


def test_empty_question(capsys, clip_24fps):
    assert_one_line_error(*run(["ask", str(clip_24fps), "   ", *TINY], capsys), "empty")


def test_question_longer_than_the_context(capsys, clip_24fps):
    question = " ".join(f"w{i}" for i in range(20000))  # tiny-random's context is 32768 tokens
    assert_one_line_error(*run(["ask", str(clip_24fps), question, "--fps", "4", *TINY], capsys), "shorter question")


def test_unknown_option_is_a_usage_error(capsys, clip_24fps):
    assert_one_line_error(*run(["ask", str(clip_24fps), "What?", "--frobnicate", *TINY], capsys), "--help")


def test_both_fps_and_stride(capsys, clip_24fps):
    assert_one_line_error(*run(["ask", str(clip_24fps), "What?", "--fps", "2", "--stride", "3", *TINY], capsys), "--stride")


def test_hub_id_without_network_names_the_way_out(capsys, clip_24fps):
    rc, out, err = run(["ask", str(clip_24fps), "What?", "--model", "nobody/no-such-model-xyz"], capsys)
    assert_one_line_error(rc, out, err, "tiny-random", "local")


def test_local_dir_without_config(capsys, clip_24fps, tmp_path):
    assert_one_line_error(*run(["ask", str(clip_24fps), "What?", "--model", str(tmp_path)], capsys), "config.json")


def test_ask_json_has_the_contract_fields(capsys, clip_24fps):
    import json

    rc, out, err = run(["ask", str(clip_24fps), "What color is the square?", "--at", "1.5", "--fps", "4", "--json", *TINY], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    for key in ("answer", "token_ids", "ttft_s", "latency_s", "frames", "cache_tokens"):
        assert key in doc
    assert doc["frames"] == 7  # t = 0, 0.25, ..., 1.5
    assert 1 <= len(doc["token_ids"]) <= 4


def test_ask_modes_agree(capsys, clip_24fps):
    """`ask` in streaming and in offline mode: the same tokens for the same frames (both runs here)."""
    import json

    docs = {}
    for mode in ("streaming", "offline"):
        rc, out, err = run(["ask", str(clip_24fps), "What?", "--fps", "4", "--mode", mode, "--json", *TINY], capsys)
        assert rc == 0, err
        docs[mode] = json.loads(out)
    assert docs["streaming"]["frames"] == docs["offline"]["frames"] == 12  # 3 s at 4 fps
    assert 1 <= len(docs["streaming"]["token_ids"]) <= 4
    assert docs["streaming"]["token_ids"] == docs["offline"]["token_ids"]
