"""`streamchat chat` and `streamchat demo`: the commands that open the Textual app.

Textual is imported only when one of them runs, so the headless commands never load it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from .cli import add_engine_options, add_video_options, config_from, open_video
from .errors import UserError

DEMO_NOTE = (
    "Demo: tiny-random has random weights, so its answers are noise. It shows the streaming, the "
    "timeline and the figures; run `streamchat chat VIDEO` with a real --model for real answers."
)
TOY_NOTE = (
    "Demo: tiny-shapes is a toy model trained on synthetic shapes scenes like this one, nothing else. "
    "Ask \"What word was shown?\", a shape's colour or a colour's shape at 00:05, which shape appeared "
    "first, how often one flashed, how many are on screen; about 5 answers in 6 are right. "
    "Your videos: `streamchat chat VIDEO --model ...`."
)
NOTES = {"tiny-random": DEMO_NOTE, "tiny-shapes": TOY_NOTE}


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
        help="open the app on a generated shapes scene with the built-in tiny-shapes model (no download)",
        description="Write a generated shapes scene (moving shapes, one word shown for a second, a clock) into "
        "$STREAMCHAT_HOME and open it in the app with tiny-shapes, a toy model trained on such scenes: it "
        "answers their template questions (the word shown, colours, shapes, flashes, order, counts), about "
        "5 in 6 right. --model tiny-random shows the same with random weights.",
    )
    p.add_argument("--seconds", type=int, default=12, help="length of the scene in whole seconds, 2 to 600; tiny-shapes was trained on 2 to 96 (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="which generated scene (default: 0)")
    _add_app_options(p, realtime_default=True)
    add_video_options(p)
    # one question at a time, as tiny-shapes was trained: earlier turns are not kept
    add_engine_options(p, history_default="drop", model_default="tiny-shapes", device_default="cpu")
    p.set_defaults(func=cmd_demo)


def _add_app_options(p, realtime_default: bool = False) -> None:
    if realtime_default:
        p.add_argument("--no-realtime", dest="realtime", action="store_false", default=True,
                       help="encode as fast as the model can instead of at the video's own pace (default: at the video's pace)")
    else:
        p.add_argument("--realtime", action="store_true", default=False,
                       help="encode at the video's own pace, as a live source would arrive (default: as fast as possible)")
    p.add_argument("--keymap", metavar="FILE", default=None,
                   help='JSON file mapping binding ids to keys, e.g. {"streamchat.pause": "ctrl+t"}; F1 in the app lists the ids, unknown ones are refused (default: none)')
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
    from .app import binding_ids

    known = binding_ids()
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(f"--keymap {path}: unknown binding id {', '.join(map(repr, unknown))}; the ids are {', '.join(known)}")
    return data


def _need_terminal(command: str) -> None:
    """The app draws on the terminal and reads keys from it: without one it would wait forever."""
    redirected = [name for name in ("stdin", "stdout", "stderr") if not _isatty(getattr(sys, name))]
    if redirected:
        which = redirected[0] + " is not one" if len(redirected) == 1 else \
            f"{', '.join(redirected[:-1])} and {redirected[-1]} are not terminals"
        raise UserError(
            f"`streamchat {command}` is a full-screen app and needs a terminal, but {which}; "
            "run it in a terminal, or use `streamchat run` for a headless session"
        )


def _isatty(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _load(args, model_id: str, dtype: str, max_new_tokens: int):
    """Load the model before the app opens, so a missing model, an unreachable hub or a missing GPU is a
    one-line error, and the hub's messages go to the terminal, not over the app."""
    from .cli import load_model
    from .config import SessionConfig
    from .context import model_context

    loaded = load_model(argparse.Namespace(**{**vars(args), "model": model_id, "dtype": dtype, "json": False}))
    context = model_context(loaded)
    if max_new_tokens >= context:
        raise UserError(
            f"--max-new-tokens {max_new_tokens} leaves no room for the video in {model_id}'s context of {context} tokens; "
            f"use a smaller value (default: {SessionConfig().max_new_tokens})"
        )
    return loaded


def _prepare_resume(args):
    """Everything `chat --resume NAME` can check before a model is loaded (the session, its latest
    snapshot's file, its video). Returns (model id, snapshot dtype, max_new_tokens)."""
    from .app.worker import check_resumable
    from .config import SessionConfig

    row, meta = check_resumable(args.resume, args.video)
    return row["model_id"], meta.get("dtype", "auto"), SessionConfig.from_dict(row["config"]).max_new_tokens


def _check_name_free(name: str | None) -> None:
    if name is None:
        return
    from .store import Store

    with Store() as store:
        try:
            store.get_session(name)
        except UserError:
            return
    raise UserError(
        f"a session named {name} already exists; pick another --name, or open that one with "
        f"`streamchat chat --resume {name}`"
    )


@contextlib.contextmanager
def _library_logs_to(path: Path):
    """While the app runs, transformers' and the hub's log lines (retries, warnings) go to `path`
    instead of their stderr handlers, which would draw them over the app."""
    import logging

    handler = logging.FileHandler(path, delay=True, encoding="utf-8")  # no file until a line comes
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers[:] = [handler]
        logger.propagate = False
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers[:] = handlers
            logger.propagate = propagate
        handler.close()


LIBRARY_LOGGERS = ("transformers", "huggingface_hub", "accelerate", "safetensors", "torch")


def _run(launch, keymap: dict[str, str]) -> int:
    from .app import ChatApp
    from .store import home

    app = ChatApp(launch, keymap=keymap)
    home().mkdir(parents=True, exist_ok=True)
    with _library_logs_to(home() / "app.log"):
        app.run()
    _goodbye(app.session_name)
    if app.session_name is None and app.state == "failed":
        return 1  # no session ever opened: the error was shown in the app
    return app.return_code or 0


def _goodbye(name: str | None) -> None:
    """After the app: which session this was and how to come back to it."""
    if name is None:
        return
    from .store import Store

    try:
        with Store() as store:
            snaps = store.snapshots(store.get_session(name)["id"])
    except UserError:
        print(f"session {name} is no longer in the store")
        return
    if snaps:
        print(f"session {name}: resume it with `streamchat chat --resume {name}`")
    else:
        print(f"session {name} is logged (`streamchat sessions show {name}`); it has no snapshot, so it cannot be resumed")


def _check_memory(loaded, source, config) -> None:
    """The memory policy resolved for the whole video now (one line, exit 2 if it cannot work), not in
    the app's worker, where it would open a dead app."""
    from .engine import StreamEngine

    fps = config.sampling.sampled_fps(source.info.native_fps)
    StreamEngine(loaded, config, fps).resolve_budget(len(source.plan), source.info.resized_height, source.info.resized_width)


def cmd_chat(args) -> int:
    from .app import Launch

    keymap = _keymap(args.keymap)
    if args.resume:
        model_id, dtype, max_new = _prepare_resume(args)
        _need_terminal("chat")
        loaded = _load(args, model_id, dtype, max_new)
        return _run(Launch(resume=args.resume, video=args.video, device=args.device, dtype=args.dtype,
                           realtime=args.realtime, loaded=loaded), keymap)
    if not args.video:
        raise UserError("give a VIDEO to chat about, or --resume NAME (`streamchat sessions list` shows them)")
    config = config_from(args)
    source = open_video(args.video, config)  # a bad file is a one-line error, before the app opens
    _check_name_free(args.name)
    _need_terminal("chat")
    loaded = _load(args, config.model, args.dtype, config.max_new_tokens)
    _check_memory(loaded, source, config)
    source.close()
    return _run(Launch(video=args.video, config=config, device=args.device, dtype=args.dtype, name=args.name,
                       realtime=args.realtime, loaded=loaded), keymap)


def demo_clip(seed: int, seconds: int) -> Path:
    """The demo's clip: generated scene `seed` (scenes.generate), written once into $STREAMCHAT_HOME/demo."""
    from .scenes import generate
    from .store import home

    clip = home() / "demo" / f"shapes-{seed}-{seconds}s.mp4"
    if not clip.exists():  # written aside, then renamed: an interrupted write never leaves a clip behind
        part = clip.with_name(clip.stem + ".part.mp4")
        generate(seed, seconds=float(seconds)).write(part, fps=24.0)
        part.replace(clip)
    return clip


def cmd_demo(args) -> int:
    from .app import Launch

    keymap = _keymap(args.keymap)
    if not 2 <= args.seconds <= 600:
        raise UserError(f"--seconds must be 2 to 600 (tiny-shapes was trained on 2 to 96); got {args.seconds}")
    config = config_from(args)
    _need_terminal("demo")
    clip = demo_clip(args.seed, args.seconds)
    loaded = _load(args, config.model, args.dtype, config.max_new_tokens)
    with open_video(str(clip), config) as source:
        _check_memory(loaded, source, config)
    note = NOTES.get(args.model)
    return _run(Launch(video=str(clip), config=config, device=args.device, dtype=args.dtype, note=note,
                       realtime=args.realtime, loaded=loaded), keymap)
