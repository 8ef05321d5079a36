"""`streamchat eval` on the CPU with tiny-random: the needle's construction, the grid, the table, the
JSON, the heat map and the logged run. Random weights answer nothing right, so the assertions are on
what is known without a trained model."""

import json

import pytest

from streamchat.config import SessionConfig
from streamchat.evaluate import EvalSettings, needle_start, run_eval
from streamchat.memory import MemoryConfig
from streamchat.scenes import CAPTION
from streamchat.store import Store
from streamchat.video import Sampling, VideoSource
from test_sessions import cli, error_line  # noqa: F401 - fixtures

SMALL = ["eval", "--model", "tiny-random", "--device", "cpu", "--width", "112", "--height", "112", "--lengths", "3,5",
         "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One small run through the CLI (its own store: the per-test store fixture is function-scoped)."""
    import contextlib
    import io

    from streamchat.cli import main

    out = tmp_path_factory.mktemp("eval") / "needle.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMCHAT_HOME", str(tmp_path_factory.mktemp("home")))
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main([*SMALL, "--out", str(out), "--json"])
        assert rc == 0, stderr.getvalue()
        with Store() as store:
            runs = store.runs(kind="eval")
    return json.loads(stdout.getvalue()), out, runs


def test_needle_starts_at_depth_times_the_free_length_on_the_frame_grid():
    assert [needle_start(d, 5.0, 2.0) for d in (0, 0.25, 0.5, 0.75, 1)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [needle_start(d, 3.0, 2.0) for d in (0, 0.25, 0.5, 0.75, 1)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert needle_start(0.5, 10.0, 2.0) == 4.5 and needle_start(1 / 3, 10.0, 2.0) == 3.0


def test_grid_cells_and_needle_frames(small_run):
    doc, _, _ = small_run
    assert doc["modes"] == ["streaming:exact", "streaming:bounded", "offline"]
    assert doc["needle"] == "word" and doc["question"] == "What word was shown?"  # tiny-random: the bare word
    cells = {(c["length_s"], c["depth"]): c for c in doc["cells"]}
    assert set(cells) == {(L, d) for L in (3.0, 5.0) for d in (0.0, 0.25, 0.5, 0.75, 1.0)}
    for (length, depth), cell in cells.items():
        first = round(depth * (length - 1) * 2)  # 2 fps, a 1 s needle
        assert cell["frames"] == 2 * length
        assert cell["needle"]["frames"] == [first, first + 1]
        assert cell["needle"]["end_s"] - cell["needle"]["start_s"] == 1.0
        assert set(cell["results"]) == set(doc["modes"])
        for mode, result in cell["results"].items():
            assert result["frames_seen"] == 2 * length and len(result["token_ids"]) <= 4, (mode, result)
            assert result["correct"] is (result["answer"].strip().lower() == cell["needle"]["word"])
    # one haystack and one needle per length: only the depth moves
    for length in (3.0, 5.0):
        assert len({cells[(length, d)]["needle"]["word"] for d in (0.0, 0.25, 0.5, 0.75, 1.0)}) == 1


def test_streaming_equals_offline_token_for_token_on_every_cell(small_run):
    doc, _, _ = small_run
    for cell in doc["cells"]:
        assert cell["streaming_equals_offline"] == {"streaming:exact": True, "streaming:bounded": True}
        offline = cell["results"]["offline"]["token_ids"]
        assert all(cell["results"][m]["token_ids"] == offline for m in ("streaming:exact", "streaming:bounded"))


def test_accuracy_grid_is_the_share_of_correct_answers(small_run):
    doc, _, _ = small_run
    for mode in doc["modes"]:
        assert set(doc["accuracy"][mode]) == {"3", "5"}
        for length in ("3", "5"):
            assert set(doc["accuracy"][mode][length]) == {"0", "0.25", "0.5", "0.75", "1"}
            for depth, acc in doc["accuracy"][mode][length].items():
                (cell,) = [c for c in doc["cells"] if f"{c['length_s']:g}" == length and f"{c['depth']:g}" == depth]
                assert acc == float(cell["results"][mode]["correct"])


def test_json_file_heat_map_and_logged_run(small_run):
    doc, out, runs = small_run
    assert json.loads(out.read_text())["cells"] == doc["cells"]
    png = out.with_suffix(".png")
    assert doc["written"]["heatmap"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png).size == (900, 340)  # three panels: (1.2 + 2.6 x 3) x 3.4 inches at 100 dpi
    assert [r["id"] for r in runs] == [doc["run_id"]]
    assert runs[0]["report"]["accuracy"] == doc["accuracy"]


def test_the_needle_is_in_the_frames_the_report_names(tmp_path):
    """The clip eval builds, decoded through the same VideoSource: the caption strip is lit exactly on
    the needle's frames."""
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=2.0)).validate()
    settings = EvalSettings(lengths=(5.0,), depths=(0.75,), policies=(), offline=False, width=112, height=112)
    from streamchat.evaluate import _cell, haystack

    class NoModel:  # no mode runs: only the clip is built
        model_id = "none"

    hay, word = haystack(settings, 5.0, 0)
    cell = _cell(NoModel(), config, settings, "word", hay, word, 5.0, 0.75, 0, tmp_path, None)
    source = VideoSource(tmp_path / "L5-d0.75-t0.mp4", config.sampling)
    frames = source.read(0, len(source.plan))
    top = int(source.info.resized_height * (1 - CAPTION))
    lit = [k for k in range(len(frames)) if (frames[k, top:] > 200).all(axis=-1).sum() > 20]
    assert cell["needle"]["frames"] == lit == [6, 7]
    assert cell["needle"]["shown"] == word


def test_a_real_checkpoint_gets_the_secret_word_sentence(tmp_path):
    from streamchat.evaluate import NEEDLES, _cell, haystack, needle_kind

    assert [needle_kind("auto", m) for m in ("tiny-random", "random:qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "/ckpt")] == [
        "word", "word", "sentence", "sentence"]
    assert needle_kind("word", "/ckpt") == "word"
    # a checkpoint streamchat.train wrote reads words: a copy of tiny-shapes as a local directory
    from streamchat.models import checkpoint_source

    assert needle_kind("auto", checkpoint_source("tiny-shapes")) == "word"
    (tmp_path / "training.json").write_text('{"note": "someone else\'s"}')
    assert needle_kind("auto", str(tmp_path)) == "sentence"
    config = SessionConfig(model="x", sampling=Sampling(fps=2.0)).validate()
    settings = EvalSettings(lengths=(4.0,), depths=(0.0,), policies=(), offline=False, width=224, height=112)

    class NoModel:
        model_id = "none"

    hay, word = haystack(settings, 4.0, 0)
    cell = _cell(NoModel(), config, settings, "sentence", hay, word, 4.0, 0.0, 0, tmp_path, None)
    assert cell["needle"]["shown"] == f"the secret word is {word}" and cell["needle"]["frames"] == [0, 1]
    assert NEEDLES["sentence"][1] == "What is the secret word? Answer with the word only."


def test_exact_refuses_and_bounded_recalls_on_a_stream_over_the_budget(tiny):
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=2.0), max_new_tokens=2,
                           memory=MemoryConfig(gpu_kv_budget="448", retrieve_tokens=64)).validate()
    settings = EvalSettings(lengths=(40.0,), depths=(0.5,), policies=("exact", "bounded"), offline=False,
                            width=112, height=112)
    report = run_eval(tiny, config, settings)
    (cell,) = report["cells"]
    assert cell["frames"] == 80 and cell["needle"]["frames"] == [39, 40]  # 0.5 x 39 s = 19.5 s, frame 39 at 2 fps
    assert cell["results"]["streaming:exact"]["skipped"].startswith("exact memory cannot hold this stream")
    bounded = cell["results"]["streaming:bounded"]
    assert bounded["policy"] == "bounded" and bounded["recalled"] and bounded["cache_tokens"] < 448
    assert report["accuracy"]["streaming:exact"] == {"40": {"0.5": None}}
    assert report["accuracy"]["streaming:bounded"]["40"]["0.5"] in (0.0, 1.0)


@pytest.mark.parametrize("flag, value, says", [
    ("--depths", "0,1.5", "--depths must lie in [0, 1]"),
    ("--lengths", "1", "longer than the 1 s needle"),
    ("--lengths", "a,b", "not a comma-separated list"),
    ("--policies", "exact,lru", "--policies takes"),
    ("--trials", "0", "--trials must be at least 1"),
    ("--needle", "image", "--needle: invalid choice"),
])
def test_bad_eval_options_exit_2_with_one_line(capsys, flag, value, says):
    assert says in error_line(capsys, *SMALL, flag, value)


def test_eval_help_gives_every_default(capsys):
    from streamchat.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for text in ("(default: 16,32,64;", "(default: 0,0.25,0.5,0.75,1)", "(default: exact,bounded)", "(default: 2)"):
        assert text in " ".join(out.split()), text
