"""Commands for sessions that last: run, resume, sessions, logs, replay (loaded by cli.py's register hook)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import Parser, add_engine_options, add_output_options, add_video_options, config_from, emit, open_video, progress_for
from .errors import UserError


def _warn(message: str) -> None:
    print(f"streamchat: warning: {message}", file=sys.stderr)


def _add_schedule_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ask", action="append", default=[], metavar="T:QUESTION",
                   help="ask QUESTION once the stream has encoded every frame up to T seconds; repeat for more; "
                        "a T the stream has already passed is asked at once; "
                        "without T: after the last frame this command encodes (default: no questions)")
    p.add_argument("--until", type=float, default=None, metavar="T", help="stop encoding at T seconds of the video (default: the end of the video)")
    p.add_argument("--realtime", action="store_true", help="pace encoding at the video's own speed (default: off, as fast as possible)")
    p.add_argument("--snapshot", action="store_true", help="save the KV cache and stream state at the end, so the session can be resumed (default: off)")


def _model_options(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto = cuda if present)")
    g.add_argument("--dtype", default="auto", help=f"float32, bfloat16, float16 or auto (default: auto = the dtype {what})")
    g.add_argument("--video", default=None, metavar="NEW_PATH", help="the session's video, if it moved; checked by sha256 (default: the recorded path)")


def register(sub) -> None:
    p = sub.add_parser("run", help="stream a video headless, asking questions at given times; logged as a session",
                       description="Stream VIDEO into the cache, ask each --ask question when the stream reaches its time, "
                                   "log every chunk and turn, and with --snapshot save the cache to resume later.")
    p.add_argument("video", help="video file")
    p.add_argument("--session", default=None, metavar="NAME", help="name of the new session (default: DATE-VIDEO-XXXX)")
    _add_schedule_options(p)
    add_video_options(p)
    add_engine_options(p)
    add_output_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue a session from its latest snapshot",
                       description="Restore session NAME's snapshot, continue encoding the same video where it stopped, "
                                   "ask, and log into the same session.")
    p.add_argument("name", help="session name (see `streamchat sessions list`)")
    _add_schedule_options(p)
    p.add_argument("--from", dest="from_snapshot", type=int, default=None, metavar="N",
                   help="restore snapshot number N (1 = the first; see `sessions show NAME`) (default: the latest)")
    _model_options(p, "the snapshot was saved in")
    add_output_options(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("sessions", help="list, show, remove or export logged sessions",
                       description="Logged sessions: list (the default), show NAME, rm NAME, export NAME --format md|json.")
    add_output_options(p)
    p.set_defaults(func=cmd_sessions, sessions_command="list")
    actions = p.add_subparsers(dest="sessions_command", metavar="ACTION", parser_class=Parser)
    a = actions.add_parser("list", help="every session, newest first")
    _child_output_options(a)
    a = actions.add_parser("show", help="one session: video, model, settings, chunks, turns, snapshots")
    a.add_argument("name", help="session name or id")
    _child_output_options(a)
    a = actions.add_parser("rm", help="delete a session's rows and snapshot files")
    a.add_argument("name", help="session name or id")
    _child_output_options(a)
    a = actions.add_parser("export", help="a session as Markdown or JSON")
    a.add_argument("name", help="session name or id")
    a.add_argument("--format", choices=["md", "json"], default="md", help="md or json (default: md)")
    a.add_argument("--output", "-o", default=None, metavar="FILE", help="write to FILE instead of stdout (default: stdout)")
    _child_output_options(a)

    p = sub.add_parser("logs", help="the latest logged turns, like `llm logs`",
                       description="Show the latest logged questions and answers, newest last.")
    p.add_argument("-n", "--count", type=int, default=3, metavar="N", help="how many turns; 0 for all (default: 3)")
    p.add_argument("-q", "--query", default=None, metavar="TEXT", help="only turns whose question or answer has every word of TEXT (default: all)")
    p.add_argument("--session", default=None, metavar="NAME", help="only this session's turns (default: every session)")
    add_output_options(p)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("replay", help="re-run a session's turns the offline way and compare",
                       description="Re-run every logged streaming turn of session NAME in offline mode with exactly the frames "
                                   "and history it saw; report identical answers, TTFT, latency and memory side by side.")
    p.add_argument("name", help="session name or id")
    p.add_argument("--against", choices=["offline"], default="offline", help="what to replay against (default: offline)")
    p.add_argument("--report", default=None, metavar="FILE", help="also write a Markdown report here, with a PNG chart beside it (default: none)")
    _model_options(p, "the session was recorded in")
    add_output_options(p)
    p.set_defaults(func=cmd_replay)


def _child_output_options(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: an action's own flag must not reset `sessions --json` given before it
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document on stdout (default: text)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks (default: one-line errors)")


# --- run / resume -------------------------------------------------------------------------------


def _loader(args):
    def load_model(model_id: str, dtype: str | None):
        from .models import load

        return load(model_id, device=args.device, dtype=args.dtype if args.dtype != "auto" else dtype)

    return load_model


def _turn_text(ans, at_s) -> str:
    when = f"{at_s:g} s" if at_s is not None else "end"
    return (f"[{when}, {ans.frames_seen} frames] Q: {ans.question}\n{ans.text}\n"
            f"  (TTFT {ans.ttft_s * 1000:.1f} ms, {ans.latency_s:.3f} s, {ans.new_tokens} tokens, cache {ans.cache_tokens} tokens)\n")


def _drive(args, live, asks) -> int:
    """Run the schedule on `live`, save a snapshot if asked, print; shared by run and resume."""
    from .session import Pacer, run_schedule
    from .snapshots import SnapshotWriteError

    target = live.stream.frames_at(args.until)
    bar = progress_for(args, max(target - live.stream.next_frame, 1), "encoding")
    start = live.stream.next_frame
    pacer = Pacer(live.time_of(start) if start < live.stream.total_frames else live.position_s) if args.realtime else None

    def on_answer(ans, at_s) -> None:
        if not args.json:
            bar.close()
            sys.stdout.write(_turn_text(ans, at_s))
            sys.stdout.flush()

    try:
        run_schedule(live, asks, until=args.until, pacer=pacer,
                     on_chunk=lambda c: bar.update(c.frame_last + 1 - start), on_answer=on_answer)
    except KeyboardInterrupt:
        bar.close()
        print(f"streamchat: session {live.name} keeps what was logged ({len(live.store.chunks(live.id))} chunks, "
              f"{len(live.store.turns(live.id))} turns)", file=sys.stderr)
        raise
    bar.close()
    error = None
    if args.snapshot:
        try:
            live.save_snapshot()
        except SnapshotWriteError as exc:
            error = str(exc)
    doc = live.summary()
    if error:
        doc["snapshot_error"] = error
    snap = f", snapshot {doc['snapshot']} ({doc['snapshot_bytes']} bytes)" if doc["snapshot"] else ""
    text = (f"session {doc['session']}: {doc['frames']} frames in {doc['chunks']} chunks up to {doc['position_s']:g} s, "
            f"cache {doc['cache_tokens']} tokens, {len(doc['turns'])} new turns{snap}")
    emit(args, doc, text)
    if error:
        print(f"streamchat: error: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_run(args) -> int:
    from .cli import load_model
    from .session import Ask, LiveSession, check_schedule
    from .store import Store

    config = config_from(args)
    asks = [Ask.parse(a) for a in args.ask]
    source = open_video(args.video, config)
    check_schedule(source, asks, args.until)
    with Store() as store:
        if args.session is not None:
            try:
                store.get_session(args.session)
            except UserError:
                pass
            else:
                raise UserError(f"a session named {args.session!r} already exists; pick another --session or `streamchat resume {args.session}`")
        loaded = load_model(args)
        with LiveSession.create(loaded, source, config, name=args.session, store=store) as live:
            return _drive(args, live, asks)


def cmd_resume(args) -> int:
    from .session import Ask, LiveSession

    from .store import Store

    asks = [Ask.parse(a) for a in args.ask]
    with Store() as store:
        with LiveSession.resume(args.name, load_model=_loader(args), video=args.video, snapshot=args.from_snapshot, store=store) as live:
            for w in live.warnings:
                _warn(w)
            return _drive(args, live, asks)


# --- sessions / logs ----------------------------------------------------------------------------


def _plain(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.endswith("_json")}


def _s(value, fmt: str = "{}") -> str:
    return "–" if value is None else fmt.format(value)


def cmd_sessions(args) -> int:
    from .store import Store

    with Store() as store:
        action = args.sessions_command or "list"
        if action == "list":
            rows = store.list_sessions()
            doc = {"sessions": [_plain(r) for r in rows]}
            lines = [f"{'name':<40} {'updated (UTC)':<19} {'model':<16} {'history':<7} {'chunks':>6} {'turns':>5} {'snaps':>5}  video"]
            for r in rows:
                lines.append(f"{r['name']:<40} {(r['updated_utc'] or '')[:19]:<19} {r['model_id'] or '':<16} {r['history'] or '':<7} "
                             f"{r['n_chunks']:>6} {r['n_turns']:>5} {r['n_snapshots']:>5}  {Path(r['video_path'] or '').name}")
            emit(args, doc, "\n".join(lines) if rows else "no sessions yet; start one with `streamchat run VIDEO --ask T:QUESTION`")
        elif action == "show":
            emit(args, *_show(store, args.name))
        elif action == "rm":
            from .inuse import holder

            session = store.get_session(args.name)
            name = session["name"]
            pid = holder(session["id"])
            if pid is not None:
                raise UserError(f"session {name} is open in `streamchat chat` (process {pid}); quit the app first, then remove it")
            removed = _remove(store, args.name)
            emit(args, {"removed": name, "snapshot_files": removed}, f"removed session {name} and {len(removed)} snapshot files")
        elif action == "export":
            fmt = "json" if args.json else args.format
            text = store.export(args.name, fmt)
            if args.output:
                Path(args.output).write_text(text)
                if args.json:
                    emit(args, {"session": args.name, "format": fmt, "path": args.output}, "")
                else:
                    sys.stdout.write(f"wrote {args.output}\n")
            else:
                sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _show(store, name: str) -> tuple[dict, str]:
    from .store import summarize_chunks

    s = store.get_session(name)
    chunks = store.chunks(s["id"])
    turns = store.turns(s["id"])
    snaps = store.snapshots(s["id"])
    summary = summarize_chunks(chunks)
    doc = {
        "session": _plain(s),
        "chunk_summary": summary,
        "turns": [{k: t[k] for k in ("id", "mode", "at_s", "frames_seen", "question", "answer", "ttft_ms", "latency_ms", "replay_of")} for t in turns],
        "snapshots": [_plain(x) for x in snaps],
    }
    lines = [
        f"session {s['name']}  ({s['id']})",
        f"  video    {s['video_path']}  sha256 {(s['video_sha256'] or '')[:16]}…",
        f"  model    {s['model_id']}  fingerprint {s['config_fingerprint'] or '–'}  history {s['history']}",
        f"  created  {s['created_utc']}  updated {s['updated_utc']}",
        f"  chunks   {summary['count']}, frames {_s(summary['frame_first'])}–{_s(summary['frame_last'])}, "
        f"up to {_s(summary['t_end_s'], '{:g} s')}, cache {_s(summary['cache_tokens_after'])} tokens",
        f"  turns    {sum(t['mode'] == 'streaming' for t in turns)} streaming, {sum(t['mode'] == 'offline' for t in turns)} offline",
    ]
    for i, x in enumerate(snaps, 1):
        lines.append(f"  snapshot {i}: {x['path']}  {_s(x['bytes'])} bytes, {_s(x['chunks'])} chunks, "
                     f"{_s(x['frames'])} frames, {_s(x['cache_tokens'])} cache tokens  ({x['created_utc']})")
    for t in turns:
        lines.append(f"  [{t['mode']} {_s(t['at_s'], '{:g} s')}] {t['question']} → {(t['answer'] or '')[:60]!r}")
    return doc, "\n".join(lines)


def _remove(store, name: str) -> list[str]:
    """Delete the rows, the snapshot files and (if nothing else is in it) the session's folder."""
    from .store import home

    session = store.get_session(name)
    paths = store.delete_session(session["id"])
    removed = []
    for p in paths:
        path = Path(p)
        if path.exists():
            path.unlink()
            removed.append(str(path))
    folder = home() / session["name"]
    if folder.is_dir():
        for leftover in folder.glob(".snapshot-*.partial"):  # from a process killed while writing
            leftover.unlink()
        try:
            folder.rmdir()
        except OSError:
            pass  # other files the user put there stay
    return removed


def cmd_logs(args) -> int:
    from .store import Store

    with Store() as store:
        rows = store.logs(n=args.count, query=args.query, session=args.session)
    if args.json:
        emit(args, {"turns": [_plain(r) for r in rows]}, "")
        return 0
    blocks = []
    for r in rows:
        replay = f", replay of {r['replay_of']}" if r.get("replay_of") else ""
        blocks.append("\n".join([
            f"# {r['created_utc'] or ''}  session {r['session_name']}  ({r['mode']}, at {_s(r['at_s'], '{:g} s')}, "
            f"{_s(r['frames_seen'])} frames{replay})",
            "",
            f"> {r['question']}",
            "",
            r["answer"] or "",
            "",
            f"TTFT {_s(r['ttft_ms'], '{:.1f} ms')} · latency {_s(r['latency_ms'], '{:.1f} ms')} · "
            f"{_s(r['new_tokens'])} tokens · cache {_s(r['cache_tokens'])} tokens",
        ]))
    sys.stdout.write(("\n\n".join(blocks) if blocks else "no turns logged yet") + "\n")
    return 0


# --- replay -------------------------------------------------------------------------------------


def cmd_replay(args) -> int:
    from .replay import replay_session, text_report, write_report

    from .store import Store

    with Store() as store:
        total = len(store.turns(store.get_session(args.name)["id"], mode="streaming"))
    bar = progress_for(args, total, "replaying", unit="turns")
    done = [0]

    def on_turn(_entry: dict) -> None:
        done[0] += 1
        bar.update(done[0])

    report = replay_session(args.name, load_model=_loader(args), video=args.video, on_turn=on_turn)
    bar.close()
    if args.report:
        image = write_report(report, Path(args.report))
        report["report"] = {"markdown": args.report, "png": str(image) if image else None}
    emit(args, report, text_report(report))
    return 0

