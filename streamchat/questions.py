"""Template questions with short exact answers over a scene's ground truth, and the exact-match scorer.

Every question is answerable from the frames alone, without ambiguity at the sampling rates streamchat
uses: a question about a moment names a whole second at which nothing changes within half a second
either side (no colour change, no flash, no shape appearing).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

from .scenes import Scene

MARGIN_S = 0.5  # nothing the question is about changes this close to the moment it names


@dataclass
class QA:
    kind: str  # colour | shape | word | flashes | order | count
    question: str
    answer: str
    at_s: float | None = None  # the moment the question names, if any

    def to_json(self) -> dict:
        return asdict(self)


def questions(scene: Scene, seed: int = 0) -> list[QA]:
    """The template questions this scene answers exactly, in a fixed order (kind, then shape), with
    moments and pair orders drawn from `seed`."""
    rng = random.Random(seed)
    out: list[QA] = []
    named = []  # (shape, moment) of each colour question: the shape questions ask the other way round
    for shape in scene.shapes:
        moments = [t for t in range(int(scene.seconds) + 1) if _steady(scene, shape.kind, t)]
        if moments:
            t = rng.choice(moments)
            named.append((shape, t))
            out.append(QA("colour", f"What colour is the {shape.kind} at {scene.clock_at(t)}?", shape.colour_at(t), float(t)))
    for shape, t in named:
        colour = shape.colour_at(t)
        if not any(colour in (o.colour_at(t - MARGIN_S), o.colour_at(t), o.colour_at(t + MARGIN_S))
                   for o in scene.shapes if o is not shape):  # no other shape has that colour then
            out.append(QA("shape", f"Which shape is {colour} at {scene.clock_at(t)}?", shape.kind, float(t)))
    if len(scene.words) == 1:
        out.append(QA("word", "What word was shown?", scene.words[0].text))
    for shape in scene.shapes:
        count = sum(f.kind == shape.kind for f in scene.flashes)
        out.append(QA("flashes", f"How many times did the {shape.kind} flash?", str(count)))
    kinds = [s.kind for s in scene.shapes]
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            first = min((a, b), key=lambda k: scene.shape(k).appear_s)
            x, y = rng.sample([a, b], 2)
            out.append(QA("order", f"What appeared first, the {x} or the {y}?", first))
    appear = [s.appear_s for s in scene.shapes]
    counts = [t for t in range(int(scene.seconds) + 1) if t <= scene.seconds - MARGIN_S
              and all(abs(t - a) > MARGIN_S for a in appear)]
    if counts:
        t = rng.choice(counts)
        out.append(QA("count", f"How many shapes are on screen at {scene.clock_at(t)}?", str(len(scene.visible(t))), float(t)))
    return out


def _steady(scene: Scene, kind: str, t: float) -> bool:
    """The shape is on screen, unflashing and of one colour for MARGIN_S either side of t."""
    shape = scene.shape(kind)
    lo, hi = t - MARGIN_S, t + MARGIN_S
    if lo < shape.appear_s or hi > scene.seconds:
        return False
    if any(lo <= start <= hi for start, _ in shape.colours):
        return False
    return not any(f.kind == kind and f.start_s <= hi and lo <= f.end_s for f in scene.flashes)


NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
ARTICLES = {"a", "an", "the"}


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, number words as digits: 'The Star.' -> 'star', 'Two' -> '2'."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(NUMBERS.get(w, w) for w in words if w not in ARTICLES)


def exact_match(prediction: str, answer: str) -> bool:
    return normalise(prediction) == normalise(answer)


def accuracy(pairs: list[tuple[QA, str]]) -> dict[str, dict]:
    """Per question kind and overall: {kind: {"n", "correct", "accuracy"}} for (question, prediction) pairs."""
    table: dict[str, dict] = {}
    for qa, prediction in pairs:
        for key in (qa.kind, "all"):
            row = table.setdefault(key, {"n": 0, "correct": 0})
            row["n"] += 1
            row["correct"] += exact_match(prediction, qa.answer)
    for row in table.values():
        row["accuracy"] = row["correct"] / row["n"]
    return table
