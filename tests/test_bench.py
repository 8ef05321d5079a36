"""`streamchat bench` on the CPU with tiny-random: the smoke test CI runs (no timing assertions)."""

import json
import subprocess
import sys

import pytest

from streamchat.bench import BenchSettings, SyntheticVideo, chunk_plan
from streamchat.cli import main
from streamchat.errors import UserError
from streamchat.store import Store

SMALL = ["bench", "--model", "tiny-random", "--device", "cpu", "--width", "112", "--height", "112", "--frames", "16", "--chunk-frames", "4",
         "--decode-seconds", "0"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_HOME", str(tmp_path))
    return tmp_path


def test_bench_reports_streaming_both_whole_video_paths_agreement_and_floors(home, capsys):
    assert main([*SMALL, "--decode-seconds", "2", "--report", str(home / "bench.md"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)

    assert {"config", "warmup", "rates", "costs", "memory", "streaming", "questions", "full_cache_questions", "offline", "fair",
            "agreement", "agreement_fair", "decoding", "floors", "load_s", "run_id"} <= set(r)
    # the comparison's default memory: exact, with a budget that holds the video (tiny-random's context)
    assert r["config"]["memory"]["mode"] == "exact" and r["config"]["memory"]["gpu_tokens"] == 32768
    st = r["streaming"]
    assert st["n_chunks"] == 4 and [c["frames"] for c in st["chunks"]] == [4, 8, 12, 16]
    assert [c["cache_before"] for c in st["chunks"][1:]] == [c["cache_after"] for c in st["chunks"][:-1]]
    for key in ("encode_s", "vision_s", "wall_s", "frames_per_s", "streaming_tax_stock", "streaming_tax_fair", "cache_bytes",
                "preprocess_s", "preprocess_ms_per_chunk"):
        assert st[key] > 0, key
    assert st["preprocess_ms_per_chunk"] == pytest.approx(st["preprocess_s"] * 1000 / 4, abs=1e-3)
    # tiny-random: 112 px -> 4x4 merged tokens per frame pair, 8 pairs, 36,864 B/token's small cousin
    assert st["cache_bytes"] == st["cache_tokens"] * r["costs"]["kv_bytes_per_token"]
    assert st["gpu_busy_pct"] is None and st["peak_bytes"] is None and st["max_reserved_bytes"] is None  # no CUDA: unknown, not 0
    assert r["memory"]["cuda_context_bytes"] is None

    assert [q["frames"] for q in r["questions"]] == [4, 8, 16]  # first chunk, 1/4 (= first chunk), 1/2, all
    assert [q["first_of_process"] for q in r["questions"]] == [True, False, False]
    for q in r["questions"]:
        assert q["ttft_ms"] > 0 and q["ttft_ms_again"] > 0 and q["floor_ttft_ms"] > 0 and q["again_identical"]
    assert r["questions"][-1]["cache_tokens"] == st["cache_tokens"]
    fq = r["full_cache_questions"]
    assert fq["n"] == 20 and fq["cache_tokens"] == st["cache_tokens"] and fq["ttft_ms"]["n"] == 20
    assert 0 < fq["ttft_ms"]["p50"] <= fq["ttft_ms"]["p90"] <= fq["ttft_ms"]["p99"] <= fq["ttft_ms"]["max"]
    assert fq["decode_ms_per_token"]["n"] >= 1

    of, fa = r["offline"], r["fair"]
    assert of["ok"] and of["prefill_s"] > 0 and of["ttft_s"] >= of["prefill_s"] and of["preprocess_s"] > 0
    assert of["gpu_prefill_s"] == pytest.approx(of["prefill_s"] - of["preprocess_s"], abs=2e-6)
    assert of["prompt_tokens"] == st["cache_tokens"] + r["questions"][-1]["question_tokens"] == fa["prompt_tokens"]
    assert fa["ok"] and fa["prefill_s"] > 0 and fa["preprocess_s"] > 0 and 0 < fa["vision_s"] <= fa["prefill_s"] <= fa["ttft_s"]
    assert st["streaming_tax_stock"] == pytest.approx(st["encode_s"] / of["gpu_prefill_s"], rel=1e-2)
    assert st["streaming_tax_fair"] == pytest.approx(st["encode_s"] / fa["prefill_s"], rel=1e-2)
    for ag in (r["agreement"], r["agreement_fair"]):  # float32 on the CPU: the same computation three ways
        assert ag["identical"] and ag["first_divergence"] is None and ag["max_logit_diff"] <= 1e-4

    dec = r["decoding"]
    assert dec["sampled_frames"] == 4 and dec["native_frames_decoded"] == 46  # 2 s at 30 fps sampled at 2 fps: frames 0, 15, 30, 45
    assert dec["resized_to"] == "112x112" and dec["sampled_frames_per_s"] > 0
    assert dec["keeps_up_with_stream"] == (dec["sampled_frames_per_s"] >= dec["stream_frames_per_s"])

    assert r["rates"]["matmul_flop_per_s"] > 0 and r["rates"]["copy_bytes_per_s"] > 0
    assert all(r["floors"][k] > 0 for k in ("encode_s", "encode_frames_per_s", "offline_prefill_s", "ttft_ms", "decode_ms_per_token"))

    runs = Store().runs(kind="bench")
    assert len(runs) == 1 and runs[0]["id"] == r["run_id"] and runs[0]["report"]["streaming"]["cache_tokens"] == st["cache_tokens"]
    saved = json.loads((home / r["json_path"]).read_text())
    assert saved["agreement"] == r["agreement"]
    text = (home / "bench.md").read_text()
    assert text.count("![") == 2
    for line in ("Whole video, stock transformers", "Whole video on streaming's kernels", "vision tower + pixel upload",
                 "host preprocessing (normalise, patchify, pin)", "against the whole video on streaming's kernels",
                 "20 questions of different lengths: TTFT ms p50", "Real decoding (decord", "max reserved", "CUDA context"):
        assert line in text, line
    assert "vision + preprocessing" not in text
    assert (home / "bench-encode.png").stat().st_size > 0 and (home / "bench-ttft.png").stat().st_size > 0


def test_bench_help_says_the_comparison_defaults_to_exact_memory(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default: exact for the comparison" in text and "auto with --minutes" in text
    assert "default: the model's context for the comparison" in text
    assert "--questions QUESTIONS" in text and "(default: 20)" in text and "--decode-seconds" in text


def test_bench_memory_policy_can_still_be_bounded_and_says_so(home, capsys):
    argv = [*SMALL, "--no-offline", "--no-warmup", "--no-repeat-questions", "--questions", "0", "--frames", "80", "--memory", "auto", "--gpu-kv-budget", "600"]
    assert main(argv) == 0
    assert "the agreement below measures the policy" in capsys.readouterr().out
    assert Store().runs(kind="bench")[0]["report"]["config"]["memory"]["mode"] == "bounded"
    assert main([*SMALL, "--gpu-kv-budget", "lots"]) == 2
    assert "--gpu-kv-budget 'lots' is not a size" in capsys.readouterr().err


def test_bench_table_has_every_section_and_odd_frames_pad_the_last_chunk(home, capsys):
    argv = [*SMALL, "--frames", "6", "--no-offline", "--no-warmup", "--no-repeat-questions", "--questions-at", "2", "--questions", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for section in ("Whole video, stock", "Whole video on streaming's kernels", "Streaming, per chunk", "Streaming totals", "Questions",
                    "Agreement", "Floors", "GPU busy"):
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
    monkeypatch.setattr("streamchat.bench_fair.answer_fair", out_of_memory)
    assert main([*SMALL, "--no-warmup", "--no-repeat-questions", "--questions", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    oom = "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert r["offline"] == {"ok": False, "error": oom, "cudnn_sdp": False} and r["fair"] == {"ok": False, "error": oom}
    assert r["agreement"] is None and r["agreement_fair"] is None
    assert r["streaming"]["streaming_tax_stock"] is None and r["streaming"]["streaming_tax_fair"] is None
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


def test_the_streaming_cache_is_gone_before_the_whole_video_paths_run(home, capsys, monkeypatch):
    """Their peak memory and out-of-memory headroom must not include the streaming engine's cache."""
    import gc

    import streamchat.bench_fair
    import streamchat.offline
    from streamchat.engine import StreamEngine

    alive = []
    real_offline, real_fair = streamchat.offline.answer_offline, streamchat.bench_fair.answer_fair

    def engines() -> int:
        return sum(type(o) is StreamEngine for o in gc.get_objects())

    def offline(*args, **kwargs):
        alive.append(engines())
        return real_offline(*args, **kwargs)

    def fair(*args, **kwargs):
        alive.append(engines())
        return real_fair(*args, **kwargs)

    monkeypatch.setattr("streamchat.offline.answer_offline", offline)
    monkeypatch.setattr("streamchat.bench_fair.answer_fair", fair)
    assert main([*SMALL, "--no-repeat-questions", "--questions", "1", "--json"]) == 0
    assert alive == [0, 0, 0, 0]  # warm-up and timed run of each path


def test_minutes_mode_keeps_the_streams_own_memory_defaults(home, capsys):
    argv = ["bench", "--model", "tiny-random", "--device", "cpu", "--minutes", "0.1", "--width", "112", "--height", "112",
            "--final-questions", "1", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["memory"]["gpu_tokens"] == 65536 and r["memory"]["mode"] == "exact"  # auto, resolved: 12 frames fit
