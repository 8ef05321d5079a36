"""Reusable widgets of the app: the frame in half-block pixels, the chunk timeline, a point plot,
the metrics strip. Each keeps its own DEFAULT_CSS; the app's layout lives in streamchat.tcss."""

from __future__ import annotations

import math

import numpy as np
from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.strip import Strip
from textual.widget import Widget

from ..metrics import mib


class FrameView(Widget):
    """A video frame drawn with '▀': each cell shows two pixels (top in the foreground colour,
    bottom in the background), scaled to fit the widget and keeping the aspect ratio."""

    DEFAULT_CSS = """
    FrameView { height: 12; width: 1fr; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self._frame: np.ndarray | None = None  # uint8 [H, W, 3]
        self._lines: list[Strip] = []
        self._for_size: tuple[int, int] | None = None

    def show(self, frame: np.ndarray) -> None:
        self._frame = frame
        self._for_size = None
        self.refresh()

    def clear(self) -> None:
        self._frame = None
        self._for_size = None
        self.refresh()

    def _build(self, width: int, height: int) -> list[Strip]:
        frame = self._frame
        if frame is None or width < 1 or height < 1:
            return []
        src_h, src_w = frame.shape[:2]
        scale = min(width / src_w, 2 * height / src_h)
        cols, rows = max(1, int(src_w * scale)), max(2, int(src_h * scale) // 2 * 2)
        ys = np.minimum((np.arange(rows) + 0.5) / rows * src_h, src_h - 1).astype(int)
        xs = np.minimum((np.arange(cols) + 0.5) / cols * src_w, src_w - 1).astype(int)
        small = frame[ys][:, xs]  # [rows, cols, 3], nearest neighbour
        pad = (width - cols) // 2
        lines = []
        for r in range(0, rows, 2):
            top, bottom = small[r], small[r + 1]
            segs = [Segment(" " * pad)] if pad else []
            for (tr, tg, tb), (br, bg, bb) in zip(top.tolist(), bottom.tolist()):
                segs.append(Segment("▀", Style(color=Color.from_rgb(tr, tg, tb), bgcolor=Color.from_rgb(br, bg, bb))))
            lines.append(Strip(segs, pad + cols))
        return lines

    def render_line(self, y: int) -> Strip:
        size = (self.size.width, self.size.height)
        if self._for_size != size:
            self._lines, self._for_size = self._build(*size), size
        top = (size[1] - len(self._lines)) // 2
        if 0 <= y - top < len(self._lines):
            return self._lines[y - top].extend_cell_length(size[0])
        return Strip.blank(size[0])


SPARK = "▁▂▃▄▅▆▇█"


class ChunkTimeline(Widget):
    """One cell per chunk coloured by state (waiting, encoding, in cache, recalled by the selected answer
    under bounded memory), a row of marks where
    questions were asked, and a sparkline of per-chunk encode time, all aligned by chunk.
    Long videos put several chunks in a cell (the cell shows the least advanced state)."""

    DEFAULT_CSS = """
    ChunkTimeline { height: auto; width: 1fr; }
    """

    MAX_ROWS = 3  # rows of cells before chunks are grouped

    total = reactive(0)

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.encode_ms: dict[int, float] = {}
        self.encoding: int | None = None
        self.marks: set[int] = set()  # chunk indices after which a question was asked
        self.cached = 0  # chunks in the cache
        self.recalled: set[int] = set()  # chunks the selected answer brought back from the archive

    def reset(self, total: int, cached: int = 0) -> None:
        self.total, self.cached = total, cached
        self.encode_ms.clear()
        self.marks.clear()
        self.encoding = None
        self.refresh(layout=True)

    def started(self, index: int) -> None:
        self.encoding = index
        self.refresh()

    def encoded(self, index: int, encode_ms: float) -> None:
        self.encode_ms[index] = encode_ms
        self.cached = max(self.cached, index + 1)
        if self.encoding == index:
            self.encoding = None
        self.refresh()

    def show_recalled(self, chunks: set[int]) -> None:
        self.recalled = set(chunks)
        self.refresh()

    def mark(self) -> None:
        """A question asked now: after the last chunk in the cache."""
        self.marks.add(max(self.cached - 1, 0))
        self.refresh()

    def _layout(self, width: int) -> tuple[int, int]:
        """(chunks per cell, cells per row)."""
        width = max(width, 1)
        per_cell = max(1, math.ceil(self.total / (width * self.MAX_ROWS)))
        return per_cell, width

    def get_content_height(self, container, viewport, width: int) -> int:
        per_cell, cols = self._layout(width)
        cells = math.ceil(self.total / per_cell) if self.total else 1
        return 3 * math.ceil(cells / cols)

    def render(self) -> Text:
        width = self.content_size.width or 40
        per_cell, cols = self._layout(width)
        cells = math.ceil(self.total / per_cell) if self.total else 0
        top = max(self.encode_ms.values(), default=0.0)
        styles = {"cache": "green", "encoding": "bold yellow", "waiting": "grey35", "recalled": "bold magenta"}
        out = Text(no_wrap=True, overflow="crop")
        for row_start in range(0, max(cells, 1), cols):
            cell_row, mark_row, spark_row = Text(), Text(), Text()
            for cell in range(row_start, min(row_start + cols, cells)):
                chunks = range(cell * per_cell, min((cell + 1) * per_cell, self.total))
                if self.encoding in chunks:
                    state = "encoding"
                elif chunks.stop <= self.cached:
                    state = "cache"
                else:
                    state = "waiting"
                if state == "cache" and any(c in self.recalled for c in chunks):
                    state = "recalled"  # in the archive, brought back for the selected answer
                cell_row.append("█" if state != "waiting" else "░", styles[state])
                mark_row.append("▲" if any(c in self.marks for c in chunks) else " ", "bold magenta")
                ms = [self.encode_ms[c] for c in chunks if c in self.encode_ms]
                if ms and top > 0:
                    level = min(len(SPARK) - 1, int(max(ms) / top * (len(SPARK) - 1) + 0.5))
                    spark_row.append(SPARK[level], "cyan")
                else:
                    spark_row.append(" ")
            if row_start:
                out.append("\n")
            out.append_text(cell_row)
            out.append("\n")
            out.append_text(mark_row)
            out.append("\n")
            out.append_text(spark_row)
        return out


class PointPlot(Widget):
    """A small text scatter plot of (x, y) points with its title and axis ranges."""

    DEFAULT_CSS = """
    PointPlot { height: 7; width: 1fr; }
    """

    def __init__(self, title: str, x_unit: str, y_unit: str, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.title = title
        self.x_unit, self.y_unit = x_unit, y_unit
        self.points: list[tuple[float, float]] = []

    def add(self, x: float, y: float) -> None:
        self.points.append((x, y))
        self.refresh()

    def clear(self) -> None:
        self.points.clear()
        self.refresh()

    def render(self) -> Text:
        width, height = max(self.content_size.width, 10), max(self.content_size.height, 3)
        rows = height - 2  # title line and x-axis line
        out = Text(self.title, style="bold", no_wrap=True, overflow="crop")
        if not self.points:
            out.append("\n" + "\n".join(" " for _ in range(rows)) + "\n(no data yet)", style="dim")
            return out
        xs, ys = [p[0] for p in self.points], [p[1] for p in self.points]
        x_lo, x_hi = min(xs), max(xs)
        y_hi = max(ys) or 1.0
        label = f"{y_hi:.3g}"
        gutter = len(label) + 1
        cols = max(width - gutter, 2)
        grid = [[" "] * cols for _ in range(rows)]
        for x, y in self.points:
            c = 0 if x_hi == x_lo else round((x - x_lo) / (x_hi - x_lo) * (cols - 1))
            r = rows - 1 - round(y / y_hi * (rows - 1))
            grid[max(0, min(rows - 1, r))][c] = "•"
        for i, row in enumerate(grid):
            out.append("\n")
            out.append((label if i == 0 else ("0" if i == rows - 1 else "")).rjust(gutter - 1) + "│", style="dim")
            out.append("".join(row), style="cyan")
        axis = f"{x_lo:.0f}".ljust(cols // 2) + f"{x_hi:.0f} {self.x_unit}".rjust(cols - cols // 2)
        out.append("\n" + " " * gutter + axis[:cols], style="dim")
        return out


def fmt_bytes(n: int | float | None) -> str:
    if not n:
        return "0 B" if n == 0 else "–"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    if n < 2**30:
        return f"{mib(n):.1f} MiB"
    return f"{n / 2**30:.2f} GiB"


class MetricsStrip(Widget):
    """Cache tokens and size, GPU memory allocated / reserved (on a GPU), encode fps: one line, or one
    part a line where the strip is too narrow (a part is never split)."""

    DEFAULT_CSS = """
    MetricsStrip { height: auto; width: 1fr; color: $text-muted; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.values = {"cache_tokens": 0, "cache_bytes": 0, "allocated": None, "reserved": None, "fps": None}

    def set(self, **values) -> None:
        self.values.update(values)
        self.refresh(layout=True)

    def parts(self) -> list[str]:
        v = self.values
        parts = [f"cache {v['cache_tokens']} tok · {fmt_bytes(v['cache_bytes'])}"]
        if v["allocated"] is not None:  # on the CPU there is no device memory to show
            parts.append(f"GPU {fmt_bytes(v['allocated'])} alloc / {fmt_bytes(v['reserved'])} reserved")
        parts.append("encode –" if v["fps"] is None else f"encode {v['fps']:.1f} fps")
        return parts

    def lines(self, width: int) -> list[str]:
        out: list[str] = []
        for part in self.parts():
            if out and len(out[-1]) + 3 + len(part) <= width:
                out[-1] += " │ " + part
            else:
                out.append(part)
        return out

    def get_content_height(self, container, viewport, width: int) -> int:
        return len(self.lines(width))

    def render(self) -> Text:
        return Text("\n".join(self.lines(self.content_size.width or 80)), no_wrap=True, overflow="ellipsis")
