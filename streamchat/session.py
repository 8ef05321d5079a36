"""Sessions that last: a stream whose every chunk and turn is logged, that can be snapshotted and resumed.

`LiveSession` is the step-by-step API the CLI and the TUI share: `create` or `resume`, then
`encode_next_chunk` / `encode_to`, `ask`, `save_snapshot`. `run_schedule` drives one through a list of
timed questions, the way `streamchat run` and `streamchat resume` do. Every event is one transaction
in the store, so a killed process loses at most the event it was in.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import snapshots
from .config import SessionConfig
from .engine import Answer, ChunkStats, segments_to_json
from .errors import UserError
from .models import Loaded
from .store import Store, home
from .stream import Stream
from .video import TIME_EPS, VideoSource, sha256_file

FIRST_TOP = 8  # first-step logits kept per turn (ids and values) so a replay can say how close it came
_SNAPSHOT_RE = re.compile(r"^snapshot-(\d+)\.safetensors$")


@dataclass
class Ask:
    """A question and the video second at which the stream asks it (None: once encoding is done)."""

    at_s: float | None
    question: str

    @classmethod
    def parse(cls, text: str) -> "Ask":
        """'T:QUESTION' with T in seconds, or just 'QUESTION' (a colon after a word that is not a
        number, as in 'Note: what is red?', is part of the question)."""
        example = "as in --ask '12.5:What is red?'"
        head, sep, rest = text.partition(":")
        if sep and not head.strip():
            raise UserError(f"--ask {text!r} has no time before the colon; write T:QUESTION, {example}, or the question alone to ask it at the end")
        try:
            at = float(head) if sep else None
        except ValueError:
            at = None
        if at is None:
            question = text.strip()
        else:
            question = rest.strip()
            if not math.isfinite(at) or at < 0:
                raise UserError(f"--ask {text!r}: the time must be 0 or more seconds, {example}")
        if not question:
            raise UserError(f"--ask {text!r} has no question; write it as T:QUESTION, {example}")
        return cls(at, question)


class Pacer:
    """Real-time pacing: video second `s` is reached `s - origin_s` wall seconds after the pacer starts."""

    def __init__(self, origin_s: float, clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep):
        self.origin_s = origin_s
        self.clock, self.sleep = clock, sleep
        self.t0 = clock()

    def wait_for(self, video_s: float) -> None:
        delay = (video_s - self.origin_s) - (self.clock() - self.t0)
        if delay > 0:
            self.sleep(delay)


def _resolve(path: str) -> Path:
    """A snapshot's recorded path; if `$STREAMCHAT_HOME` moved, the same file under the current home."""
    p = Path(path)
    if p.exists():
        return p
    moved = home() / p.parent.name / p.name
    return moved if moved.exists() else p


class LiveSession:
    """One logged stream over one video. Build it with `create` or `resume`."""

    def __init__(self, store: Store, session: dict, stream: Stream, *, owns_store: bool, attempt: dict, chunks=None, dialogue=None, snapshot=None):
        self.store = store
        self.session = session
        self.attempt = attempt  # the attempts row every chunk, turn and snapshot of this process is logged under
        self.stream = stream
        self.engine = stream.engine
        self.loaded: Loaded = stream.loaded
        self.config: SessionConfig = stream.config
        self.chunks: list[list] = list(chunks or [])  # [frame_first, frame_last, padded, cache_tokens_after]
        self.dialogue: list[dict] = list(dialogue or [])  # {at_s, question, token_ids}, what the snapshot keeps
        self.restored_from: snapshots.Snapshot | None = snapshot
        self.warnings: list[str] = snapshot.version_warnings() if snapshot is not None else []
        if stream.source.warning:  # a partly decodable video: for resume and the app to show
            self.warnings.append(stream.source.warning)
        if stream.budget.reason:  # auto memory chose bounded: say so wherever the session runs
            self.warnings.append(stream.budget.reason)
        self.turn_records: list[dict] = []  # turns asked by this process, as `run --json` prints them
        self.last_turn_id: str | None = None
        self.last_snapshot: dict | None = None
        self._owns_store = owns_store

    # --- building ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, loaded: Loaded, source: VideoSource, config: SessionConfig, *, name: str | None = None, store: Store | None = None,
               command: str = "run") -> "LiveSession":
        """A new session row for `source` and a fresh stream; `command` names its first attempt."""
        from .context import check_max_new_tokens, pair_tokens

        check_max_new_tokens(loaded, config, pair_tokens(loaded, source.info.resized_height, source.info.resized_width))
        stream = Stream(loaded, source, config)  # exact memory that cannot hold the video is refused before a row exists
        owns = store is None
        store = store or Store()
        try:
            video_path = source.info.path.resolve()
            row = store.create_session(
                video_path=video_path,
                video_sha256=sha256_file(video_path),
                model_id=loaded.model_id,
                config=config.to_dict(),
                history=config.history,
                name=name,
                versions=snapshots.versions(),
                config_fingerprint=loaded.fingerprint,  # the model's: a snapshot restores only into it
            )
            stream.spill_to(home() / row["name"] / "pages")
            return cls(store, row, stream, owns_store=owns, attempt=store.start_attempt(row["id"], command))
        except BaseException:
            if owns:
                store.close()
            raise

    @classmethod
    def resume(
        cls,
        name: str,
        *,
        loaded: Loaded | None = None,
        load_model: Callable[[str, str], Loaded] | None = None,
        video: str | None = None,
        snapshot: int | None = None,
        store: Store | None = None,
        command: str = "resume",
    ) -> "LiveSession":
        """Restore session `name` from its latest snapshot (or number `snapshot`, 1-based), as a new
        attempt (named `command`) that goes on from the snapshot's chunk.

        Everything (snapshot file, video, model) is checked before the model is used; `load_model(model_id,
        dtype)` is called only once the file and the video passed, with the snapshot's dtype.
        """
        owns = store is None
        store = store or Store()
        try:
            row = store.get_session(name)
            snap_row = snapshot_row(store, row, snapshot)
            snap = snapshots.read(_resolve(snap_row["path"]), expected_sha256=snap_row["sha256"])
            video_path = check_video(row, video)
            if snap.video_sha256 != row["video_sha256"]:
                raise snapshots.SnapshotError(f"snapshot {snap.path.name} was made from another video than session {row['name']}'s; the store and the file disagree")
            config = SessionConfig.from_dict(row["config"])
            if loaded is None:
                loaded = (load_model or _default_loader)(row["model_id"], snap.dtype)
            snap.check(loaded, config=config, video_sha256=row["video_sha256"])
            stream = Stream(loaded, VideoSource(video_path, config.sampling), config, spill_dir=home() / row["name"] / "pages")
            snap.restore(stream)
            if str(video_path) != row["video_path"]:
                store.update_session(row["id"], video_path=str(video_path))
                row = store.get_session(row["id"])
            attempt = store.start_attempt(row["id"], command, from_snapshot=snap_row)
            return cls(store, row, stream, owns_store=owns, attempt=attempt, chunks=snap.state.get("chunks"),
                       dialogue=snap.state.get("dialogue"), snapshot=snap)
        except BaseException:
            if owns:
                store.close()
            raise

    def close(self) -> None:
        self.stream.source.close()
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> "LiveSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- where the stream is ----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.session["name"]

    @property
    def id(self) -> str:
        return self.session["id"]

    @property
    def done(self) -> bool:
        return self.stream.done

    @property
    def position_s(self) -> float:
        """Video second of the last encoded frame (the sampling start before any)."""
        plan = self.stream.source.plan
        return plan[self.stream.next_frame - 1][1] if self.stream.next_frame else self.config.sampling.start

    def time_of(self, frame: int) -> float:
        return self.stream.source.plan[frame][1]

    # --- encoding ---------------------------------------------------------------------------------

    def _log_chunk(self, c: ChunkStats) -> None:
        padded = (c.frame_last - c.frame_first + 1) % 2 == 1  # chunks hold pairs: an odd count had its last frame repeated
        self.chunks.append([c.frame_first, c.frame_last, padded, c.cache_tokens])
        self.store.log_chunk(
            self.id,
            attempt_id=self.attempt["id"],
            chunk_index=c.index,
            frame_first=c.frame_first,
            frame_last=c.frame_last,
            t_start_s=c.t_start_s,
            t_end_s=c.t_end_s,
            tokens=c.tokens,
            cache_tokens_after=c.cache_tokens,
            cache_bytes=c.cache_bytes,
            encode_ms=c.encode_s * 1000,
            gpu_allocated_bytes=c.memory.get("allocated_bytes"),
            gpu_reserved_bytes=c.memory.get("reserved_bytes"),
            gpu_peak_bytes=c.memory.get("peak_bytes"),
        )

    def encode_next_chunk(self, limit_frames: int | None = None, *, pad_tail: bool = False) -> ChunkStats | None:
        """Encode (and log) one chunk, up to plan frame `limit_frames` (default: the end); None if nothing is left."""
        limit = self.stream.total_frames if limit_frames is None else limit_frames
        end = min(self.stream.next_frame + self.config.chunk_frames, limit)
        out = self.stream.encode_until(end, pad_tail=pad_tail, on_chunk=self._log_chunk)
        return out[0] if out else None

    def encode_to(
        self,
        seconds: float | None,
        *,
        pad_tail: bool = False,
        pacer: Pacer | None = None,
        on_chunk: Callable[[ChunkStats], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[ChunkStats]:
        """Encode every sampled frame with timestamp <= `seconds` (None: to the end), an odd one waiting
        for its pair unless the video ends there; with a pacer, no chunk before its last frame's time."""
        target = self.stream.frames_at(seconds)

        def logged(c: ChunkStats) -> None:
            self._log_chunk(c)
            if on_chunk is not None:
                on_chunk(c)

        if pacer is None:
            return self.stream.encode_until(target, pad_tail=pad_tail, on_chunk=logged, should_stop=should_stop)
        out: list[ChunkStats] = []
        while self.stream.next_frame < target:
            start = self.stream.next_frame
            end = min(start + self.config.chunk_frames, target)
            if (end - start) % 2 and not pad_tail and end < self.stream.total_frames:
                end -= 1  # an odd last frame waits for its pair
            if end <= start:
                break
            pacer.wait_for(self.time_of(end - 1))
            out.extend(self.stream.encode_until(end, pad_tail=pad_tail, on_chunk=logged))
            if should_stop is not None and should_stop():
                break
        return out

    def encode_for_question(
        self, seconds: float | None, *, pacer: Pacer | None = None, on_chunk: Callable[[ChunkStats], None] | None = None
    ) -> int:
        """Encode what a question at video second `seconds` sees, by `frames_up_to` (an odd last frame
        is paired with itself); return that frame count. UserError if the stream is already past it."""
        what = "the question's time" if seconds is None else f"a question at {seconds:g} s"
        count = frames_up_to(self.stream.source, seconds, flag=what, frames_seen=self.stream.next_frame)
        self.encode_to(seconds, pad_tail=True, pacer=pacer, on_chunk=on_chunk)
        return count

    # --- asking -----------------------------------------------------------------------------------

    def ask(self, question: str, at_s: float | None = None, on_token: Callable[[int], None] | None = None) -> Answer:
        """Answer on top of the cache and log the turn with the exact prompt it saw (for replay)."""
        ans = self.engine.ask(question, on_token=on_token)
        at = self.position_s if at_s is None else at_s
        top = []
        if ans.first_logits is not None:
            values, ids = ans.first_logits.float().topk(min(FIRST_TOP, ans.first_logits.numel()))
            top = [[int(i), float(v)] for i, v in zip(ids, values)]
        self.last_turn_id = self.store.log_turn(
            self.id,
            mode="streaming",
            attempt_id=self.attempt["id"],
            at_s=at,
            **ans.turn_fields(),
            extra={
                "prompt": segments_to_json(ans.prompt),
                "first_top": top,
                "history": self.config.history,
                "memory": self.engine.budget.to_json(),
                "retrieval_ms": round(ans.retrieval_s * 1000, 3),
                "chunks_encoded": self.engine.chunks_encoded,
                "dtype": snapshots.dtype_name(self.loaded.dtype),
                "device": str(self.loaded.device),
            },
        )
        self.dialogue.append({"at_s": at, "question": ans.question, "token_ids": ans.token_ids})
        self.turn_records.append({"id": self.last_turn_id, "at_s": at, **ans.to_json()})
        return ans

    # --- snapshots --------------------------------------------------------------------------------

    def next_snapshot_path(self) -> Path:
        folder = home() / self.name
        numbers = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else []) if (m := _SNAPSHOT_RE.match(p.name))]
        numbers += [i + 1 for i, _ in enumerate(self.store.snapshots(self.id))]
        return (folder / f"snapshot-{max(numbers, default=0) + 1}.safetensors").resolve()

    def save_snapshot(self) -> dict:
        """Write the cache and state atomically and record the file (path, bytes, sha256) in the store."""
        written = snapshots.save(
            self.stream,
            self.next_snapshot_path(),
            video_path=self.session["video_path"],
            video_sha256=self.session["video_sha256"],
            session=self.name,
            chunks=self.chunks,
            dialogue=self.dialogue,
        )
        snap_id = self.store.log_snapshot(
            self.id,
            attempt_id=self.attempt["id"],
            path=str(written.path),
            bytes=written.bytes,
            sha256=written.sha256,
            chunks=self.engine.chunks_encoded,
            cache_tokens=self.engine.cache_tokens,
            frames=self.engine.frames_seen,
        )
        self.last_snapshot = {"id": snap_id, "path": str(written.path), "bytes": written.bytes, "sha256": written.sha256, "seconds": written.seconds}
        return self.last_snapshot

    # --- reporting --------------------------------------------------------------------------------

    def summary(self) -> dict:
        """The document `run --json` and `resume --json` print."""
        return {
            "session": self.name,
            "video": self.session["video_path"],
            **self.stream.source.info.to_json(),
            "model": self.loaded.model_id,
            "history": self.config.history,
            "memory": self.engine.budget.to_json(),
            "archive_bytes": self.engine.book.archive.host_bytes + self.engine.book.archive.disk_bytes,
            "frames": self.engine.frames_seen,
            "chunks": self.engine.chunks_encoded,
            "cache_tokens": self.engine.cache_tokens,
            "position_s": self.position_s,
            "done": self.done,
            "turns": list(self.turn_records),
            "snapshot": self.last_snapshot["path"] if self.last_snapshot else None,
            "snapshot_bytes": self.last_snapshot["bytes"] if self.last_snapshot else None,
            "restored_from": str(self.restored_from.path) if self.restored_from is not None else None,
            "attempt": self.attempt["number"],
        }


def _default_loader(model_id: str, dtype: str) -> Loaded:
    from .models import load

    return load(model_id, dtype=dtype)


def snapshot_row(store: Store, session: dict, number: int | None = None) -> dict:
    """The store's row for the session's latest snapshot (or number `number`, 1-based)."""
    rows = store.snapshots(session["id"])
    if not rows:
        raise UserError(
            f"session {session['name']} has no snapshot to resume from; snapshots are saved by "
            f"`streamchat run --snapshot`, `streamchat resume --snapshot` or F3 in the app"
        )
    if number is None:
        return rows[-1]
    if 1 <= number <= len(rows):
        return rows[number - 1]
    raise UserError(f"--from {number}: session {session['name']} has snapshots 1 to {len(rows)}")


def read_snapshot(store: Store, session: dict, number: int | None = None) -> snapshots.Snapshot:
    """The session's latest snapshot (or number `number`, 1-based), read and verified against its recorded sha256."""
    row = snapshot_row(store, session, number)
    return snapshots.read(_resolve(row["path"]), expected_sha256=row["sha256"])


def check_video(session: dict, video: str | None = None) -> Path:
    """The session's video (or `video`, if it moved), checked to be the same bytes by sha256."""
    path = Path(video) if video else Path(session["video_path"])
    if not path.exists():
        if video:
            raise UserError(f"{video}: no such file; give the path the session's video has now")
        raise UserError(
            f"the video of session {session['name']} is no longer at {session['video_path']}; if it moved, give its new path: "
            f"`streamchat resume|replay {session['name']} --video NEW_PATH` or `streamchat chat NEW_PATH --resume {session['name']}`"
        )
    if sha256_file(path) != session["video_sha256"]:
        raise UserError(
            f"{path} is not the video session {session['name']} was recorded on (sha256 differs: the file changed); "
            f"give the original video (resume/replay: --video PATH; chat --resume: the VIDEO argument)"
        )
    return path.resolve()


def frames_up_to(source: VideoSource, seconds: float | None, *, flag: str, frames_seen: int = 0) -> int:
    """How many planned frames a question at video second `seconds` sees (None: the whole plan).

    The one rule for "the frames up to T", shared by `ask --at`, `run --ask`, `resume --ask` and the
    app: every sampled frame whose own timestamp is <= T. Frames reach the model in pairs, so the
    stream encodes them with `pad_tail=True`: an odd count repeats its last frame once, as the HF video
    processor pads, and the frame at T is never left waiting for a partner from after T.
    UserError (naming `flag`) when T is outside the video, no frame is that early, or the stream
    already holds `frames_seen` frames, more than T allows (its cache cannot forget them).
    """
    plan, info = source.plan, source.info
    if seconds is None:
        return len(plan)
    if not math.isfinite(seconds) or seconds < 0:
        raise UserError(f"{flag}: the time must be 0 or more seconds")
    if seconds > info.duration_s + TIME_EPS:
        decodes = f"; only {info.duration_s:.2f} s of its {info.container_duration_s:.2f} s decode" if info.truncated else ""
        raise UserError(
            f"{flag} is past the end of {info.path.name} ({info.duration_s:.2f} s{decodes}); ask at a time inside it"
        )
    count = source.frames_until(seconds)
    if count == 0:
        raise UserError(f"{flag}: no frame is sampled at or before {seconds:g} s (the first is at {plan[0][1]:g} s); ask at {plan[0][1]:g} s or later")
    if count < frames_seen:
        held = plan[frames_seen - 1][1]
        raise UserError(
            f"{flag}: the stream already holds {frames_seen} frames, up to {held:g} s, past {seconds:g} s; "
            f"ask at {held:g} s or later, or without a time"
        )
    return count


def check_schedule(source: VideoSource, asks: list[Ask], until: float | None, frames_seen: int = 0) -> list[Ask]:
    """Validate the questions against the video, --until and what the stream already holds (by
    `frames_up_to`); return them in the order they will be asked."""
    if until is not None and (not math.isfinite(until) or until < 0):
        raise UserError(f"--until must be 0 or more seconds; got {until:g}")
    for a in asks:
        if a.at_s is not None and until is not None and a.at_s > until + 1e-9:
            raise UserError(f"--ask {a.at_s:g}:… comes after --until {until:g}, where encoding stops; ask earlier or raise --until")
        if a.at_s is not None:
            frames_up_to(source, a.at_s, flag=f"--ask {a.at_s:g}:…", frames_seen=frames_seen)
        elif until is not None:  # asked once the stream reaches --until: the same rule at that time
            frames_up_to(source, until, flag=f"--until {until:g} (for --ask {a.question!r})", frames_seen=frames_seen)
    return sorted(asks, key=lambda a: math.inf if a.at_s is None else a.at_s)


def run_schedule(
    live: LiveSession,
    asks: list[Ask],
    *,
    until: float | None = None,
    pacer: Pacer | None = None,
    on_chunk: Callable[[ChunkStats], None] | None = None,
    on_answer: Callable[[Answer, float | None], None] | None = None,
) -> list[Answer]:
    """Stream to each question's time and ask it; then encode on to `until` (None: the video's end)."""
    answers = []
    for a in check_schedule(live.stream.source, asks, until, live.stream.next_frame):
        when = a.at_s if a.at_s is not None else until
        live.encode_for_question(when, pacer=pacer, on_chunk=on_chunk)
        if pacer is not None and when is not None:
            pacer.wait_for(when)
        ans = live.ask(a.question, at_s=a.at_s)
        answers.append(ans)
        if on_answer is not None:
            on_answer(ans, a.at_s)
    live.encode_to(until, pacer=pacer, on_chunk=on_chunk)
    return answers
