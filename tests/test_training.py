"""The training script for `tiny-shapes` (streamchat/train.py): what it trains on is what streamchat
streams, its batched forward is the model's own forward, its batches are seeded, and what it writes is an
ordinary checkpoint directory that loads through the local-directory path. No test trains a model to
any accuracy; one runs two optimizer steps to check the command end to end.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import numpy as np
import pytest
import torch

from streamchat import hf, models, tiny, tinyshapes, train
from streamchat.fingerprint import config_fingerprint
from streamchat.layout import Vocab
from streamchat.questions import QA, questions

from reference_qwen import processor_inputs, reference_positions, user


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A freshly initialised tiny-shapes model (float32, CPU), its processor and the layout's vocabulary."""
    model, processor = tinyshapes.new_model_and_processor(0, tmp_path_factory.mktemp("tok"))
    model.eval()
    return model, processor, Vocab(processor.tokenizer, tinyshapes.SYSTEM_PROMPT)


def frames_of(scene):
    return np.stack([scene.frame(t) for t in tinyshapes.frame_times(scene.seconds)])


def test_training_prompts_are_the_processors_chat_template_and_qwens_positions(fresh):
    """Every question the recipe asks about a scene: the prompt the model is trained on is, token for
    token, what transformers' processor renders with the chat template (Qwen's published one, checked
    equal to the model's own), and its positions are Qwen's M-RoPE rule computed by the reference."""
    _, processor, vocab = fresh
    scene = tinyshapes.training_scene(11, 4)
    frames = frames_of(scene)
    asked = questions(scene)
    assert {qa.kind for qa in asked} == set(tinyshapes.QUESTION_KINDS)
    for qa in asked:
        theirs = processor_inputs(processor, [user(qa.question, True)], [frames], fps=tinyshapes.FPS)
        ids = theirs["input_ids"][0].tolist()
        ours, pos, start = train.prompt(vocab, len(frames), qa, 8)
        assert ours[:start] == ids, qa.question
        assert ours[start:] == vocab.ids(qa.answer) + [vocab.im_end]
        grid = theirs["video_grid_thw"].tolist()
        expected = reference_positions(ours, grid, [tinyshapes.interval() / 2], video_pad=vocab.video_pad)
        assert torch.equal(pos, expected), qa.question


def test_positions_by_hand_for_a_two_second_clip(fresh):
    """Pinned by hand: after the s head tokens, the two temporal patches of a 2 s clip at 2 fps sit at
    t = s and s + 2 (interval 2: tokens_per_second 2 x 2 frames / 2 fps), rows and columns at s..s+7,
    and the question resumes at s + 8 (the largest position used, s + 7, plus one)."""
    _, _, vocab = fresh
    ids, pos, _ = train.prompt(vocab, 4, QA("word", "What word was shown?", "apple"), 8)
    s = len(vocab.stream_start())
    assert pos[:, :s].tolist() == [list(range(s))] * 3
    video = pos[:, s : s + 128]
    assert video[0].unique().tolist() == [s, s + 2]
    assert video[1].unique().tolist() == video[2].unique().tolist() == list(range(s, s + 8))
    assert video[:, 64 + 8 * 3 + 5].tolist() == [s + 2, s + 3, s + 5]  # second patch, row 3, column 5
    assert pos[:, s + 128].tolist() == [s + 8] * 3
    assert ids[s : s + 128] == [vocab.video_pad] * 128 and ids[s + 128] == vocab.vision_end


def test_the_packed_forward_is_the_models_own_forward_on_each_prompt(fresh):
    """Two clips with four questions each, packed one row per clip over one copy of its video: the
    logits at every answer token equal stock `model(...)` on that question's prompt alone (rendered by
    `train.prompt`, which the processor test above holds), the targets are the answer's tokens and its
    end of turn, and the video matters."""
    model, processor, vocab = fresh
    batch = train.make_batch(3, 0, 2, 4, processor, vocab, h264_share=0.0, seconds=(2, 3))
    assert batch["parts"].shape[0] == 2 == len(batch["clip_of"])  # one row per clip
    assert (batch["parts"] == -1).any() or batch["seconds"] == 2  # rows of different lengths are padded
    assert len(batch["asked"]) == 8
    per_clip = batch["grid_thw"].prod(-1).tolist()
    with torch.no_grad():
        got = train.step_logits(model, batch, torch.device("cpu"))
        for q, (c, qa) in enumerate(batch["asked"]):
            t, h, _ = batch["grid_thw"][c].tolist()
            ids, pos, start = train.prompt(vocab, 2 * t, qa, h // 2)
            first = sum(per_clip[:c])
            out = model(input_ids=torch.tensor([ids]), pixel_values_videos=batch["pixel_values"][first : first + per_clip[c]],
                        video_grid_thw=batch["grid_thw"][c : c + 1], position_ids=pos.unsqueeze(1), use_cache=False)
            rows = (batch["question_of"] == q).nonzero().flatten()
            assert batch["targets"][rows].tolist() == ids[start:] and ids[-1] == vocab.im_end
            assert set(batch["kinds"][r] for r in rows.tolist()) == {qa.kind}
            torch.testing.assert_close(got[rows], out.logits[0, start - 1 : len(ids) - 1], rtol=1e-4, atol=1e-5)
        other = dict(batch, pixel_values=batch["pixel_values"].flip(0))
        assert (train.step_logits(model, other, torch.device("cpu")) - got).abs().max() > 1e-3


def test_frames_patchified_where_the_model_is_are_the_workers_pixels(fresh):
    """On a GPU the batch workers send uint8 frames and the trainer runs the processor on the GPU:
    the same grid and pixel values as a worker's processor (here both on the CPU), so the same logits."""
    model, processor, vocab = fresh
    made = train.make_batch(4, 1, 2, 3, processor, vocab, seconds=(2, 3))
    sent = train.make_batch(4, 1, 2, 3, processor, vocab, seconds=(2, 3), frames_only=True)
    assert "pixel_values" not in sent and all(f.dtype == torch.uint8 and f.shape[-1] == 3 for f in sent["frames"])
    assert torch.equal(sent["grid_thw"], made["grid_thw"])
    assert torch.equal(train.pixels(sent, processor, torch.device("cpu")), made["pixel_values"])
    odd = train.video_grid(processor, (5, 56, 84, 3))  # an odd frame count fills its last temporal patch
    assert odd.tolist() == hf.video_pixels(processor, torch.zeros(5, 56, 84, 3, dtype=torch.uint8))[1].tolist() == [[3, 4, 6]]
    with torch.no_grad():
        torch.testing.assert_close(train.step_logits(model, sent, torch.device("cpu"), processor),
                                   train.step_logits(model, made, torch.device("cpu")), rtol=0, atol=0)


def test_pack_shares_the_common_prefix_and_keeps_each_answers_cue_in_its_own_part():
    """Hand-made prompts: the longest common prefix is stored once, a prompt asked twice and a lone
    prompt keep the token before their answer in their own part, and `part_mask` lets each part
    see the prefix and itself only."""
    pos = lambda n: torch.arange(n).expand(3, n)  # noqa: E731
    a, b = ([1, 2, 3, 4, 9, 5], 5), ([1, 2, 3, 7, 9, 6], 5)
    ids, positions, parts, offsets = train.pack([(a[0], pos(6), a[1]), (b[0], pos(6), b[1])])
    assert ids == [1, 2, 3, 4, 9, 5, 7, 9, 6] and parts == [0, 0, 0, 1, 1, 1, 2, 2, 2] and offsets == [0, 3]
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5]
    ids, _, parts, offsets = train.pack([(a[0], pos(6), a[1]), (a[0], pos(6), a[1])])  # asked twice
    assert ids == [1, 2, 3, 4, 9, 5, 9, 5] and parts == [0, 0, 0, 0, 1, 1, 2, 2] and offsets == [0, 2]
    assert train.pack([(a[0], pos(6), a[1])])[2] == [0, 0, 0, 0, 1, 1]
    mask = train.part_mask(torch.tensor([[0, 0, 1, 1, 2, 2, -1]]))[0, 0]
    assert mask[5].tolist() == [True, True, False, False, True, True, False]  # prefix and itself, causal
    assert mask[3].tolist() == [True, True, True, True, False, False, False]
    assert mask[6].tolist() == [False] * 6 + [True]  # padding sees only itself


def test_batches_are_seeded_and_held_out_clips_are_never_trained_on(fresh):
    _, processor, vocab = fresh
    a = train.make_batch(5, 2, 2, 2, processor, vocab, seconds=(2, 2))
    b = train.make_batch(5, 2, 2, 2, processor, vocab, seconds=(2, 2))
    c = train.make_batch(5, 3, 2, 2, processor, vocab, seconds=(2, 2))
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["ids"], b["ids"])
    assert not torch.equal(a["pixel_values"], c["pixel_values"])
    train_seeds = {tinyshapes.scene_seed(seed, n, False) for seed in (0, 1, 7) for n in range(0, 10**6, 997)}
    held_seeds = {tinyshapes.scene_seed(seed, n, True) for seed in (1, 8) for n in range(0, 10**6, 997)}
    assert max(train_seeds) < tinyshapes.HELD_OUT <= min(held_seeds)


def test_curriculum_looks_first_then_grows_the_longest_clip():
    every = tinyshapes.QUESTION_KINDS
    assert train.curriculum(0, 100, (2, 24), 0.4) == ((2, 2), every, False)
    assert train.curriculum(20, 100, (2, 24), 0.4) == ((2, 13), every, False)
    assert train.curriculum(40, 100, (2, 24), 0.4) == ((2, 24), every, False) == train.curriculum(99, 100, (2, 24), 0.4)
    assert train.curriculum(0, 100, (2, 24), 0.0) == ((2, 24), every, False)
    # a first stage of plain clips of the shortest length and questions no prior answers, then the ramp
    assert train.curriculum(19, 100, (2, 24), 0.4, first=0.2) == ((2, 2), ("colour", "shape", "word"), True)
    assert train.curriculum(20, 100, (2, 24), 0.4, first=0.2) == ((2, 2), every, False)
    assert train.curriculum(40, 100, (2, 24), 0.4, first=0.2) == ((2, 13), every, False)
    assert train.curriculum(5, 100, (2, 24), 0.4, 0.2, ("count", "order")) == ((2, 2), ("count", "order"), True)


def test_plain_scenes_show_everything_the_whole_time():
    for seed in range(20):
        scene = tinyshapes.training_scene(seed, 4, plain=True)
        assert not scene.flashes and all(len(s.colours) == 1 and s.appear_s == s.vx == s.vy == 0 for s in scene.shapes)
        assert [(w.start_s, w.end_s) for w in scene.words] == [(0, 4)]
        assert scene.word_at(3.9) == scene.words[0].text and len(scene.visible(0)) == len(scene.shapes)
        busy = tinyshapes.training_scene(seed, 4)
        assert [s.kind for s in busy.shapes] == [s.kind for s in scene.shapes]  # the same draw otherwise
    assert any(tinyshapes.training_scene(seed, 8).flashes for seed in range(20))


def test_late_clocks_start_some_clips_clocks_at_a_random_minute_and_change_nothing_else(fresh):
    _, processor, vocab = fresh
    scenes = [tinyshapes.training_scene(seed, 6) for seed in range(40)]
    late = [tinyshapes.training_scene(seed, 6, late_clocks=0.5) for seed in range(40)]
    assert all(s.clock_start == 0 for s in scenes)
    starts = [s.clock_start for s in late]
    assert 10 < sum(x > 0 for x in starts) < 30 and all(x == 0 or 60 <= x < 59 * 60 for x in starts)
    assert all(dataclasses.replace(b, clock_start=0) == a for a, b in zip(scenes, late))
    assert all(s.clock_start >= 60 for s in (tinyshapes.training_scene(seed, 6, late_clocks=1.0) for seed in range(10)))
    timed = [qa.question for _, qa in train.make_batch(0, 3, 3, 6, processor, vocab, seconds=(6, 6), late_clocks=1.0)["asked"]
             if qa.at_s is not None]
    assert timed and not any(" at 00:" in q for q in timed)  # the batches' questions name the late clocks' minutes


def test_the_h264_round_trip_keeps_the_picture():
    frames = frames_of(tinyshapes.training_scene(4, 2))
    back = train.roundtrip(frames)
    assert back.shape == frames.shape and back.dtype == np.uint8
    diff = np.abs(back.astype(int) - frames.astype(int))
    assert 0 < diff.mean() < 3  # codec artefacts, not another picture


def test_pick_questions_draws_kinds_uniformly():
    scene = tinyshapes.training_scene(21, 12)
    picked = tinyshapes.pick_questions(scene, random.Random(0), 2000)
    counts = {k: sum(q.kind == k for q in picked) for k in tinyshapes.QUESTION_KINDS}
    assert all(300 < n < 500 for n in counts.values()), counts  # 400 each; colour questions are 3x as many
    assert tinyshapes.pick_questions(scene, random.Random(0), 5, ("word",)) == [q for q in questions(scene) if q.kind == "word"] * 5


def test_the_command_writes_a_checkpoint_that_loads_as_a_local_directory(tmp_path, capsys):
    """Two optimizer steps, then the directory loads through `--model DIR` (the local-checkpoint path):
    same architecture, the tokenizer and chat template from the directory, and another seed gives other
    weights under the same config, which the snapshot fingerprint tells apart."""
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"ckpt{seed}"
        assert train.main(["--out", str(out), "--steps", "2", "--clips", "1", "--questions", "2", "--workers", "0",
                           "--eval-batches", "1", "--device", "cpu", "--seconds", "2,2", "--warmup", "1",
                           "--seed", str(seed)]) == 0
        outs.append(out)
    names = {p.name for p in outs[0].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "loss.csv", "loss.png", "training.json"} <= names
    record = json.loads((outs[0] / "training.json").read_text())
    assert record["steps_done"] == 2 and record["device"] == "cpu" and "all" in record["held_out_accuracy"]
    assert (outs[0] / "loss.csv").read_text().splitlines()[0] == "step,seconds,loss"
    a = models.load(str(outs[0]), device="cpu", dtype="float32")
    b = models.load(str(outs[1]), device="cpu", dtype="float32")
    assert a.model_id == str(outs[0]) and a.processor.chat_template == (outs[0] / "chat_template.jinja").read_text()
    assert a.model.config.vision_config.fullatt_block_indexes == tinyshapes.VISION["fullatt_block_indexes"]
    assert config_fingerprint(a.model.config) == config_fingerprint(b.model.config)
    assert a.fingerprint != b.fingerprint
    # a later stage starts from an earlier run's weights: before its first step they are those weights
    later = tmp_path / "later"
    assert train.main(["--out", str(later), "--steps", "1", "--clips", "1", "--questions", "1", "--workers", "0",
                       "--eval-batches", "1", "--device", "cpu", "--seconds", "2,2", "--lr", "0", "--warmup", "1",
                       "--init", str(outs[1])]) == 0
    assert models.load(str(later), device="cpu", dtype="float32").fingerprint == b.fingerprint


@pytest.mark.parametrize("args, says", [
    (["--seconds", "5"], "--seconds 5: give MIN,MAX"),
    (["--seconds", "9,4"], "--seconds 9,4: give MIN,MAX"),
    (["--kinds", "word,weather"], "--kinds word,weather: each must be one of"),
    (["--clips", "x"], "--clips: invalid int value"),
    (["--late-clocks", "1.5"], "--late-clocks 1.5: give a share from 0 to 1"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--out", str(tmp_path / "new"), *args])
    assert exit_.value.code == 2 and says in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("init, says", [
    ("missing", "not a checkpoint directory (no config.json)"),
    ("retokenized", "not a tiny-shapes checkpoint of this recipe (another tokenizer)"),
])
def test_init_from_something_this_recipe_cannot_continue_is_one_line_and_exit_2(tmp_path, capsys, init, says):
    source = tmp_path / init
    if init == "retokenized":  # the shipped checkpoint with tiny-random's tokenizer in place of its own
        shutil.copytree(models.checkpoint_source("tiny-shapes"), source)
        tiny.build_tokenizer(source)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--out", str(tmp_path / "new"), "--steps", "1", "--device", "cpu", "--init", str(source)])
    assert exit_.value.code == 2 and says in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "new").exists()


def test_an_existing_checkpoint_is_not_overwritten_without_force(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--out", str(tmp_path), "--steps", "1", "--device", "cpu"])
    assert exit_.value.code == 2 and "add --force" in capsys.readouterr().err
    assert (tmp_path / "config.json").read_text() == "{}"


def test_an_answer_is_right_only_when_every_token_is():
    """Teacher-forced argmax per answer token, counted per question: one wrong token makes the answer wrong."""
    batch = {"question_of": torch.tensor([0, 0, 1, 1, 2, 2]), "targets": torch.tensor([3, 1, 4, 1, 2, 1]),
             "kinds": ["word", "word", "word", "word", "count", "count"]}
    logits = torch.zeros(6, 5)
    for i, t in enumerate([3, 1, 4, 0, 2, 1]):  # question 1's <|im_end|> is missed
        logits[i, t] = 1.0
    assert train.answers_right(logits, batch) == {"word": [1, 2], "count": [1, 1], "all": [2, 3]}


def test_the_shipped_checkpoints_script_runs_five_stages_this_parser_takes():
    """scripts/train_tiny_shapes.sh, the shipped checkpoint's recipe: five `streamchat.train` commands,
    each later one starting from the one before, and every option one the command still takes."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).parents[1] / "scripts" / "train_tiny_shapes.sh").read_text().replace("\\\n", " ")
    commands = [shlex.split(line)[3:] for line in text.splitlines() if line.startswith('"$PY" -m streamchat.train')]
    assert len(commands) == 5
    outs = []
    for argv in commands:
        args = train.build_parser().parse_args(argv)
        assert args.init == (outs[-1] if outs else None)
        outs.append(args.out)
    assert outs[-1] == "$DIR/tiny-shapes"
    shipped = json.loads((Path(models.checkpoint_source("tiny-shapes")) / "training.json").read_text())
    defaults = vars(train.build_parser().parse_args(["--out", "x"]))  # options added since ran at their defaults
    assert {k: v for k, v in vars(args).items() if k not in ("out", "init", "device")} == \
        {k: v for k, v in {**defaults, **shipped["settings"]}.items() if k not in ("out", "init", "device")}
