"""`streamchat bench` on the CPU with tiny-random: the smoke test CI runs (no timing assertions)."""

import json
import subprocess
import sys

import pytest

from streamchat.bench import BenchSettings, SyntheticVideo, chunk_plan
from streamchat.cli import main
from streamchat.errors import UserError
from streamchat.store import Store

SMALL = ["bench", "--model", "tiny-random", "--device", "cpu", "--width", "112", "--height", "112", "--frames", "16", "--chunk-frames", "4"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_HOME", str(tmp_path))
    return tmp_path


def test_bench_reports_streaming_offline_agreement_and_floors(home, capsys):
    assert main([*SMALL, "--report", str(home / "bench.md"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)

    assert {"config", "warmup", "rates", "costs", "streaming", "questions", "offline", "agreement", "floors", "load_s", "run_id"} <= set(r)
    st = r["streaming"]
    assert st["n_chunks"] == 4 and [c["frames"] for c in st["chunks"]] == [4, 8, 12, 16]
    assert [c["cache_before"] for c in st["chunks"][1:]] == [c["cache_after"] for c in st["chunks"][:-1]]
    for key in ("encode_s", "vision_s", "wall_s", "frames_per_s", "streaming_tax", "cache_bytes", "preprocess_ms_per_chunk"):
        assert st[key] > 0, key
    # tiny-random: 112 px -> 4x4 merged tokens per frame pair, 8 pairs, 36,864 B/token's small cousin
    assert st["cache_bytes"] == st["cache_tokens"] * r["costs"]["kv_bytes_per_token"]
    assert st["gpu_busy_pct"] is None and st["peak_bytes"] is None  # no CUDA: reported as unknown, not 0

    assert [q["frames"] for q in r["questions"]] == [4, 8, 16]  # first chunk, 1/4 (= first chunk), 1/2, all
    assert [q["first_of_process"] for q in r["questions"]] == [True, False, False]
    for q in r["questions"]:
        assert q["ttft_ms"] > 0 and q["ttft_ms_again"] > 0 and q["floor_ttft_ms"] > 0 and q["again_identical"]
    assert r["questions"][-1]["cache_tokens"] == st["cache_tokens"]

    of = r["offline"]
    assert of["ok"] and of["prefill_s"] > 0 and of["ttft_s"] >= of["prefill_s"]
    assert of["prompt_tokens"] == st["cache_tokens"] + r["questions"][-1]["question_tokens"]
    assert r["agreement"]["identical"] and r["agreement"]["first_divergence"] is None  # float32 on the CPU
    assert r["agreement"]["max_logit_diff"] <= 1e-4

    assert r["rates"]["matmul_flop_per_s"] > 0 and r["rates"]["copy_bytes_per_s"] > 0
    assert all(r["floors"][k] > 0 for k in ("encode_s", "encode_frames_per_s", "offline_prefill_s", "ttft_ms", "decode_ms_per_token"))

    runs = Store().runs(kind="bench")
    assert len(runs) == 1 and runs[0]["id"] == r["run_id"] and runs[0]["report"]["streaming"]["cache_tokens"] == st["cache_tokens"]
    saved = json.loads((home / r["json_path"]).read_text())
    assert saved["agreement"] == r["agreement"]
    assert (home / "bench.md").read_text().count("![") == 2
    assert (home / "bench-encode.png").stat().st_size > 0 and (home / "bench-ttft.png").stat().st_size > 0


def test_bench_table_has_every_section_and_odd_frames_pad_the_last_chunk(home, capsys):
    argv = [*SMALL, "--frames", "6", "--no-offline", "--no-warmup", "--no-repeat-questions", "--questions-at", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for section in ("Offline", "Streaming, per chunk", "Streaming totals", "Questions", "Agreement", "Floors", "GPU busy"):
        assert section in text, section
    assert "not run (--no-offline)" in text
    run = Store().runs(kind="bench")[0]["report"]
    assert [c["encoded_frames"] for c in run["streaming"]["chunks"]] == [4, 2]
    assert [q["frames"] for q in run["questions"]] == [4, 6]  # asked after the chunk holding frame 2, and at the end


def test_bench_rejects_sizes_the_patch_grid_cannot_hold(home, capsys):
    assert main([*SMALL[:5], "--width", "100", "--height", "112"]) == 2
    assert "multiples of 28" in capsys.readouterr().err
    with pytest.raises(UserError, match="outside 1..16"):
        BenchSettings(width=112, height=112, frames=16, questions_at=[0, 4]).validate()


def test_synthetic_frames_are_deterministic_and_move():
    a, b = SyntheticVideo(56, 28, 4), SyntheticVideo(56, 28, 4)
    frames = a.read([0, 1, 1])
    assert frames.shape == (3, 28, 56, 3) and frames.dtype.name == "uint8"
    assert (frames == b.read([0, 1, 1])).all() and (frames[1] == frames[2]).all() and (frames[0] != frames[1]).any()
    assert chunk_plan(10, 4) == [(0, 4), (4, 4), (8, 2)]


def test_registering_bench_does_not_import_torch():
    """cli imports streamchat.bench for every command, so its import must stay light."""
    code = (
        "import argparse, sys; from streamchat import bench; "
        "bench.register(argparse.ArgumentParser().add_subparsers()); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_bench_reports_offline_out_of_memory_instead_of_failing(home, capsys, monkeypatch):
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("streamchat.offline.answer_offline", out_of_memory)
    assert main([*SMALL, "--no-warmup", "--no-repeat-questions", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["offline"] == {"ok": False, "error": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB", "cudnn_sdp": False}
    assert r["agreement"] is None and r["streaming"]["streaming_tax"] is None
    assert r["streaming"]["frames_per_s"] > 0 and r["floors"]["offline_prefill_s"] > 0


def test_bench_minutes_streams_under_the_memory_policy_minute_by_minute(home, capsys, tmp_path):
    """Half a minute of 56x56 frames at 8 fps (120 pages of 4 tokens) through a 100-token working set:
    per-minute rows, an archive that grows, questions that retrieve, a chart beside the report."""
    report = tmp_path / "long.md"
    argv = ["bench", "--minutes", "0.5", "--model", "tiny-random", "--device", "cpu", "--width", "56", "--height", "56",
            "--fps", "8", "--max-new-tokens", "4", "--gpu-kv-budget", "402", "--retrieve-tokens", "32",
            "--final-questions", "3", "--report", str(report), "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["memory"]["mode"] == "bounded" and r["memory"]["working_tokens"] == 100
    [minute] = r["minutes"]
    assert minute["minute"] == 1 and minute["frames"] == 240 and minute["cache_tokens"] <= 100
    assert minute["archived_pages"] > 100 and minute["host_bytes"] == minute["archived_pages"] * 4 * r["bytes_per_token"]
    assert r["final"]["questions"] == 3 and r["final"]["retrieval_p50_ms"] > 0
    assert (tmp_path / "long-minutes.png").stat().st_size > 10_000 and "long-minutes.png" in report.read_text()
    with Store() as store:
        assert [row["kind"] for row in store.runs()] == ["bench-long"]
