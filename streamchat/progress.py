"""A progress bar on stderr for work that takes more than a second; silent with --json or off a TTY."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, enabled: bool | None = None, unit: str = "frames"):
        self.total = max(total, 1)
        self.label = label
        self.unit = unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.done = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        t = time.perf_counter()
        if t - self._last < 0.1 and done < self.total:
            return
        self._last = t
        elapsed = t - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * done / self.total)
        bar = "█" * filled + "░" * (width - filled)
        sys.stderr.write(
            f"\r{self.label} {bar} {done}/{self.total} {self.unit}  {rate:.1f} {self.unit}/s  ~{left:.0f}s left "
        )
        sys.stderr.flush()

    def phase(self, text: str) -> None:
        """A step that has no count (compare's offline prefill): the bar gives way to a line saying what runs."""
        if not self.enabled:
            return
        line = f"{text} … ({time.perf_counter() - self.t0:.0f} s in)"
        sys.stderr.write("\r" + line.ljust(99)[:99] + " ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()
