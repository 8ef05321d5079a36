"""What a new user hits in the commands: paths and values checked before the work, one-line errors
that name real flags, `logs` like `llm logs`, sessions by update, one chunk row per attempt,
replays found by run, the store in the user's data folder, fast store-only commands, completion."""

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamchat.cli import build_parser, main, subparsers
from streamchat.containers import lacks_moov
from streamchat.replay import text_report as replay_text
from streamchat.store import Store
from test_sessions import ENGINE, Q1, Q2, cli, cli_json, error_line, home, load_calls  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]


def all_options(parser: argparse.ArgumentParser) -> set[str]:
    found = {o for a in parser._actions for o in a.option_strings}
    for p in subparsers(parser).values():
        found |= all_options(p)
    return found


# --- checked before the work --------------------------------------------------------------------


def test_output_paths_that_cannot_be_written_exit_2_before_the_model_loads(home, clip_24fps, capsys, load_calls, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "--report" in error_line(capsys, "compare", clip_24fps, *ENGINE, "--report", blocker / "dir" / "r.md")
    assert "--out" in error_line(capsys, "bench", "--model", "tiny-random", "--out", blocker / "b.json")
    assert "is a folder" in error_line(capsys, "replay", "any", "--report", tmp_path)
    assert "/proc" in error_line(capsys, "make-clip", "/proc/x.mp4")
    assert "--output" in error_line(capsys, "sessions", "export", "any", "--output", blocker / "s.md")
    assert load_calls == []


def test_missing_output_folders_are_created_and_nothing_is_lost(home, clip_24fps, capsys, tmp_path):
    report = tmp_path / "missing" / "dir" / "r.md"
    rc, out, err = cli(capsys, "compare", clip_24fps, *ENGINE, "--max-new-tokens", 4, "--report", report)
    assert rc == 0 and report.exists() and report.with_suffix(".png").exists(), err
    assert f"Written: report {report}, chart {report.with_suffix('.png')}, database {home / 'streamchat.db'}" in out
    assert "GPU memory n/a on the CPU" in out and "0.0 MiB" not in out and "(speedup = offline time / streaming time)" in out
    with Store() as store:
        [run] = store.runs(kind="compare")
    rc, out, _ = cli(capsys, "logs", "--runs")
    assert rc == 0 and f"compare  {run['id']}" in out and "identical True" in out

    cli_json(capsys, "ask", clip_24fps, "What is red?", *ENGINE, "--at", 1)
    exported = tmp_path / "more" / "s.md"
    [name] = [s["name"] for s in cli_json(capsys, "sessions", "list")["sessions"]]
    rc, out, _ = cli(capsys, "sessions", "export", name, "--output", exported)
    assert rc == 0 and exported.read_text().startswith(f"# Session {name}")

    clip = tmp_path / "clips" / "new" / "c.mp4"
    assert cli(capsys, "make-clip", clip, "--seconds", 1)[0] == 0 and clip.exists()
    size = clip.stat().st_size
    assert "already exists; pass --force" in error_line(capsys, "make-clip", clip, "--seconds", 2)
    assert clip.stat().st_size == size
    assert cli(capsys, "make-clip", clip, "--seconds", 2, "--force")[0] == 0 and clip.stat().st_size > size


def test_bad_device_and_bad_values_are_one_line_errors(home, clip_24fps, capsys, load_calls):
    assert "--device 'tpu'" in error_line(capsys, "ask", clip_24fps, "Q", *ENGINE, "--device", "tpu")
    assert "--device 'tpu'" in error_line(capsys, "bench", "--device", "tpu")
    assert "no time before the colon" in error_line(capsys, "run", clip_24fps, *ENGINE, "--ask", ":Q")
    err = error_line(capsys, "run", clip_24fps, *ENGINE, "--ask", "-2:Q")  # not argparse's "expected one argument"
    assert "'-2:Q': the time must be 0 or more seconds" in err
    assert "--until 100 is past the end of the video (3.00 s)" in error_line(capsys, "run", clip_24fps, *ENGINE, "--until", 100)
    assert "-n must be 0 (all) or more" in error_line(capsys, "logs", "-n", -1)
    assert load_calls == []


def test_no_arguments_prints_the_help_and_exits_0(capsys):
    rc, out, err = cli(capsys)
    assert rc == 0 and out.startswith("usage: streamchat") and "completion" in out and err == ""


def test_a_corrupt_video_prints_only_our_line_and_a_cut_off_mp4_is_not_sent_to_ffmpeg(clip_24fps, tmp_path, capfd):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip_24fps.read_bytes()[:20000])  # the moov atom (the index) is at the end: gone
    assert lacks_moov(cut) and not lacks_moov(clip_24fps)
    rc = main(["ask", str(cut), "Q", "--model", "tiny-random"])
    out, err = capfd.readouterr()  # file descriptor 2: decord's C++ log would land here
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert "ERROR opening" not in err and "fixed.mp4" not in err and "export or download it again" in err


def test_errors_name_only_flags_that_exist():
    """Every `--flag` written in a message of the package is an option of some command."""
    from streamchat import train

    known = all_options(build_parser()) | all_options(train.build_parser())  # the training command's own
    named = set()
    for path in (REPO / "streamchat").rglob("*.py"):
        for literal in re.findall(r'f?"(?:[^"\\\n]|\\.)*"', path.read_text()):
            named |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", literal))
    assert named and named - known == set()
    assert "--name" not in known - all_options(subparsers(build_parser())["chat"])  # only chat has --name


def test_messages_about_moved_videos_and_taken_names_fit_every_command(home):
    from streamchat.errors import UserError
    from streamchat.session import check_video

    session = {"name": "s", "video_path": "/gone/v.mp4", "video_sha256": "0" * 64}
    with pytest.raises(UserError) as e:
        check_video(session)
    assert "streamchat resume|replay s --video NEW_PATH" in str(e.value) and "streamchat chat NEW_PATH --resume s" in str(e.value)
    with Store() as store:
        store.create_session(video_path="/v.mp4", video_sha256="0", model_id="m", config={}, history="drop", name="x")
        with pytest.raises(UserError, match=r"already exists; pick another name$"):
            store.create_session(video_path="/v.mp4", video_sha256="0", model_id="m", config={}, history="drop", name="x")


# --- logs and sessions --------------------------------------------------------------------------


def test_logs_filters_and_short_forms(home, clip_24fps, capsys):
    assert cli(capsys, "logs")[1].startswith("no turns logged yet")
    cli_json(capsys, "run", clip_24fps, *ENGINE, "--ask", Q1, "--ask", Q2, "--session", "one")
    asked = cli_json(capsys, "ask", clip_24fps, "Is anything blue?", *ENGINE, "--at", 2)
    cli_json(capsys, "ask", clip_24fps, "Not logged?", *ENGINE, "--no-log")

    turns = cli_json(capsys, "logs", "-n", 0)["turns"]
    assert [t["question"] for t in turns] == ["What is red?", "What moved?", "Is anything blue?"]  # ask is logged, --no-log is not
    assert turns[-1]["session_name"] == asked["session"] and turns[-1]["token_ids"] == asked["token_ids"]
    assert cli(capsys, "logs", "-q", "zzzz")[1].startswith("no turns match")
    assert cli_json(capsys, "logs", "-m", "tiny-random", "-n", 0)["turns"] == turns
    assert cli(capsys, "logs", "-m", "other/model")[1].startswith("no turns match")
    rc, out, _ = cli(capsys, "logs", "-r")
    assert rc == 0 and out == asked["answer"] + "\n"
    rc, out, _ = cli(capsys, "logs", "-s", "-n", 0)
    assert rc == 0 and len(out.splitlines()) == 3 and "[streaming 1.00 s]  What is red? → " in out
    long = "word " * 60
    with Store() as store:
        store.log_turn(store.get_session("one")["id"], question=long, answer=long)
    rc, out, _ = cli(capsys, "logs", "-n", 1, "-t")
    assert rc == 0 and max(map(len, out.splitlines())) < 200 and "…" in out
    rc, out, _ = cli(capsys, "logs", "path")
    assert rc == 0 and out == f"{home / 'streamchat.db'}\n"


def test_sessions_list_hides_empty_sessions_and_rm_asks_on_a_terminal(home, clip_24fps, capsys, monkeypatch):
    cli_json(capsys, "run", clip_24fps, *ENGINE, "--until", 0.5, "--session", "empty")
    cli_json(capsys, "run", clip_24fps, *ENGINE, "--ask", Q1, "--until", 1, "--session", "kept")
    assert [s["name"] for s in cli_json(capsys, "sessions", "list")["sessions"]] == ["kept"]
    rc, out, _ = cli(capsys, "sessions", "list")
    assert "1 session with no turns and no snapshot hidden" in out
    assert [s["name"] for s in cli_json(capsys, "sessions", "list", "--all")["sessions"]] == ["kept", "empty"]
    assert cli(capsys, "sessions", "list", "--names", "--all")[1] == "kept\nempty\n"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    rc, out, err = cli(capsys, "sessions", "rm", "kept")
    assert rc == 1 and "remove session kept" in err and "nothing removed" in err
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    assert cli(capsys, "sessions", "rm", "kept")[0] == 0
    monkeypatch.setattr(sys, "stdin", Terminal(""))
    rc, out, err = cli(capsys, "sessions", "rm", "empty", "--yes")
    assert rc == 0 and out == "removed session empty and 0 snapshot files\n" and err == ""


# --- attempts and replays -----------------------------------------------------------------------


def test_resume_from_an_earlier_snapshot_keeps_one_chunk_row_per_attempt(home, clip_24fps, capsys):
    cli_json(capsys, "run", clip_24fps, *ENGINE, "--ask", Q1, "--until", 1, "--session", "p", "--snapshot")
    # the question at 1 s sees frames 0-4: chunks [0-3] and [4, 4 repeated]
    cli_json(capsys, "resume", "p", "--snapshot")  # to the end: chunks 2 and 3
    again = cli_json(capsys, "resume", "p", "--from", 1, "--ask", Q2)  # chunks 2 and 3 once more
    assert again["attempt"] == 3
    with Store() as store:
        sid = store.get_session("p")["id"]
        live = store.chunks(sid)
        every = store.chunks(sid, every_attempt=True)
        assert [(c["chunk_index"], c["attempt"]) for c in live] == [(0, 1), (1, 1), (2, 3), (3, 3)]
        assert sorted((c["chunk_index"], c["attempt"]) for c in every) == [(0, 1), (1, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
        assert [(a["number"], a["command"], a["start_chunk"]) for a in store.attempts(sid)] == [(1, "run", 0), (2, "resume", 2), (3, "resume", 2)]
    shown = cli_json(capsys, "sessions", "show", "p")
    assert shown["live_attempt"] == 3 and shown["chunk_summary"]["count"] == 4 and shown["chunk_rows"] == 6
    assert [t["attempt"] for t in shown["turns"]] == [1, 3]
    rc, out, _ = cli(capsys, "sessions", "show", "p")
    assert "attempts 3, live: 3" in out and "2 more chunk rows from attempts a resume replaced" in out
    assert cli_json(capsys, "sessions", "list")["sessions"][0]["n_chunks"] == 4
    rc, md, _ = cli(capsys, "sessions", "export", "p")
    assert "4 chunks, frames 0–11" in md and "3 attempts (1: run; 2: resume from chunk 2; 3: resume from chunk 2); live: 3." in md

    first = cli_json(capsys, "replay", "p")
    second = cli_json(capsys, "replay", "p")
    assert first["run_id"] != second["run_id"]
    for run in (first, second):
        turns = cli_json(capsys, "logs", "--run", run["run_id"], "-n", 0)["turns"]
        assert [t["offline_turn_id"] for t in run["turns"]] == [t["id"] for t in turns] and len(turns) == 2
    rc, out, _ = cli(capsys, "logs", "--runs", "--kind", "replay")
    assert out.count("replay ") == 2 and "session p: 2 turns replayed" in out


def test_replay_text_rounds_times_and_explains_ratios():
    entry = {"at_s": 9.409876543209878, "frames_seen": 20, "question": "Q", "identical": True, "first_divergence": None,
             "streaming": {"ttft_s": 0.01, "latency_s": 0.1, "peak_bytes": 0}, "offline": {"ttft_s": 0.005, "latency_s": 0.2, "peak_bytes": 0},
             "ratios": {"ttft": 0.5, "latency": 2.0, "peak_memory": None}}
    text = replay_text({"session": "s", "model": "m", "device": "cpu", "dtype": "float32", "history": "drop",
                        "replayed": 1, "skipped": 0, "all_identical": True, "turns": [entry]})
    assert "[9.41 s, 20 frames]" in text and "1 turn replayed" in text and "under 1, offline was the faster" in text
    assert "0.50×" in text and "n/a" in text and "0.0 MiB" not in text


def test_a_store_from_before_attempts_gets_one_attempt_per_session(home, capsys):
    import sqlite_utils

    from streamchat.migrations import migrate
    from test_store import seed_m001_rows

    home.mkdir(parents=True, exist_ok=True)
    db = sqlite_utils.Database(home / "streamchat.db")
    migrate(db, stop_after="m004_turns_extra")
    sid, _ = seed_m001_rows(db)
    db.execute("insert into chunks (id, session_id, chunk_index, tokens) values ('dup', ?, 0, 99)", [sid])  # an old resume's duplicate
    db.conn.commit()
    db.close()
    with Store() as store:
        [attempt] = store.attempts(sid)
        assert attempt["number"] == 1 and [c["tokens"] for c in store.chunks(sid)] == [99]
        assert len(store.chunks(sid, every_attempt=True)) == 2
        assert {t["attempt_id"] for t in store.turns(sid)} == {attempt["id"]}


# --- everyday comfort ---------------------------------------------------------------------------


def test_streamchat_model_sets_the_default_model_but_not_demos(monkeypatch):
    monkeypatch.setenv("STREAMCHAT_MODEL", "tiny-random")
    commands = subparsers(build_parser())
    for name in ("ask", "compare", "run", "chat"):
        [action] = [a for a in commands[name]._actions if a.dest == "model"]
        assert action.default == "tiny-random" and "from $STREAMCHAT_MODEL" in action.help
    assert commands["demo"].parse_args([]).model == "tiny-shapes"
    assert commands["bench"].parse_args([]).model == "random:qwen2.5-vl-3b"
    monkeypatch.delenv("STREAMCHAT_MODEL")
    assert commands["ask"].get_default("model") == "tiny-random"  # parsers built before keep it
    assert subparsers(build_parser())["ask"].parse_args(["v", "q"]).model == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_store_only_commands_import_neither_torch_nor_transformers(home):
    code = ("import sys; from streamchat.cli import main\n"
            "for argv in (['logs'], ['logs', 'path'], ['logs', '--runs'], ['sessions'], ['sessions', 'list', '--names']):\n"
            "    assert main(argv) == 0, argv\n"
            "print(sorted(m for m in ('torch', 'transformers', 'textual', 'decord') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_offers_commands_options_and_session_names(home, tmp_path, capsys):
    with Store() as store:
        sid = store.create_session(video_path="/v.mp4", video_sha256="0", model_id="m", config={}, history="drop", name="beach-1")["id"]
        store.log_turn(sid, question="q", answer="a")
    rc, script, _ = cli(capsys, "completion", "bash")
    assert rc == 0 and "complete -o default -F _streamchat_complete streamchat" in script
    (tmp_path / "bin").mkdir()
    shim = tmp_path / "bin" / "streamchat"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m streamchat \"$@\"\n")
    shim.chmod(0o755)
    (tmp_path / "c.sh").write_text(script)

    def complete(*words: str) -> list[str]:
        code = (f"source {tmp_path / 'c.sh'}; COMP_WORDS=(streamchat {' '.join(repr(w) for w in words)}); "
                f"COMP_CWORD={len(words)}; _streamchat_complete; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
        env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
        done = subprocess.run(["bash", "-c", code], capture_output=True, text=True, env=env, check=True)
        return done.stdout.split()

    assert complete("re") == ["resume", "replay"]
    assert complete("resume", "") == ["beach-1"]
    assert complete("sessions", "show", "b") == ["beach-1"]
    assert complete("chat", "--resume", "") == ["beach-1"]
    assert complete("logs", "--ru") == ["--run", "--runs"]
    assert complete("sessions", "") == ["list", "show", "rm", "export"]
    rc, zsh, _ = cli(capsys, "completion", "zsh")
    assert rc == 0 and zsh.startswith("autoload -U +X bashcompinit && bashcompinit")


def test_a_store_left_in_dot_sessions_by_an_older_streamchat_is_named_not_silently_ignored(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STREAMCHAT_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(capsys, "logs", "path")
    assert rc == 0 and out == f"{tmp_path / 'xdg' / 'streamchat' / 'streamchat.db'}\n" and err == ""
    Store(tmp_path / "sessions" / "streamchat.db").close()
    rc, out, err = cli(capsys, "logs", "path")
    assert rc == 0 and "sessions/streamchat.db (from an older streamchat) is not read: set STREAMCHAT_HOME=sessions" in err


def test_demo_help_names_the_defaults_it_uses():
    demo = subparsers(build_parser())["demo"]
    helps = {a.dest: a.help for a in demo._actions}
    args = demo.parse_args([])
    assert (args.model, args.device, args.history) == ("tiny-shapes", "cpu", "drop")
    assert helps["model"].endswith("(default: tiny-shapes)") and helps["device"].endswith("(default: cpu)")
    assert helps["history"].endswith("(default: drop)")
