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
