"""`streamchat eval --task questions` on the CPU with tiny-random: the held-out clips, the questions per
kind, streaming == offline on every question, the scorer on hand-made predictions, the outputs and the
logged run. Random weights answer nothing right, so accuracy itself is checked on made-up predictions."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from streamchat import tinyshapes
from streamchat.evaluate_questions import score, text_table
from streamchat.questions import questions
from streamchat.store import Store
from test_sessions import error_line  # noqa: F401 - fixtures

KINDS = ("colour", "shape", "word", "flashes", "order", "count")
SMALL = ["eval", "--task", "questions", "--model", "tiny-random", "--device", "cpu", "--clips", "3", "--lengths", "4",
         "--size", "112"]


def held_out_scenes(clips: int, seconds: int, size: int, seed: int = 0):
    """The clips the task must build, worked out here from the recipe alone."""
    return [tinyshapes.training_scene(tinyshapes.HELD_OUT + n * 1009 + seed, seconds, size) for n in range(clips)]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One small run through the CLI, then `logs --runs` (its own store: the per-test one is function-scoped)."""
    import contextlib
    import io

    from streamchat.cli import main

    out = tmp_path_factory.mktemp("eval") / "questions.json"
    stdout, stderr, logs = io.StringIO(), io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMCHAT_HOME", str(tmp_path_factory.mktemp("home")))
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main([*SMALL, "--out", str(out), "--json"])
        assert rc == 0, stderr.getvalue()
        with Store() as store:
            runs = store.runs(kind="eval")
        with contextlib.redirect_stdout(logs):
            assert main(["logs", "--runs", "--kind", "eval"]) == 0
    return json.loads(stdout.getvalue()), out, runs, logs.getvalue()


def test_held_out_clips_carry_every_template_question_of_their_scene(small_run):
    doc, _, _, _ = small_run
    scenes = held_out_scenes(3, 4, 112)
    assert [(c["seed"], c["length_s"], c["frames"]) for c in doc["clips"]] == [(s.seed, 4, 8) for s in scenes]
    assert all(s.seed >= tinyshapes.HELD_OUT for s in scenes)  # seeds training never draws
    for clip, scene in zip(doc["clips"], scenes):
        assert [(q["kind"], q["question"], q["answer"]) for q in clip["questions"]] == [
            (qa.kind, qa.question, qa.answer) for qa in questions(scene)]
        for q in clip["questions"]:
            for mode in ("streaming", "offline"):
                r = q["results"][mode]
                assert r["frames_seen"] == 8 and 1 <= len(r["token_ids"]) <= 8, (mode, r)  # --max-new-tokens 8 by default
    assert doc["config"]["max_new_tokens"] == 8 and doc["config"]["history"] == "drop"


def test_table_has_every_kind_with_n_from_the_scenes_questions(small_run):
    doc, _, _, _ = small_run
    counts = Counter(qa.kind for scene in held_out_scenes(3, 4, 112) for qa in questions(scene))
    assert set(counts) == set(KINDS)  # these three clips ask every kind
    assert doc["modes"] == ["streaming", "offline"] and doc["kinds"] == list(KINDS)
    for mode in doc["modes"]:
        assert {k: row["n"] for k, row in doc["table"][mode].items()} == {**counts, "all": sum(counts.values())}
        for kind in (*KINDS, "all"):
            right = [q["results"][mode]["correct"] for c in doc["clips"] for q in c["questions"] if kind in (q["kind"], "all")]
            assert doc["table"][mode][kind]["correct"] == sum(right)
        assert doc["by_length"][mode]["4"]["n"] == sum(counts.values())
    text = text_table(doc).splitlines()
    for kind in (*KINDS, "all"):
        (line,) = [x for x in text if x.split()[:1] == [kind]]
        n = sum(counts.values()) if kind == "all" else counts[kind]
        assert line.count(f"(n={n})") == 2, line


def test_streaming_answers_equal_offline_token_for_token_on_every_question(small_run):
    doc, _, _, _ = small_run
    asked = [q for c in doc["clips"] for q in c["questions"]]
    for q in asked:
        assert q["results"]["streaming"]["token_ids"] == q["results"]["offline"]["token_ids"], q
        assert q["results"]["streaming"]["prediction"] == q["results"]["offline"]["prediction"]
        assert q["streaming_equals_offline"] is True
    assert doc["streaming_equals_offline"] == {"equal": len(asked), "compared": len(asked)}
    assert f"streaming == offline answers (token ids): {len(asked)} of {len(asked)}" in text_table(doc)


def test_scorer_counts_exact_matches_per_kind_and_mode():
    """Hand-made predictions on one scene's real questions: streaming gets colour and word right, offline
    every kind (in another case, with an article and a full stop) but one skipped question; the last
    question's token ids differ between the modes."""
    scene = held_out_scenes(1, 24, 112)[0]
    qas = questions(scene)
    counts = Counter(qa.kind for qa in qas)
    assert set(counts) == set(KINDS)
    asked = []
    for i, qa in enumerate(qas):
        streaming = {"prediction": qa.answer if qa.kind in ("colour", "word") else "purple", "token_ids": [1, i]}
        offline = {"prediction": f"The {qa.answer.upper()}.", "token_ids": [1, i if i < len(qas) - 1 else -1]}
        if i == 0:
            offline = {"skipped": "the whole video does not fit"}
        asked.append({**qa.to_json(), "results": {"streaming": streaming, "offline": offline}})
    clips = [{"length_s": 24, "questions": asked}]
    report = score(clips, ["streaming", "offline"], (24, 8))
    table = report["table"]
    assert qas[0].kind == "colour"
    for kind in KINDS:
        right = counts[kind] if kind in ("colour", "word") else 0
        assert table["streaming"][kind] == {"n": counts[kind], "correct": right, "accuracy": right / counts[kind], "skipped": 0}
        skipped = 1 if kind == "colour" else 0
        assert table["offline"][kind] == {"n": counts[kind], "correct": counts[kind] - skipped,
                                          "accuracy": (counts[kind] - skipped) / counts[kind], "skipped": skipped}
    n = len(qas)
    assert table["streaming"]["all"]["correct"] == counts["colour"] + counts["word"]
    assert table["offline"]["all"] == {"n": n, "correct": n - 1, "accuracy": (n - 1) / n, "skipped": 1}
    assert report["by_length"]["offline"] == {"24": table["offline"]["all"], "8": {"n": 0, "correct": 0, "accuracy": None, "skipped": 0}}
    assert report["streaming_equals_offline"] == {"equal": n - 2, "compared": n - 1}
    # a kind nobody was asked stays in the table, with no accuracy
    only_word = [{"length_s": 24, "questions": [q for q in asked if q["kind"] == "word"]}]
    assert score(only_word, ["streaming"], (24,))["table"]["streaming"]["count"] == {"n": 0, "correct": 0, "accuracy": None, "skipped": 0}


def test_json_file_bar_chart_and_logged_run(small_run):
    doc, out, runs, logs = small_run
    assert json.loads(out.read_text())["clips"] == doc["clips"]
    png = out.with_suffix(".png")
    assert doc["written"]["chart"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png).size == (640, 360)
    assert [r["id"] for r in runs] == [doc["run_id"]]
    assert runs[0]["report"]["task"] == "questions" and runs[0]["report"]["table"] == doc["table"]
    n = sum(len(c["questions"]) for c in doc["clips"])
    assert doc["run_id"] in logs and f"questions tiny-random: 3 clips, exact match streaming 0%, offline 0%, streaming == offline {n} of {n}" in logs


@pytest.mark.parametrize("flag, value, says", [
    ("--clips", "0", "--clips must be at least 1"),
    ("--lengths", "1,4", "whole seconds of at least 2"),
    ("--lengths", "4.5", "whole seconds of at least 2"),
    ("--size", "100", "--size: give a multiple of 28"),
    ("--depths", "0.5", "--depths: for --task needle"),
    ("--history", "keep", "leave out --history keep"),
])
def test_bad_questions_options_exit_2_with_one_line(capsys, flag, value, says):
    assert says in error_line(capsys, *SMALL, flag, value)


def test_questions_options_are_refused_with_the_needle_task(capsys):
    assert "--clips: for --task questions" in error_line(capsys, "eval", "--model", "tiny-random", "--clips", "3")


def test_eval_help_gives_the_questions_defaults(capsys):
    from streamchat.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("(default: needle)", "4,8,16,24 with --task questions, the range every training stage covered", "(default: 20)", "(default: 224, as in training)",
                 "(default: 64; 8 with --task questions)"):
        assert text in out, text


def test_the_task_does_not_import_training():
    """The engine side uses the recipe (tinyshapes), never the training script."""
    code = ("import sys\n"
            "import streamchat.evaluate, streamchat.evaluate_questions as q, streamchat.stream, streamchat.offline\n"
            "q.plan(q.QuizSettings(clips=2, lengths=(2,), size=56))\n"
            "print('streamchat.train' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False"
