"""`streamchat chat` and `streamchat demo`: the commands that open the Textual app.

Textual is imported only when one of them runs, so the headless commands never load it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cli import add_engine_options, add_video_options, config_from, open_video
from .errors import UserError

DEMO_NOTE = (
    "Demo: tiny-random has random weights, so its answers are noise. It shows the streaming, the "
    "timeline and the figures; run `streamchat chat VIDEO` with a real --model for real answers."
)


def register(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="open the app: chat with a video while it encodes",
        description="Open the Textual app on VIDEO and start encoding at once; questions are answered "
        "at the stream's current position. --resume NAME opens a saved session from its snapshot.",
    )
    p.add_argument("video", nargs="?", default=None, help="video file (with --resume: only if the session's video moved)")
    p.add_argument("--resume", metavar="NAME", default=None, help="open a saved session from its latest snapshot (default: a new session)")
    p.add_argument("--name", default=None, help="name for the new session (default: date, video name and 4 hex digits)")
    _add_app_options(p)
    add_video_options(p)
    add_engine_options(p, history_default="keep")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "demo",
        help="open the app on a generated sample clip with the tiny-random model (no download)",
        description="Write a short synthetic clip into $STREAMCHAT_HOME and open it in the app with "
        "tiny-random, a model with random weights: its answers are noise.",
    )
    p.add_argument("--seconds", type=float, default=8.0, help="length of the sample clip (default: 8)")
    _add_app_options(p, realtime_default=True)
    add_video_options(p)
    add_engine_options(p, history_default="keep")
    p.set_defaults(func=cmd_demo, model="tiny-random", device="cpu")


def _add_app_options(p, realtime_default: bool = False) -> None:
    if realtime_default:
        p.add_argument("--no-realtime", dest="realtime", action="store_false", default=True,
                       help="encode as fast as the model can instead of at the video's own pace (default: at the video's pace)")
    else:
        p.add_argument("--realtime", action="store_true", default=False,
                       help="encode at the video's own pace, as a live source would arrive (default: as fast as possible)")
    p.add_argument("--keymap", metavar="FILE", default=None,
                   help='JSON file mapping binding ids to keys, e.g. {"streamchat.pause": "ctrl+t"} (default: none; F1 in the app lists the keys)')
    p.add_argument("--debug", action="store_true", help="show tracebacks (default: one-line errors)")


def _keymap(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read --keymap {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"--keymap {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise UserError(f'--keymap {path} must be a JSON object of binding id to keys, e.g. {{"streamchat.pause": "ctrl+t"}}')
    return data


def _run(launch, keymap: dict[str, str]) -> int:
    from .app import ChatApp

    ChatApp(launch, keymap=keymap).run()
    return 0


def cmd_chat(args) -> int:
    from .app import Launch

    keymap = _keymap(args.keymap)
    if args.resume:
        from .store import Store

        with Store() as store:
            store.get_session(args.resume)  # a missing name is a one-line error, before the app opens
        return _run(Launch(resume=args.resume, video=args.video, device=args.device, dtype=args.dtype,
                           realtime=args.realtime), keymap)
    if not args.video:
        raise UserError("give a VIDEO to chat about, or --resume NAME (`streamchat sessions list` shows them)")
    config = config_from(args)
    open_video(args.video, config).close()  # a bad file is a one-line error, before the app opens
    return _run(Launch(video=args.video, config=config, device=args.device, dtype=args.dtype, name=args.name,
                       realtime=args.realtime), keymap)


def cmd_demo(args) -> int:
    from .app import Launch
    from .clips import make_clip
    from .store import home

    keymap = _keymap(args.keymap)
    if args.seconds <= 0:
        raise UserError(f"--seconds must be positive; got {args.seconds}")
    config = config_from(args)
    clip = home() / "demo" / f"sample-{args.seconds:g}s.mp4"
    if not clip.exists():
        make_clip(clip, seconds=args.seconds, fps=24.0, width=224, height=224)
    note = DEMO_NOTE if args.model == "tiny-random" else None
    return _run(Launch(video=str(clip), config=config, device=args.device, dtype=args.dtype, note=note,
                       realtime=args.realtime), keymap)
