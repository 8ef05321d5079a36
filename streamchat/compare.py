"""Streaming against offline on the same frames: answers, logits, latency, memory; text/Markdown/JSON."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import SessionConfig
from .engine import Answer, ChunkStats
from .metrics import gpu_memory, mib, reset_peak
from .models import Loaded
from .layout import frame_count
from .offline import answer_with_retry
from .stream import Stream
from .video import VideoSource


def match(a: Answer, b: Answer | None) -> dict:
    """identical token ids?, index of the first differing token, max |Δ| of the first step's logits, and
    (b offline) b's top-1 minus top-2 logit where they part: a near-tie there is a rounding call."""
    if b is None:
        return {"identical": False, "first_divergence": 0, "max_logit_diff": None, "margin_at_divergence": None}
    first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
    if first is None and len(a.token_ids) != len(b.token_ids):
        first = min(len(a.token_ids), len(b.token_ids))
    diff = None
    if a.first_logits is not None and b.first_logits is not None:
        diff = float((a.first_logits.float() - b.first_logits.float()).abs().max())
    margin = b.margins[first] if first is not None and first < len(b.margins) else None
    return {"identical": first is None, "first_divergence": first, "max_logit_diff": diff, "margin_at_divergence": margin}


def run_compare(loaded: Loaded, source: VideoSource, config: SessionConfig, question: str, at: float | None = None,
                on_chunk=None, on_phase=None) -> dict:
    """Encode the frames up to `at` chunk by chunk and ask; then ask offline with the same prompt.
    `on_phase(text)` is told when the streaming answer and the offline run start (for a progress line)."""
    on_phase = on_phase or (lambda text: None)
    target = source.frames_until(at) if at is not None else len(source.plan)
    stream = Stream(loaded, source, config, frames=target)
    dev = loaded.device
    reset_peak(loaded.devices)
    chunks: list[ChunkStats] = stream.encode_until(target, pad_tail=True, on_chunk=on_chunk)
    encode_peak = gpu_memory(loaded.devices)["peak_bytes"]
    after_encode = gpu_memory(loaded.devices)["allocated_bytes"]
    on_phase("streaming: answering on the cache")
    s_ans = stream.engine.ask(question)
    cache_bytes = chunks[-1].cache_bytes if chunks else 0
    stream.engine.reset()  # frees the streaming cache, its graphs and archive before offline runs
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    on_phase(f"offline: one prefill of the whole prompt ({s_ans.cache_tokens} tokens), then the answer")
    o_ans, attempts = answer_with_retry(
        loaded, s_ans.prompt, stream.read_frames, stream.fps, s_ans.question, config.max_new_tokens, stream.engine.vocab
    )
    report = {
        "video": str(source.info.path),
        **source.info.to_json(),
        "model": loaded.model_id,
        "device": str(dev),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "sampling": {
            "native_fps": source.info.native_fps,
            "sampled_fps": stream.fps,
            "size": [source.info.resized_width, source.info.resized_height],
            "chunk_frames": config.chunk_frames,
            "history": config.history,
        },
        "question": s_ans.question,
        "memory": stream.budget.to_json(),
        "streaming": {
            **s_ans.to_json(),
            "frames": frame_count(s_ans.prompt),  # the same count as offline's: distinct frames, no pad
            "chunks": len(chunks),
            "encode_s": round(sum(c.encode_s for c in chunks), 6),
            "vision_s": round(sum(c.vision_s for c in chunks), 6),
            "cache_bytes": cache_bytes,
            "encode_peak_bytes": encode_peak,
            "allocated_after_encode_bytes": after_encode,
            "per_chunk": [
                {"cache_tokens": c.cache_tokens, "encode_ms": round(c.encode_s * 1000, 3), "tokens": c.tokens}
                for c in chunks
            ],
        },
        "offline": None,
        "attempts": [a.to_json() for a in attempts],
        "match": match(s_ans, o_ans),
    }
    if o_ans is not None:
        report["offline"] = {
            **o_ans.to_json(),
            "frames": frame_count(o_ans.prompt),
            "prefill_s": round(o_ans.prefill_s or 0.0, 6),
        }
        o = report["offline"]
        st = report["streaming"]
        report["analysis"] = {
            "ttft_speedup": round(o["ttft_s"] / st["ttft_s"], 2) if st["ttft_s"] else None,
            "latency_speedup": round(o["latency_s"] / st["latency_s"], 2) if st["latency_s"] else None,
            "peak_memory_delta_bytes": o["peak_bytes"] - max(st["peak_bytes"], encode_peak),
        }
    return report


def _fmt_s(x) -> str:
    return "—" if x is None else f"{x:.3f} s"


def _gpu_mib(r: dict, n: int | None) -> str:
    """GPU memory in MiB; the CPU has no such figure (its counters read 0)."""
    if n is None:
        return "—"
    return "n/a on the CPU" if r["device"] == "cpu" else f"{mib(n)} MiB"


def _speedup(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x}x" + (" (under 1: offline was faster here)" if x < 1 else "")


SPEEDUP_NOTE = "speedup = offline time / streaming time"


def _memory_line(memory: dict | None, st: dict) -> str:
    """Which memory policy the streaming side ran under; bounded: what its agreement with offline measures."""
    if not memory or memory["mode"] == "exact":
        return "  memory exact: every token in the cache, the same computation as offline"
    spans = st.get("retrieved") or []
    return (f"  memory bounded: a working set of {memory['working_tokens']:,} tokens and {len(spans)} archived span(s) "
            f"recalled for the question, so the agreement below measures the policy against the exact whole video")


def text_report(r: dict) -> str:
    st, of, m = r["streaming"], r["offline"], r["match"]
    smp = r["sampling"]
    lines = [
        f"streamchat compare — {r['video']}",
        f"model {r['model']} on {r['device']} ({r['dtype']})"
        + ("  [random weights: answers are noise; compare the tokens and logits]" if "random" in r["model"] else ""),
        "",
        "Frame sampling",
        f"  native {smp['native_fps']:.3f} fps -> {smp['sampled_fps']:.3f} fps, {smp['size'][0]}x{smp['size'][1]}, "
        f"chunks of {smp['chunk_frames']} frames",
        f"  streaming frames {st['frames']}   offline frames {of['frames'] if of else '—'}",
        "",
        "Encoding",
        f"  streaming: {st['chunks']} chunks, {st['encode_s']:.3f} s total ({st['vision_s']:.3f} s vision)",
        f"  offline:   prefill {_fmt_s(of['prefill_s'] if of else None)}",
        "",
        "QA latency                 streaming      offline",
        f"  TTFT                   {st['ttft_s']:>10.4f} s  {_fmt_s(of['ttft_s'] if of else None):>11}",
        f"  total                  {st['latency_s']:>10.4f} s  {_fmt_s(of['latency_s'] if of else None):>11}",
        f"  new tokens             {st['new_tokens']:>12}  {of['new_tokens'] if of else '—':>11}",
        "",
        "Memory and cache",
        _memory_line(r.get("memory"), st),
        f"  cache tokens {st['cache_tokens']}, cache size {mib(st['cache_bytes'])} MiB",
        f"  streaming peak {_gpu_mib(r, max(st['peak_bytes'], st['encode_peak_bytes']))}, "
        f"allocated after encode {_gpu_mib(r, st['allocated_after_encode_bytes'])}",
        f"  offline peak {_gpu_mib(r, of['peak_bytes'] if of else None)}",
        "",
        "Answers",
        f"  Q: {r['question']}",
        f"  streaming: {st['answer']!r}",
        f"  offline:   {of['answer']!r}" if of else "  offline:   (no answer: every attempt failed)",
        "",
        "Attempts (offline)",
        *[
            f"  stride x{a['stride_factor']}: {a['frames']} frames, {'ok' if a['ok'] else a['error']}"
            for a in r["attempts"]
        ],
        "",
        "Analysis",
        f"  identical: {m['identical']}   first divergence: {m['first_divergence']}   "
        f"max first-step logit diff: {m['max_logit_diff']}",
    ]
    if "analysis" in r:
        a = r["analysis"]
        memory = (
            "GPU memory n/a on the CPU" if r["device"] == "cpu"
            else f"offline peak memory {'+' if a['peak_memory_delta_bytes'] >= 0 else ''}{mib(a['peak_memory_delta_bytes'])} MiB vs streaming"
        )
        lines.append(f"  TTFT speedup {_speedup(a['ttft_speedup'])}, latency speedup {_speedup(a['latency_speedup'])}, {memory}")
        lines.append(f"  ({SPEEDUP_NOTE})")
    written = [f"{k} {v}" for k, v in (r.get("written") or {}).items() if v]
    if written:
        lines += ["", "Written: " + ", ".join(written)]
    return "\n".join(lines)


def markdown_report(r: dict, image: str | None = None) -> str:
    st, of, m = r["streaming"], r["offline"], r["match"]
    rows = [
        ("frames", st["frames"], of["frames"] if of else "—"),
        ("encode / prefill", f"{st['encode_s']:.3f} s", f"{of['prefill_s']:.3f} s" if of else "—"),
        ("TTFT", f"{st['ttft_s']:.4f} s", f"{of['ttft_s']:.4f} s" if of else "—"),
        ("QA latency", f"{st['latency_s']:.4f} s", f"{of['latency_s']:.4f} s" if of else "—"),
        ("new tokens", st["new_tokens"], of["new_tokens"] if of else "—"),
        ("cache tokens", st["cache_tokens"], of["cache_tokens"] if of else "—"),
        ("peak memory", _gpu_mib(r, max(st['peak_bytes'], st['encode_peak_bytes'])), _gpu_mib(r, of['peak_bytes'] if of else None)),
    ]
    out = [
        "# streamchat compare",
        "",
        f"- video: `{r['video']}`",
        f"- model: `{r['model']}` on {r['device']} ({r['dtype']})",
        f"- sampling: {r['sampling']['sampled_fps']:.3f} fps, {r['sampling']['size'][0]}x{r['sampling']['size'][1]}, "
        f"chunks of {r['sampling']['chunk_frames']} frames",
        f"- cache size: {mib(st['cache_bytes'])} MiB",
        "",
        "| | streaming | offline |",
        "| --- | --- | --- |",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"**Question:** {r['question']}",
        "",
        f"- streaming: {st['answer']!r}",
        f"- offline: {of['answer']!r}" if of else "- offline: no answer (every attempt failed)",
        "",
        f"**Match:** identical = {m['identical']}, first divergence = {m['first_divergence']}, "
        f"max first-step logit diff = {m['max_logit_diff']}",
        "",
        "**Offline attempts:** "
        + "; ".join(f"stride x{a['stride_factor']} ({a['frames']} frames): {'ok' if a['ok'] else a['error']}" for a in r["attempts"]),
    ]
    if "analysis" in r:
        a = r["analysis"]
        memory = ("GPU memory n/a on the CPU." if r["device"] == "cpu"
                  else f"offline peak memory {mib(a['peak_memory_delta_bytes'])} MiB above streaming.")
        out += ["", f"**Analysis:** TTFT speedup {_speedup(a['ttft_speedup'])}, latency speedup {_speedup(a['latency_speedup'])} "
                f"({SPEEDUP_NOTE}); {memory}"]
    if image:
        out += ["", f"![encode time per chunk against cache length]({image})"]
    return "\n".join(out) + "\n"


def write_report(r: dict, path: Path) -> Path | None:
    """Markdown at `path`, with a PNG of encode time against cache length beside it."""
    from .plots import encode_plot

    png = path.with_suffix(".png")
    points = [(c["cache_tokens"], c["encode_ms"]) for c in r["streaming"]["per_chunk"]]
    image = encode_plot(points, png) if points else None
    path.write_text(markdown_report(r, image.name if image else None))
    return image
