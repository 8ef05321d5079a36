"""Seeded procedural scenes with their ground truth: moving coloured shapes, flashes, words.

A Scene is the ground truth itself (JSON-able dataclasses); every frame is rendered from it, so what
the ground truth says is where, when, is what the pixels show. Each shape keeps its own lane (a
horizontal band), so shapes never cover one another; words appear in a caption strip at the bottom,
below the lanes. A clock strip at the top shows the whole seconds as the questions name them
("00:12"): a model as small as `tiny-shapes` reads the moment a question names from the frame. The
clock starts at `clock_start` (0 unless training asks for a late one), and questions name a moment by
the clock's reading, so a long stream's minutes can be shown to a model trained on short clips.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {  # names a question can use; far apart in RGB
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "orange": (245, 140, 20),
    "cyan": (30, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (12, 12, 12), "grey": (70, 70, 70), "navy": (16, 20, 70)}
FLASH = (255, 255, 255)  # a flashing shape is drawn white for the flash's span
KINDS = ("circle", "square", "star")
WORDS = ("apple", "river", "cloud", "tiger", "piano", "lemon", "stone", "robot", "candle", "mango", "zebra", "violin")
FLASH_S = 0.5
WORD_S = 1.0
CAPTION = 0.2  # fraction of the height kept for the caption strip
CLOCK = 0.15  # fraction of the height kept for the clock strip, when the scene has one


@dataclass
class Shape:
    kind: str  # circle | square | star
    colours: list[tuple[float, str]]  # (from second, colour name), sorted; the first starts at appear_s
    appear_s: float  # not drawn before this second; drawn from then to the end
    lane: int  # which horizontal band, top to bottom
    x0: float  # centre at t=0 of its motion, as a fraction of the width
    vx: float  # widths per second; bounces off the frame's sides
    y0: float  # centre at t=0 as a fraction of the lane's free height
    vy: float  # lane heights per second; bounces inside the lane

    def colour_at(self, t: float) -> str | None:
        if t < self.appear_s:
            return None
        name = self.colours[0][1]
        for start, colour in self.colours:
            if t >= start:
                name = colour
        return name


@dataclass
class Flash:
    kind: str  # the shape that flashes
    start_s: float
    end_s: float


@dataclass
class Word:
    text: str  # a word or a digit
    start_s: float
    end_s: float


@dataclass
class Scene:
    seed: int
    seconds: float
    width: int
    height: int
    background: str
    shapes: list[Shape]
    flashes: list[Flash] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    clock: bool = False  # a strip at the top shows mm:ss (whole seconds)
    clock_start: int = 0  # the clock's reading at t = 0, in whole seconds

    def clock_at(self, t: float) -> str:
        """What the clock shows at second t ("05:12"), and how questions name that moment."""
        return clock(self.clock_start + int(t))

    # --- ground truth, derived --------------------------------------------------------------

    def shape(self, kind: str) -> Shape:
        return next(s for s in self.shapes if s.kind == kind)

    def _lane(self, lane: int) -> tuple[float, float]:
        """Top and bottom pixel rows of a lane: lanes share the rows between the clock and the caption."""
        top = self.height * CLOCK if self.clock else 0.0
        usable = self.height * (1 - CAPTION) - top
        return top + lane * usable / len(self.shapes), top + (lane + 1) * usable / len(self.shapes)

    def radius(self) -> float:
        """Half the side of every shape's box: fits its lane with room to move."""
        top, bottom = self._lane(0)
        return max(min((bottom - top) * 0.35, self.width * 0.12), 2.0)

    def centre(self, kind: str, t: float) -> tuple[float, float]:
        """(x, y) in pixels of a shape's centre at second t (whether or not it has appeared)."""
        s = self.shape(kind)
        r = self.radius()
        x = r + _bounce(s.x0 + s.vx * t) * (self.width - 2 * r)
        top, bottom = self._lane(s.lane)
        y = top + r + _bounce(s.y0 + s.vy * t) * max(bottom - top - 2 * r, 0.0)
        return x, y

    def flashing(self, kind: str, t: float) -> bool:
        return any(f.kind == kind and f.start_s <= t < f.end_s for f in self.flashes)

    def word_at(self, t: float) -> str | None:
        return next((w.text for w in self.words if w.start_s <= t < w.end_s), None)

    def visible(self, t: float) -> list[str]:
        return [s.kind for s in self.shapes if t >= s.appear_s]

    def at(self, t: float) -> dict:
        """What is where at second t: each visible shape's colour, centre and flash, and the word shown."""
        return {
            "t": t,
            "shapes": {k: {"colour": self.shape(k).colour_at(t), "centre": [round(v, 1) for v in self.centre(k, t)],
                           "flashing": self.flashing(k, t)} for k in self.visible(t)},
            "word": self.word_at(t),
        }

    def to_json(self) -> dict:
        doc = dataclasses.asdict(self)
        for shape in doc["shapes"]:
            shape["colours"] = [list(c) for c in shape["colours"]]
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "Scene":
        doc = dict(doc)
        doc["shapes"] = [Shape(**{**s, "colours": [tuple(c) for c in s["colours"]]}) for s in doc["shapes"]]
        doc["flashes"] = [Flash(**f) for f in doc.get("flashes", [])]
        doc["words"] = [Word(**w) for w in doc.get("words", [])]
        return cls(**doc)

    def with_word(self, text: str, start_s: float, seconds: float = WORD_S) -> "Scene":
        """A copy with one more word event (the needle of a needle-in-a-video test)."""
        words = sorted([*self.words, Word(text, start_s, start_s + seconds)], key=lambda w: w.start_s)
        return dataclasses.replace(self, words=words)

    # --- pixels --------------------------------------------------------------------------------

    def frame(self, t: float) -> np.ndarray:
        """The frame at second t: uint8 [H, W, 3]."""
        img = np.empty((self.height, self.width, 3), dtype=np.uint8)
        img[:] = BACKGROUNDS[self.background]
        r = self.radius()
        for s in self.shapes:
            colour = s.colour_at(t)
            if colour is None:
                continue
            cx, cy = self.centre(s.kind, t)
            # every shape lies within r of its centre: test only the pixels of that box
            x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, self.width)
            y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, self.height)
            yy, xx = np.ogrid[y0:y1, x0:x1]
            box = img[y0:y1, x0:x1]
            box[_mask(s.kind, xx - cx, yy - cy, r)] = FLASH if self.flashing(s.kind, t) else COLOURS[colour]
        word = self.word_at(t)
        if word is not None:
            _draw_text(img, word, int(self.height * (1 - CAPTION)), self.height)
        if self.clock:
            _draw_text(img, self.clock_at(t), 0, int(self.height * CLOCK))
        return img

    def frames(self, fps: float) -> Iterator[np.ndarray]:
        """Every frame at fps, t = i / fps, for the whole scene."""
        for i in range(frame_count(self.seconds, fps)):
            yield self.frame(i / fps)

    def write(self, path: str | Path, fps: float = 24.0) -> Path:
        """A real H.264 file of the scene (PyAV, the same writer as make_clip), readable by decord."""
        from .clips import make_clip

        return make_clip(path, seconds=self.seconds, fps=fps, width=self.width, height=self.height,
                         draw=lambda i, n: self.frame(i / fps))


def clock(seconds: float) -> str:
    """00:12 for 12.7 s: how the clock strip and the questions name a moment (whole seconds)."""
    whole = int(seconds)
    return f"{whole // 60:02d}:{whole % 60:02d}"


def frame_count(seconds: float, fps: float) -> int:
    return max(round(seconds * fps), 1)


def _bounce(u: float) -> float:
    """A triangle wave in [0, 1]: position along a segment for a point that bounces off both ends."""
    u = u % 2.0
    return u if u <= 1.0 else 2.0 - u


def _mask(kind: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels of a shape whose centre is at dx = dy = 0 and whose box is 2r wide."""
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if kind == "star":
        # a five-pointed star: inside when the radius at this angle is below the star's outline there
        angle = np.arctan2(dx, -dy)  # 0 points up
        sector = np.abs((angle % (2 * np.pi / 5)) - np.pi / 5) / (np.pi / 5)  # 0 at a point, 1 between
        outline = r * (1.0 - 0.55 * sector)
        return dx * dx + dy * dy <= outline * outline
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {', '.join(KINDS)}")


def _draw_text(img: np.ndarray, text: str, top: int, bottom: int) -> None:
    """White text centred in the strip of rows top..bottom, in PIL's default font, sized to the strip."""
    from PIL import Image, ImageDraw

    height, width = bottom - top, img.shape[1]
    strip = Image.fromarray(img[top:bottom])
    draw = ImageDraw.Draw(strip)
    draw.text((width / 2, height / 2), text, fill=(255, 255, 255), font=_fitted_font(text, width, height), anchor="mm")
    img[top:bottom] = np.asarray(strip)


@functools.lru_cache(maxsize=512)
def _fitted_font(text: str, width: int, height: int):
    """PIL's default font at 80% of the strip's height, shrunk until the text takes at most 90% of its width."""
    from PIL import Image, ImageDraw, ImageFont

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = max(int(height * 0.8), 6)
    font = ImageFont.load_default(size=size)
    while size > 6 and draw.textlength(text, font=font) > width * 0.9:
        size -= 1
        font = ImageFont.load_default(size=size)
    return font


def generate(seed: int, seconds: float = 20.0, width: int = 224, height: int = 224, *, shapes: int = 3,
             flashes: int = 3, words: int = 1, colour_changes: int = 2, clock: bool = True) -> Scene:
    """A scene drawn from `seed`: `shapes` of the three kinds appearing at distinct times in the first
    third, each changing colour up to `colour_changes` times, `flashes` flashes over random shapes,
    and `words` words (a word or a digit) shown for WORD_S seconds each, never overlapping; with `clock`, the
    clock strip on top."""
    if not 1 <= shapes <= len(KINDS):
        raise ValueError(f"shapes must be 1..{len(KINDS)}; got {shapes}")
    if seconds <= 0 or width < 16 or height < 16:
        raise ValueError(f"a scene needs seconds > 0 and at least 16x16 pixels; got {seconds} s, {width}x{height}")
    rng = random.Random(seed)
    kinds = rng.sample(KINDS, shapes)
    lanes = rng.sample(range(shapes), shapes)
    # distinct appearance times, at least 1 s apart, so "what appeared first" has one answer
    first = seconds / 3
    appear = sorted(round(rng.uniform(0, first), 2) for _ in kinds)
    appear = [round(a + i * min(1.0, seconds / (2 * shapes)), 2) for i, a in enumerate(appear)]
    order = rng.sample(kinds, shapes)
    out = []
    for kind, lane in zip(kinds, lanes):
        start = appear[order.index(kind)]
        names = rng.sample(list(COLOURS), colour_changes + 1)
        changes = sorted(round(rng.uniform(start, seconds), 2) for _ in range(colour_changes))
        out.append(Shape(kind=kind, colours=list(zip([start, *changes], names)), appear_s=start, lane=lane,
                         x0=rng.random(), vx=rng.uniform(0.05, 0.25) * rng.choice((-1, 1)),
                         y0=rng.random(), vy=rng.uniform(0.1, 0.4) * rng.choice((-1, 1))))
    scene = Scene(seed=seed, seconds=seconds, width=width, height=height, background=rng.choice(list(BACKGROUNDS)),
                  shapes=out, clock=clock)
    for _ in range(flashes):
        s = rng.choice(out)
        lo = s.appear_s
        if seconds - lo <= FLASH_S:
            continue
        start = round(rng.uniform(lo, seconds - FLASH_S), 2)
        if any(f.kind == s.kind and f.start_s < start + FLASH_S + 0.5 and start < f.end_s + 0.5 for f in scene.flashes):
            continue  # two flashes of one shape must be told apart: at least 0.5 s between them
        scene.flashes.append(Flash(s.kind, start, start + FLASH_S))
    scene.flashes.sort(key=lambda f: f.start_s)
    for _ in range(words):
        if seconds <= WORD_S:
            break
        start = round(rng.uniform(0, seconds - WORD_S), 2)
        if any(w.start_s < start + WORD_S and start < w.end_s for w in scene.words):
            continue
        text = rng.choice(WORDS) if rng.random() < 0.7 else str(rng.randrange(10))
        scene = scene.with_word(text, start)
    return scene
