"""Screens over the chat: the sessions list (resume one), help, and the confirm-discard dialog."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Static


class SessionsScreen(Screen[str | None]):
    """The sessions that can be resumed (those with a snapshot), newest first; Enter resumes the highlighted one."""

    BINDINGS = [
        Binding("escape", "close", "Back", id="sessions.close"),
        Binding("enter", "resume", "Resume", id="sessions.resume", priority=True),
    ]

    COLUMNS = ("name", "video", "model", "chunks", "turns", "snaps", "updated (UTC)")

    def __init__(self, rows: list[dict], hidden: int = 0):
        super().__init__()
        self.rows = rows
        self.hidden = hidden  # sessions left out: no snapshot to resume from

    def compose(self) -> ComposeResult:
        title = "Sessions with a snapshot: Enter resumes from the latest one, Esc goes back."
        if self.hidden:
            title += (f"\n{self.hidden} session{'s' if self.hidden != 1 else ''} without a snapshot "
                      "(nothing to resume) not listed; `streamchat sessions list` shows all.")
        yield Static(title, id="sessions-title")
        yield DataTable(id="sessions-table", cursor_type="row", zebra_stripes=True)
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns(*self.COLUMNS)
        for r in self.rows:
            video = r["video_path"].rsplit("/", 1)[-1]
            video = video if len(video) <= 24 else video[:23] + "…"
            table.add_row(r["name"], video, r["model_id"], r["n_chunks"], r["n_turns"], r["n_snapshots"],
                          r["updated_utc"][:16].replace("T", " "), key=r["name"])
        if not self.rows:
            self.query_one("#sessions-title", Static).update(
                "No session has a snapshot to resume yet (F3 saves one). Esc goes back.")
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.dismiss(event.row_key.value)

    def action_resume(self) -> None:
        table = self.query_one(DataTable)
        if self.rows:
            self.dismiss(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def action_close(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """The keys (as remapped by the keymap), their binding ids for --keymap, and what they do."""

    BINDINGS = [Binding("escape,f1,q", "close", "Close", id="help.close")]

    def __init__(self, keys: list[tuple[str, str, str]]):
        super().__init__()
        self.keys = keys  # (key, binding id, what it does)

    def compose(self) -> ComposeResult:
        kw = max((len(k) for k, _, _ in self.keys), default=4)
        iw = max((len(i) for _, i, _ in self.keys), default=4)
        lines = "\n".join(f"{k.ljust(kw)}  {i.ljust(iw)}  {d}" for k, i, d in self.keys)
        with Vertical(id="help-box"):
            yield Static("[b]streamchat keys[/b]   (Esc, F1 or q closes this help)", id="help-title")
            yield Static(lines, id="help-keys", markup=False)
            yield Static(
                "Enter asks at the stream's current position; encoding goes on. --keymap FILE remaps "
                'keys: a JSON object of binding id to keys, e.g. {"streamchat.pause": "ctrl+t"}.',
                id="help-text",
                markup=False,
            )

    def action_close(self) -> None:
        self.dismiss(None)


class ConfirmDiscard(ModalScreen[str]):
    """Asked before an unsaved session is left: 'save', 'discard' or 'cancel'."""

    BINDINGS = [
        Binding("escape", "choose('cancel')", "Cancel", id="confirm.cancel"),
        Binding("s", "choose('save')", "Save", id="confirm.save"),
        Binding("d", "choose('discard')", "Discard", id="confirm.discard"),
    ]

    def __init__(self, verb: str = "quit", can_save: bool = True):
        super().__init__()
        self.verb = verb
        self.can_save = can_save

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(
                f"This session has chunks or answers not in a snapshot. {self.verb.capitalize()} anyway? "
                "(The log stays in the store either way; only the cache would be lost.)",
                id="confirm-text",
            )
            with Horizontal(id="confirm-buttons"):
                if self.can_save:
                    yield Button(f"Save and {self.verb} (s)", id="save", variant="primary")
                yield Button(f"{self.verb.capitalize()} without saving (d)", id="discard", variant="error")
                yield Button("Cancel (Esc)", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)

    def action_choose(self, choice: str) -> None:
        if choice == "save" and not self.can_save:
            return
        self.dismiss(choice)
