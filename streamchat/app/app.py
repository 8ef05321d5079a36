"""The Textual app: chat with a video while it encodes.

The engine runs in a thread worker (`EngineWorker.run`) and reaches the UI only through the messages
in `messages.py`; the UI reaches the engine only through the worker's non-blocking methods.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from rich.text import Text
from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Header, Input, Markdown, ProgressBar, Static
from textual.widgets.markdown import MarkdownStream

from ..errors import UserError
from ..store import Store
from . import messages as m
from .rate import rate_text
from .screens import ConfirmDiscard, HelpScreen, SessionsScreen
from .widgets import ChunkTimeline, FrameView, MetricsStrip, PointPlot
from .worker import ChunkGate, EngineWorker, Launch, check_resumable

STATE_STYLE = {
    "starting": "loading…",
    "encoding": "● encoding",
    "answering": "● answering",
    "paused": "❚❚ paused",
    "saving": "● saving snapshot",
    "comparing": "● comparing with offline",
    "done": "✔ done",
    "failed": "✖ failed",
}


QUESTION_SHOWN = 600  # characters of a question echoed in the chat: a pasted page would push the rest away


@dataclass
class TurnView:
    answer: Markdown
    figures: Static
    stream: MarkdownStream | None = None
    written: str = ""  # what the stream has been given so far
    retrieved: list = field(default_factory=list)  # bounded memory: the archived spans this answer brought back


def clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def figures_line(f: dict) -> str:
    """The quiet line under an answer; under bounded memory, the archived spans it recalled."""
    f = {k: (v if v is not None else 0) for k, v in f.items()}  # rows logged by other tools may lack some
    line = (
        f"TTFT {f['ttft_ms']:.1f} ms · {f['tokens_per_s']:.1f} tok/s · {f['new_tokens']} tokens · "
        f"cache {f['cache_tokens']} tokens · at {f['at_s']:.1f} s ({f['frames']} frames)"
    )
    spans = f.get("retrieved") or []
    if spans:
        line += " · recalled " + ", ".join(f"{clock(s['t_start_s'])}–{clock(s['t_end_s'])}" for s in spans)
    return line


def binding_ids() -> list[str]:
    """Every binding id that --keymap can remap: the app's and its screens'."""
    return [b.id for cls in (ChatApp, SessionsScreen, HelpScreen, ConfirmDiscard) for b in cls.BINDINGS if b.id]


class ChatApp(App[None]):
    """`streamchat chat`: the video panel on the left, the chat on the right."""

    CSS_PATH = "streamchat.tcss"
    TITLE = "streamchat"
    # ids make every key remappable with App.set_keymap (--keymap FILE); no ctrl+s / ctrl+j (tmux).
    # Short descriptions fit all seven keys in an 80-column footer; the tooltips are the help screen's words.
    BINDINGS = [
        Binding("f1", "help", "Help", id="streamchat.help", tooltip="this help"),
        Binding("f2", "toggle_pause", "Pause", id="streamchat.pause", tooltip="pause or resume encoding"),
        Binding("f3", "snapshot", "Save", id="streamchat.snapshot", tooltip="save a snapshot (to resume it later)"),
        Binding("f4", "compare", "Compare", id="streamchat.compare",
                tooltip="ask the last question offline, compare"),
        Binding("f5", "sessions", "Sessions", id="streamchat.sessions", tooltip="open a saved session"),
        Binding("f6", "copy_answer", "Copy", id="streamchat.copy", tooltip="copy the last answer"),
        Binding("ctrl+q", "quit", "Quit", id="streamchat.quit", priority=True, tooltip="quit (asks first if unsaved)"),
    ]

    def __init__(self, launch: Launch, *, gate: ChunkGate | None = None, clock: Callable[[], float] | None = None,
                 keymap: dict[str, str] | None = None):
        super().__init__()
        self.launch = launch
        self.gate = gate  # a wait point inside each chunk (tests, benchmarks)
        self.clock = clock or time.perf_counter  # the worker's wall clock (tests freeze it)
        self._keymap_config = keymap or {}
        self.engine: EngineWorker | None = None
        self._engine_job = None
        self._engine_gen = 0  # which engine worker the messages must come from
        self.state = "starting"
        self.info: m.EngineReady | None = None
        self.session_name: str | None = None  # the last session opened (printed with its resume command on quit)
        self.turns: dict[int, TurnView] = {}
        self.turn_count = 0
        self.last_answer: str | None = None
        self.unsaved = False  # chunks or answers since the last snapshot
        self._after_save: Callable[[], None] | None = None
        self._frames_done = 0  # plan frames in the cache
        self._frames_run = 0  # frames encoded by this worker, and the wall time they took
        self._wall_run = 0.0
        self._archived = 0  # bounded memory: pages this worker moved out of the working set
        self._position_s = 0.0  # video second of the last frame in the cache

    # --- layout -------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            with Vertical(id="video-panel"):
                yield FrameView(id="frame")
                yield ChunkTimeline(id="timeline")
                yield ProgressBar(total=None, show_eta=False, id="progress")
                yield Static("", id="rate")
                yield PointPlot("encode ms vs cache tokens", "tok", "ms", id="encode-plot")
                yield PointPlot("TTFT ms vs cache tokens", "tok", "ms", id="ttft-plot")
            with Vertical(id="chat-panel"):
                yield Static(self.launch.note or "", id="note", classes="" if self.launch.note else "hidden")
                yield VerticalScroll(id="chat")
                yield MetricsStrip(id="metrics")
                yield Input(placeholder="Ask about the video, Enter sends", id="question")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        # The panels, held here so that updates reach them while another screen is on top.
        self.body = self.query_one("#body", Horizontal)
        self._fit(self.size.height)
        self.frame_view = self.query_one(FrameView)
        self.timeline = self.query_one(ChunkTimeline)
        self.progress = self.query_one(ProgressBar)
        self.rate = self.query_one("#rate", Static)
        self.encode_plot = self.query_one("#encode-plot", PointPlot)
        self.ttft_plot = self.query_one("#ttft-plot", PointPlot)
        self.chat = self.query_one("#chat", VerticalScroll)
        self.metrics = self.query_one(MetricsStrip)
        if self._keymap_config:
            self.set_keymap(self._keymap_config)
        self.chat.anchor()
        self.query_one("#question", Input).focus()
        self._show_state()
        self.start_engine(self.launch)

    def on_resize(self, event: events.Resize) -> None:
        self._fit(event.size.height)

    def _fit(self, height: int) -> None:
        """The plots give way first when the terminal is short (80x24 keeps the frame, timeline and rate)."""
        body = getattr(self, "body", None)  # held, not queried: a dialog may be the active screen
        if body is not None:
            body.set_class(height < 40, "-short")
            body.set_class(height < 30, "-shorter")

    def start_engine(self, launch: Launch) -> None:
        self._engine_gen += 1
        gen = self._engine_gen

        def post(message) -> bool:
            message.gen = gen
            return self.post_message(message)

        self.launch = launch
        self.engine = EngineWorker(launch, post, gate=self.gate, clock=self.clock)
        self._engine_job = self.run_worker(self.engine.run, thread=True, group="engine", name="engine",
                                           exit_on_error=False)

    def _mine(self, message) -> bool:
        """Messages from an engine worker that was replaced (a session switch) are dropped."""
        return getattr(message, "gen", None) == self._engine_gen

    def on_unmount(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    # --- header and progress ------------------------------------------------------------------

    def _show_state(self) -> None:
        info = self.info
        # the state first: a narrow terminal cuts the header's end
        state = STATE_STYLE.get(self.state, self.state)
        if info is not None:
            self.title = info.session
            self.sub_title = f"{state} · {info.video} · {info.model} · {info.device}"
        else:
            self.sub_title = state

    def _show_rate(self) -> None:
        info = self.info
        self.rate.update(rate_text(
            done=self._frames_done, total=info.total_frames if info else 0, frames_run=self._frames_run,
            wall_s=self._wall_run, sampled_fps=info.sampled_fps if info else 0.0, realtime=self.launch.realtime,
            video_left_s=(info.end_s - self._position_s) if info else 0.0, archived_pages=self._archived,
        ))

    # --- engine messages ----------------------------------------------------------------------

    async def on_engine_ready(self, message: m.EngineReady) -> None:
        if not self._mine(message):
            return
        self._frames_done = message.frames_done
        self._position_s = message.position_s
        self._chunk_frames = message.chunk_frames
        timeline = self.timeline
        chunks = -(-message.total_frames // message.chunk_frames)
        timeline.reset(chunks, cached=message.frames_done // message.chunk_frames)
        for c in message.chunks:
            timeline.encode_ms[c["chunk_index"]] = c["encode_ms"] or 0.0
            self.encode_plot.add(c["cache_tokens_after"] or 0, c["encode_ms"] or 0.0)
        self.metrics.set(cache_tokens=message.cache_tokens, cache_bytes=message.cache_bytes)
        if message.frame is not None:
            self.frame_view.show(message.frame)
        self.progress.update(total=message.total_frames, progress=message.frames_done)
        for t in message.history:
            self.turn_count += 1
            figures = {"ttft_ms": t["ttft_ms"], "tokens_per_s": t["tokens_per_s"], "new_tokens": t["new_tokens"],
                       "cache_tokens": t["cache_tokens"], "at_s": t["at_s"], "frames": t["frames_seen"],
                       "retrieved": t.get("retrieved") or []}
            view = await self._mount_turn(t["question"], t["answer"], figures_line(figures))
            view.retrieved = figures["retrieved"]
            timeline.marks.add(max(-(-(t["frames_seen"] or 0) // message.chunk_frames) - 1, 0))
            self.turns[self.turn_count] = view
            self.last_answer = t["answer"]
            self.ttft_plot.add(t["cache_tokens"] or 0, t["ttft_ms"] or 0.0)
        self.session_name = message.session
        self.info = message  # last: tests and other handlers take a set `info` to mean "ready and shown"
        self._show_state()
        self._show_rate()

    def on_engine_state(self, message: m.EngineState) -> None:
        if self._mine(message):
            self.state = message.state
            self._show_state()

    def on_chunk_started(self, message: m.ChunkStarted) -> None:
        if self._mine(message):
            self.frame_view.show(message.frame)
            self.timeline.started(message.index)

    def on_chunk_encoded(self, message: m.ChunkEncoded) -> None:
        if not self._mine(message):
            return
        s = message.stats
        self.unsaved = True
        self._frames_done = message.frames_done
        self._position_s = s.t_end_s
        self._frames_run += s.frame_last - s.frame_first + 1
        self._wall_run += message.wall_s
        self._archived += s.evicted_pages
        self.timeline.encoded(s.index, s.encode_s * 1000)
        self.progress.update(progress=message.frames_done)
        self.encode_plot.add(s.cache_tokens, s.encode_s * 1000)
        on_gpu = self.info is not None and self.info.device.startswith("cuda")
        self.metrics.set(
            cache_tokens=s.cache_tokens,
            cache_bytes=s.cache_bytes,
            allocated=s.memory.get("allocated_bytes") if on_gpu else None,
            reserved=s.memory.get("reserved_bytes") if on_gpu else None,
            fps=self._frames_run / self._wall_run if self._wall_run else None,
        )
        self._show_rate()

    def on_answer_started(self, message: m.AnswerStarted) -> None:
        view = self.turns.get(message.turn) if self._mine(message) else None
        if view is None:
            return
        view.figures.update(f"answering at {message.at_s:.1f} s ({message.frames} frames)…")
        chunk = -(-message.frames // self.info.chunk_frames) - 1 if self.info else 0
        timeline = self.timeline
        timeline.marks.add(max(chunk, 0))
        timeline.refresh()

    async def on_answer_token(self, message: m.AnswerToken) -> None:
        view = self.turns.get(message.turn) if self._mine(message) else None
        if view is None:
            return
        if message.text.startswith(view.written):  # else: a character was re-decoded; the final update fixes it
            delta, view.written = message.text[len(view.written):], message.text
            if not delta:
                return
            if view.stream is None:
                # Made at the first token, not when the answer starts: stop() on a stream whose task never
                # ran re-raises the task's CancelledError, which cancels the handler and shuts the app down.
                view.stream = Markdown.get_stream(view.answer)
            await view.stream.write(delta)

    async def on_answer_done(self, message: m.AnswerDone) -> None:
        view = self.turns.get(message.turn) if self._mine(message) else None
        if view is None:
            return
        await self._finish_stream(view)
        # One full update after stop(): a streamed half-open fence can leave block state that drops content.
        await view.answer.update(message.text)
        view.figures.update(figures_line(message.figures))
        view.retrieved = message.figures.get("retrieved") or []
        self.select_turn(view)
        self.last_answer = message.text
        self.unsaved = True
        self.metrics.set(cache_tokens=message.figures["cache_tokens_after"], cache_bytes=message.figures["cache_bytes_after"])
        self.ttft_plot.add(message.figures["cache_tokens"], message.figures["ttft_ms"])

    async def on_answer_failed(self, message: m.AnswerFailed) -> None:
        view = self.turns.get(message.turn) if self._mine(message) else None
        if view is None:
            return
        await self._finish_stream(view)
        if view.written:  # the tokens shown so far stay, marked by the error under them
            await view.answer.update(view.written)
        else:
            view.answer.add_class("hidden")
        view.figures.update(Text(f"✖ {message.error}"))
        view.figures.add_class("error")

    async def on_engine_failed(self, message: m.EngineFailed) -> None:
        if not self._mine(message):
            return
        await self._chat_line(f"✖ {message.error}", "error")
        self.notify(message.error, title="engine error", severity="error")
        if message.fatal:
            self.state = "failed"
            self._show_state()

    async def on_notice(self, message: m.Notice) -> None:
        if not self._mine(message):
            return
        if message.kind == "compare":
            widget = Markdown(message.text, classes="notice compare")
            await self.chat.mount(widget)
        else:
            await self._chat_line(message.text, message.kind)
        if message.kind == "error":
            self._after_save = None  # a save that failed does not quit or switch

    async def on_snapshot_saved(self, message: m.SnapshotSaved) -> None:
        if not self._mine(message):
            return
        self.unsaved = False
        await self._chat_line(f"Snapshot saved: {message.path} ({message.bytes / 2**20:.1f} MiB)", "info")
        then, self._after_save = self._after_save, None
        if then is not None:
            then()

    # --- chat ---------------------------------------------------------------------------------

    def select_turn(self, view: TurnView) -> None:
        """The chosen answer (the newest, or one clicked): its recalled spans light up on the timeline."""
        per_chunk = getattr(self, "_chunk_frames", 0) or 1
        chunks = {c for s in view.retrieved for c in range(s["frame_first"] // per_chunk, s["frame_last"] // per_chunk + 1)}
        for other in self.turns.values():
            other.figures.set_class(other is view and bool(chunks), "-selected")
        self.timeline.show_recalled(chunks)

    def on_click(self, event) -> None:
        for view in self.turns.values():
            if event.widget is view.figures:
                self.select_turn(view)
                return

    async def _mount_turn(self, question: str, answer: str = "", figures: str = "") -> TurnView:
        chat = self.chat
        view = TurnView(Markdown(answer, classes="answer"), Static(figures, classes="figures"))
        if len(question) > QUESTION_SHOWN:
            question = f"{question[:QUESTION_SHOWN]}… ({len(question):,} characters)"
        await chat.mount(Static(Text(f"› {question}"), classes="question"), view.answer, view.figures)
        return view

    async def _chat_line(self, text: str, kind: str) -> None:
        await self.chat.mount(Static(Text(text), classes=f"notice {kind}"))

    async def _finish_stream(self, view: TurnView) -> None:
        if view.stream is not None:
            await view.stream.stop()
            view.stream = None

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        question = event.value.strip()
        if not question:
            return
        event.input.clear()
        self.turn_count += 1
        view = await self._mount_turn(question, figures="waiting for the engine…")
        self.turns[self.turn_count] = view
        if self.engine is None or self.state == "failed":
            view.figures.update(Text("✖ no engine is running; see the error above"))
            view.figures.add_class("error")
            return
        self.engine.ask(self.turn_count, question)

    # --- actions ------------------------------------------------------------------------------

    def action_toggle_pause(self) -> None:
        if self.engine is not None:
            self.engine.toggle_pause()

    async def action_snapshot(self) -> None:
        if self.engine is not None:
            self.engine.save_snapshot()

    async def action_compare(self) -> None:
        if self.engine is None or self.last_answer is None:
            self.notify("No answer to compare yet; ask a question first.", severity="warning")
            return
        await self._chat_line("Comparing the last answer with offline (whole prompt in one prefill)…", "info")
        self.engine.compare_last()

    def action_copy_answer(self) -> None:
        if self.last_answer is None:
            self.notify("No answer to copy yet.", severity="warning")
            return
        self.copy_to_clipboard(self.last_answer)
        self.notify("Copied the last answer.")

    def action_help(self) -> None:
        keys = []
        for binding in self.BINDINGS:
            key = self._keymap_config.get(binding.id, binding.key) if binding.id else binding.key
            keys.append((key, binding.id, binding.tooltip or binding.description))
        self.push_screen(HelpScreen(keys))

    def action_sessions(self) -> None:
        with Store() as store:
            rows = store.list_sessions()
        resumable = [r for r in rows if r["n_snapshots"]]  # without a snapshot there is no cache to resume
        self.push_screen(SessionsScreen(resumable, hidden=len(rows) - len(resumable)), self._session_chosen)

    async def _session_chosen(self, name: str | None) -> None:
        if not name:
            return
        try:  # before anything is torn down: the current session stays if the chosen one cannot open
            await asyncio.to_thread(check_resumable, name)
        except UserError as exc:
            await self._chat_line(f"✖ cannot open session {name}: {exc}", "error")
            self.notify(str(exc), title=f"cannot open {name}", severity="error")
            return
        self._leave("switch", lambda: self.call_later(self.switch_session, name))

    async def switch_session(self, name: str) -> None:
        """Stop this session's worker, clear the view, and open `name` from its snapshot."""
        old, job = self.engine, self._engine_job
        if old is not None:
            old.stop()
            await self.workers.wait_for_complete([job])
        self._engine_gen += 1  # anything the old worker still has queued is dropped
        await self.chat.remove_children()
        for plot in (self.encode_plot, self.ttft_plot):
            plot.clear()
        self.timeline.reset(0)
        self.frame_view.clear()
        self.progress.update(total=None, progress=0)
        self.metrics.set(cache_tokens=0, cache_bytes=0, allocated=None, reserved=None, fps=None)
        self.info, self.state, self.turns, self.turn_count, self.last_answer = None, "starting", {}, 0, None
        self.unsaved, self._frames_done, self._frames_run, self._wall_run, self._position_s = False, 0, 0, 0.0, 0.0
        self._show_state()
        loaded = old.loaded if old is not None else None
        self.start_engine(replace(self.launch, resume=name, video=None, name=None, loaded=loaded))

    async def action_quit(self) -> None:
        self._leave("quit", self._quit_now)

    def _leave(self, verb: str, then: Callable[[], None]) -> None:
        """Run `then`, asking first when the session has work that is not in a snapshot."""
        if not self.unsaved or self.state == "failed":
            then()
            return

        def chosen(choice: str | None) -> None:
            if choice == "save":
                self._after_save = then
                self.engine.save_snapshot()
            elif choice == "discard":
                then()

        self.push_screen(ConfirmDiscard(verb), chosen)

    def _quit_now(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        self.exit()
