"""The video source: probe a file with decord, plan which frames to sample, and
decode them (already resized for Qwen2.5-VL) in even-sized chunks."""

from __future__ import annotations

import bisect
import hashlib
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamchat.errors import UserError

# decord gives frame times as float32 seconds (7.6e-6 s apart at 100 s, 6.1e-5 s at 600 s): a frame
# "at" a time may be this far off either way, and no two real frames are this close.
TIME_EPS = 1e-4


def _fix(path: Path) -> str:
    """What to do about a file ffmpeg cannot fully decode."""
    from .containers import lacks_moov

    if lacks_moov(path):
        return "it is an MP4/MOV without its index (no moov atom: recording or download stopped early), which no re-encode can read; export or download it again"
    return f"re-download it, or re-encode what decodes: ffmpeg -i '{path}' -c:v libx264 -pix_fmt yuv420p fixed.mp4"


@dataclass(frozen=True)
class Sampling:
    """Which frames to take from a video and how big to make them."""

    fps: float | None = 2.0  # what Qwen2.5-VL saw in training
    stride: int | None = None  # take every k-th decoded frame instead of fps (then fps must be None)
    start: float = 0.0  # seconds
    duration: float | None = None  # seconds; None = to the end
    max_frames: int | None = None
    min_pixels: int = 4 * 28 * 28  # per-frame pixel budget, lower bound
    max_pixels: int = 768 * 28 * 28  # Qwen2.5-VL's video default

    def sampled_fps(self, native_fps: float) -> float:
        """Frames per second of the sampled stream."""
        return self.fps if self.fps is not None else native_fps / self.stride

    def check(self) -> None:
        """Raise UserError for settings that cannot describe a sampling."""
        if self.fps is not None and self.stride is not None:
            raise UserError(f"give --fps or --stride, not both (got fps={self.fps:g}, stride={self.stride})")
        if self.fps is None and self.stride is None:
            raise UserError("give --fps (e.g. 2) or --stride (e.g. 12) to say which frames to sample")
        if self.fps is not None and not self.fps > 0:
            raise UserError(f"--fps must be positive; got {self.fps:g}")
        if self.stride is not None and self.stride < 1:
            raise UserError(f"--stride must be a positive whole number of frames; got {self.stride}")
        if not self.start >= 0:
            raise UserError(f"--start must be 0 or more seconds; got {self.start:g}")
        if self.duration is not None and not self.duration > 0:
            raise UserError(f"--duration must be positive seconds; got {self.duration:g}")
        if self.max_frames is not None and self.max_frames < 1:
            raise UserError(f"--max-frames must be at least 1; got {self.max_frames}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise UserError(
                f"need 0 < min_pixels <= max_pixels; got min_pixels={self.min_pixels}, max_pixels={self.max_pixels}"
            )


@dataclass(frozen=True)
class VideoInfo:
    """What was probed at open: what really decodes, what the container claims, and the decode size."""

    path: Path
    native_fps: float  # the container's average rate; frame times come from the frames' own timestamps
    frame_count: int  # frames that really decode (probed), not the container's claim
    duration_s: float  # seconds that decode: from the first frame to the end of the last decodable one
    width: int  # source size
    height: int
    resized_width: int  # after smart_resize (multiples of 28)
    resized_height: int
    container_duration_s: float | None = None  # the container's claim (None: it makes none)
    container_frames: int | None = None  # the container's frame count (None: it gives none)

    @property
    def truncated(self) -> bool:
        """Less decodes than the container claims: frames it indexes fail, or its duration runs on
        by more than a frame or two (0.25 s at least: an audio track may outlast the video)."""
        if self.container_frames is not None and self.frame_count < self.container_frames:
            return True
        if self.container_duration_s is None:
            return False
        slack = max(2 * self.duration_s / self.frame_count, 0.25)
        return self.container_duration_s - self.duration_s > slack

    def truncation_warning(self) -> str | None:
        """One line saying how much of a partly decodable file is used, or None if all of it decodes."""
        if not self.truncated:
            return None
        claimed = max(self.container_duration_s or 0.0, self.duration_s)
        frames = f" ({self.frame_count} of {self.container_frames} frames)" if self.container_frames else ""
        return (
            f"{self.path.name}: only the first {self.duration_s:.2f} s of {claimed:.2f} s decode{frames}, "
            f"the file is truncated or damaged; streamchat uses those {self.duration_s:.2f} s "
            f"(re-download the file for the rest)"
        )

    def to_json(self) -> dict:
        """The durations `--json` output reports for the video."""
        return {
            "decodable_duration_s": round(self.duration_s, 6),
            "container_duration_s": None if self.container_duration_s is None else round(self.container_duration_s, 6),
            "decodable_frames": self.frame_count,
            "container_frames": self.container_frames,
            "truncated": self.truncated,
        }


@dataclass
class FrameChunk:
    """Consecutive planned frames, decoded and ready for the video processor."""

    index: int  # chunk number within the plan, 0-based
    frames: np.ndarray  # uint8 [N, H, W, 3], already resized; N is even
    frame_indices: list[int]  # source frame index of each frame (a pad frame repeats its index)
    timestamps: list[float]  # seconds of each frame
    first: int  # position of frames[0] in the sampled plan
    padded: bool  # True if the last frame was repeated to make N even


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 768 * 28 * 28,
) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides are multiples of `factor`, the area lies within
    [min_pixels, max_pixels], the aspect ratio is kept as closely as possible."""
    if min(height, width) < 1:
        raise UserError(f"video frames are {width}x{height}; both sides must be at least 1 pixel")
    if max(height, width) / min(height, width) > 200:
        raise UserError(
            f"video aspect ratio {width}x{height} is over 200:1, which Qwen2.5-VL cannot take; crop the video"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks so big videos don't fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def _check_file(path: Path) -> None:
    """Fail early, with a specific message, for files ffmpeg would only call 'invalid data'."""
    if not path.exists():
        raise UserError(f"video not found: {path}; check the path")
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass a video file inside it")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}; check its permissions") from e
    if not head:
        raise UserError(f"{path} is empty (0 bytes); the copy or download probably failed, fetch it again")
    if b"\0" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            raise UserError(f"{path} is a text file, not a video; pass a video file (mp4, mkv, webm, ...)")


class VideoSource:
    """A video file opened with decord, with its sampling plan fixed at open.

    Frames are resized during decode to the smart_resize size, so every consumer
    (the model, previews, snapshots) sees the same uint8 pixels.
    """

    def __init__(self, path: str | Path, sampling: Sampling = Sampling()):
        sampling.check()
        self.path = Path(path)
        self.sampling = sampling
        _check_file(self.path)
        _quiet_ffmpeg()

        first, native = _probe_first(self._open)  # native size: decord reports no frame size
        if first is None:
            raise UserError(f"{self.path}: no frame decodes, the file is truncated or corrupt; {_fix(self.path)}")
        height, width = first.shape[:2]
        native_fps = float(native.get_avg_fps())
        del native
        if not native_fps > 0 or not math.isfinite(native_fps):
            raise UserError(f"{self.path} reports a frame rate of {native_fps}; {_fix(self.path)}")

        resized_height, resized_width = smart_resize(
            height, width, min_pixels=sampling.min_pixels, max_pixels=sampling.max_pixels
        )
        self._size = (resized_height, resized_width)
        self._lock = threading.Lock()  # one decoder, shared by read() and the prefetch thread
        last, self._vr = _probe_last_decodable(lambda: self._open(resized_width, resized_height))
        if last < 0:
            raise UserError(f"{self.path}: no frame decodes, the file is truncated or corrupt; {_fix(self.path)}")

        indexed = len(self._vr)
        self.times, end_s = _frame_times(self._vr, last + 1, native_fps)
        claimed, claimed_frames = _container_claim(self.path)
        if indexed > last + 1:  # frames the container indexes past the last one that decodes
            tail = float(self._vr.get_frame_timestamp([indexed - 1])[0, 1]) - float(self._vr.get_frame_timestamp([0])[0, 0])
            claimed = max(claimed or 0.0, tail)
        self.info = VideoInfo(
            path=self.path,
            native_fps=native_fps,
            frame_count=last + 1,
            duration_s=end_s,
            width=width,
            height=height,
            resized_width=resized_width,
            resized_height=resized_height,
            container_duration_s=claimed,
            container_frames=max(claimed_frames or 0, indexed),
        )
        self.plan: list[tuple[int, float]] = self._make_plan()

    @property
    def warning(self) -> str | None:
        """A line to show the user about this file (today: that only part of it decodes), or None."""
        return self.info.truncation_warning()

    def _open(self, width: int = -1, height: int = -1):
        """A decord VideoReader, with decord's failures turned into one-line UserErrors."""
        from decord import DECORDError, VideoReader, cpu

        try:
            return VideoReader(str(self.path), ctx=cpu(0), width=width, height=height)
        except DECORDError as e:
            if "cannot find video stream" in str(e):
                raise UserError(f"{self.path} has no video stream (audio only?); pass a file with video") from e
            # e.g. 'av_read_frame failed': the index reaches past the data (truncated file).
            raise UserError(
                f"{self.path}: ffmpeg cannot read it, the file is truncated or corrupt; {_fix(self.path)}"
            ) from e
        except (RuntimeError, AssertionError) as e:
            # RuntimeError: ffmpeg could not open it (no moov atom, unknown format).
            # AssertionError: decord found 0 frames.
            raise UserError(
                f"{self.path}: ffmpeg cannot read it as a video (not a video, or truncated/corrupt); {_fix(self.path)}"
            ) from e

    def _make_plan(self) -> list[tuple[int, float]]:
        """(source frame index, seconds) of every sampled frame. --fps takes, every 1/fps seconds,
        the frame on screen at that moment by the frames' own timestamps, so a variable-rate video
        is sampled evenly in time; --stride takes every k-th decodable frame."""
        s, info, times = self.sampling, self.info, self.times
        if s.start >= info.duration_s:
            raise UserError(
                f"--start {s.start:g}s is past the end of {self.path.name} ({info.duration_s:.2f}s long); "
                f"use a start below {info.duration_s:.2f}"
            )
        end = info.duration_s if s.duration is None else min(s.start + s.duration, info.duration_s)
        on_screen = lambda t: bisect.bisect_right(times, t + TIME_EPS) - 1  # noqa: E731 - times[0] is 0
        indices: list[int] = []
        if s.fps is not None:
            i = 0
            while (t := s.start + i / s.fps) < end:
                indices.append(on_screen(t))
                i += 1
        else:
            index = on_screen(s.start)
            while index < len(times) and times[index] < end - TIME_EPS:
                indices.append(index)
                index += s.stride
        if s.max_frames is not None:
            indices = indices[: s.max_frames]
        return [(index, times[index]) for index in indices]

    def frames_until(self, seconds: float) -> int:
        """How many planned frames have a timestamp <= seconds."""
        return bisect.bisect_right(self.plan, seconds + TIME_EPS, key=lambda planned: planned[1])

    def read(self, first: int, count: int) -> np.ndarray:
        """Planned frames [first, first + count) as uint8 [count, H, W, 3]."""
        if first < 0 or count < 0 or first + count > len(self.plan):
            raise IndexError(f"frames [{first}, {first + count}) are outside the plan of {len(self.plan)}")
        if count == 0:
            return np.zeros((0, *self._size, 3), dtype=np.uint8)
        return self._decode([index for index, _ in self.plan[first : first + count]])

    def _decode(self, indices: list[int]) -> np.ndarray:
        from decord import DECORDError

        with self._lock:
            if self._vr is None:
                raise RuntimeError("VideoSource is closed")
            try:
                return self._vr.get_batch(indices).asnumpy()  # [N, H, W, 3]
            except DECORDError:
                pass
            # On files with a damaged tail decord's read-ahead thread can fail a batch
            # of frames that do decode; a fresh reader, one frame at a time, recovers.
            frames: dict[int, np.ndarray] = {}
            for index in indices:
                if index not in frames:
                    frames[index] = self._decode_one(index)
            return np.stack([frames[index] for index in indices])

    def _decode_one(self, index: int, tries: int = 3) -> np.ndarray:
        from decord import DECORDError

        for _ in range(tries):
            try:
                return self._vr[index].asnumpy()  # [H, W, 3]
            except DECORDError:
                self._vr = self._open(self._size[1], self._size[0])
        raise UserError(f"{self.path}: frame {index} does not decode, the file is corrupt; {_fix(self.path)}")

    def chunks(self, chunk_frames: int, first: int = 0, last: int | None = None) -> Iterator[FrameChunk]:
        """Planned frames [first, last) in chunks of chunk_frames; an odd total repeats
        the final frame once, as the HF video processor does."""
        last = self._check_range(chunk_frames, first, last)
        return self._chunks(chunk_frames, first, last)

    def _chunks(self, chunk_frames: int, first: int, last: int) -> Iterator[FrameChunk]:
        for number, start in enumerate(range(first, last, chunk_frames)):
            count = min(chunk_frames, last - start)
            frames = self.read(start, count)
            planned = self.plan[start : start + count]
            padded = count % 2 == 1  # only the final chunk can be odd
            if padded:
                frames = np.concatenate([frames, frames[-1:]])
                planned = [*planned, planned[-1]]
            yield FrameChunk(
                index=number,
                frames=frames,
                frame_indices=[index for index, _ in planned],
                timestamps=[t for _, t in planned],
                first=start,
                padded=padded,
            )

    def _check_range(self, chunk_frames: int, first: int, last: int | None) -> int:
        if chunk_frames < 2 or chunk_frames % 2:
            raise UserError(f"--chunk-frames must be even (Qwen2.5-VL packs frames in pairs); got {chunk_frames}")
        last = len(self.plan) if last is None else last
        if not 0 <= first <= last <= len(self.plan):
            raise IndexError(f"frame range [{first}, {last}) is outside the plan of {len(self.plan)}")
        return last

    def prefetch_chunks(
        self, chunk_frames: int, first: int = 0, last: int | None = None, depth: int = 2
    ) -> Iterator[FrameChunk]:
        """chunks(), decoded up to `depth` chunks ahead in a background thread so decoding
        overlaps the model's work (decord releases the GIL while it decodes)."""
        last = self._check_range(chunk_frames, first, last)
        if depth < 1:
            raise ValueError(f"depth must be at least 1; got {depth}")
        return self._prefetch(chunk_frames, first, last, depth)

    def _prefetch(self, chunk_frames: int, first: int, last: int, depth: int) -> Iterator[FrameChunk]:
        ready: queue.Queue = queue.Queue(maxsize=depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for chunk in self._chunks(chunk_frames, first, last):
                    if not put(chunk):
                        return
                put(_DONE)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
                put(_Failed(e))

        worker = threading.Thread(target=work, name="streamchat-decode", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()  # the worker sees it within 50 ms of finishing its current chunk
            worker.join()

    def close(self) -> None:
        with self._lock:
            self._vr = None

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def _probe_first(reopen: Callable[[], Any], tries: int = 2) -> tuple[Any, Any]:
    """Frame 0 (None if it never decodes) and the reader that tried it."""
    from decord import DECORDError

    vr = reopen()
    for _ in range(tries):
        try:
            return vr[0], vr
        except DECORDError:
            vr = reopen()  # see _probe_last_decodable: a fresh reader recovers
    return None, vr


def _probe_last_decodable(reopen: Callable[[], Any]) -> tuple[int, Any]:
    """Index of the last frame that really decodes (-1 if none), and a healthy reader.

    The container's count can over-report, and decord's get_batch then spins forever
    in native code holding the GIL (dmlc/decord#373); single-frame reads fail cleanly.
    """
    from decord import DECORDError

    vr = reopen()

    def decodes(index: int, tries: int = 2) -> bool:
        # After one failure near a damaged tail decord's read-ahead thread can fail
        # every later read, even of good frames; only a fresh reader recovers.
        nonlocal vr
        for _ in range(tries):
            try:
                vr[index]
                return True
            except DECORDError:
                vr = reopen()
        return False

    bad = len(vr) - 1
    if decodes(bad):
        return bad, vr
    step = 1
    while True:  # step back in doubling steps until a frame decodes ...
        good = max(bad - step, 0)
        if decodes(good):
            break
        if good == 0:
            return -1, vr
        bad, step = good, step * 2
    while bad - good > 1:  # ... then bisect between the good and the bad frame
        mid = (good + bad) // 2
        if decodes(mid):
            good = mid
        else:
            bad = mid
    return good, vr


def _frame_times(vr, count: int, native_fps: float) -> tuple[list[float], float]:
    """Start time of each of the first `count` frames, in seconds from the first frame, from the
    container's timestamps; and the end of the last one. Without usable timestamps (none, or not
    increasing) frames are taken as evenly spaced at the average rate."""
    stamps = np.asarray(vr.get_frame_timestamp(list(range(count))), dtype=np.float64)  # [count, 2]: start, end
    starts = stamps[:, 0] - stamps[0, 0]
    end = stamps[-1, 1] - stamps[0, 0]
    if not np.all(np.isfinite(stamps)) or (count > 1 and not starts[-1] > 0):
        return [i / native_fps for i in range(count)], count / native_fps
    starts = np.maximum.accumulate(starts)  # a stray out-of-order stamp must not break the bisections
    if not end > starts[-1]:
        end = starts[-1] + 1 / native_fps
    return [round(float(t), 6) for t in starts], round(float(end), 6)


def _container_claim(path: Path) -> tuple[float | None, int | None]:
    """The video stream's length in seconds and its frame count as the container states them (its
    header or index; None where it says nothing). decord counts only the packets it can read, which
    for a cut file stop where the data stops; the header keeps what the file was written with."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = stream.frames or None
            if stream.duration:  # mp4, mov: the track's own length
                return float(stream.duration * stream.time_base), frames
            tag = stream.metadata.get("DURATION")  # mkv, webm: the track's end time, HH:MM:SS.fraction
            if tag:
                h, m, sec = tag.split(":")
                start = float((stream.start_time or 0) * stream.time_base)
                return int(h) * 3600 + int(m) * 60 + float(sec) - start, frames
            if container.duration:  # the whole file's, audio included
                return (container.duration - (container.start_time or 0)) / 1e6, frames
            return None, frames
    except Exception:  # noqa: BLE001 - only a claim to compare against; decord already read the file
        return None, None


_quieted = False


def _quiet_ffmpeg() -> None:
    """Silence ffmpeg's stderr chatter ('moov atom not found', ...): it would scribble over
    the terminal UI, and every failure already becomes a one-line UserError."""
    global _quieted
    if not _quieted:
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        _quieted = True
