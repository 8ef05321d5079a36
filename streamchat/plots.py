"""PNG charts beside Markdown reports: encode time against cache length, TTFT against cache size."""

from __future__ import annotations

from pathlib import Path


def _line_plot(points: list[tuple[float, float]], path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display; never pick an interactive backend
    import matplotlib.pyplot as plt

    xs, ys = zip(*sorted(points)) if points else ((), ())
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def encode_plot(points: list[tuple[int, float]], path: Path) -> Path:
    """points: (cache tokens after the chunk, encode ms of the chunk)."""
    return _line_plot(points, path, "cache length (tokens)", "encode time per chunk (ms)", "Chunk encode time vs cache length")


def ttft_plot(points: list[tuple[int, float]], path: Path) -> Path:
    """points: (cache tokens when asked, TTFT ms)."""
    return _line_plot(points, path, "cache size (tokens)", "time to first token (ms)", "TTFT vs cache size")
