"""`streamchat logs`: the latest logged turns (or runs) and where the store is, like `llm logs`.

Reads the store only, so it is registered in the light parser (no torch, no transformers).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import Parser, add_output_options, emit
from .cli_sessions import _child_output_options, _plain, _s, plural
from .errors import UserError


def register_logs(sub) -> None:
    p = sub.add_parser("logs", help="the latest logged turns (or runs), like `llm logs`; `logs path`: where the store is",
                       description="Show the latest logged questions and answers, newest last. `streamchat logs path` prints "
                                   "where the database is; --runs lists compare, bench, replay and eval runs instead of turns.")
    p.add_argument("-n", "--count", type=int, default=3, metavar="N", help="how many turns (or runs); 0 for all (default: 3)")
    p.add_argument("-q", "--query", default=None, metavar="TEXT", help="only turns whose question or answer has every word of TEXT (default: all)")
    p.add_argument("-m", "--model", default=None, metavar="MODEL", help="only turns of sessions with this model id, e.g. tiny-random (default: every model)")
    p.add_argument("--session", default=None, metavar="NAME", help="only this session's turns (default: every session)")
    p.add_argument("--run", default=None, metavar="RUN_ID", help="only the turns a run logged, e.g. one replay's offline turns (default: all)")
    p.add_argument("-r", "--response", action="store_true", help="print only the last matching answer's text (default: whole turns)")
    p.add_argument("-s", "--short", action="store_true", help="one line per turn: time, session, question and answer, truncated (default: whole turns)")
    p.add_argument("-t", "--truncate", action="store_true", help="cut questions and answers to 100 characters (default: whole)")
    p.add_argument("--runs", action="store_true", help="list logged runs (compare, bench, replay, eval) instead of turns (default: turns)")
    p.add_argument("--kind", choices=["compare", "bench", "replay", "eval"], default=None, help="with --runs: only runs of this kind (default: all)")
    add_output_options(p)
    p.set_defaults(func=cmd_logs, logs_command=None)
    actions = p.add_subparsers(dest="logs_command", metavar="ACTION", parser_class=Parser)
    a = actions.add_parser("path", help="print where the database is ($STREAMCHAT_HOME, else the user data folder)")
    _child_output_options(a)


def _recalled(spans) -> str:
    """Bounded memory: the archived time spans a turn brought back, as the app shows them."""
    if not spans:
        return ""
    return " · recalled " + ", ".join(f"{s['t_start_s']:.1f}–{s['t_end_s']:.1f} s" for s in spans)


def _cut(text: str | None, limit: int = 100) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cmd_logs(args) -> int:
    from .store import Store

    if args.logs_command == "path":
        from .store import DB_NAME, home_path

        path = home_path() / DB_NAME
        emit(args, {"path": str(path), "exists": path.exists()}, str(path))
        return 0
    if args.count < 0:
        raise UserError(f"-n must be 0 (all) or more; got {args.count}")
    if args.runs:
        return _logs_runs(args)
    if args.kind:
        raise UserError("--kind picks runs; use it with --runs")
    with Store() as store:
        rows = store.logs(n=1 if args.response else args.count, query=args.query, session=args.session,
                          model=args.model, run=args.run)
        total = store.count_turns() if not rows else len(rows)
    if args.json:
        emit(args, {"turns": [_plain(r) for r in rows]}, "")
        return 0
    if not rows:
        filtered = any(x is not None for x in (args.query, args.session, args.model, args.run))
        msg = "no turns match" + (" (`streamchat logs` without filters shows the latest)" if filtered else "") if total else \
            "no turns logged yet; `streamchat ask VIDEO QUESTION` or `streamchat run VIDEO --ask T:QUESTION` logs some"
        sys.stdout.write(msg + "\n")
        return 0
    if args.response:
        sys.stdout.write((rows[-1]["answer"] or "") + "\n")
        return 0
    cut = _cut if args.truncate or args.short else (lambda text, limit=0: text or "")
    if args.short:
        sys.stdout.write("".join(
            f"{(r['created_utc'] or '')[:19].replace('T', ' ')}  {r['session_name']}  [{r['mode']} {_s(r['at_s'], '{:.2f} s')}]  "
            f"{cut(r['question'], 60)} → {cut(r['answer'], 60)}\n" for r in rows))
        return 0
    blocks = []
    for r in rows:
        replay = f", replay of {r['replay_of']} in run {r.get('run_id') or '–'}" if r.get("replay_of") else ""
        attempt = f", attempt {r['attempt']}" if (r.get("attempt") or 1) > 1 else ""
        blocks.append("\n".join([
            f"# {(r['created_utc'] or '')[:19].replace('T', ' ')} UTC  session {r['session_name']}  ({r['model_id']}, {r['mode']}, "
            f"at {_s(r['at_s'], '{:.2f} s')}, {_s(r['frames_seen'])} frames{attempt}{replay})",
            "",
            f"> {cut(r['question'])}",
            "",
            cut(r["answer"]),
            "",
            f"TTFT {_s(r['ttft_ms'], '{:.1f} ms')} · latency {_s(r['latency_ms'], '{:.1f} ms')} · "
            f"{_s(r['new_tokens'])} tokens · cache {_s(r['cache_tokens'])} tokens" + _recalled(r.get("retrieved")),
        ]))
    sys.stdout.write("\n\n".join(blocks) + "\n")
    return 0


def _logs_runs(args) -> int:
    from .store import Store

    for flag, value in (("-q", args.query), ("-m", args.model), ("--run", args.run)):
        if value is not None:
            raise UserError(f"{flag} filters turns, not runs; with --runs use --kind or --session")
    with Store() as store:
        session_id = store.get_session(args.session)["id"] if args.session else None
        rows = store.runs(kind=args.kind, session_id=session_id, n=args.count)[::-1]  # newest last, like turns
    if args.json:
        emit(args, {"runs": [_plain(r) for r in rows]}, "")
        return 0
    if not rows:
        sys.stdout.write("no runs logged yet; `streamchat compare`, `bench` and `replay` log them\n")
        return 0
    lines = []
    for r in rows:
        lines.append(f"{(r['created_utc'] or '')[:19].replace('T', ' ')}  {r['kind']:<7}  {r['id']}  {_run_summary(r)}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _run_summary(r: dict) -> str:
    """One line of what a run found; `sessions export` and `--json` have the whole report."""
    rep = r.get("report") or {}
    if r["kind"] == "replay":
        return (f"session {r.get('session_name') or rep.get('session')}: {plural(rep.get('replayed', 0), 'turn')} replayed, "
                f"all identical: {rep.get('all_identical')}")
    if r["kind"] == "compare":
        m = rep.get("match") or {}
        return f"{Path(rep.get('video') or '').name} {rep.get('model')}: identical {m.get('identical')}, first divergence {m.get('first_divergence')}"
    if r["kind"] == "eval" and rep.get("task") == "questions":
        acc = ", ".join(f"{mode} {_s(rep['table'][mode]['all']['accuracy'], '{:.0%}')}" for mode in rep.get("modes", []))
        same = rep.get("streaming_equals_offline") or {}
        return (f"questions {rep.get('model')}: {plural(len(rep.get('clips', [])), 'clip')}, exact match {acc}, "
                f"streaming == offline {same.get('equal')} of {same.get('compared')}")
    return f"{rep.get('model', '')} {rep.get('device', '')}".strip() + (f", JSON {rep['json_path']}" if rep.get("json_path") else "")
