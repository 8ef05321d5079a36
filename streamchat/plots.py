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
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Write the figure as PNG atomically (a temporary file renamed into place) and close it."""
    import matplotlib.pyplot as plt

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


def long_stream_plot(minutes: list[dict], path: Path) -> Path:
    """Four panels against stream time (`bench --minutes`): encode rate, GPU memory, archive, TTFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [m["minute"] for m in minutes]
    gib = 2**30

    def series(key, scale=1.0):
        return [None if m.get(key) is None else m[key] / scale for m in minutes]

    fig, axes = plt.subplots(2, 2, figsize=(9.6, 6.0), dpi=100, sharex=True)
    panels = [
        (axes[0][0], [("frames_per_s", 1.0, "encode")], "frames/s"),
        (axes[0][1], [("gpu_peak_bytes", gib, "GPU peak"), ("gpu_kv_bytes", gib, "GPU KV")], "GiB"),
        (axes[1][0], [("host_bytes", gib, "host"), ("disk_bytes", gib, "disk")], "archive GiB"),
        (axes[1][1], [("ttft_ms", 1.0, "TTFT"), ("retrieval_ms", 1.0, "retrieval")], "ms"),
    ]
    for ax, lines, ylabel in panels:
        for key, scale, label in lines:
            ys = series(key, scale)
            if any(y is not None for y in ys):
                ax.plot(t, [float("nan") if y is None else y for y in ys], marker="o", markersize=3, linewidth=1.2, label=label)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("stream time (minutes)")
    fig.suptitle("Long stream under the memory policy")
    return _save(fig, path)


def loss_plot(curves: dict[str, list[tuple[int, float]]], path: Path, title: str = "training loss") -> Path:
    """Training loss against optimizer step, one line per run (the answer tokens' cross entropy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for label, points in curves.items():
        xs, ys = zip(*sorted(points)) if points else ((), ())
        ax.plot(xs, ys, linewidth=1.0, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy (nats / answer token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)
