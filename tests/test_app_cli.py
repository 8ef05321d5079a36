"""`streamchat chat` / `demo` before the app opens: every check that can be made is made first, and
fails with one line and exit code 2; without a terminal the app is not started at all.

Checks that come after the terminal check run on a real pseudo-terminal (pty), so the command sees
a TTY exactly as in a shell; they fail before the app would draw on it."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import shutil
import sys

import pytest

from streamchat.cli import main
from streamchat.store import Store


@pytest.fixture(scope="module")
def cli_clip(tmp_path_factory):
    from streamchat.clips import make_clip

    return make_clip(tmp_path_factory.mktemp("cli") / "clip.mp4", seconds=1.0, fps=8.0, width=112, height=112)


@contextlib.contextmanager
def terminal(monkeypatch):
    """stdin, stdout and stderr on one real pty; yields a function that returns what was written."""
    master, slave = pty.openpty()
    files = [os.fdopen(os.dup(slave), mode, buffering=1, encoding="utf-8") for mode in ("r", "w", "w")]
    for name, f in zip(("stdin", "stdout", "stderr"), files):
        monkeypatch.setattr(sys, name, f)

    def written() -> str:
        for f in files[1:]:
            f.flush()
        out = b""
        while select.select([master], [], [], 0.05)[0]:
            chunk = os.read(master, 65536)
            if not chunk:
                break
            out += chunk
        return out.decode("utf-8", "replace").replace("\r\n", "\n")

    try:
        yield written
    finally:
        for f in files:
            f.close()
        os.close(slave)
        os.close(master)


def test_chat_command_errors_are_one_line(capsys, tmp_path):
    assert main(["chat"]) == 2
    assert "give a VIDEO" in capsys.readouterr().err
    assert main(["chat", "--resume", "nope"]) == 2
    assert "no session named nope" in capsys.readouterr().err
    assert main(["chat", str(tmp_path / "missing.mp4"), "--model", "tiny-random"]) == 2
    assert "video not found" in capsys.readouterr().err
    (tmp_path / "keys.json").write_text("[1, 2]")
    assert main(["demo", "--keymap", str(tmp_path / "keys.json")]) == 2
    assert "must be a JSON object of binding id to keys" in capsys.readouterr().err


def test_unknown_keymap_ids_are_refused_with_the_known_ones(capsys, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text('{"streamchat.pause": "ctrl+t", "streamchat.paws": "ctrl+p"}')
    assert main(["demo", "--keymap", str(keys)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown binding id 'streamchat.paws'" in err
    assert "streamchat.pause" in err and "sessions.resume" in err and "help.close" in err


def test_without_a_terminal_chat_and_demo_refuse_instead_of_starting_the_app(capsys, cli_clip):
    assert main(["chat", str(cli_clip), "--model", "tiny-random"]) == 2  # pytest captures stdin/out/err
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a terminal" in err and "but stdin, stdout and stderr are not terminals;" in err
    assert main(["demo", "--seconds", "2"]) == 2
    assert "`streamchat demo` is a full-screen app and needs a terminal" in capsys.readouterr().err


def test_only_stdout_redirected_is_enough_to_refuse(monkeypatch, cli_clip):
    with terminal(monkeypatch) as written:
        monkeypatch.setattr(sys, "stdout", open(os.devnull, "w"))
        assert main(["chat", str(cli_clip), "--model", "tiny-random"]) == 2
        assert "but stdout is not one" in written()


def test_a_session_name_already_taken_is_refused_before_the_app(capsys, cli_clip):
    with Store() as store:
        store.create_session(video_path=str(cli_clip), video_sha256="0" * 64, model_id="tiny-random", config={},
                             history="keep", name="taken")
    assert main(["chat", str(cli_clip), "--model", "tiny-random", "--name", "taken"]) == 2
    err = capsys.readouterr().err
    assert "a session named taken already exists" in err and "streamchat chat --resume taken" in err


def test_model_and_device_errors_come_before_the_app_on_a_terminal(monkeypatch, cli_clip):
    with terminal(monkeypatch) as written:
        if not __import__("torch").cuda.is_available():
            assert main(["chat", str(cli_clip), "--model", "tiny-random", "--device", "cuda"]) == 2
            assert "--device cuda asked for, but no CUDA GPU is visible" in written()
        assert main(["chat", str(cli_clip), "--model", "no-such-org/no-such-model"]) == 2  # HF_HUB_OFFLINE=1
        out = written()
        assert "could not fetch no-such-org/no-such-model" in out and out.count("\n") == 1
        assert main(["chat", str(cli_clip), "--model", "tiny-random", "--max-new-tokens", "40000"]) == 2
        assert "--max-new-tokens 40000 leaves no room for the video in tiny-random's context of 32768 tokens" in written()


def test_resume_checks_the_snapshot_and_the_video_before_the_app(capsys, cli_clip, tmp_path):
    clip = tmp_path / "moving.mp4"
    shutil.copy(cli_clip, clip)
    assert main(["run", str(clip), "--model", "tiny-random", "--session", "saved", "--snapshot", "--json"]) == 0
    assert main(["run", str(clip), "--model", "tiny-random", "--session", "unsaved", "--json"]) == 0
    capsys.readouterr()
    assert main(["chat", "--resume", "unsaved"]) == 2
    assert "session unsaved has no snapshot, so there is no cache to resume" in capsys.readouterr().err
    clip.rename(tmp_path / "moved.mp4")
    assert main(["chat", "--resume", "saved"]) == 2
    assert "the video of session saved is no longer at" in capsys.readouterr().err
    with Store() as store:
        snap = store.snapshots(store.get_session("saved")["id"])[-1]["path"]
    os.remove(snap)
    assert main(["chat", "--resume", "saved", str(tmp_path / "moved.mp4")]) == 2
    assert f"snapshot {snap} is missing" in capsys.readouterr().err


def test_library_log_lines_go_to_a_file_while_the_app_runs(tmp_path, capfd):
    import logging

    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as tf_logging

    from streamchat.cli_app import _library_logs_to

    hub = hub_logging.get_logger("huggingface_hub.utils._http")
    tf = tf_logging.get_logger("transformers.modeling_utils")
    before = logging.getLogger("huggingface_hub").handlers[:]
    with _library_logs_to(tmp_path / "app.log"):
        hub.warning("Retrying in 1s [Retry 1/5].")
        tf.error("a transformers error")
    assert capfd.readouterr().err == ""
    text = (tmp_path / "app.log").read_text()
    assert "huggingface_hub.utils._http WARNING Retrying in 1s [Retry 1/5]." in text
    assert "transformers.modeling_utils ERROR a transformers error" in text
    assert logging.getLogger("huggingface_hub").handlers == before  # put back after the app
    assert logging.getLogger("huggingface_hub").propagate is True
    hub.warning("after the app")
    assert "after the app" not in (tmp_path / "app.log").read_text()


def test_demo_writes_a_shapes_scene_in_home_and_opens_tiny_shapes_with_a_note(monkeypatch, streamchat_home):
    import streamchat.cli_app as cli_app

    opened = []
    monkeypatch.setattr(cli_app, "_run", lambda launch, keymap: opened.append(launch) and 0)
    with terminal(monkeypatch):
        assert main(["demo", "--seconds", "4", "--seed", "3"]) == 0
        assert main(["demo", "--seconds", "4", "--model", "tiny-random"]) == 0
    launch, noise = opened
    assert launch.config.model == "tiny-shapes" and launch.device == "cpu" and launch.config.history == "drop"
    assert launch.loaded is not None and launch.loaded.model_id == "tiny-shapes"  # loaded before the app opens
    assert "toy model trained on synthetic shapes" in launch.note and "What word was shown?" in launch.note
    assert launch.realtime is True  # the demo streams at the clip's own pace, so there is encoding to watch
    assert launch.video == str(streamchat_home / "demo" / "shapes-3-4s.mp4")
    assert sorted(p.name for p in (streamchat_home / "demo").iterdir()) == ["shapes-0-4s.mp4", "shapes-3-4s.mp4"]
    assert noise.config.model == "tiny-random" and "noise" in noise.note


def test_demo_refuses_lengths_it_cannot_play(monkeypatch, streamchat_home):
    with terminal(monkeypatch) as written:
        assert main(["demo", "--seconds", "1"]) == 2
        assert "--seconds must be 2 to 600" in written()
    assert not (streamchat_home / "demo").exists()


def test_on_quit_the_session_and_its_resume_command_are_printed(capsys, cli_clip):
    from streamchat.cli_app import _goodbye

    assert main(["run", str(cli_clip), "--model", "tiny-random", "--session", "kept", "--snapshot", "--json"]) == 0
    assert main(["run", str(cli_clip), "--model", "tiny-random", "--session", "logged", "--json"]) == 0
    capsys.readouterr()
    _goodbye("kept")
    assert capsys.readouterr().out == "session kept: resume it with `streamchat chat --resume kept`\n"
    _goodbye("logged")
    assert capsys.readouterr().out == (
        "session logged is logged (`streamchat sessions show logged`); it has no snapshot, so it cannot be resumed\n")
    _goodbye(None)  # no session was ever opened
    assert capsys.readouterr().out == ""


def test_a_memory_policy_that_cannot_hold_the_video_is_refused_before_the_app(monkeypatch, cli_clip):
    with terminal(monkeypatch) as written:
        assert main(["chat", str(cli_clip), "--model", "tiny-random", "--memory", "exact", "--gpu-kv-budget", "100"]) == 2
        out = written()
        assert "exact memory cannot hold this stream" in out and out.count("\n") == 1
        assert main(["chat", str(cli_clip), "--model", "tiny-random", "--memory", "bounded", "--gpu-kv-budget", "300"]) == 2
        assert "cannot hold two chunks" in written()
