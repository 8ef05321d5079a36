"""`streamchat eval --task questions`: tiny-shapes' acceptance test, exact match per question kind.

Held-out clips of the training recipe (`tinyshapes.training_scene` on `scene_seed(seed, n, held_out=True)`,
seeds training never draws), with lengths spread over the given ones, each written as a real video file
and sampled as any video is. Every template question of `questions(scene)` is asked after the whole
clip: in streaming mode (the clip encoded once, each question answered on top of the cache and rolled
back, as `ask --mode streaming` does) and offline (the whole video and the question in one prefill).
Scored by exact match per kind and overall; streaming and offline are compared token for token.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable

from . import tinyshapes
from .errors import UserError
from .questions import QA, accuracy, exact_match, questions
from .scenes import Scene

KINDS = tinyshapes.QUESTION_KINDS
WRITE_FPS = 24.0  # clips are written as ordinary videos and sampled down (2 fps by default), as any video is
MAX_NEW_TOKENS = 8  # answers are a word or a number; random weights never stop early


@dataclasses.dataclass
class QuizSettings:
    clips: int = 20  # held-out clips, spread over `lengths` in turn
    lengths: tuple[int, ...] = (4, 8, 16, 24)  # whole seconds: the range every training stage covered (the last two went to 96 s)
    seed: int = 0  # the run's seed: clip n is scene seed tinyshapes.scene_seed(seed, n, held_out=True)
    size: int = tinyshapes.SIZE  # frames are size x size, as in training
    offline: bool = True  # also the whole-video prefill per question


@dataclasses.dataclass
class Clip:
    n: int
    length: int
    scene: Scene
    qas: list[QA]


def plan(settings: QuizSettings) -> list[Clip]:
    """The clips and their questions; cheap (no frame is drawn), so the progress total is known first."""
    out = []
    for n in range(settings.clips):
        length = settings.lengths[n % len(settings.lengths)]
        scene = tinyshapes.training_scene(tinyshapes.scene_seed(settings.seed, n, True), length, settings.size)
        out.append(Clip(n, length, scene, questions(scene)))
    return out


def modes(settings: QuizSettings) -> list[str]:
    return ["streaming"] + (["offline"] if settings.offline else [])


def run_questions(loaded, config, settings: QuizSettings, on_answer: Callable[[], None] | None = None,
                  clips_dir: Path | None = None) -> dict:
    """Every question of every clip in every mode; returns the report (clips, table, agreement)."""
    check_config(config)
    if clips_dir is None:
        with tempfile.TemporaryDirectory(prefix="streamchat-eval-") as tmp:
            return run_questions(loaded, config, settings, on_answer, Path(tmp))
    clips = [_clip(loaded, config, settings, clip, clips_dir, on_answer or (lambda: None)) for clip in plan(settings)]
    return {
        "benchmark": "template questions on held-out tiny-shapes clips (exact match)",
        "task": "questions",
        "model": loaded.model_id,
        "settings": dataclasses.asdict(settings),
        "config": config.to_dict(),
        "modes": modes(settings),
        "kinds": list(KINDS),
        "clips": clips,
        **score(clips, modes(settings), settings.lengths),
    }


def check_config(config) -> None:
    if config.history != "drop":
        raise UserError("--task questions asks each question on its own, as offline does; leave out --history keep")


def _clip(loaded, config, settings: QuizSettings, clip: Clip, clips_dir: Path, on_answer) -> dict:
    from .evaluate import offline_answer
    from .stream import Stream
    from .video import VideoSource

    path = clip.scene.write(clips_dir / f"clip{clip.n}-{clip.length}s.mp4", fps=WRITE_FPS)
    source = VideoSource(path, config.sampling)
    frames = len(source.plan)
    results: list[dict] = [{} for _ in clip.qas]
    policy = None
    try:  # exact memory refuses a stream that cannot fit, before any work: every question is skipped
        stream = Stream(loaded, source, config, frames=frames)
    except UserError as exc:
        stream, refused = None, str(exc)
    if stream is not None:
        stream.encode_until(frames, pad_tail=True)  # once; every question is asked on top and rolled back
        policy = stream.budget.mode
    for qa, res in zip(clip.qas, results):
        res["streaming"] = _result(stream.engine.ask(qa.question) if stream else refused, qa)
        on_answer()
    if settings.offline:
        for qa, res in zip(clip.qas, results):
            res["offline"] = _result(offline_answer(loaded, config, source, qa.question), qa)
            on_answer()
    return {"n": clip.n, "seed": clip.scene.seed, "length_s": clip.length, "frames": frames, "policy": policy,
            "questions": [{**qa.to_json(), "results": res, "streaming_equals_offline": _same(res)}
                          for qa, res in zip(clip.qas, results)]}


def _result(ans, qa: QA) -> dict:
    if isinstance(ans, str):  # why there is no answer
        return {"skipped": ans}
    return {"prediction": ans.text, "token_ids": ans.token_ids, "correct": exact_match(ans.text, qa.answer),
            "frames_seen": ans.frames_seen, "cache_tokens": ans.cache_tokens, "ttft_ms": ans.ttft_s * 1000}


def _same(results: dict) -> bool | None:
    """Streaming's generated token ids equal offline's; None where either has no answer."""
    s, o = results.get("streaming", {}), results.get("offline", {})
    return s["token_ids"] == o["token_ids"] if "token_ids" in s and "token_ids" in o else None


def score(clips: list[dict], mode_names: list[str], lengths: tuple[int, ...]) -> dict:
    """The table ({mode: {kind | "all": {n, correct, accuracy, skipped}}}, every kind present; a skipped
    answer counts as wrong), the same by clip length, and how often streaming equalled offline."""
    table, by_length = {}, {}
    for mode in mode_names:
        asked = [(c["length_s"], QA(**{k: q[k] for k in ("kind", "question", "answer", "at_s")}), q["results"][mode])
                 for c in clips for q in c["questions"]]
        table[mode] = _rows(asked, KINDS)
        by_length[mode] = {f"{length:g}": _rows([a for a in asked if a[0] == length], ())["all"] for length in lengths}
    same = [v for c in clips for q in c["questions"] if (v := _same(q["results"])) is not None]
    return {"table": table, "by_length": by_length, "streaming_equals_offline": {"equal": sum(same), "compared": len(same)}}


def _rows(asked: list[tuple], kinds: tuple[str, ...]) -> dict:
    rows = {kind: {"n": 0, "correct": 0, "accuracy": None} for kind in (*kinds, "all")}
    rows.update(accuracy([(qa, r.get("prediction", "")) for _, qa, r in asked]))  # "" matches no answer
    for key, row in rows.items():
        row["skipped"] = sum("skipped" in r for _, qa, r in asked if key in (qa.kind, "all"))
    return rows


def text_table(report: dict) -> str:
    """Kind down, mode across: accuracy in percent and n; then by clip length; then the agreement."""
    s, names = report["settings"], report["modes"]
    n = sum(len(c["questions"]) for c in report["clips"])
    lines = [f"template questions: {report['model']}, {len(report['clips'])} held-out clip(s) of "
             f"{', '.join(f'{x:g}' for x in s['lengths'])} s at {s['size']}x{s['size']}, {n} questions"]
    cell = lambda row: ("-" if row["accuracy"] is None else f"{row['accuracy']:.0%}") + f" (n={row['n']})" + (  # noqa: E731
        f", {row['skipped']} skipped" if row["skipped"] else "")
    lines += ["", f"{'kind':<10}" + "".join(f"{m:>22}" for m in names)]
    for kind in (*report["kinds"], "all"):
        lines.append(f"{kind:<10}" + "".join(f"{cell(report['table'][m][kind]):>22}" for m in names))
    lines += ["", f"{'length':<10}" + "".join(f"{m:>22}" for m in names)]
    for length in report["by_length"][names[0]]:
        lines.append(f"{length + ' s':<10}" + "".join(f"{cell(report['by_length'][m][length]):>22}" for m in names))
    same = report["streaming_equals_offline"]
    if same["compared"]:
        lines += ["", f"streaming == offline answers (token ids): {same['equal']} of {same['compared']}"]
    return "\n".join(lines)


def bar_chart(report: dict, path: Path) -> Path:
    """Accuracy per question kind (and overall), one bar per mode, n under each kind."""
    import matplotlib

    matplotlib.use("Agg")  # no display; never pick an interactive backend
    import matplotlib.pyplot as plt

    from .plots import _save

    keys = [*report["kinds"], "all"]
    names = report["modes"]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for i, mode in enumerate(names):
        rows = [report["table"][mode][k] for k in keys]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, [r["accuracy"] or 0.0 for r in rows], width, label=mode)
        ax.bar_label(bars, ["-" if r["accuracy"] is None else f"{r['accuracy']:.0%}" for r in rows], fontsize=7)
    ax.set_xticks(range(len(keys)), [f"{k}\nn={report['table'][names[0]][k]['n']}" for k in keys])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("exact match")
    ax.axhline(0.95, color="grey", linewidth=0.8, linestyle="--")  # issue 10's bar for tiny-shapes
    ax.set_title(f"template questions: {report['model']}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def settings_from(args, lengths: tuple[float, ...] | None) -> QuizSettings:
    d = QuizSettings()
    lo = tinyshapes.SECONDS[0]
    if lengths is None:
        lengths = d.lengths
    if any(v < lo or v != int(v) for v in lengths):
        raise UserError(f"--lengths for --task questions must be whole seconds of at least {lo} (tiny-shapes trains "
                        f"on {tinyshapes.SECONDS[0]}..{tinyshapes.SECONDS[1]} s); got {','.join(f'{v:g}' for v in lengths)}")
    clips = d.clips if args.clips is None else args.clips
    if clips < 1:
        raise UserError(f"--clips must be at least 1; got {clips}")
    size = d.size if args.size is None else args.size
    if problem := tinyshapes.size_problem(size):
        raise UserError(f"--size: {problem}")
    return QuizSettings(clips=clips, lengths=tuple(int(v) for v in lengths), seed=args.seed, size=size, offline=args.offline)
