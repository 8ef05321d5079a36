"""The stderr progress bar: drawn when enabled, silent otherwise."""

from __future__ import annotations

import json

from streamchat.cli import main
from streamchat.progress import Progress


def test_progress_draws_counts_rate_and_time_left(capsys):
    bar = Progress(8, "encoding", enabled=True)
    bar.update(8)
    bar.close()
    err = capsys.readouterr().err
    assert "encoding" in err and "8/8 frames" in err and "frames/s" in err and "left" in err


def test_progress_disabled_writes_nothing(capsys):
    bar = Progress(8, "encoding", enabled=False)
    bar.update(4)
    bar.close()
    assert capsys.readouterr().err == ""


def test_json_output_is_one_document_and_stderr_stays_quiet(capsys, clip_24fps):
    rc = main(["ask", str(clip_24fps), "What?", "--model", "tiny-random", "--fps", "4", "--max-new-tokens", "3", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert isinstance(json.loads(out), dict)
    assert err == ""


def test_compare_progress_names_the_offline_phase(clip_24fps, monkeypatch, capsys):
    import streamchat.cli

    shown = []

    class Recording(Progress):
        def phase(self, text):
            shown.append((self.done, text))
            super().phase(text)

    monkeypatch.setattr("streamchat.progress.Progress", Recording)
    monkeypatch.setattr(streamchat.cli.sys.stderr, "isatty", lambda: True, raising=False)
    rc = main(["compare", str(clip_24fps), "--model", "tiny-random", "--fps", "4", "--max-new-tokens", "3", "--no-log"])
    err = capsys.readouterr().err
    assert rc == 0 and [text.split(":")[0] for _, text in shown] == ["streaming", "offline"]
    assert shown[1][0] == 12 and "offline: one prefill of the whole prompt" in err  # after all 12 frames
