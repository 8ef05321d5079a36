"""`streamchat eval`: a needle-in-a-video benchmark by V-NIAH's construction rule, on generated scenes.

A haystack (a shapes scene without words) of each stream length gets one needle, a word shown for one
second, at depth d: it starts at d x (length - 1 s), snapped to the sampling grid, so d = 0 is the
first frame and d = 1 ends with the last. The same haystack and needle serve every depth of a length
(only the depth moves), and the needle's question is asked at the end of the stream: in streaming
mode under each memory policy, and offline where the whole video fits the model's context.
Scored by exact match. For a real checkpoint the needle is a sentence ("the secret word is mango"),
as V-NIAH's needles are images with a question about them; for tiny-random and random:<arch> it is
the bare word, what a model trained on these scenes learns to read.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError
from .questions import exact_match
from .scenes import WORD_S, WORDS, Scene, generate

NEEDLES = {  # kind -> (the text shown, the question asked)
    "word": ("{word}", "What word was shown?"),
    "sentence": ("the secret word is {word}", "What is the secret word? Answer with the word only."),
}
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass
class EvalSettings:
    lengths: tuple[float, ...] = (16.0, 32.0, 64.0)  # stream lengths in seconds
    depths: tuple[float, ...] = DEPTHS  # V-NIAH's needle depths (it steps by 0.2; quarters here)
    policies: tuple[str, ...] = ("exact", "bounded")  # memory policies the stream is asked under
    needle: str = "auto"  # word | sentence | auto: a sentence for a real checkpoint, the word for built-in models (tiny-shapes reads words)
    offline: bool = True  # also the whole-video prefill, where it fits the context
    trials: int = 1  # haystack and needle pairs per length; accuracy is the share answered right
    seed: int = 0
    width: int = 224
    height: int = 224


def needle_start(depth: float, length: float, fps: float) -> float:
    """Where the needle starts: depth x (length - its 1 s), on the sampled-frame grid."""
    return round(depth * (length - WORD_S) * fps) / fps


def haystack(settings: EvalSettings, length: float, trial: int) -> tuple[Scene, str]:
    """The scene without words and the needle word for one (length, trial): the same for every depth."""
    seed = settings.seed * 1_000_003 + trial * 1009 + int(length * 100)
    scene = generate(seed, seconds=length, width=settings.width, height=settings.height, words=0)
    return scene, random.Random(seed).choice(WORDS)


def needle_kind(setting: str, model_id: str) -> str:
    """auto: the word for built-in and random models and for checkpoints `streamchat.train` wrote (a
    local directory with its training.json: they read words, not sentences); the sentence otherwise."""
    from .models import BUILT_IN

    if setting != "auto":
        return setting
    if model_id in BUILT_IN or model_id.startswith("random:") or _trained_here(model_id):
        return "word"
    return "sentence"


def _trained_here(model_id: str) -> bool:
    try:
        record = json.loads((Path(model_id) / "training.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "held_out_accuracy" in record and "streamchat.train" in str(record.get("command", ""))


def modes(settings: EvalSettings) -> list[str]:
    return [f"streaming:{p}" for p in settings.policies] + (["offline"] if settings.offline else [])


def run_eval(loaded, config, settings: EvalSettings, on_answer: Callable[[], None] | None = None,
             clips_dir: Path | None = None) -> dict:
    """Every (length, depth, trial) cell in every mode; returns the report (cells and accuracy)."""
    if clips_dir is None:
        with tempfile.TemporaryDirectory(prefix="streamchat-eval-") as tmp:
            return run_eval(loaded, config, settings, on_answer, Path(tmp))
    kind = needle_kind(settings.needle, loaded.model_id)
    cells = []
    for length in settings.lengths:
        for trial in range(settings.trials):
            hay, word = haystack(settings, length, trial)
            for depth in settings.depths:
                cells.append(_cell(loaded, config, settings, kind, hay, word, length, depth, trial, clips_dir, on_answer))
    return {
        "benchmark": "needle-in-a-video (V-NIAH construction rule)",
        "model": loaded.model_id,
        "needle": kind,
        "question": NEEDLES[kind][1],
        "settings": dataclasses.asdict(settings),
        "config": config.to_dict(),
        "modes": modes(settings),
        "cells": cells,
        "accuracy": accuracy_grid(cells, settings),
    }


def _cell(loaded, config, settings, kind: str, hay: Scene, word: str, length, depth, trial, clips_dir: Path,
          on_answer) -> dict:
    from .video import VideoSource

    fps = config.sampling.fps  # the clip is written at the rate it is sampled: every frame is a plan frame
    start = needle_start(depth, length, fps)
    shown, question = NEEDLES[kind]
    scene = hay.with_word(shown.format(word=word), start)
    path = scene.write(clips_dir / f"L{length:g}-d{depth:g}-t{trial}.mp4", fps=fps)
    source = VideoSource(path, config.sampling)
    needle_frames = [k for k, (_, t) in enumerate(source.plan) if start - 1e-6 <= t < start + WORD_S - 1e-6]
    cell = {"length_s": length, "depth": depth, "trial": trial, "frames": len(source.plan),
            "needle": {"word": word, "shown": scene.word_at(start), "start_s": start, "end_s": start + WORD_S, "frames": needle_frames},
            "results": {}}
    for mode in modes(settings):
        cell["results"][mode] = _ask(loaded, config, source, mode, question, word)
        if on_answer is not None:
            on_answer()
    offline = cell["results"].get("offline", {})
    cell["streaming_equals_offline"] = {
        mode: r["token_ids"] == offline["token_ids"] for mode, r in cell["results"].items()
        if mode != "offline" and "token_ids" in r and "token_ids" in offline}
    return cell


def _ask(loaded, config, source, mode: str, question: str, word: str) -> dict:
    """One answer in one mode, or why there is none (a refused or unfitting stream is a result, not an error)."""
    frames = len(source.plan)
    if mode == "offline":
        ans = offline_answer(loaded, config, source, question)
        if isinstance(ans, str):
            return {"skipped": ans}
        extra = {}
    else:
        from .stream import Stream

        policy = mode.split(":", 1)[1]
        cfg = dataclasses.replace(config, memory=dataclasses.replace(config.memory, mode=policy))
        try:
            stream = Stream(loaded, source, cfg, frames=frames)
        except UserError as exc:  # exact memory refuses a stream that cannot fit, before any work
            return {"skipped": str(exc)}
        stream.encode_until(frames, pad_tail=True)
        ans = stream.engine.ask(question)
        extra = {"policy": stream.budget.mode, "recalled": ans.retrieved}
    return {"answer": ans.text, "token_ids": ans.token_ids, "correct": exact_match(ans.text, word),
            "frames_seen": ans.frames_seen, "cache_tokens": ans.cache_tokens, "ttft_ms": ans.ttft_s * 1000, **extra}


def offline_answer(loaded, config, source, question: str):
    """The whole-video path (`ask --mode offline`: every plan frame and the question in one prefill, no
    streaming engine) at the video's own stride: the Answer, or why there is none (a string)."""
    from . import hf
    from .layout import Vocab, one_turn
    from .offline import answer_with_retry
    from .stream import read_frames

    frames = len(source.plan)
    vc = hf.vision_config(loaded.model)
    unit = vc.patch_size * vc.spatial_merge_size
    vocab = Vocab(loaded.tokenizer, config.system_prompt)
    prompt = one_turn(vocab, frames, source.info.resized_height // unit, source.info.resized_width // unit, question)
    fps = config.sampling.sampled_fps(source.info.native_fps)
    ans, attempts = answer_with_retry(loaded, prompt, lambda pos: read_frames(source, pos), fps, question,
                                      config.max_new_tokens, vocab, max_attempts=1)
    if ans is None or attempts[-1].stride_factor != 1:  # a halved video is not the whole video
        return attempts[0].error or "the whole video does not fit"
    return ans


def accuracy_grid(cells: list[dict], settings: EvalSettings) -> dict:
    """{mode: {length: {depth: share correct, or None where nothing ran}}}, keys as strings (JSON)."""
    grid: dict = {}
    for mode in modes(settings):
        grid[mode] = {}
        for length in settings.lengths:
            row = grid[mode][f"{length:g}"] = {}
            for depth in settings.depths:
                runs = [c["results"][mode] for c in cells if c["length_s"] == length and c["depth"] == depth]
                done = [r["correct"] for r in runs if "correct" in r]
                row[f"{depth:g}"] = sum(done) / len(done) if done else None
    return grid


def text_table(report: dict) -> str:
    """Per mode, depth down and length across, accuracy in percent ('-' where nothing ran)."""
    s = report["settings"]
    lines = [f"needle in a video: {report['model']}, {len(report['cells'])} cells x {len(report['modes'])} modes, "
             f"{s['trials']} trial(s) per cell, question {report['question']!r}"]
    for mode in report["modes"]:
        lines.append("")
        lines.append(f"{mode:<18}" + "".join(f"{f'{length:g} s':>9}" for length in s["lengths"]))
        for depth in s["depths"]:
            cells = [report["accuracy"][mode][f"{length:g}"][f"{depth:g}"] for length in s["lengths"]]
            lines.append(f"  depth {depth:<10g}" + "".join(f"{'-' if a is None else f'{a:.0%}':>9}" for a in cells))
    same = [v for c in report["cells"] for v in c["streaming_equals_offline"].values()]
    if same:
        lines.append("")
        lines.append(f"streaming equals offline token for token in {sum(same)} of {len(same)} comparisons")
    return "\n".join(lines)


def heatmap(report: dict, path: Path) -> Path:
    """One panel per mode: depth (rows) x length (columns), accuracy 0..1; grey where nothing ran."""
    import matplotlib

    matplotlib.use("Agg")  # no display; never pick an interactive backend
    import matplotlib.pyplot as plt
    import numpy as np

    from .plots import _save

    s = report["settings"]
    names = report["modes"]
    fig, axes = plt.subplots(1, len(names), figsize=(1.2 + 2.6 * len(names), 3.4), dpi=100, squeeze=False)
    for ax, mode in zip(axes[0], names):
        acc = np.array([[np.nan if (a := report["accuracy"][mode][f"{length:g}"][f"{d:g}"]) is None else a
                         for length in s["lengths"]] for d in s["depths"]], dtype=float)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
        ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(s["lengths"])), [f"{v:g}" for v in s["lengths"]])
        ax.set_yticks(range(len(s["depths"])), [f"{v:g}" for v in s["depths"]])
        ax.set_xlabel("stream length (s)")
        ax.set_title(mode, fontsize=9)
        for (i, j), a in np.ndenumerate(acc):
            ax.text(j, i, "-" if np.isnan(a) else f"{a:.0%}", ha="center", va="center", fontsize=7,
                    color="black" if np.isnan(a) or a > 0.5 else "white")
    axes[0][0].set_ylabel("needle depth")
    return _save(fig, path)


# --- command -------------------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{text!r} is not a comma-separated list of numbers, such as 16,32,64") from None
    if not values:
        raise UserError("give at least one number, such as 16,32,64")
    return values


NEEDLE_ONLY = ("depths", "policies", "needle", "trials", "width", "height")  # None unless given: refused with the other task
QUESTIONS_ONLY = ("clips", "size")


def _given(args, names: tuple[str, ...]) -> str:
    return ", ".join(f"--{n}" for n in names if getattr(args, n, None) is not None)


def settings_from(args) -> EvalSettings:
    from .memory import MEMORY_MODES

    if given := _given(args, QUESTIONS_ONLY):
        raise UserError(f"{given}: for --task questions; add --task questions, or leave {given} out")
    default = EvalSettings()
    pick = lambda name: getattr(default, name) if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    lengths = default.lengths if args.lengths is None else _floats(args.lengths)
    depths = default.depths if args.depths is None else _floats(args.depths)
    policies = default.policies if args.policies is None else tuple(p.strip() for p in args.policies.split(",") if p.strip())
    trials, width, height, needle = pick("trials"), pick("width"), pick("height"), pick("needle")
    if any(v <= WORD_S for v in lengths):
        raise UserError(f"--lengths must all be longer than the {WORD_S:g} s needle; got {args.lengths}")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise UserError(f"--depths must lie in [0, 1]; got {args.depths}")
    if bad := [p for p in policies if p not in MEMORY_MODES]:
        raise UserError(f"--policies takes {', '.join(MEMORY_MODES)}; got {', '.join(bad)}")
    if not policies and not args.offline:
        raise UserError("nothing to run: give --policies, or leave out --no-offline")
    if trials < 1:
        raise UserError(f"--trials must be at least 1; got {trials}")
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise UserError(f"--width and --height must be even and at least 16; got {width}x{height}")
    return EvalSettings(lengths=lengths, depths=depths, policies=policies, offline=args.offline, trials=trials,
                        needle=needle, seed=args.seed, width=width, height=height)


def cmd_eval(args) -> int:
    import json

    from . import evaluate_questions as quiz
    from .cli import _log_run, config_from, emit, load_model, progress_for
    from .config import SessionConfig

    questions = args.task == "questions"
    if questions:
        if given := _given(args, NEEDLE_ONLY):
            raise UserError(f"{given}: for --task needle; leave {given} out with --task questions")
        settings = quiz.settings_from(args, _floats(args.lengths) if args.lengths is not None else None)
    else:
        settings = settings_from(args)
    if args.max_new_tokens is None:
        args.max_new_tokens = quiz.MAX_NEW_TOKENS if questions else SessionConfig().max_new_tokens
    config = config_from(args)
    if questions:
        quiz.check_config(config)  # before the model loads
    loaded = load_model(args)
    if questions:
        clips = quiz.plan(settings)
        total = sum(len(c.qas) for c in clips) * len(quiz.modes(settings))
    else:
        total = len(settings.lengths) * len(settings.depths) * settings.trials * len(modes(settings))
    bar = progress_for(args, total, "eval", unit="answers")
    done = [0]

    def tick() -> None:
        done[0] += 1
        bar.update(done[0])

    report = (quiz.run_questions if questions else run_eval)(loaded, config, settings, on_answer=tick)
    bar.close()
    written = {}
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        chart = quiz.bar_chart(report, out.with_suffix(".png")) if questions else heatmap(report, out.with_suffix(".png"))
        written = {"json": str(out), "chart" if questions else "heatmap": str(chart)}
    if not args.no_log:
        report["run_id"], written["database"] = _log_run("eval", report)
    report["written"] = written
    text = (quiz.text_table if questions else text_table)(report) + "".join(f"\n{k}: {v}" for k, v in written.items())
    emit(args, report, text)
    return 0


def register(sub) -> None:
    from .cli import add_engine_options, add_no_log_option, add_output_options
    from .config import SessionConfig
    from .evaluate_questions import MAX_NEW_TOKENS, QuizSettings
    from .video import Sampling

    d, q, v = EvalSettings(), QuizSettings(), Sampling()
    p = sub.add_parser("eval", help="benchmarks on generated scenes: needle in a video (default), or tiny-shapes' template questions",
                       description="--task needle: build generated haystack scenes with a word shown for one second at each needle "
                       "depth (V-NIAH's construction rule), ask for it at the end of each stream in streaming mode "
                       "under each memory policy and offline where the whole video fits; print an accuracy table, write "
                       "JSON and a heat map, log the run in the store. --task questions: held-out clips of the tiny-shapes "
                       "training recipe, every template question (colour, shape, word, flashes, order, count) asked after the whole "
                       "clip in streaming mode (encoded once, each answer rolled back) and offline; exact-match accuracy per "
                       "question kind, streaming == offline token for token; a table, JSON and a bar chart, the run logged.")
    p.add_argument("--task", choices=["needle", "questions"], default="needle", help="needle: the needle-in-a-video grid; questions: "
                   "template questions on held-out tiny-shapes clips, scored per question kind (default: needle)")
    p.add_argument("--lengths", default=None, help="stream lengths in seconds, comma-separated; with --task questions, whole seconds "
                   "of at least 2 that the clips take in turn (default: "
                   f"{','.join(f'{x:g}' for x in d.lengths)}; {','.join(f'{x:g}' for x in q.lengths)} with --task questions, "
                   "the range every training stage covered; tiny-shapes' last two stages also trained on clips of up to 96 s, "
                   "which --lengths 48,96 asks)")
    g = p.add_argument_group("--task needle")
    g.add_argument("--depths", default=None, help=f"needle depths in [0, 1], comma-separated (default: {','.join(f'{x:g}' for x in d.depths)})")
    g.add_argument("--policies", default=None, help=f"memory policies to stream under, comma-separated, from auto, exact, bounded; the budgets come from --gpu-kv-budget and friends (default: {','.join(d.policies)})")
    g.add_argument("--needle", choices=["auto", *NEEDLES], default=None, help="word: the bare word is shown, 'What word was shown?'; sentence: "
                   "'the secret word is …' is shown, 'What is the secret word?'; auto: sentence for a real checkpoint, word for "
                   f"the built-in models, random:<arch> and checkpoints streamchat.train wrote (default: {d.needle})")
    g.add_argument("--trials", type=int, default=None, help=f"haystack and needle pairs per length (default: {d.trials})")
    g.add_argument("--width", type=int, default=None, help=f"scene width in pixels, even (default: {d.width})")
    g.add_argument("--height", type=int, default=None, help=f"scene height in pixels, even (default: {d.height})")
    g = p.add_argument_group("--task questions")
    g.add_argument("--clips", type=int, default=None, help=f"held-out clips (scene seeds training never draws), lengths taken in turn from --lengths (default: {q.clips})")
    g.add_argument("--size", type=int, default=None, help=f"frame width and height in pixels, a multiple of 28; the streaming memory policy is --memory (default: {q.size}, as in training)")
    p.add_argument("--no-offline", dest="offline", action="store_false", default=True, help="skip the whole-video prefill (default: run it where the video fits the context)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the haystacks and needles, or of the held-out clips (default: {d.seed})")
    p.add_argument("--fps", type=float, default=v.fps, help=f"frames per second sampled; the needle's clips are also written at it, the questions' at 24 (default: {v.fps:g})")
    p.add_argument("--max-pixels", type=int, default=v.max_pixels, help=f"per-frame pixel budget, upper bound (default: {v.max_pixels})")
    p.add_argument("--min-pixels", type=int, default=v.min_pixels, help=f"per-frame pixel budget, lower bound (default: {v.min_pixels})")
    p.add_argument("--out", default=None, help="write the report as JSON here and its chart beside it (.png: a heat map, or bars per question kind); the folder is created (default: none)")
    add_no_log_option(p, "the run")
    add_engine_options(p)
    for action in p._actions:  # a short answer is all a template question needs; random weights never stop early
        if action.dest == "max_new_tokens":
            action.default = None
            action.help = action.help.replace(f"(default: {SessionConfig().max_new_tokens})",
                                              f"(default: {SessionConfig().max_new_tokens}; {MAX_NEW_TOKENS} with --task questions)")
    add_output_options(p)
    p.set_defaults(func=cmd_eval, stride=None, start=0.0, duration=None, max_frames=None)
