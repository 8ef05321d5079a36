"""Train `tiny-shapes` from scratch: `python -m streamchat.train --out DIR` (one command, seeded).

Data recipe (streamchat.tinyshapes): every batch is `--clips` fresh scenes of one length (224x224, 2 to
3 shapes, 0 to 5 flashes, one word or digit, a clock strip), sampled at 2 fps, half of them round-tripped
through H.264 (libx264 crf 18, what `make-clip` writes) so the model sees codec artefacts as decord
gives them. Each clip gets `--questions` template questions, each of a kind drawn uniformly. The
curriculum (`curriculum`): first 2 s plain clips (every shape and the word on screen the whole time)
with word, colour and shape questions only, then every kind with the longest clip growing to 24 s. A
prompt is exactly what streamchat prefills for a one-turn question after the whole clip
(`layout.one_turn` and `layout.render`: the same token ids and M-RoPE positions), so a streamed answer
is the trained computation. A clip's questions share one pass over its video (`pack`: one row per
clip, each question's own tokens seeing the shared prefix and themselves only), which gives every
question the logits of its prompt run alone. The loss is the cross entropy of the answer's tokens
and its `<|im_end|>`. Batch b is made from (seed, b) alone, so the run does not depend on how many
workers make the batches.

Writes the checkpoint (bf16 safetensors, tokenizer, processor, chat template), `training.json` (the
settings, the card, the wall time, held-out accuracy per question kind and clip length), `loss.csv`
and `loss.png`. Tests run it for two steps on the CPU (tests/test_training.py); none trains a model.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import hf, tinyshapes
from .layout import TextSeg, Vocab, one_turn, render
from .questions import QA

def roundtrip(frames: np.ndarray) -> np.ndarray:
    """The frames through libx264 crf 18 yuv420p and back (in memory), as a clip file would give them."""
    import av

    from .clips import X264_OPTIONS

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=int(tinyshapes.FPS))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = dict(X264_OPTIONS)
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    buf.seek(0)
    from av.video.reformatter import VideoReformatter

    rgb = VideoReformatter()  # one conversion context for every frame: the same pixels, 5x faster than to_ndarray(format=...)
    with av.open(buf, mode="r") as inp:
        decoded = [rgb.reformat(f, format="rgb24").to_ndarray() for f in inp.decode(video=0)]
    return np.stack(decoded)


def clip_frames(scene, h264: bool) -> np.ndarray:
    frames = np.stack([scene.frame(t) for t in tinyshapes.frame_times(scene.seconds)])
    return roundtrip(frames) if h264 else frames


def prompt(vocab: Vocab, frames: int, qa: QA, grid: int) -> tuple[list[int], torch.Tensor, int]:
    """Token ids and positions of a one-turn prompt followed by its answer; and where the answer starts."""
    segs = one_turn(vocab, frames, grid, grid, qa.question)
    answer = vocab.ids(qa.answer) + [vocab.im_end]
    ids, pos = render(segs + [TextSeg(answer)], vocab, [(frames // 2, grid, grid)], tinyshapes.interval())
    return ids, pos, len(ids) - len(answer)


def pack(prompts: list[tuple[list[int], torch.Tensor, int]]) -> tuple[list[int], torch.Tensor, list[int], list[int]]:
    """One clip's prompts (ids, positions, answer start) as one sequence: the prefix they share, once
    (the head and the video: the long part), then each prompt's own rest. Returns the ids, the [3, L]
    positions, each token's part (0: the shared prefix, j + 1: prompt j's rest) and, per prompt, the
    offset at which its tokens lie (token i at i + offset). Under `part_mask` a prompt's rest sees
    the prefix and itself only, so every token's logits are those of its prompt run alone
    (tests/test_training.py holds them against stock `model(...)` on each prompt)."""
    shared = min(start for _, _, start in prompts) - 1  # the token before each answer stays in its prompt's rest
    first = prompts[0][0]
    for ids, _, _ in prompts[1:]:
        shared = next((i for i in range(shared) if ids[i] != first[i]), shared)
    out_ids, out_pos, parts, offsets = list(first[:shared]), [prompts[0][1][:, :shared]], [0] * shared, []
    for j, (ids, pos, _) in enumerate(prompts):
        offsets.append(len(out_ids) - shared)
        out_ids += ids[shared:]
        out_pos.append(pos[:, shared:])
        parts += [j + 1] * (len(ids) - shared)
    return out_ids, torch.cat(out_pos, dim=1), parts, offsets


def part_mask(parts: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] boolean attention mask (True: attend) from each token's part [B, L] (see `pack`;
    -1 for padding): causal, and a token sees the shared prefix (part 0) and its own part only.
    Padding sees itself, so that no row is empty."""
    width = parts.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=parts.device).tril()
    q, k = parts.unsqueeze(2), parts.unsqueeze(1)
    allowed = causal & ((k == 0) | (k == q)) & (q >= 0)
    allowed |= torch.eye(width, dtype=torch.bool, device=parts.device)
    return allowed.unsqueeze(1)


def make_batch(seed: int, index: int, clips: int, per_clip: int, processor, vocab: Vocab, h264_share: float = 0.5,
               held_out: bool = False, seconds: tuple[int, int] = tinyshapes.SECONDS,
               kinds: tuple[str, ...] = tinyshapes.QUESTION_KINDS, size: int = tinyshapes.SIZE, plain: bool = False,
               frames_only: bool = False, late_clocks: float = 0.0) -> dict:
    """Batch `index` of the run seeded `seed`, of clips `seconds` long (a range), `plain` ones
    (tinyshapes.training_scene) in the first stage: tensors on the CPU. One row per clip: its
    questions' prompts packed over one copy of the video (`pack`). `frames_only`: each clip's uint8
    frames (`frames`, a quarter of the bytes) instead of its pixel values, for `pixels` to patchify
    where the model is. `late_clocks`: the share of clips whose clock starts late (training_scene)."""
    rng = random.Random(seed * 1_000_003 + index)
    seconds = rng.randint(*seconds)
    pixels, grids, rows_of_clips, asked = [], [], [], []
    for c in range(clips):
        scene = tinyshapes.training_scene(tinyshapes.scene_seed(seed, index * clips + c, held_out), seconds, size, plain,
                                          late_clocks)
        frames = clip_frames(scene, rng.random() < h264_share)
        if frames_only:
            pv, grid = torch.from_numpy(frames), video_grid(processor, frames.shape)
        else:
            pv, grid = hf.video_pixels(processor, frames)
        g = int(grid[0, 1]) // 2  # merged grid side
        qas = tinyshapes.pick_questions(scene, rng, per_clip, kinds)
        if not qas:
            continue
        pixels.append(pv)
        grids.append(grid)
        asked += [(len(rows_of_clips), qa) for qa in qas]
        prompts = [prompt(vocab, len(frames), qa, g) for qa in qas]
        rows_of_clips.append((*pack(prompts), prompts))
    if not rows_of_clips:
        raise ValueError(f"no question of the kinds {', '.join(kinds)} fits {clips} clip(s) of {seconds} s; ask other kinds or longer clips")
    width = max(len(r[0]) for r in rows_of_clips)
    pad = vocab.tok.convert_tokens_to_ids("<|endoftext|>")
    ids = torch.full((len(rows_of_clips), width), pad, dtype=torch.long)
    parts = torch.full((len(rows_of_clips), width), -1, dtype=torch.long)
    pos = torch.zeros((3, len(rows_of_clips), width), dtype=torch.long)
    rows, cols, targets, target_kinds, question_of = [], [], [], [], []
    q = 0
    for b, (s_ids, s_pos, s_parts, offsets, prompts) in enumerate(rows_of_clips):
        n = len(s_ids)
        ids[b, :n] = torch.tensor(s_ids)
        parts[b, :n] = torch.tensor(s_parts)
        pos[:, b, :n] = s_pos
        pos[:, b, n:] = s_pos[:, -1:] + 1 + torch.arange(width - n)
        for (p_ids, _, start), offset in zip(prompts, offsets):
            for j in range(start, len(p_ids)):  # token j of the prompt is predicted from token j - 1
                rows.append(b)
                cols.append(j - 1 + offset)
                targets.append(p_ids[j])
                target_kinds.append(asked[q][1].kind)
                question_of.append(q)
            q += 1
    video = dict(frames=pixels) if frames_only else dict(pixel_values=torch.cat(pixels))
    return dict(**video, grid_thw=torch.cat(grids), clip_of=list(range(len(rows_of_clips))), ids=ids,
                parts=parts, pos=pos, rows=torch.tensor(rows), cols=torch.tensor(cols), targets=torch.tensor(targets),
                kinds=target_kinds, question_of=torch.tensor(question_of), asked=asked, seconds=seconds)


def video_grid(processor, shape: tuple[int, ...]) -> torch.Tensor:
    """grid_thw [1, 3] the video processor gives uint8 frames of `shape` [N, H, W, 3] (no resizing):
    temporal patches (the last frame repeated to fill one), then patch rows and columns."""
    vp = processor.video_processor
    n, h, w = shape[:3]
    return torch.tensor([[-(-n // vp.temporal_patch_size), h // vp.patch_size, w // vp.patch_size]])


def pixels(batch: dict, processor, device) -> torch.Tensor:
    """The batch's pixel values on `device`: made by the batch's worker, or here from its uint8 frames
    (`make_batch(frames_only=True)`: the processor runs on `device`, e.g. the training GPU)."""
    if "pixel_values" in batch:
        return batch["pixel_values"].to(device)
    return torch.cat([hf.video_pixels(processor, f.to(device, non_blocking=True), device)[0] for f in batch["frames"]])


# questions no text prior answers: the model has to look. "shape" asks for the shape of a colour: its
# loss asks the tower for what tells the shapes apart, which "colour" alone asked too faintly for
# (docs/tiny-shapes.md)
FIRST_KINDS = ("word", "colour", "shape")


def curriculum(index: int, count: int, seconds: tuple[int, int], ramp: float, first: float = 0.0,
               kinds: tuple[str, ...] = tinyshapes.QUESTION_KINDS) -> tuple[tuple[int, int], tuple[str, ...], bool]:
    """Clip lengths, question kinds and whether the clips are plain, for batch `index` of `count`.

    The first `first` of the run: plain clips of the shortest length (tinyshapes.training_scene:
    everything on screen the whole time), and only FIRST_KINDS (of `kinds`), which the answers'
    priors cannot answer, so the model learns to look, and to tell the shapes apart, before it can
    learn to guess. On the H200 (docs/tiny-shapes.md) plain clips took words from chance to 94-100%
    right; the word shown for 1 s of a 4 s clip, or every kind from the start, left the model at the
    answers' priors for thousands of steps. Then every kind on full clips, and the longest clip grows
    from the shortest to seconds[1] over the next `ramp` of the run."""
    lo, hi = seconds
    stage = round(first * count)
    if index < stage:
        return (lo, lo), tuple(k for k in kinds if k in FIRST_KINDS) or kinds, True
    if ramp <= 0:
        return (lo, hi), kinds, False
    return (lo, min(hi, lo + round((hi - lo) * (index - stage) / (ramp * count)))), kinds, False


class Batches(torch.utils.data.Dataset):
    """Batch i of a run, made in whichever worker process asks for it (each builds its own processor)."""

    def __init__(self, seed: int, count: int, clips: int, per_clip: int, tokenizer_dir: Path, *, held_out: bool = False,
                 seconds: tuple[int, int] = tinyshapes.SECONDS, ramp: float = 0.0, first: float = 0.0,
                 kinds: tuple[str, ...] = tinyshapes.QUESTION_KINDS, size: int = tinyshapes.SIZE, frames_only: bool = False,
                 late_clocks: float = 0.0):
        self.seed, self.count, self.clips, self.per_clip, self.tokenizer_dir = seed, count, clips, per_clip, str(tokenizer_dir)
        self.held_out, self.seconds, self.ramp, self.first, self.kinds, self.size = held_out, seconds, ramp, first, kinds, size
        self.frames_only, self.late_clocks = frames_only, late_clocks
        self.processor = self.vocab = None

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if self.processor is None:
            from .tiny import CHAT_TEMPLATE

            self.processor = hf.default_processor(hf.tokenizer_from_dir(self.tokenizer_dir), CHAT_TEMPLATE)
            self.vocab = Vocab(self.processor.tokenizer, tinyshapes.SYSTEM_PROMPT)
        lengths, kinds, plain = curriculum(index, self.count, self.seconds, self.ramp, self.first, self.kinds)
        return make_batch(self.seed, index, self.clips, self.per_clip, self.processor, self.vocab, held_out=self.held_out,
                          seconds=lengths, kinds=kinds, size=self.size, plain=plain, frames_only=self.frames_only,
                          late_clocks=self.late_clocks)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # batch makers share the machine's cores; the trainer keeps its own threads


def step_logits(model, batch, device, processor=None):
    """Logits at every answer token of the batch; `processor` patchifies batches of frames (`pixels`)."""
    return hf.batch_logits(model, batch["ids"].to(device), part_mask(batch["parts"].to(device)), batch["pos"].to(device),
                           pixels(batch, processor, device), batch["grid_thw"].to(device), batch["clip_of"],
                           batch["rows"].to(device), batch["cols"].to(device))


def answers_right(logits, batch) -> dict[str, list[int]]:
    """Per question kind: [right, asked]. An answer is right when every one of its tokens (and the end
    of turn) is the argmax under teacher forcing, which is exactly when greedy decoding returns it."""
    hit = (logits.argmax(-1).cpu() == batch["targets"]).tolist()
    per_question: dict[int, bool] = {}
    kind_of: dict[int, str] = {}
    for q, ok, kind in zip(batch["question_of"].tolist(), hit, batch["kinds"]):
        per_question[q] = per_question.get(q, True) and ok
        kind_of[q] = kind
    table: dict[str, list[int]] = {}
    for q, ok in per_question.items():
        for key in (kind_of[q], "all"):
            tally(table, key, ok, 1)
    return table


def tally(table: dict[str, list[int]], key: str, right: int, asked: int) -> None:
    """Add to table[key] = [right, asked]."""
    row = table.setdefault(key, [0, 0])
    row[0] += right
    row[1] += asked


def evaluate(model, loader, device, bf16: bool = False, processor=None) -> dict:
    model.eval()
    table: dict[str, list[int]] = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        for batch in loader:
            for kind, (ok, n) in answers_right(step_logits(model, batch, device, processor), batch).items():
                for key in [kind] if kind != "all" else ["all", f"all, clips of {batch['seconds']} s"]:
                    tally(table, key, ok, n)
    model.train()
    return {k: {"correct": ok, "n": n, "accuracy": ok / n} for k, (ok, n) in sorted(table.items())}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streamchat.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint directory to write (new or empty, unless --force)")
    p.add_argument("--force", action="store_true", help="write into --out even if it holds files")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--minutes", type=float, default=None, help="stop early after this many minutes of training")
    p.add_argument("--clips", type=int, default=24, help="clips per batch")
    p.add_argument("--questions", type=int, default=4, help="questions per clip")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW, warm-up then cosine)")
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and every batch")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start from the weights of an earlier run's checkpoint (a later stage) instead of fresh ones (default: fresh)")
    p.add_argument("--workers", type=int, default=8, help="processes making batches")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches for the accuracy report")
    p.add_argument("--seconds", default=f"{tinyshapes.SECONDS[0]},{tinyshapes.SECONDS[1]}",
                   help="clip lengths MIN,MAX in whole seconds (the held-out set uses the same range)")
    p.add_argument("--first", type=float, default=0.3,
                   help="share of the steps first spent on plain MIN-second clips (every shape and the word on screen all the time) with word, colour and shape questions only")
    p.add_argument("--ramp", type=float, default=0.3,
                   help="share of the steps, after --first, over which the longest clip grows from MIN to MAX (0: at once)")
    p.add_argument("--late-clocks", type=float, default=0.0,
                   help="share of clips (held-out ones too) whose clock starts at a random minute, 01:00 to 58:59, not 00:00: "
                        "the minutes a long stream's clock reaches, without long clips")
    p.add_argument("--report", type=int, default=100, help="print the loss and answers right every this many steps")
    p.add_argument("--size", type=int, default=tinyshapes.SIZE, help="frame width and height in pixels (a multiple of 28)")
    p.add_argument("--kinds", default=",".join(tinyshapes.QUESTION_KINDS), help="question kinds to train on")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast on a GPU (default: float32 with TF32 matmuls)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to train")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        seconds = tuple(int(x) for x in args.seconds.split(","))
    except ValueError:
        seconds = ()
    if len(seconds) != 2 or not 2 <= seconds[0] <= seconds[1]:
        p.error(f"--seconds {args.seconds}: give MIN,MAX whole seconds with 2 <= MIN <= MAX, e.g. 2,24")
    if problem := tinyshapes.size_problem(args.size):
        p.error(f"--size: {problem}")
    if not 0.0 <= args.late_clocks <= 1.0:
        p.error(f"--late-clocks {args.late_clocks}: give a share from 0 to 1, e.g. 0.5")
    kinds = tuple(args.kinds.split(","))
    if not set(kinds) <= set(tinyshapes.QUESTION_KINDS):
        p.error(f"--kinds {args.kinds}: each must be one of {', '.join(tinyshapes.QUESTION_KINDS)}")
    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.force:
        p.error(f"--out {args.out} exists and is not empty; pick another directory or add --force to overwrite")

    if args.init is not None and not (Path(args.init) / "config.json").is_file():
        p.error(f"--init {args.init}: not a checkpoint directory (no config.json); give an earlier run's --out")

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    tok_dir = Path(tempfile.mkdtemp(prefix="tiny-shapes-tok-"))
    model, processor = tinyshapes.new_model_and_processor(args.seed, tok_dir)
    if args.init is not None:  # a later stage: the weights of an earlier run, the same architecture and tokenizer
        if hf.tokenizer_from_dir(args.init).get_vocab() != processor.tokenizer.get_vocab():
            p.error(f"--init {args.init}: not a tiny-shapes checkpoint of this recipe (another tokenizer); start fresh without --init")
        earlier, _ = hf.load_pretrained(args.init, dtype=torch.float32, device_map="cpu", local_only=True)
        model.load_state_dict(earlier.state_dict())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(device).train()
    hf.use_training_attention(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"tiny-shapes: {params / 1e6:.2f} M parameters, training on {device}", file=sys.stderr)

    # on a GPU the workers send uint8 frames and the processor patchifies there: a quarter of the bytes
    # through the workers' queues, and the workers' share of making a 96 s clip about halved (CPU)
    on_gpu = device.type == "cuda"

    def loader(count, held_out, workers):
        data = Batches(args.seed + (1 if held_out else 0), count, args.clips, args.questions, tok_dir, held_out=held_out,
                       seconds=seconds, ramp=0.0 if held_out else args.ramp, first=0.0 if held_out else args.first,
                       kinds=kinds, size=args.size, frames_only=on_gpu, late_clocks=args.late_clocks)
        return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers, pin_memory=on_gpu,
                                           prefetch_factor=4 if workers else None, worker_init_fn=_one_thread)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    start = time.monotonic()

    def lr_at(step):
        """Linear warm-up, then cosine to 5% over the run: by steps, or by time with --minutes (the
        schedule ends when the time does; training.json records the steps, for a rerun with --steps)."""
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        done = (step - args.warmup) / max(args.steps - args.warmup, 1)
        if args.minutes is not None:
            done = max(done, (time.monotonic() - start) / (args.minutes * 60))
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))

    curve = []
    recent: dict[str, list[int]] = {}  # training answers right per kind since the last report
    done = 0
    for step, batch in enumerate(loader(args.steps, False, args.workers)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda"):
            logits = step_logits(model, batch, device, processor)
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["targets"].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach().item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        for kind, (ok, n) in answers_right(logits.detach(), batch).items():
            tally(recent, kind, ok, n)
        if step % 10 == 0 or done == args.steps:
            curve.append((done, round(time.monotonic() - start, 2), loss))
        if step % args.report == 0 or done == args.steps:
            right = " ".join(f"{k} {ok / n:.2f}" for k, (ok, n) in sorted(recent.items()))
            print(f"step {done} loss {loss:.4f} lr {lr_at(step):.2e} {time.monotonic() - start:.0f}s | right: {right}",
                  file=sys.stderr, flush=True)
            recent.clear()
        if args.minutes is not None and time.monotonic() - start > args.minutes * 60:
            break
    wall = time.monotonic() - start
    accuracy = evaluate(model, loader(args.eval_batches, True, min(args.workers, args.eval_batches)), device, args.bf16, processor)
    print(json.dumps(accuracy), file=sys.stderr)

    model.to(dtype=torch.bfloat16, device="cpu").save_pretrained(out)
    processor.save_pretrained(out)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    (out / "loss.csv").write_text("step,seconds,loss\n" + "".join(f"{s},{t},{v:.5f}\n" for s, t, v in curve))
    from .plots import loss_plot

    loss_plot({f"seed {args.seed}": [(s, v) for s, _, v in curve]}, out / "loss.png", f"tiny-shapes training loss ({card})")
    (out / "training.json").write_text(json.dumps(dict(
        command="python -m streamchat.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        settings=vars(args), steps_done=done, parameters=params, device=card, torch=torch.__version__,
        transformers=hf.transformers_version(), wall_seconds=round(wall, 1), held_out_accuracy=accuracy,
        held_out_note=f"{args.eval_batches} batches of {args.clips} clips x {args.questions} questions, seeds >= {tinyshapes.HELD_OUT}, "
                      "teacher-forced argmax of every answer token (= greedy decoding)"), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
