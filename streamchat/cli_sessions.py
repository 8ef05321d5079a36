"""Commands for sessions that last: run, resume, sessions, logs, replay (loaded by cli.py's register hook)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import Parser, add_device_map_option, add_engine_options, add_output_options, add_video_options, config_from, emit, open_video, progress_for, warn
from .errors import UserError


def _add_schedule_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ask", action="append", default=[], metavar="T:QUESTION",
                   help="ask QUESTION with every sampled frame up to T seconds, as `ask --at T` sees them (an odd "
                        "last frame is paired with itself); repeat for more; a T a resumed stream has already passed "
                        "is refused; without T: after the last frame this command encodes (default: no questions)")
    p.add_argument("--until", type=float, default=None, metavar="T", help="stop encoding at T seconds of the video (default: the end of the video)")
    p.add_argument("--realtime", action="store_true", help="pace encoding at the video's own speed (default: off, as fast as possible)")
    p.add_argument("--snapshot", action="store_true", help="save the KV cache and stream state at the end, so the session can be resumed (default: off)")


def _model_options(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto = cuda if present)")
    add_device_map_option(g)
    g.add_argument("--dtype", default="auto", help=f"float32, bfloat16, float16 or auto (default: auto = the dtype {what})")
    g.add_argument("--video", default=None, metavar="NEW_PATH", help="the session's video, if it moved; checked by sha256 (default: the recorded path)")


def _check_until(source, until: float | None) -> None:
    if until is not None and until > source.info.duration_s + 1e-6:
        raise UserError(f"--until {until:g} is past the end of the video ({source.info.duration_s:.2f} s); "
                        f"give a time inside it, or leave --until out to encode to the end")


def plural(count: int, noun: str) -> str:
    """'1 new turn', '2 new turns'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def register(sub, light: bool = False) -> None:
    """Every command of this module; `light`: only those that read the store (no torch import)."""
    if not light:
        _register_run_resume(sub)
    _register_store_commands(sub)
    if not light:
        _register_replay(sub)


def _register_run_resume(sub) -> None:
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


def _register_store_commands(sub) -> None:
    p = sub.add_parser("sessions", help="list, show, remove or export logged sessions",
                       description="Logged sessions: list (the default), show NAME, rm NAME, export NAME --format md|json.")
    add_output_options(p)
    p.set_defaults(func=cmd_sessions, sessions_command="list")
    actions = p.add_subparsers(dest="sessions_command", metavar="ACTION", parser_class=Parser)
    a = actions.add_parser("list", help="sessions that logged something, most recently updated first")
    a.add_argument("--all", action="store_true", help="also sessions that logged no turn and saved no snapshot (default: hidden)")
    a.add_argument("--names", action="store_true", help="print only the names, one a line, for scripts and shell completion (default: a table)")
    _child_output_options(a)
    a = actions.add_parser("show", help="one session: video, model, settings, chunks, turns, snapshots")
    a.add_argument("name", help="session name or id")
    _child_output_options(a)
    a = actions.add_parser("rm", help="delete a session's rows and snapshot files")
    a.add_argument("name", help="session name or id")
    a.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation (default: ask when stdin is a terminal; a 'no' exits with code 1)")
    _child_output_options(a)
    a = actions.add_parser("export", help="a session as Markdown or JSON")
    a.add_argument("name", help="session name or id")
    a.add_argument("--format", choices=["md", "json"], default="md", help="md or json (default: md)")
    a.add_argument("--output", "-o", default=None, metavar="FILE", help="write to FILE instead of stdout; its folder is created (default: stdout)")
    _child_output_options(a)

    from .cli_logs import register_logs

    register_logs(sub)


def _register_replay(sub) -> None:
    p = sub.add_parser("replay", help="re-run a session's turns the offline way and compare",
                       description="Re-run every logged streaming turn of session NAME in offline mode with exactly the frames "
                                   "and history it saw; report identical answers, TTFT, latency and memory side by side.")
    p.add_argument("name", help="session name or id")
    p.add_argument("--against", choices=["offline"], default="offline", help="what to replay against (default: offline)")
    p.add_argument("--report", default=None, metavar="FILE", help="also write a Markdown report here, with a PNG chart beside it; the folder is created (default: none)")
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
        from .models import load, parse_device_map

        device_map, main_device = parse_device_map(getattr(args, "device_map", None))
        spread = {} if device_map is None else {"device_map": device_map, "main_device": main_device}
        return load(model_id, device=args.device, dtype=args.dtype if args.dtype != "auto" else dtype, **spread)

    return load_model


def _turn_text(ans, at_s) -> str:
    when = f"{at_s:.2f} s" if at_s is not None else "end"
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

    def on_chunk(c) -> None:
        bar.update(c.frame_last + 1 - start)
        if c.warning:  # a spill that failed (a full disk): the session goes on with the pages in memory
            warn(c.warning)

    try:
        run_schedule(live, asks, until=args.until, pacer=pacer, on_chunk=on_chunk, on_answer=on_answer)
    except KeyboardInterrupt:
        bar.close()
        print(f"streamchat: session {live.name} keeps what was logged ({plural(len(live.store.chunks(live.id)), 'chunk')}, "
              f"{plural(len(live.store.turns(live.id)), 'turn')})", file=sys.stderr)
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
    snap = f", snapshot {doc['snapshot']} ({doc['snapshot_bytes']:,} bytes)" if doc["snapshot"] else ""
    attempt = f" (attempt {doc['attempt']}, resumed from {doc['restored_from']})" if doc.get("restored_from") else ""
    text = (f"session {doc['session']}{attempt}: {plural(doc['frames'], 'frame')} in {plural(doc['chunks'], 'chunk')} "
            f"up to {doc['position_s']:.2f} s, cache {plural(doc['cache_tokens'], 'token')}, "
            f"{plural(len(doc['turns']), 'new turn')}{snap}; logged in {live.store.path}")
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
    _check_until(source, args.until)
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
            for w in live.warnings:  # a partly decodable video; auto memory that bounds the stream
                warn(w)
            return _drive(args, live, asks)


def cmd_resume(args) -> int:
    from .session import Ask, LiveSession, check_schedule

    from .store import Store

    asks = [Ask.parse(a) for a in args.ask]
    with Store() as store:
        with LiveSession.resume(args.name, load_model=_loader(args), video=args.video, snapshot=args.from_snapshot, store=store) as live:
            check_schedule(live.stream.source, asks, args.until, live.stream.next_frame)  # refusals before warnings
            for w in live.warnings:
                warn(w)
            _check_until(live.stream.source, args.until)
            return _drive(args, live, asks)


# --- sessions -------------------------------------------------------------------------------------


def _plain(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.endswith("_json")}


def _s(value, fmt: str = "{}") -> str:
    return "–" if value is None else fmt.format(value)


def cmd_sessions(args) -> int:
    from .store import Store

    with Store() as store:
        action = args.sessions_command or "list"
        if action == "list":
            _list(args, store)
        elif action == "show":
            emit(args, *_show(store, args.name))
        elif action == "rm":
            from .inuse import holder

            session = store.get_session(args.name)
            name = session["name"]
            pid = holder(session["id"])
            if pid is not None:
                raise UserError(f"session {name} is open in `streamchat chat` (process {pid}); quit the app first, then remove it")
            if not getattr(args, "yes", False) and sys.stdin.isatty():  # the question goes to stderr: --json stays clean
                if not _confirm(f"remove session {name}, its log and its snapshot files? [y/N] "):
                    print("streamchat: nothing removed", file=sys.stderr)
                    return 1
            removed = _remove(store, args.name)
            emit(args, {"removed": name, "snapshot_files": removed},
                 f"removed session {name} and {plural(len(removed), 'snapshot file')}")
        elif action == "export":
            fmt = "json" if args.json else args.format
            text = store.export(args.name, fmt)
            if args.output:
                Path(args.output).write_text(text if text.endswith("\n") else text + "\n")
                if args.json:
                    emit(args, {"session": args.name, "format": fmt, "path": args.output}, "")
                else:
                    sys.stdout.write(f"wrote {args.output}\n")
            else:
                sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _confirm(prompt: str) -> bool:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        return False
    return answer.strip().lower() in ("y", "yes")


def _list(args, store) -> None:
    every = getattr(args, "all", False)
    rows = store.list_sessions(every=every)
    if getattr(args, "names", False):
        sys.stdout.write("".join(f"{r['name']}\n" for r in rows))
        return
    hidden = 0 if every else len(store.list_sessions()) - len(rows)
    doc = {"sessions": [_plain(r) for r in rows], "hidden_empty": hidden}
    lines = [f"{'name':<40} {'updated (UTC)':<19} {'model':<16} {'history':<7} {'chunks':>6} {'turns':>5} {'snaps':>5}  video"]
    for r in rows:
        lines.append(f"{r['name']:<40} {(r['updated_utc'] or '')[:19].replace('T', ' '):<19} {r['model_id'] or '':<16} {r['history'] or '':<7} "
                     f"{r['n_chunks']:>6} {r['n_turns']:>5} {r['n_snapshots']:>5}  {Path(r['video_path'] or '').name}")
    if not rows:
        lines = ["no sessions yet; start one with `streamchat run VIDEO --ask T:QUESTION`"]
    if hidden:
        lines.append(f"({plural(hidden, 'session')} with no turns and no snapshot hidden; `streamchat sessions list --all` shows them)")
    emit(args, doc, "\n".join(lines))


def _show(store, name: str) -> tuple[dict, str]:
    from .store import summarize_chunks

    s = store.get_session(name)
    chunks = store.chunks(s["id"])
    every_chunk = store.chunks(s["id"], every_attempt=True)
    turns = store.turns(s["id"])
    snaps = store.snapshots(s["id"])
    attempts = store.attempts(s["id"])
    number = {a["id"]: a["number"] for a in attempts}
    summary = summarize_chunks(chunks)
    doc = {
        "session": _plain(s),
        "chunk_summary": summary,
        "chunk_rows": len(every_chunk),
        "attempts": [_plain(a) for a in attempts],
        "live_attempt": attempts[-1]["number"] if attempts else None,
        "turns": [{**{k: t[k] for k in ("id", "mode", "at_s", "frames_seen", "question", "answer", "ttft_ms", "latency_ms", "replay_of", "run_id")},
                   "attempt": number.get(t.get("attempt_id"))} for t in turns],
        "snapshots": [{**_plain(x), "attempt": number.get(x.get("attempt_id"))} for x in snaps],
    }
    replays = sorted({t["run_id"] for t in turns if t["mode"] == "offline" and t.get("run_id")})
    lines = [
        f"session {s['name']}  ({s['id']})",
        f"  video    {s['video_path']}  sha256 {(s['video_sha256'] or '')[:16]}…",
        f"  model    {s['model_id']}  fingerprint {s['config_fingerprint'] or '–'}  history {s['history']}",
        f"  created  {s['created_utc']}  updated {s['updated_utc']}",
        f"  chunks   {summary['count']}, frames {_s(summary['frame_first'])}–{_s(summary['frame_last'])}, "
        f"up to {_s(summary['t_end_s'], '{:.2f} s')}, cache {_s(summary['cache_tokens_after'])} tokens"
        + (f" ({len(every_chunk) - len(chunks)} more chunk rows from attempts a resume replaced)" if len(every_chunk) > len(chunks) else ""),
        f"  turns    {sum(t['mode'] == 'streaming' for t in turns)} streaming, {sum(t['mode'] == 'offline' for t in turns)} offline"
        + (f" (from {plural(len(replays), 'replay')}: runs {', '.join(replays)})" if replays else ""),
    ]
    if len(attempts) > 1:
        by_id = {x["id"]: i for i, x in enumerate(snaps, 1)}
        lines.append(f"  attempts {len(attempts)}, live: {attempts[-1]['number']}  ("
                     + "; ".join(f"{a['number']}: {a['command']}" + (f" from snapshot {by_id.get(a['from_snapshot_id'], '?')} at chunk {a['start_chunk']}"
                                                                     if a["from_snapshot_id"] else "") for a in attempts) + ")")
    for i, x in enumerate(snaps, 1):
        lines.append(f"  snapshot {i}: {x['path']}  {_s(x['bytes'], '{:,}')} bytes, {_s(x['chunks'])} chunks, "
                     f"{_s(x['frames'])} frames, {_s(x['cache_tokens'])} cache tokens  ({x['created_utc']})")
    for t in turns:
        attempt = f" attempt {number.get(t.get('attempt_id'), '?')}" if len(attempts) > 1 else ""
        lines.append(f"  [{t['mode']} {_s(t['at_s'], '{:.2f} s')}{attempt}] {t['question']} → {(t['answer'] or '')[:60]!r}")
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
    with Store() as store:
        report["database"] = str(store.path)
    emit(args, report, text_report(report))
    return 0

