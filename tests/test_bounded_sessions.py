"""Bounded memory through the commands: snapshots that hold the working set, the index and the archive
(written incrementally), resume equal to an uninterrupted run, the policy on stderr and in the log,
and budgets that cannot work refused in one line."""

from __future__ import annotations

import json
import os

import pytest

from streamchat.store import Store
from test_sessions import cli, cli_json, error_line, home, load_calls, tokens  # noqa: F401 - fixtures

BOUNDED = ["--model", "tiny-random", "--fps", "8", "--max-new-tokens", "8", "--memory", "bounded",
           "--gpu-kv-budget", "438", "--retrieve-tokens", "64"]  # a 100-token working set for tiny-random


def page_files(home, name):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (home / name / "pages").glob("page-*.safetensors")}


@pytest.mark.parametrize("history", ["drop", "keep"])
def test_a_bounded_session_resumed_from_its_snapshot_answers_like_an_uninterrupted_one(home, clip_24fps, capsys, history):
    q1, q2 = "1.5:What is red?", "2.9:What moved?"
    full = cli_json(capsys, "run", clip_24fps, *BOUNDED, "--history", history, "--ask", q1, "--ask", q2, "--session", "full")
    part = cli_json(capsys, "run", clip_24fps, *BOUNDED, "--history", history, "--ask", q1, "--until", "1.5", "--session", "part", "--snapshot")
    first = page_files(home, "part")
    assert first, "pages left the working set before the snapshot, so their files are in the session's folder"
    resumed = cli_json(capsys, "resume", "part", "--ask", q2, "--snapshot")
    assert tokens(part) + tokens(resumed) == tokens(full)
    assert [t["retrieved"] for t in part["turns"] + resumed["turns"]] == [t["retrieved"] for t in full["turns"]]
    assert any(t["retrieved"] for t in full["turns"])  # the questions did reach into the archive
    second = page_files(home, "part")
    # incremental: the first snapshot's page files are the same files, untouched; newer pages were added
    assert {k: v for k, v in second.items() if k in first} == first and len(second) > len(first)
    with Store() as store:
        turns = store.turns(store.get_session("full")["id"])
    assert [t["retrieved"] for t in turns] == [t["retrieved"] for t in full["turns"]]  # the store's column
    rc, out, _ = cli(capsys, "logs", "--session", "full")
    spans = next(t["retrieved"] for t in full["turns"] if t["retrieved"])
    assert rc == 0 and f"recalled {spans[0]['t_start_s']:.1f}–{spans[0]['t_end_s']:.1f} s" in out


def test_a_bounded_snapshot_with_a_damaged_page_file_is_refused_at_the_question(home, clip_24fps, capsys):
    cli_json(capsys, "run", clip_24fps, *BOUNDED, "--until", "2.9", "--session", "s", "--snapshot")
    pages = sorted((home / "s" / "pages").glob("page-*.safetensors"))
    for page in pages:  # whichever pages the question picks, the first one read is damaged
        data = bytearray(page.read_bytes())
        data[-1] ^= 0xFF
        page.write_bytes(bytes(data))
    err = error_line(capsys, "resume", "s", "--ask", "2.9:What is red?")
    assert "archive page" in err and "is damaged" in err and "restore an earlier snapshot" in err
    os.remove(pages[0])
    err = error_line(capsys, "resume", "s", "--ask", "2.9:What is red?")
    assert "needs archive page file" in err and "missing" in err


def test_auto_memory_says_when_it_bounds_the_stream(home, clip_24fps, clip_long, capsys):
    # 12 s at 8 fps: 48 pages of 16 tokens, over a 438-token budget; 3 s (clip_24fps) fits it exactly
    rc, out, err = cli(capsys, "ask", clip_long, "What is red?", "--model", "tiny-random", "--fps", "8", "--max-new-tokens", "8",
                       "--gpu-kv-budget", "438", "--retrieve-tokens", "64")
    assert rc == 0 and "memory is bounded (every page stays retrievable)" in err and "cache tokens, over the GPU KV budget" in err
    doc = cli_json(capsys, "ask", clip_long, "What is red?", "--model", "tiny-random", "--fps", "8", "--max-new-tokens", "8",
                   "--gpu-kv-budget", "438", "--retrieve-tokens", "64")
    assert doc["memory"]["mode"] == "bounded" and doc["memory"]["working_tokens"] == 100 and doc["retrieved"]
    doc = cli_json(capsys, "ask", clip_24fps, "What is red?", "--model", "tiny-random", "--fps", "8", "--max-new-tokens", "8",
                   "--gpu-kv-budget", "438", "--retrieve-tokens", "64")
    assert doc["memory"]["mode"] == "exact" and doc["retrieved"] == []


@pytest.mark.parametrize("flags,expected", [
    (["--gpu-kv-budget", "-5"], "--gpu-kv-budget '-5' is not a size"),
    (["--gpu-kv-budget", "lots"], "--gpu-kv-budget 'lots' is not a size"),
    (["--gpu-kv-budget", "3 parsecs"], "has an unknown unit"),
    (["--host-kv-budget", "100"], "--host-kv-budget '100' has an unknown unit"),
    (["--memory", "bounded", "--gpu-kv-budget", "300"], "cannot hold two chunks"),
    (["--memory", "exact", "--gpu-kv-budget", "150"], "exact memory cannot hold this stream"),
    (["--retrieve-tokens", "-1"], "--retrieve-tokens must be 0 or more"),
])
def test_budgets_that_cannot_work_are_one_line_and_exit_2(home, clip_24fps, capsys, flags, expected):
    err = error_line(capsys, "run", clip_24fps, "--model", "tiny-random", "--fps", "8", *flags, "--session", "b")
    assert expected in err
    with Store() as store:
        assert store.list_sessions(every=True) == []  # refused before a session row was made


def test_compare_under_bounded_memory_reports_its_agreement_with_the_whole_video(home, clip_long, capsys):
    flags = ["--model", "tiny-random", "--fps", "8", "--max-new-tokens", "8", "--gpu-kv-budget", "438", "--retrieve-tokens", "64"]
    doc = cli_json(capsys, "compare", clip_long, *flags)
    assert doc["memory"]["mode"] == "bounded" and doc["streaming"]["retrieved"]
    assert doc["match"]["max_logit_diff"] is not None and doc["offline"]["frames"] == doc["streaming"]["frames"] == 96
    rc, out, _ = cli(capsys, "compare", clip_long, *flags)
    assert rc == 0 and "memory bounded: a working set of 100 tokens" in out and "measures the policy" in out
    exact = cli_json(capsys, "compare", clip_long, "--model", "tiny-random", "--fps", "8", "--max-new-tokens", "8")
    assert exact["memory"]["mode"] == "exact" and exact["match"]["identical"] is True


def test_a_spill_that_fails_is_reported_once_and_the_session_goes_on(home, clip_long, capsys):
    """The session's folder cannot take the archive's files (a full disk, here a file where the pages
    folder should be): one warning line, the pages stay in host memory, questions are answered and
    every chunk and turn is logged."""
    (home / "s").mkdir(parents=True)
    (home / "s" / "pages").write_text("not a folder")
    rc, out, err = cli(capsys, "run", clip_long, "--model", "tiny-random", "--fps", "8", "--max-new-tokens", "8",
                       "--gpu-kv-budget", "438", "--retrieve-tokens", "64", "--host-kv-budget", "1KiB",
                       "--ask", "11:What is red?", "--session", "s", "--json")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "could not spill archive pages" in line]
    assert len(warnings) == 1 and "they stay in host memory" in warnings[0]
    doc = json.loads(out)
    assert doc["turns"][0]["retrieved"] and doc["archive_bytes"] > 1024
    with Store() as store:
        sid = store.get_session("s")["id"]
        assert len(store.chunks(sid)) == 25 and len(store.turns(sid)) == 1  # 96 frames; frame 88 paired with itself at 11 s
