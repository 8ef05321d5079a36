"""Replay: re-run every logged streaming turn of a session the offline way and compare.

Each streaming turn was logged with the exact prompt it saw (segments: token ids and plan frame
positions). Offline gets that same prompt in one prefill, so on the CPU in float32 the answers must be
identical token for token; the report says where they first differ, and puts TTFT, latency and
memory side by side with their ratios (offline / streaming: how much slower offline is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .config import SessionConfig
from .engine import Answer
from .errors import UserError
from .layout import Vocab, segments_from_json
from .models import Loaded
from .offline import answer_with_retry
from .session import check_video
from .store import Store, new_id
from .stream import read_frames
from .video import VideoSource


def _ratio(offline: float | None, streaming: float | None) -> float | None:
    return float(f"{offline / streaming:.4g}") if offline is not None and streaming else None


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix of the other), None if equal."""
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    return first


def top_logit_diff(first_top: list, offline: Answer) -> float | None:
    """max |Δ| of the first step's logits over the streaming turn's logged top ids."""
    if not first_top or offline.first_logits is None:
        return None
    logits = offline.first_logits.float()
    return max(abs(float(logits[i]) - v) for i, v in first_top)


def _default_loader(model_id: str, dtype: str | None) -> Loaded:
    from .models import load

    return load(model_id, dtype=dtype)


def replay_session(
    name: str,
    *,
    loaded: Loaded | None = None,
    load_model: Callable[[str, str | None], Loaded] | None = None,
    video: str | None = None,
    store: Store | None = None,
    on_turn: Callable[[dict], None] | None = None,
) -> dict:
    """Replay session `name`'s streaming turns offline, log the offline turns (replay_of) and a run; return the report."""
    owns = store is None
    store = store or Store()
    try:
        row = store.get_session(name)
        turns = store.turns(row["id"], mode="streaming")
        if not turns:
            raise UserError(f"session {row['name']} has no streaming turns to replay; ask something with `streamchat resume {row['name']} --ask T:QUESTION`")
        video_path = check_video(row, video)
        config = SessionConfig.from_dict(row["config"])
        dtype = next((t["extra"].get("dtype") for t in turns if t["extra"].get("dtype")), None)
        if loaded is None:
            loaded = (load_model or _default_loader)(row["model_id"], dtype)
        if row.get("config_fingerprint") and row["config_fingerprint"] not in (loaded.fingerprint, loaded.legacy_fingerprint):
            raise UserError(
                f"session {row['name']} was recorded with other weights or architecture of {row['model_id']} "
                f"(fingerprint {row['config_fingerprint']}, loaded {loaded.fingerprint}); a replay would compare different models: "
                "load the checkpoint it was recorded with"
            )
        source = VideoSource(video_path, config.sampling)
        vocab = Vocab(loaded.tokenizer, config.system_prompt)  # offline needs the layout, not a stream
        fps = config.sampling.sampled_fps(source.info.native_fps)
        out = []
        run_id = new_id()  # the offline turns point at this replay's run row, logged at the end
        try:
            for t in turns:
                entry = replay_turn(store, row, t, loaded, source, fps, vocab, config, run_id=run_id)
                out.append(entry)
                if on_turn is not None:
                    on_turn(entry)
        finally:
            source.close()
        done = [e for e in out if e["identical"] is not None]
        report = {
            "session": row["name"],
            "against": "offline",
            "video": str(video_path),
            "model": loaded.model_id,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).replace("torch.", ""),
            "history": config.history,
            "all_identical": bool(done) and all(e["identical"] for e in done),
            "replayed": len(done),
            "skipped": len(out) - len(done),
            "turns": out,
        }
        report["run_id"] = store.log_run("replay", report, session_id=row["id"], run_id=run_id)
        return report
    finally:
        if owns:
            store.close()


def replay_turn(store: Store, session: dict, turn: dict, loaded: Loaded, source: VideoSource, fps: float, vocab: Vocab,
                config: SessionConfig, run_id: str | None = None) -> dict:
    """One streaming turn against offline on the same prompt; the offline turn is logged with replay_of."""
    streaming = {
        "token_ids": turn["token_ids"],
        "answer": turn["answer"],
        "ttft_s": None if turn["ttft_ms"] is None else turn["ttft_ms"] / 1000,
        "latency_s": None if turn["latency_ms"] is None else turn["latency_ms"] / 1000,
        "peak_bytes": turn["peak_bytes"],
        "cache_tokens": turn["cache_tokens"],
    }
    entry = {
        "turn_id": turn["id"],
        "at_s": turn["at_s"],
        "frames_seen": turn["frames_seen"],
        "question": turn["question"],
        "streaming": streaming,
        "offline": None,
        "identical": None,
        "first_divergence": None,
    }
    prompt_json = turn["extra"].get("prompt")
    if not prompt_json:
        entry["skipped"] = "no prompt was logged with this turn (logged by an older streamchat)"
        return entry
    prompt = segments_from_json(prompt_json)
    ans, attempts = answer_with_retry(loaded, prompt, lambda positions: read_frames(source, positions), fps, turn["question"],
                                      config.max_new_tokens, vocab)
    entry["attempts"] = [a.to_json() for a in attempts]
    if ans is None:
        entry["skipped"] = "offline ran out of memory at every stride"
        entry["identical"] = False
        return entry
    stride = attempts[-1].stride_factor
    first = first_divergence(turn["token_ids"], ans.token_ids)
    entry["identical"] = first is None and stride == 1
    entry["first_divergence"] = first
    entry["stride_factor"] = stride
    entry["max_top_logit_diff"] = top_logit_diff(turn["extra"].get("first_top"), ans)
    entry["offline"] = {
        "token_ids": ans.token_ids,
        "answer": ans.text,
        "ttft_s": round(ans.ttft_s, 6),
        "latency_s": round(ans.latency_s, 6),
        "prefill_s": round(ans.prefill_s or 0.0, 6),
        "peak_bytes": ans.peak_bytes,
        "prompt_tokens": ans.cache_tokens,
    }
    entry["ratios"] = {  # offline / streaming
        "ttft": _ratio(ans.ttft_s, streaming["ttft_s"]),
        "latency": _ratio(ans.latency_s, streaming["latency_s"]),
        "peak_memory": _ratio(ans.peak_bytes, streaming["peak_bytes"]),
    }
    entry["offline_turn_id"] = store.log_turn(
        session["id"],
        mode="offline",
        replay_of=turn["id"],
        run_id=run_id,
        at_s=turn["at_s"],
        **ans.turn_fields(),
        extra={
            "prefill_ms": (ans.prefill_s or 0.0) * 1000,
            "stride_factor": stride,
            "attempts": entry["attempts"],
            "identical": entry["identical"],
            "first_divergence": first,
        },
    )
    return entry


# --- reports ------------------------------------------------------------------------------------


def _ms(s: float | None) -> str:
    return "–" if s is None else f"{s * 1000:.1f} ms"


def _x(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def _mib(b: int | None) -> str:
    """0 bytes is what the CPU reports: no GPU memory to measure."""
    if b is None:
        return "–"
    return "n/a" if b == 0 else f"{b / 2**20:.1f} MiB"


def _at(e: dict) -> str:
    return "end" if e["at_s"] is None else f"{e['at_s']:.2f} s"


RATIO_NOTE = "× is offline / streaming: above 1, offline took that many times longer (or more memory); under 1, offline was the faster"


def _verdict(e: dict) -> str:
    if e["identical"] is None:
        return f"skipped ({e.get('skipped', '')})"
    if e["identical"]:
        return "identical"
    return f"differs at token {e['first_divergence']}" + (f" (offline stride ×{e['stride_factor']})" if e.get("stride_factor", 1) != 1 else "")


def text_report(r: dict) -> str:
    lines = [
        f"replay of session {r['session']} against offline — {r['model']} on {r['device']} ({r['dtype']}), history {r['history']}",
        f"{_n(r['replayed'], 'turn')} replayed, {r['skipped']} skipped; all identical: {r['all_identical']}"
        + (f"; logged as run {r['run_id']}" if r.get("run_id") else "")
        + (f" in {r['database']}" if r.get("database") else ""),
        RATIO_NOTE,
        "",
    ]
    for i, e in enumerate(r["turns"], 1):
        s, o, ratio = e["streaming"], e["offline"] or {}, e.get("ratios", {})
        lines += [
            f"{i}. [{_at(e)}, {e['frames_seen']} frames] {e['question']}",
            f"   {_verdict(e)}",
            f"   TTFT     streaming {_ms(s['ttft_s']):>10}  offline {_ms(o.get('ttft_s')):>10}  {_x(ratio.get('ttft'))}",
            f"   latency  streaming {_ms(s['latency_s']):>10}  offline {_ms(o.get('latency_s')):>10}  {_x(ratio.get('latency'))}",
            f"   peak     streaming {_mib(s['peak_bytes']):>10}  offline {_mib(o.get('peak_bytes')):>10}  {_x(ratio.get('peak_memory'))}",
        ]
    if r.get("report"):
        lines += ["", f"report: {r['report']['markdown']}" + (f", chart: {r['report']['png']}" if r["report"].get("png") else "")]
    return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def markdown_report(r: dict, image: str | None = None) -> str:
    out = [
        f"# Replay of session {r['session']} against offline",
        "",
        f"- video: `{r['video']}`",
        f"- model: `{r['model']}` on {r['device']} ({r['dtype']}), history {r['history']}",
        f"- {_n(r['replayed'], 'turn')} replayed, {r['skipped']} skipped; **all identical: {r['all_identical']}**",
        f"- {RATIO_NOTE}",
        *([f"- run id: `{r['run_id']}` (`streamchat logs --run {r['run_id']}` shows its offline turns)"] if r.get("run_id") else []),
        "",
        "| # | at | frames | question | result | TTFT streaming | TTFT offline | × | latency streaming | latency offline | × | peak streaming | peak offline | × |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, e in enumerate(r["turns"], 1):
        s, o, ratio = e["streaming"], e["offline"] or {}, e.get("ratios", {})
        q = e["question"].replace("|", "\\|")
        out.append(
            f"| {i} | {_at(e)} | {e['frames_seen']} | {q} | {_verdict(e)} | "
            f"{_ms(s['ttft_s'])} | {_ms(o.get('ttft_s'))} | {_x(ratio.get('ttft'))} | "
            f"{_ms(s['latency_s'])} | {_ms(o.get('latency_s'))} | {_x(ratio.get('latency'))} | "
            f"{_mib(s['peak_bytes'])} | {_mib(o.get('peak_bytes'))} | {_x(ratio.get('peak_memory'))} |"
        )
    out += ["", "## Answers"]
    for i, e in enumerate(r["turns"], 1):
        out += ["", f"### {i}. {e['question']}", "", f"- streaming: {e['streaming']['answer']!r}"]
        if e["offline"]:
            out.append(f"- offline: {e['offline']['answer']!r}")
    if image:
        out += ["", f"![offline time to first token against prompt size]({image})"]
    return "\n".join(out) + "\n"


def write_report(r: dict, path: Path) -> Path | None:
    """Markdown at `path`, with a PNG of offline TTFT against prompt size beside it."""
    from .plots import ttft_plot

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    points = [(e["offline"]["prompt_tokens"], e["offline"]["ttft_s"] * 1000) for e in r["turns"] if e["offline"]]
    image = ttft_plot(points, path.with_suffix(".png")) if points else None
    path.write_text(markdown_report(r, image.name if image else None))
    return image
