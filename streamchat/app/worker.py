"""The engine side of the app: one thread owns the model, the stream and the session.

The UI talks to it through `EngineWorker`'s methods (which only queue commands or set events) and
hears back through the messages in `messages.py`. Questions, snapshots and comparisons are taken
between chunks, so a question is answered at the stream's current position and encoding goes on.

The session itself is a `session.LiveSession`, the one the headless commands use: every chunk and
turn goes into the same store, so an app session can be listed, exported, resumed and replayed from
the CLI, and snapshots are the same files.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import inuse
from ..config import SessionConfig
from ..engine import Answer
from ..errors import UserError
from ..models import Loaded
from ..session import LiveSession
from ..store import Store
from . import messages as m

Post = Callable[[object], object]


@dataclass
class Launch:
    """What `streamchat chat` / `demo` open: a video with its settings, or a saved session by name."""

    video: str | None = None
    config: SessionConfig = field(default_factory=SessionConfig)
    device: str = "auto"
    dtype: str = "auto"
    resume: str | None = None  # a session name: open it from its latest snapshot (`video`: where it moved)
    name: str | None = None  # name for a new session (default: generated from the video)
    note: str | None = None  # shown above the chat (the demo's "random weights" warning)
    loaded: Loaded | None = None  # an already loaded model (tests, benchmarks, switching sessions)
    realtime: bool = False  # encode no chunk before its last frame's time, as a live source would


class ChunkGate:
    """A wait point inside a chunk, after its frames are decoded and before the model sees them.

    Chunks with index < `allow` pass; the next one waits until `allow` grows (or the worker
    stops). Tests and the key-echo benchmark use it to hold the engine inside a chunk.
    """

    def __init__(self, allow: int | None = None):
        self._cond = threading.Condition()
        self._allow = allow
        self.waiting: int | None = None  # the chunk index held now

    def allow(self, n: int | None) -> None:
        """Let chunks with index < n through (all when None)."""
        with self._cond:
            self._allow = n
            self._cond.notify_all()

    def wait(self, index: int, stop: threading.Event) -> None:
        with self._cond:
            while self._allow is not None and index >= self._allow and not stop.is_set():
                self.waiting = index
                self._cond.wait(0.05)
            self.waiting = None


class Stopped(Exception):
    """The worker was asked to stop while it was inside a chunk."""


def check_resumable(name: str, video: str | None = None) -> tuple[dict, dict[str, str]]:
    """What can be checked before a session is resumed, without a model and without reading the cache:
    the session, its latest snapshot's file (header only) and its video (by sha256). Returns the
    session's row and the snapshot's metadata; raises a one-line UserError."""
    from ..session import _resolve, check_video
    from ..snapshots import read_header

    with Store() as store:
        row = store.get_session(name)
        snaps = store.snapshots(row["id"])
    if not snaps:
        raise UserError(
            f"session {row['name']} has no snapshot, so there is no cache to resume (save one with F3 in the app); "
            f"`streamchat sessions show {row['name']}` shows its log"
        )
    _, meta, _ = read_header(_resolve(snaps[-1]["path"]))  # missing or truncated: a one-line SnapshotError
    check_video(row, video)
    return row, meta


def open_session(launch: Launch, loaded: Loaded | None) -> LiveSession:
    """A new LiveSession on the launch's video, or the named one restored from its latest snapshot."""
    from ..models import load
    from ..video import VideoSource

    if launch.resume:
        with Store() as store:
            model_id = store.get_session(launch.resume)["model_id"]
        reuse = loaded if loaded is not None and loaded.model_id == model_id else None
        return LiveSession.resume(
            launch.resume,
            loaded=reuse,
            load_model=lambda mid, dtype: load(mid, device=launch.device, dtype=dtype),
            video=launch.video,  # the session's video, if it moved (checked by sha256)
        )
    if launch.video is None:
        raise UserError("give a VIDEO to chat about, or --resume NAME")
    config = launch.config
    if loaded is None or loaded.model_id != config.model:
        loaded = load(config.model, device=launch.device, dtype=launch.dtype)
    return LiveSession.create(loaded, VideoSource(launch.video, config.sampling), config, name=launch.name)


def resumed_turns(live: LiveSession) -> list[dict]:
    """The store's rows of the turns the restored snapshot holds (its dialogue), in order."""
    rows, out = live.store.turns(live.id, mode="streaming"), []
    for d in live.dialogue:
        while rows and (rows[0]["question"], rows[0]["token_ids"]) != (d["question"], d["token_ids"]):
            rows.pop(0)
        if rows:
            out.append(rows.pop(0))
    return out


def compare_last(live: LiveSession, ans: Answer, turn_id: str | None) -> dict:
    """`ans` again, offline (the whole prompt in one prefill); logged as a replay of its turn."""
    from ..compare import match
    from ..offline import answer_with_retry

    s = live.stream
    off, attempts = answer_with_retry(
        s.loaded, ans.prompt, s.read_frames, s.fps, ans.question, s.config.max_new_tokens, s.engine.vocab
    )
    result = {
        "question": ans.question,
        "streaming": ans.to_json(),
        "offline": off.to_json() if off is not None else None,
        "attempts": [a.to_json() for a in attempts],
        "match": match(ans, off),
    }
    if off is not None:
        live.store.log_turn(
            live.id,
            mode="offline",
            at_s=live.position_s,
            **off.turn_fields(),
            replay_of=turn_id,
            extra={"source": "app", "attempts": result["attempts"]},
        )
    live.store.log_run("compare", result, session_id=live.id)
    return result


def error_line(exc: BaseException) -> str:
    """One line for the UI: a UserError as it is, anything else with its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}".rstrip(": ")


class EngineWorker:
    """Runs in one thread (`run`); the UI calls the other methods, which never block."""

    def __init__(self, launch: Launch, post: Post, gate: ChunkGate | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.launch = launch
        self.post = post
        self.gate = gate
        self.clock = clock
        self.commands: queue.Queue = queue.Queue()
        self._paused = threading.Event()
        self._stop = threading.Event()
        self.live: LiveSession | None = None
        self.loaded: Loaded | None = launch.loaded
        self.state = "starting"
        self.last: tuple[Answer, str | None] | None = None  # the last answer and its turn id
        self._deferred: list[tuple] = []  # questions asked before the first frames were in the cache
        self._pace_t0: float | None = None  # realtime pacing: wall clock when encoding started
        self._pace_origin = 0.0  # the video second encoding started from
        self._paused_total = 0.0
        self._paused_since: float | None = None

    # --- called from the UI thread ------------------------------------------------------------

    def ask(self, turn: int, question: str) -> None:
        self.commands.put(("ask", turn, question))

    def save_snapshot(self) -> None:
        self.commands.put(("snapshot",))

    def compare_last(self) -> None:
        self.commands.put(("compare",))

    def toggle_pause(self) -> bool:
        """Pause or resume encoding (takes effect between chunks); returns True when now paused."""
        if self._paused.is_set():
            if self._paused_since is not None:
                self._paused_total += self.clock() - self._paused_since
                self._paused_since = None
            self._paused.clear()
        else:
            self._paused_since = self.clock()
            self._paused.set()
        self.commands.put(("state",))
        return self._paused.is_set()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def stop(self) -> None:
        self._stop.set()

    # --- the thread ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.live = open_session(self.launch, self.loaded)
            self.loaded = self.live.loaded
        except BaseException as exc:  # noqa: BLE001 - shown in the app, which keeps running
            self._set_state("failed")
            self.post(m.EngineFailed(error_line(exc), fatal=True))
            return
        held = inuse.hold(self.live.id)  # `sessions rm` refuses while the app has the session open
        try:
            self._hook_encode()
            self.post(self._ready())
            for warning in self.live.warnings:  # a partly decodable video, a snapshot from another version
                self.post(m.Notice(f"warning: {warning}"))
            self._set_state()
            while not self._stop.is_set():
                busy = not self._paused.is_set() and not self.live.done and self._due()
                try:
                    cmd = self.commands.get_nowait() if busy else self.commands.get(timeout=0.05)
                except queue.Empty:
                    cmd = None
                if cmd is not None:
                    self._do(cmd)
                elif busy:
                    self._encode_one()
        except Exception as exc:  # noqa: BLE001 - a bug outside a chunk or a question: say so, never die silently
            self._set_state("failed")
            self.post(m.EngineFailed(self._explain(exc), fatal=True))
        finally:
            held.release()
            self.live.close()

    def _explain(self, exc: BaseException) -> str:
        """error_line, except when the store lost the session (removed while open, the database replaced):
        then say so, since sqlite's own words (FOREIGN KEY constraint failed) do not."""
        if isinstance(exc, sqlite3.IntegrityError) and self.live is not None:
            try:
                self.live.store.get_session(self.live.id)
            except UserError:
                return (f"session {self.live.name} is no longer in the store (removed while the app had it open?), "
                        "so nothing more is logged; start a new session to keep a log")
        return error_line(exc)

    def _due(self) -> bool:
        """With --realtime, whether the next chunk's last frame has "arrived" (pauses don't count)."""
        if not self.launch.realtime:
            return True
        s = self.live.stream
        if self._pace_t0 is None:
            self._pace_t0 = self.clock()
            self._paused_total = 0.0  # a pause before the first chunk is not video time either
            self._pace_origin = s.source.plan[s.next_frame][1] if s.next_frame < s.total_frames else 0.0
        last = min(s.next_frame + s.config.chunk_frames, s.total_frames) - 1
        elapsed = self.clock() - self._pace_t0 - self._paused_total
        return s.source.plan[last][1] - self._pace_origin <= elapsed

    def _ready(self) -> m.EngineReady:
        live = self.live
        s = live.stream
        history, chunks = [], []
        if s.next_frame:  # resumed: show what the restored cache holds
            history = resumed_turns(live)
            by_index = {c["chunk_index"]: c for c in live.store.chunks(live.id)}
            chunks = [by_index[i] for i in sorted(by_index) if i < live.engine.chunks_encoded]
        return m.EngineReady(
            session=live.name,
            frame=s.read_frames([s.next_frame - 1])[0] if s.next_frame else None,
            cache_tokens=live.engine.cache_tokens,
            cache_bytes=live.engine.cache.nbytes,
            video=Path(s.source.info.path).name,
            model=s.loaded.model_id,
            device=str(s.loaded.device),
            total_frames=s.total_frames,
            chunk_frames=s.config.chunk_frames,
            sampled_fps=s.fps,
            frames_done=s.next_frame,
            position_s=live.position_s,
            end_s=s.source.plan[-1][1] if s.total_frames else 0.0,
            history=history,
            chunks=chunks,
        )

    def _hook_encode(self) -> None:
        """The engine's chunk_hook (a chunk starts, before any model work): show its frame, then
        wait at the gate, if any; a stop asked for meanwhile abandons the chunk."""

        def hook(index: int, frames) -> None:
            self.post(m.ChunkStarted(index, frames[-1]))
            if self.gate is not None:
                self.gate.wait(index, self._stop)
            if self._stop.is_set():
                raise Stopped()

        self.live.engine.chunk_hook = hook

    def _set_state(self, state: str | None = None) -> None:
        if state is None:
            if self.live is not None and self.live.done:
                state = "done"
            else:
                state = "paused" if self._paused.is_set() else "encoding"
        if state != self.state:
            self.state = state
            self.post(m.EngineState(state))

    def _encode_one(self) -> None:
        t0 = self.clock()
        try:
            stats = self.live.encode_next_chunk()
        except Stopped:
            return
        except Exception as exc:  # noqa: BLE001 - the app shows it; encoding pauses until resumed
            self._paused.set()
            self._set_state("paused")
            self.post(m.EngineFailed(f"encoding stopped: {self._explain(exc)}"))
            return
        if stats is not None:
            self.post(m.ChunkEncoded(stats, self.live.stream.next_frame, self.clock() - t0))
            if stats.warning:  # a spill that failed (a full disk): encoding goes on, the pages stay in memory
                self.post(m.Notice(f"warning: {stats.warning}"))
        self._set_state()
        deferred, self._deferred = self._deferred, []
        for cmd in deferred:
            self._do(cmd)

    def _do(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "state":
            self._set_state()
        elif kind == "ask":
            _, turn, question = cmd
            if self.live.engine.frames_seen == 0 and not self.live.done:
                self._deferred.append(cmd)  # answered as soon as the first chunk is in the cache
            else:
                self._answer(turn, question)
        elif kind == "snapshot":
            self._run("saving", self._snapshot)
        elif kind == "compare":
            self._run("comparing", self._compare)

    def _run(self, state: str, job: Callable[[], None]) -> None:
        self._set_state(state)
        try:
            job()
        except Exception as exc:  # noqa: BLE001
            self.post(m.Notice(self._explain(exc), kind="error"))
        finally:
            self._set_state()

    def _answer(self, turn: int, question: str) -> None:
        live = self.live
        self._set_state("answering")
        self.post(m.AnswerStarted(turn, live.position_s, live.engine.frames_seen))
        ids: list[int] = []
        vocab = live.engine.vocab

        def on_token(token: int) -> None:
            if self._stop.is_set():
                raise Stopped()
            ids.append(token)
            # A multi-byte character can span tokens: hold back its unfinished part.
            self.post(m.AnswerToken(turn, vocab.decode(ids).rstrip("\ufffd")))

        try:
            ans = live.ask(question, on_token=on_token)
        except Exception as exc:  # noqa: BLE001
            self.post(m.AnswerFailed(turn, self._explain(exc)))
        else:
            self.last = (ans, live.last_turn_id)
            figures = {**ans.turn_fields(), "frames": ans.frames_seen, "at_s": live.position_s,
                       # the cache now: with history=keep it holds the turn as well
                       "cache_tokens_after": live.engine.cache_tokens, "cache_bytes_after": live.engine.cache.nbytes}
            self.post(m.AnswerDone(turn, ans.text, figures))
        finally:
            self._set_state()

    def _snapshot(self) -> None:
        snap = self.live.save_snapshot()
        self.post(m.SnapshotSaved(snap["path"], snap["bytes"]))

    def _compare(self) -> None:
        if self.last is None:
            raise UserError("no answer to compare yet in this session; ask a question first")
        self.post(m.Notice(compare_line(compare_last(self.live, *self.last)), kind="compare"))


def compare_line(r: dict) -> str:
    """One Markdown line for the chat: did offline give the same tokens, and how fast was each."""
    if r["offline"] is None:
        return "**Offline:** ran out of memory at every stride; " + "; ".join(a["error"] or "" for a in r["attempts"])
    mt, st, off = r["match"], r["streaming"], r["offline"]
    verdict = "identical tokens" if mt["identical"] else f"diverged at token {mt['first_divergence']}"
    logit = f", max first-step logit diff {mt['max_logit_diff']:.2g}" if mt["max_logit_diff"] is not None else ""
    return (
        f"**Offline:** {verdict}{logit}. TTFT streaming {st['ttft_s'] * 1000:.1f} ms vs offline "
        f"{off['ttft_s'] * 1000:.1f} ms; offline answer: {off['answer']!r}"
    )
