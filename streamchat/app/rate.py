"""The encoding rate and time left, as the video panel shows them (a pure function: unit-tested)."""

from __future__ import annotations


def duration(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"


def times(x: float) -> str:
    return f"{x:.1f}×" if x < 10 else f"{x:.0f}×"


def rate_text(*, done: int, total: int, frames_run: int, wall_s: float, sampled_fps: float, realtime: bool,
              video_left_s: float, archived_pages: int = 0) -> str:
    """Two lines: frames in the cache and the encoder's speed; how it compares with real time and the time left.

    `frames_run` frames took `wall_s` seconds of decoding and encoding (this run only: waits, pauses and
    answers excluded), so frames_run / wall_s is what the encoder can do. In realtime mode chunks are
    released at the video's own pace, so the time left is at least the video still to come
    (`video_left_s`), however fast the encoder is.
    """
    head = f"{done}/{total} frames"
    if done >= total:
        # bounded memory: older pages left the cache for the archive, from which questions recall them
        return f"{head} · all encoded, {archived_pages} pages archived" if archived_pages else f"{head} · all in the cache"
    if frames_run <= 0 or wall_s <= 0:
        return f"{head} · realtime" if realtime else head
    fps = frames_run / wall_s
    speed = fps / sampled_fps if sampled_fps > 0 else 0.0
    left = (total - done) / fps
    # the time left first: a narrow panel cuts the line's end
    if realtime:
        return f"{head} · realtime\n{duration(max(left, video_left_s))} left · encoder {times(speed)} real time"
    return f"{head} · {fps:.1f} fps\n{duration(left)} left · {times(speed)} real time"
