"""`tiny-shapes`: the built-in toy model's architecture, tokenizer and data recipe.

The model is Qwen2.5-VL's architecture at toy size (vision tower with windows and merger, M-RoPE text
model), trained from scratch by `python -m streamchat.train` on clips from `streamchat.scenes` and
the questions of `streamchat.questions`, in the prompt layout and positions streamchat streams with.
A checkpoint it writes is an ordinary checkpoint directory (`--model DIR`). This module is what
training and evaluation share: what a clip is, which questions it gets, which seeds are held out.
"""

from __future__ import annotations

import dataclasses
import random
from fractions import Fraction
from pathlib import Path

from . import tiny
from .config import SessionConfig
from .scenes import BACKGROUNDS, COLOURS, KINDS, WORDS, Scene, generate

# What the model was trained on: these and nothing else (the model card says so).
FPS = 2.0  # streamchat's default sampling
SIZE = 224  # frames are 224x224: an 8x8 merged grid, 64 tokens per temporal patch (one second)
SECONDS = (2, 24)  # clip lengths, whole seconds (the curriculum starts at the shortest)
SYSTEM_PROMPT = SessionConfig.system_prompt  # the default session's: the head every prompt starts with
QUESTION_KINDS = ("colour", "shape", "word", "flashes", "order", "count")

# The tokenizer: a byte-level BPE (any text tokenizes) whose merges cover the question templates and answers.
VOCAB_SIZE = 512
CORPUS = [
    "You are a helpful assistant.",
    *(f"What colour is the {k} at 00:{s:02d}?" for k in KINDS for s in range(0, 60, 7)),
    *(f"Which shape is {c} at 00:{s:02d}?" for c in COLOURS for s in range(0, 60, 13)),
    "What word was shown?",
    *(f"How many times did the {k} flash?" for k in KINDS),
    *(f"What appeared first, the {a} or the {b}?" for a in KINDS for b in KINDS if a != b),
    *(f"How many shapes are on screen at 01:{s:02d}?" for s in range(0, 60, 11)),
    " ".join(COLOURS), " ".join(KINDS), " ".join(WORDS), " ".join(BACKGROUNDS),
    *COLOURS, *KINDS, *WORDS,
    "0 1 2 3 4 5 6 7 8 9 00:00 00:12 01:30",
    "What is happening in the video? Describe the scene.",
]


# tiny-random's sizes made larger; the rest (patches, windows, merger, rope_theta, ...) is the real model's, as there
TEXT = dict(tiny.TEXT, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=4,
            # head_dim 32: 16 rotary pairs split t/h/w in the real model's 16:24:24 proportion
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
VISION = dict(tiny.VISION, depth=4, hidden_size=128, intermediate_size=512, num_heads=4, out_hidden_size=256,
              fullatt_block_indexes=[1, 3])  # windowed blocks between full-attention ones, as in the real tower


def size_problem(size: int) -> str | None:
    """Why frames of size x size pixels cannot be used, or None."""
    if size < 56 or size % 28:
        return f"give a multiple of 28 of at least 56 (frames are cut into 28-pixel merged patches); got {size}"
    return None


def new_model_and_processor(seed: int, tokenizer_dir: Path):
    """A freshly initialised tiny-shapes model (float32, CPU) and its processor; the tokenizer is
    written to `tokenizer_dir`."""
    import torch

    from . import hf
    tokenizer = tiny.build_tokenizer(tokenizer_dir, corpus=CORPUS, vocab_size=VOCAB_SIZE)
    config = tiny.toy_config(tokenizer, TEXT, VISION)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = hf.new_model(config)
    return model, hf.default_processor(tokenizer, tiny.CHAT_TEMPLATE)


# --- the data recipe --------------------------------------------------------------------------------


HELD_OUT = 10_000_000  # held-out clips use scene seeds from here on; training draws seeds below it


def scene_seed(seed: int, n: int, held_out: bool) -> int:
    """The scene seed of a run's n-th clip: below HELD_OUT for training, from HELD_OUT on for held-out sets."""
    return HELD_OUT + n * 1009 + seed if held_out else (n * 1009 + seed) % HELD_OUT


def training_scene(seed: int, seconds: int | None = None, size: int = SIZE, plain: bool = False,
                   late_clocks: float = 0.0) -> Scene:
    """The clip of training example `seed` (held-out sets use seeds training never draws), size x size
    pixels. `plain`: the first stage's clips, where what to look for is on screen the whole time: every
    shape from the start, still and in one colour, no flashes, the word shown from start to end.
    `late_clocks`: the share of clips whose clock starts at a random minute (1 to 58) instead of 00:00,
    so the clock a long stream shows late (05:12) is no stranger than the caption."""
    rng = random.Random(seed * 7919 + 17)
    if seconds is None:
        seconds = rng.randint(*SECONDS)
    flashes, changes = rng.randint(0, 5), rng.randint(0, 2)
    scene = generate(seed, seconds=float(seconds), width=size, height=size, shapes=rng.choice((2, 3, 3)),
                     flashes=0 if plain else flashes, words=1, colour_changes=0 if plain else changes)
    if late_clocks > 0 and rng.random() < late_clocks:  # drawn last: clips without late clocks stay as they were
        scene = dataclasses.replace(scene, clock_start=rng.randrange(1, 59) * 60 + rng.randrange(60))
    if not plain:
        return scene
    shapes = [dataclasses.replace(s, appear_s=0.0, vx=0.0, vy=0.0, colours=[(0.0, s.colours[0][1])]) for s in scene.shapes]
    words = [dataclasses.replace(w, start_s=0.0, end_s=float(seconds)) for w in scene.words]
    return dataclasses.replace(scene, shapes=shapes, words=words)


def pick_questions(scene: Scene, rng: random.Random, n: int, kinds: tuple[str, ...] = QUESTION_KINDS) -> list:
    """n questions about the scene, each of a kind drawn uniformly from `kinds` (then a question of that kind)."""
    from .questions import questions

    by_kind: dict[str, list] = {}
    for qa in questions(scene, seed=rng.randrange(1 << 30)):
        if qa.kind in kinds:
            by_kind.setdefault(qa.kind, []).append(qa)
    kinds = list(by_kind)
    if not kinds:
        return []
    return [rng.choice(by_kind[k]) for k in (rng.choice(kinds) for _ in range(n))]


def interval() -> Fraction:
    from .positions import temporal_interval

    return temporal_interval(FPS, VISION["tokens_per_second"], VISION["temporal_patch_size"])


def frame_times(seconds: float) -> list[float]:
    """The sampled frames' times: t = i / FPS, an even count (whole seconds at 2 fps)."""
    from .scenes import frame_count

    n = frame_count(seconds, FPS)
    return [i / FPS for i in range(n - n % 2)]
