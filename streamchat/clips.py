"""Synthetic clips for tests and demos: small H.264 files whose every frame differs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

# ultrafast keeps a 3 s clip well under 0.5 s; crf 18 keeps shapes crisp. Training round-trips frames the same way.
X264_OPTIONS = {"crf": "18", "preset": "ultrafast"}


def _frame(i: int, n: int, width: int, height: int, seed: int) -> np.ndarray:
    """Frame i of n: a moving red square, an orbiting green disc, a blue bar in the
    second half, and a top stripe of black/white cells spelling the frame number."""
    img = np.full((height, width, 3), 32, dtype=np.uint8)  # [H, W, 3]
    t = i / max(n - 1, 1)

    # Red square sliding left to right.
    side = max(height // 5, 4)
    x0 = int((width - side) * t + seed) % max(width - side, 1)
    y0 = height // 2 - side // 2
    img[y0 : y0 + side, x0 : x0 + side] = (220, 30, 30)

    # Green disc on a circle around the centre.
    yy, xx = np.ogrid[:height, :width]
    angle = 2 * np.pi * t + seed  # seed shifts the motion: different clips, same layout
    cy = height / 2 + height / 4 * np.sin(angle)
    cx = width / 2 + width / 4 * np.cos(angle)
    r = max(min(height, width) // 10, 2)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (30, 200, 60)

    # Blue bar, only in the second half, so a question about "when" has an answer.
    if i >= n // 2:
        img[height - height // 8 :, :] = (40, 60, 230)

    # Frame number in binary across the top stripe, one black/white cell per bit, so a
    # test can read back which source frame it got (see frame_number).
    stripe = _stripe(height)
    img[:stripe, :] = 16
    for bit in range(_BITS):
        if i >> bit & 1:
            img[:stripe, _cell(bit, width) : _cell(bit + 1, width)] = 235
    return img


_BITS = 12  # frame numbers up to 4095


def _stripe(height: int) -> int:
    return max(height // 16, 2)


def _cell(bit: int, width: int) -> int:
    """Left edge of a bit's cell: a fixed fraction of the width, so it survives resizing."""
    return round(bit * width / _BITS)


def frame_number(frame: np.ndarray) -> int:
    """The source frame number make_clip drew into frame (uint8 [H, W, 3]), after any resize."""
    height, width = frame.shape[:2]
    rows = max(_stripe(height) - 1, 1)  # skip the row that blends into the scene below
    luma = frame[:rows].mean(axis=(0, 2))  # [W]
    number = 0
    for bit in range(_BITS):
        left, right = _cell(bit, width), _cell(bit + 1, width)
        margin = (right - left) // 4
        number |= int(luma[left + margin : max(right - margin, left + margin + 1)].mean() > 125) << bit
    return number


def make_clip(
    path: str | Path,
    seconds: float = 3.0,
    fps: float = 24.0,
    width: int = 224,
    height: int = 224,
    seed: int = 0,
    faststart: bool = False,
    times: Sequence[float] | None = None,
    draw: Callable[[int, int], np.ndarray] | None = None,
) -> Path:
    """Write a deterministic libx264/yuv420p mp4 with moving content; return its path.

    faststart puts the index (moov) first, so a truncated copy still opens and its
    container over-reports the frame count: the case VideoSource must survive.
    times gives each frame its own timestamp in seconds (a variable frame rate; they must
    lie on the 1/fps grid, and `seconds` is then ignored); the last frame lasts as long
    as the one before it. draw(i, n) gives frame i of n instead of the default picture (a scene).
    """
    import av  # lazy: only tests and demos need PyAV

    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p; got {width}x{height}")
    if seconds <= 0 or fps <= 0:
        raise ValueError(f"seconds and fps must be positive; got {seconds}, {fps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(round(seconds * fps), 1) if times is None else len(times)
    rate = Fraction(fps).limit_denominator(1001)
    # pts in ticks of 1/fps; with `times`, each frame's own tick
    ticks = list(range(n)) if times is None else [round(t * rate) for t in times]
    if times is not None and any(abs(t * rate - k) > 1e-6 for t, k in zip(times, ticks)):
        raise ValueError(f"times must lie on the 1/{fps:g} s grid")
    if times is not None and (n < 1 or any(b <= a for a, b in zip(ticks, ticks[1:]))):
        raise ValueError("times must be increasing")
    lasts = [b - a for a, b in zip(ticks, ticks[1:])]
    durations = dict(zip(ticks, lasts + [lasts[-1] if lasts else 1]))  # pts -> ticks the frame lasts

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = 1 / rate
        stream.options = dict(X264_OPTIONS)

        def mux(packets) -> None:
            for packet in packets:
                if times is not None and packet.pts is not None:
                    packet.duration = durations[packet.pts]
                container.mux(packet)

        for i in range(n):
            picture = _frame(i, n, width, height, seed) if draw is None else draw(i, n)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = ticks[i], 1 / rate
            mux(stream.encode(frame))
        mux(stream.encode())
    return path
