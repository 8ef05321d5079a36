"""Replay: every logged streaming turn re-run offline on exactly the prompt it saw."""

import json
from pathlib import Path

import pytest

import streamchat.models
from streamchat.cli import main
from streamchat.replay import first_divergence, markdown_report
from streamchat.store import Store
from test_sessions import cli, cli_json  # the same in-process CLI drivers

ENGINE = ["--model", "tiny-random", "--fps", "4", "--max-new-tokens", "8"]
ASKS = ["--ask", "1:What is red?", "--ask", "2:What moved?", "--ask", "2.5:Is anything blue?"]


@pytest.fixture
def home(tmp_path, monkeypatch, tiny):
    real = streamchat.models.load
    monkeypatch.setattr(streamchat.models, "load", lambda model_id, device=None, dtype=None: tiny if model_id == "tiny-random" else real(model_id, device, dtype))
    monkeypatch.setenv("STREAMCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("history", ["drop", "keep"])
def test_replay_of_a_three_question_session_is_identical_for_every_turn(home, clip_24fps, capsys, history):
    run = cli_json(capsys, "run", clip_24fps, *ENGINE, *ASKS, "--history", history, "--session", "s")
    report = cli_json(capsys, "replay", "s", "--against", "offline")
    assert report["session"] == "s" and report["all_identical"] is True and len(report["turns"]) == 3
    for turn, streamed in zip(report["turns"], run["turns"]):
        assert turn["identical"] is True and turn["first_divergence"] is None and turn["stride_factor"] == 1
        assert turn["question"] == streamed["question"]
        assert turn["streaming"]["token_ids"] == turn["offline"]["token_ids"] == streamed["token_ids"]
        assert turn["max_top_logit_diff"] < 1e-3
        for side in ("streaming", "offline"):
            assert turn[side]["ttft_s"] > 0 and turn[side]["latency_s"] >= turn[side]["ttft_s"]
        assert turn["ratios"]["ttft"] == pytest.approx(turn["offline"]["ttft_s"] / turn["streaming"]["ttft_s"], rel=1e-2)
    # keep: the last turn's prompt holds the two earlier dialogue turns, and offline saw all of it
    prompt_tokens = [t["offline"]["prompt_tokens"] for t in report["turns"]]
    assert prompt_tokens == sorted(prompt_tokens)
    with Store() as store:
        sid = store.get_session("s")["id"]
        offline = store.turns(sid, mode="offline")
        assert [t["replay_of"] for t in offline] == [t["id"] for t in store.turns(sid, mode="streaming")]
        assert [t["token_ids"] for t in offline] == [t["token_ids"] for t in run["turns"]]
        [logged] = store.runs(kind="replay", session_id=sid)
        assert logged["report"]["all_identical"] is True and logged["id"] == report["run_id"]


def test_replay_covers_turns_asked_after_a_resume(home, clip_24fps, capsys):
    cli_json(capsys, "run", clip_24fps, *ENGINE, "--ask", "1:What is red?", "--until", 1.6, "--history", "keep", "--session", "r", "--snapshot")
    cli_json(capsys, "resume", "r", "--ask", "2:What moved?", "--ask", "Is anything blue?")
    report = cli_json(capsys, "replay", "r")
    assert [t["identical"] for t in report["turns"]] == [True, True, True]
    assert [t["frames_seen"] for t in report["turns"]] == [5, 9, 12]  # every frame up to 1 s and 2 s, the last one paired with itself


def test_replay_report_writes_markdown_with_a_png_beside_it(home, clip_24fps, capsys, tmp_path):
    cli_json(capsys, "run", clip_24fps, *ENGINE, *ASKS, "--session", "m")
    out = tmp_path / "reports" / "replay.md"
    report = cli_json(capsys, "replay", "m", "--report", out)
    md = out.read_text()
    assert md.startswith("# Replay of session m against offline") and "**all identical: True**" in md
    assert md.count("| identical |") == 3 and "![offline time to first token" in md
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["report"]["png"] == str(png)
    rc, text, _ = cli(capsys, "replay", "m")
    assert rc == 0 and "all identical: True" in text and text.count("identical\n") == 3


def test_replay_reports_where_answers_first_differ(home, clip_24fps, capsys):
    cli_json(capsys, "run", clip_24fps, *ENGINE, *ASKS, "--session", "d")
    with Store() as store:
        turn = store.turns(store.get_session("d")["id"])[1]
        changed = turn["token_ids"][:3] + [(turn["token_ids"][3] + 1) % 300] + turn["token_ids"][4:]
        store.db.execute("update turns set token_ids_json = ? where id = ?", [json.dumps(changed), turn["id"]])
        store.db.conn.commit()
    report = cli_json(capsys, "replay", "d")
    assert [t["identical"] for t in report["turns"]] == [True, False, True] and report["all_identical"] is False
    assert report["turns"][1]["first_divergence"] == 3
    assert "differs at token 3" in markdown_report(report)
    assert first_divergence([1, 2], [1, 2, 3]) == 2 and first_divergence([1], [1]) is None


def test_turns_logged_without_a_prompt_are_skipped_not_guessed(home, clip_24fps, capsys):
    cli_json(capsys, "run", clip_24fps, *ENGINE, "--ask", "1:What is red?", "--session", "o")
    with Store() as store:
        sid = store.get_session("o")["id"]
        store.log_turn(sid, question="Logged by an older version", answer="x", token_ids=[1, 2])
    report = cli_json(capsys, "replay", "o")
    assert [t["identical"] for t in report["turns"]] == [True, None]
    assert (report["replayed"], report["skipped"], report["all_identical"]) == (1, 1, True)
    assert "older streamchat" in report["turns"][1]["skipped"]


def test_replay_refuses_a_changed_video_and_an_empty_session(home, clip_24fps, capsys, tmp_path):
    cli_json(capsys, "run", clip_24fps, *ENGINE, "--ask", "1:What is red?", "--session", "v")
    other = tmp_path / "other.mp4"
    other.write_bytes(Path(clip_24fps).read_bytes() + b"\0")
    rc, out, err = cli(capsys, "replay", "v", "--video", other)
    assert rc == 2 and "is not the video session v was recorded on" in err and err.count("\n") == 1
    cli_json(capsys, "run", clip_24fps, *ENGINE, "--session", "quiet", "--until", 1)
    rc, _, err = cli(capsys, "replay", "quiet")
    assert rc == 2 and "no streaming turns to replay" in err
