"""Command line: parse arguments, call the core, print text or one JSON document, map errors to exit codes.

Exit codes: 0 success, 2 bad input or usage (one line on stderr), 1 anything else (one line; the
traceback only with --debug).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from .errors import UserError

DESCRIPTION = "Chat with a video while it is being encoded into Qwen2.5-VL's KV cache."


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{message} (see `{self.prog} --help`)")


def add_video_options(p: argparse.ArgumentParser) -> None:
    from .video import Sampling

    d = Sampling()
    g = p.add_argument_group("video sampling")
    g.add_argument("--fps", type=float, default=None, help=f"frames per second to sample (default: {d.fps}, what Qwen2.5-VL saw in training)")
    g.add_argument("--stride", type=int, default=None, help="take every k-th decoded frame instead of --fps (default: off)")
    g.add_argument("--start", type=float, default=0.0, help="start at this second of the video (default: 0)")
    g.add_argument("--duration", type=float, default=None, help="seconds of video to use (default: to the end)")
    g.add_argument("--max-frames", type=int, default=None, help="sample at most this many frames (default: no limit)")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels, help=f"per-frame pixel budget, upper bound (default: {d.max_pixels})")
    g.add_argument("--min-pixels", type=int, default=d.min_pixels, help=f"per-frame pixel budget, lower bound (default: {d.min_pixels})")


def add_engine_options(p: argparse.ArgumentParser, history_default: str = "drop", model_default: str | None = None,
                       device_default: str = "auto") -> None:
    from .config import SessionConfig
    from .models import DEFAULT_MODEL

    d = SessionConfig()
    model_default = model_default or DEFAULT_MODEL
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=model_default, help=f"Hugging Face id, local directory, 'tiny-shapes' (built in: a toy trained on generated shapes scenes, answers their template questions), 'tiny-random' (built in, random weights) or 'random:qwen2.5-vl-3b' (also -7b, -32b, -72b: published architectures, random weights) (default: {model_default})")
    device_help = "auto = cuda if present" if device_default == "auto" else device_default
    g.add_argument("--device", default=device_default, help=f"cpu, cuda, cuda:N or auto (default: {device_help})")
    add_device_map_option(g)
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default: auto = bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--chunk-frames", type=int, default=d.chunk_frames, help=f"frames appended to the cache per step, even (default: {d.chunk_frames})")
    g.add_argument("--history", choices=["drop", "keep"], default=history_default, help=f"drop: roll each answer back; keep: answers stay as dialogue (default: {history_default})")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"longest answer in tokens (default: {d.max_new_tokens})")
    add_memory_options(p)


def add_device_map_option(g) -> None:
    g.add_argument("--device-map", default=None, metavar="auto|balanced|FILE.json",
                   help="spread the model over several devices through accelerate instead of --device: 'auto' or 'balanced' "
                        "(whole decoder layers balanced over the visible GPUs), or a JSON file {module: device} (cuda:N, N, cpu "
                        "or disk; cpu and disk parts are offloaded and run on the first GPU), optionally "
                        "{\"device_map\": {...}, \"main_device\": \"cpu\"} to run the cpu parts on the CPU (tiny-random and "
                        "random:<arch> only). Each layer's KV cache lives on its layer's device (default: off, one device)")


def add_memory_options(p: argparse.ArgumentParser) -> None:
    from .memory import MemoryConfig

    m = MemoryConfig()
    g = p.add_argument_group("memory (long videos)")
    g.add_argument("--memory", choices=["auto", "exact", "bounded"], default=m.mode,
                   help="exact: every token stays on the GPU, and a stream that would not fit is refused; bounded: a working "
                        "set on the GPU, every older page kept exactly in host memory or on disk and retrieved per question; "
                        f"auto: exact while the stream fits, bounded when it would not (default: {m.mode})")
    g.add_argument("--gpu-kv-budget", default=m.gpu_kv_budget,
                   help=f"KV cache on the GPU, in tokens (65536, 64k) or bytes (2GiB); bounded memory's working set, retrieved "
                        f"pages and the answer fit in it (default: {m.gpu_kv_budget} tokens)")
    g.add_argument("--host-kv-budget", default=m.host_kv_budget,
                   help=f"archived pages kept in host memory before they spill to disk in the session's folder (default: {m.host_kv_budget})")
    g.add_argument("--retrieve-tokens", type=int, default=m.retrieve_tokens,
                   help=f"bounded memory: archived tokens brought back for each question (default: {m.retrieve_tokens})")


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout and nothing else (default: text)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (default: one-line errors)")


def add_no_log_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--no-log", action="store_true", help=f"do not log {what} in the store (default: logged; `streamchat logs` shows it)")


def sampling_from(args):
    from .video import Sampling

    if args.fps is not None and args.stride is not None:
        raise UserError("give --fps or --stride, not both")
    fps = None if args.stride is not None else (args.fps if args.fps is not None else Sampling().fps)
    return Sampling(
        fps=fps,
        stride=args.stride,
        start=args.start,
        duration=args.duration,
        max_frames=args.max_frames,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )


def memory_from(args):
    from .memory import MemoryConfig

    return MemoryConfig(mode=args.memory, gpu_kv_budget=args.gpu_kv_budget, host_kv_budget=args.host_kv_budget,
                        retrieve_tokens=args.retrieve_tokens).validate()


def config_from(args):
    from .config import SessionConfig

    return SessionConfig(
        model=args.model,
        sampling=sampling_from(args),
        chunk_frames=args.chunk_frames,
        history=args.history,
        max_new_tokens=args.max_new_tokens,
        memory=memory_from(args),
    ).validate()


def tell_budget(args, budget) -> None:
    """Say on stderr (never on stdout, so --json stays one document) when auto memory chose bounded."""
    if budget.reason and not getattr(args, "json", False):
        sys.stderr.write(f"streamchat: {budget.reason}\n")


def open_video(path: str, config):
    """The video, opened before any model work; decord's own log lines (`ERROR opening: …`, written
    by its C++ code straight to file descriptor 2) are held back, so our one-line error comes alone."""
    from .video import VideoSource

    with native_stderr_held() as held:
        source = VideoSource(path, config.sampling)
    sys.stderr.write(held.text)  # opened: nothing failed, so nothing is hidden
    return source


class _Held:
    text = ""


@contextlib.contextmanager
def native_stderr_held():
    """File descriptor 2 goes to a temporary file inside the block (C/C++ libraries write there,
    not through sys.stderr); the caller decides whether to pass on what was written."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            held = _Held()
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            held.text = tmp.read().decode(errors="replace")


def warn(message: str | None) -> None:
    """One warning line on stderr (a file that decodes only in part is used, and says so), printed once
    the input has passed its checks, so that a refusal stays a single line."""
    if message:
        print(f"streamchat: warning: {message}", file=sys.stderr)


def check_context(loaded, source, config) -> None:
    """--max-new-tokens against the model's context, before any frame is encoded."""
    from .context import check_max_new_tokens, pair_tokens

    check_max_new_tokens(loaded, config, pair_tokens(loaded, source.info.resized_height, source.info.resized_width))


def load_model(args):
    """Load --model, saying so on a TTY (a hub model can take a while: download, or the hub's timeouts)."""
    from .models import load

    tell = sys.stderr.isatty() and not getattr(args, "json", False)
    if tell:
        sys.stderr.write(f"loading {args.model} …")
        sys.stderr.flush()
    try:
        from .models import parse_device_map

        device_map, main_device = parse_device_map(getattr(args, "device_map", None))
        spread = {} if device_map is None else {"device_map": device_map, "main_device": main_device}
        return load(args.model, device=args.device, dtype=args.dtype, **spread)
    finally:
        if tell:
            sys.stderr.write("\r" + " " * (len(args.model) + 12) + "\r")
            sys.stderr.flush()


def emit(args, doc: dict, text: str) -> None:
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))


def progress_for(args, total: int, label: str, unit: str = "frames"):
    """A progress bar on stderr: only on a TTY and never with --json."""
    from .progress import Progress

    return Progress(total, label, enabled=(not args.json) and sys.stderr.isatty(), unit=unit)


# --- commands -----------------------------------------------------------------------------------


def cmd_ask(args) -> int:
    from .metrics import gpu_memory
    from .session import frames_up_to
    from .stream import Stream

    config = config_from(args)
    question = args.question.strip()
    if not question:
        raise UserError("the question is empty; pass a question about the video in quotes")
    source = open_video(args.video, config)
    target = frames_up_to(source, args.at, flag=f"--at {args.at:g}" if args.at is not None else "--at")
    loaded = load_model(args)
    check_context(loaded, source, config)
    warn(source.warning)
    if args.mode == "streaming":
        stream = Stream(loaded, source, config, frames=target)
        tell_budget(args, stream.budget)
        bar = progress_for(args, target, "encoding")
        stream.encode_until(target, pad_tail=True, on_chunk=lambda c: (bar.update(c.frame_last + 1), warn(c.warning)))
        bar.close()
        ans = stream.engine.ask(question)
    else:  # the plain transformers path needs only the prompt's layout, no streaming engine
        from . import hf
        from .layout import Vocab, one_turn
        from .offline import answer_with_retry
        from .stream import read_frames

        unit = hf.vision_config(loaded.model).patch_size * hf.vision_config(loaded.model).spatial_merge_size
        vocab = Vocab(loaded.tokenizer, config.system_prompt)
        prompt = one_turn(vocab, target, source.info.resized_height // unit, source.info.resized_width // unit, question)
        fps = config.sampling.sampled_fps(source.info.native_fps)
        ans, attempts = answer_with_retry(loaded, prompt, lambda pos: read_frames(source, pos), fps, question, config.max_new_tokens, vocab)
        if ans is None:
            raise RuntimeError("offline mode ran out of memory at every stride: " + "; ".join(a.error or "" for a in attempts))
    doc = {
        "mode": args.mode,
        "video": str(source.info.path),
        "model": loaded.model_id,
        "at_s": args.at,
        "frames": ans.frames_seen,
        "memory": stream.budget.to_json() if args.mode == "streaming" else None,
        "devices": [str(d) for d in loaded.devices],
        "device_memory": gpu_memory(loaded.devices).get("devices"),  # per GPU, with several (--device-map)
        "last_frame_s": source.plan[ans.frames_seen - 1][1],  # the video second of the last frame it saw
        **source.info.to_json(),
        **ans.to_json(),
    }
    logged = ""
    if not args.no_log:
        doc["session"] = _log_ask(args, loaded, source, config, ans)
        logged = f"; logged as session {doc['session']}"
    text = (f"{ans.text}\n\n[{args.mode}: {ans.frames_seen} frames, cache {ans.cache_tokens} tokens, "
            f"TTFT {ans.ttft_s * 1000:.1f} ms, {ans.latency_s:.3f} s total{logged}]")
    emit(args, doc, text)
    return 0


def _log_ask(args, loaded, source, config, ans) -> str:
    """Log an `ask` as a session of one turn, with the exact prompt it saw, so `logs` shows it and
    `replay` can re-run it; returns the session's name."""
    from . import snapshots
    from .engine import segments_to_json
    from .store import Store
    from .video import sha256_file

    path = source.info.path.resolve()
    with Store() as store:
        row = store.create_session(video_path=path, video_sha256=sha256_file(path), model_id=loaded.model_id,
                                   config=config.to_dict(), history=config.history, versions=snapshots.versions(),
                                   config_fingerprint=loaded.fingerprint)
        attempt = store.start_attempt(row["id"], "ask")
        store.log_turn(row["id"], mode=args.mode, attempt_id=attempt["id"], at_s=args.at, **ans.turn_fields(),
                       extra={"prompt": segments_to_json(ans.prompt), "history": config.history,
                              "dtype": snapshots.dtype_name(loaded.dtype), "device": str(loaded.device), "command": "ask"})
    return row["name"]


def cmd_compare(args) -> int:
    from .compare import run_compare, text_report, write_report

    config = config_from(args)
    if not args.question.strip():
        raise UserError("the question is empty; pass --question with a question about the video")
    source = open_video(args.video, config)
    loaded = load_model(args)
    check_context(loaded, source, config)
    warn(source.warning)
    bar = progress_for(args, len(source.plan), "encoding")
    report = run_compare(loaded, source, config, args.question, on_chunk=lambda c: bar.update(c.frame_last + 1), on_phase=bar.phase)
    bar.close()
    written = {}
    if args.report:
        image = write_report(report, Path(args.report))
        written = {"report": args.report, "chart": str(image) if image else None}
    if not args.no_log:
        report["run_id"], written["database"] = _log_run("compare", report)
    report["written"] = written
    emit(args, report, text_report(report))
    return 0


def _log_run(kind: str, report: dict) -> tuple[str, str]:
    """Every figure a command prints goes into the store as well; returns the run's id and where
    the database is (`logs --runs` shows the run)."""
    from .store import Store

    with Store() as store:
        return store.log_run(kind, report), str(store.path)


def cmd_make_clip(args) -> int:
    from .clips import make_clip

    if args.width % 2 or args.height % 2:
        raise UserError(f"--width and --height must be even; got {args.width}x{args.height}")
    if args.seconds <= 0 or args.fps <= 0:
        raise UserError("--seconds and --fps must be positive")
    if args.seed is not None and args.scene == "default":
        raise UserError("--seed goes with --scene shapes; add --scene shapes, or leave --seed out")
    out = Path(args.path)  # checked before (preflight): writable, and new unless --force
    doc = {"path": str(out), "seconds": args.seconds, "fps": args.fps, "size": [args.width, args.height], "scene": args.scene}
    if args.scene == "shapes":
        from .scenes import generate

        if args.width < 16 or args.height < 16:
            raise UserError(f"--scene shapes needs at least 16x16 pixels; got {args.width}x{args.height}")
        scene = generate(args.seed or 0, seconds=args.seconds, width=args.width, height=args.height)
        scene.write(out, fps=args.fps)
        truth = out.with_name(out.name + ".json")  # the ground truth beside the clip: what is where, when
        truth.write_text(json.dumps(scene.to_json(), indent=2) + "\n")
        doc.update(seed=scene.seed, truth=str(truth), ground_truth=scene.to_json())
    else:
        make_clip(out, seconds=args.seconds, fps=args.fps, width=args.width, height=args.height)
    emit(args, doc, str(out))
    return 0


# Commands that only read the store: their parser is built without the model options, whose
# defaults import torch and transformers (seconds), so they start in a fraction of a second.
LIGHT_COMMANDS = ("sessions", "logs", "completion")


def build_parser(light: bool = False) -> argparse.ArgumentParser:
    """The whole CLI; `light`: only LIGHT_COMMANDS (same options, nothing heavy imported)."""
    parser = Parser(prog="streamchat", description=DESCRIPTION,
                    epilog="Run `streamchat COMMAND --help` for a command's options. With no arguments, this help (exit code 0).")
    parser.add_argument("--version", action="version", version=f"streamchat {__import__('streamchat').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    if light:
        for register in _extra_commands():
            register(sub, light=True)
        return parser

    p = sub.add_parser("ask", help="answer one question about a video", description="Encode the video up to --at and answer one question.")
    p.add_argument("video", help="video file")
    p.add_argument("question", help="the question, in quotes")
    p.add_argument("--at", type=float, default=None, help="answer with every sampled frame whose timestamp is up to this second, as `run --ask T:Q` does (default: the whole video)")
    p.add_argument("--mode", choices=["streaming", "offline"], default="streaming", help="streaming: chunked cache; offline: one whole-video prefill (default: streaming)")
    add_no_log_option(p, "the question and answer (a session of one turn)")
    add_video_options(p)
    add_engine_options(p)
    add_output_options(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("compare", help="run streaming and offline on the same frames and compare",
                       description="Answer the same question in streaming and offline mode on the same frames; report answers, logits, latency and memory.")
    p.add_argument("video", help="video file")
    p.add_argument("--question", "-q", default="What is happening in the video?", help="the question (default: 'What is happening in the video?')")
    p.add_argument("--report", default=None, help="also write a Markdown report here, with a PNG chart beside it; the folder is created (default: none)")
    add_no_log_option(p, "the comparison")
    add_video_options(p)
    add_engine_options(p)
    add_output_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("make-clip", help="write a short synthetic clip (no download)", description="Write a synthetic H.264 clip with moving shapes, for trying streamchat offline.")
    p.add_argument("path", help="where to write the .mp4 (its folder is created)")
    p.add_argument("--force", action="store_true", help="overwrite PATH if it exists (default: refuse)")
    p.add_argument("--seconds", type=float, default=4.0, help="length (default: 4)")
    p.add_argument("--fps", type=float, default=24.0, help="frame rate (default: 24)")
    p.add_argument("--width", type=int, default=224, help="width in pixels, even (default: 224)")
    p.add_argument("--height", type=int, default=224, help="height in pixels, even (default: 224)")
    p.add_argument("--scene", choices=["default", "shapes"], default="default",
                   help="default: a moving square and disc with the frame number on top; shapes: a seeded scene of moving "
                        "coloured shapes, flashes and a word, its ground truth written beside it as PATH.json (default: default)")
    p.add_argument("--seed", type=int, default=None, help="which shapes scene, with --scene shapes (default: 0)")
    add_output_options(p)
    p.set_defaults(func=cmd_make_clip)

    for register in _extra_commands():
        register(sub)
    _model_default_from_env(parser)
    return parser


def _extra_commands():
    """Commands that live in their own modules: each exposes register(sub); those that also have
    light commands take register(sub, light=True) and then register only those."""
    import functools
    import importlib
    import inspect

    for name in ("streamchat.cli_sessions", "streamchat.cli_app", "streamchat.bench", "streamchat.evaluate", "streamchat.cli_completion"):
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        if "light" in inspect.signature(mod.register).parameters:
            yield mod.register
        else:
            yield functools.partial(_heavy_only, mod.register)


def _heavy_only(register, sub, light: bool = False) -> None:
    if not light:
        register(sub)


MODEL_ENV = "STREAMCHAT_MODEL"


def _model_default_from_env(parser: argparse.ArgumentParser) -> None:
    """$STREAMCHAT_MODEL replaces the built-in default --model (not a command's own default, such as
    demo's tiny-shapes), so that --model need not be typed every time."""
    from .models import DEFAULT_MODEL

    model = os.environ.get(MODEL_ENV, "").strip()
    if not model:
        return
    for p in subparsers(parser).values():
        for action in p._actions:
            if action.dest == "model" and action.default == DEFAULT_MODEL:
                action.default = model
                action.help = (action.help or "").replace(f"(default: {DEFAULT_MODEL})", f"(default: {model}, from ${MODEL_ENV})")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Command name -> its parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _warn_about_old_store() -> None:
    """Before platformdirs, the store was ./sessions: say where it is now rather than look empty."""
    from .store import DB_NAME, home_path

    old = Path("sessions") / DB_NAME
    if not os.environ.get("STREAMCHAT_HOME") and old.exists() and old.resolve() != (home_path() / DB_NAME).resolve():
        print(f"streamchat: warning: the store is now {home_path()}; {old} (from an older streamchat) is not read: "
              f"set STREAMCHAT_HOME=sessions to use it", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from . import preflight

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug = "--debug" in argv or os.environ.get("STREAMCHAT_DEBUG") == "1"
    try:
        if not argv:
            build_parser().print_help()
            return 0
        light = argv[0] in LIGHT_COMMANDS
        args = build_parser(light=light).parse_args(preflight.join_dash_values(argv))
        preflight.check(args)
        _warn_about_old_store()
        if not debug and not light:
            from . import hf

            hf.quiet()
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            raise
        print(f"streamchat: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamchat: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"streamchat: error: {type(exc).__name__}: {msg} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
