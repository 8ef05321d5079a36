"""The shipped tiny-shapes checkpoint: loaded as a user's local checkpoint is, and its answers checked
against the generated scenes' ground truth (no test trains it)."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from streamchat import models
from streamchat.cli import build_parser, main, subparsers
from streamchat.evaluate import DEPTHS

CHECKPOINT = Path(models.__file__).parent / "checkpoints" / "tiny-shapes"


def run(args: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(args)
    assert rc == 0, stderr.getvalue()
    return json.loads(stdout.getvalue())


def test_the_package_holds_an_ordinary_checkpoint_directory_with_its_model_card():
    names = {p.name for p in CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "processor_config.json",
            "README.md", "training.json"} <= names
    assert models.checkpoint_source("tiny-shapes") == str(CHECKPOINT)
    assert models.checkpoint_source("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"
    card = (CHECKPOINT / "README.md").read_text()
    assert "What it knows" in card and "What it does not know" in card
    assert (CHECKPOINT / "model.safetensors").stat().st_size < 16 * 2**20  # a few MB


def test_tiny_shapes_loads_through_the_local_checkpoint_path(tmp_path, monkeypatch):
    seen = []
    real = models._load_real
    monkeypatch.setattr(models, "_load_real", lambda source, *a, **k: seen.append(source) or real(source, *a, **k))
    built_in = models.load("tiny-shapes", device="cpu")
    copy = shutil.copytree(CHECKPOINT, tmp_path / "my-checkpoint")  # what a user's own directory is
    theirs = models.load(str(copy), device="cpu")
    assert seen == [str(CHECKPOINT), str(copy)]
    assert type(built_in.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert built_in.model_id == "tiny-shapes" and built_in.fingerprint == theirs.fingerprint
    assert sum(p.numel() for p in built_in.model.parameters()) == 6_561_920


@pytest.fixture(scope="module")
def questions_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMCHAT_HOME", str(tmp_path_factory.mktemp("home")))
        return run(["eval", "--task", "questions", "--model", "tiny-shapes", "--device", "cpu", "--clips", "6",
                    "--lengths", "4,12", "--out", str(tmp_path_factory.mktemp("eval") / "q.json"), "--json"])


def test_the_word_shown_is_answered_right_on_held_out_clips(questions_run):
    words = [q for c in questions_run["clips"] for q in c["questions"] if q["kind"] == "word"]
    assert len(words) >= 5
    for q in words:
        for mode in ("streaming", "offline"):
            assert q["results"][mode]["prediction"] == q["answer"], (mode, q)
    assert questions_run["table"]["streaming"]["word"]["accuracy"] == 1.0


def test_streaming_equals_offline_on_every_question_of_the_held_out_clips(questions_run):
    asked = [q for c in questions_run["clips"] for q in c["questions"]]
    assert {q["kind"] for q in asked} == {"colour", "shape", "word", "flashes", "order", "count"}
    for q in asked:
        assert q["results"]["streaming"]["token_ids"] == q["results"]["offline"]["token_ids"], q
    assert questions_run["streaming_equals_offline"] == {"equal": len(asked), "compared": len(asked)}


def test_the_needle_is_found_at_every_depth_exact_and_offline(tmp_path, monkeypatch):
    """At the training lengths (8 and 24 s) the word is found at every depth, streamed into exact
    memory and asked of the whole video."""
    monkeypatch.setenv("STREAMCHAT_HOME", str(tmp_path))
    doc = run(["eval", "--model", "tiny-shapes", "--device", "cpu", "--lengths", "8,24", "--policies", "exact",
               "--out", str(tmp_path / "needle.json"), "--json"])
    assert doc["needle"] == "word" and doc["question"] == "What word was shown?"
    cells = {(c["length_s"], c["depth"]): c for c in doc["cells"]}
    assert sorted(cells) == sorted((length, d) for length in (8.0, 24.0) for d in DEPTHS)
    for key, cell in cells.items():
        results = cell["results"]
        assert results["streaming:exact"]["correct"] and results["offline"]["correct"], (key, results)
        assert results["streaming:exact"]["token_ids"] == results["offline"]["token_ids"]


def test_bounded_memory_recalls_pages_and_answers_where_the_needle_is_in_its_working_set(tmp_path, monkeypatch):
    """24 s does not fit a 1,024-token cache: pages are archived and some recalled for the question,
    the cache stays within its budget, and the word is found where it is in the working set (the
    stream's first pages and its recent window). Between those depths the mean-key retrieval misses
    with this checkpoint (docs/tiny-shapes.md), which is what the benchmark is for."""
    monkeypatch.setenv("STREAMCHAT_HOME", str(tmp_path))
    doc = run(["eval", "--model", "tiny-shapes", "--device", "cpu", "--lengths", "24", "--policies", "bounded",
               "--no-offline", "--gpu-kv-budget", "1024", "--retrieve-tokens", "256", "--json"])
    cells = {c["depth"]: c["results"]["streaming:bounded"] for c in doc["cells"]}
    assert sorted(cells) == sorted(DEPTHS)
    for depth, result in cells.items():
        assert result["recalled"] and result["cache_tokens"] <= 1024, (depth, result)
    assert cells[0.0]["correct"] and cells[1.0]["correct"], cells


def test_every_question_of_the_demo_scene_is_answered_right_streaming_and_offline(monkeypatch, tmp_path):
    """The demo's default scene, written as `streamchat demo` writes it, and every template question it
    answers (colour, shape, word, flashes, order, count), asked through `streamchat ask` in both modes;
    the answers are held against the scene's ground truth."""
    from streamchat.cli_app import demo_clip
    from streamchat.questions import questions
    from streamchat.scenes import generate

    monkeypatch.setenv("STREAMCHAT_HOME", str(tmp_path))
    defaults = subparsers(build_parser())["demo"].parse_args([])
    clip = demo_clip(defaults.seed, defaults.seconds)
    scene = generate(defaults.seed, seconds=float(defaults.seconds))
    asked = questions(scene)
    assert {qa.kind for qa in asked} == {"colour", "shape", "word", "flashes", "order", "count"} and len(asked) == 12
    for qa in asked:
        streamed = run(["ask", str(clip), qa.question, "--model", "tiny-shapes", "--no-log", "--json"])
        offline = run(["ask", str(clip), qa.question, "--model", "tiny-shapes", "--mode", "offline", "--no-log", "--json"])
        assert streamed["answer"] == offline["answer"] == qa.answer, (qa, streamed["answer"], offline["answer"])
        assert streamed["token_ids"] == offline["token_ids"]
