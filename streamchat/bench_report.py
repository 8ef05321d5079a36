"""`streamchat bench`'s text table and Markdown report (the figures come from bench.run_bench)."""

from __future__ import annotations

from pathlib import Path


def _f(x, fmt: str = ".1f", unit: str = "") -> str:
    return "—" if x is None else f"{x:{fmt}}{unit}"


def _gib(x) -> str:
    return _f(None if x is None else x / 2**30, ".2f", " GiB")


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]


def _pcts(p: dict, fmt: str = ".1f") -> str:
    return f"p50 {_f(p['p50'], fmt)}, p90 {_f(p['p90'], fmt)}, p99 {_f(p['p99'], fmt)}, max {_f(p['max'], fmt)}"


def _whole_lines(w: dict | None, label: str) -> list[str]:
    if w is None:
        return [label, "  not run (--no-offline)"]
    if not w["ok"]:
        return [label, f"  failed: {w['error']}"]
    return [label, f"  {w['prompt_tokens']} tokens; host preprocessing {w['preprocess_s']:.3f} s "
            + (f"(inside the prefill's timer), GPU prefill {w['gpu_prefill_s']:.3f} s (prefill {w['prefill_s']:.3f} s minus preprocessing)"
               if "gpu_prefill_s" in w else f"(before the timer), GPU prefill {w['prefill_s']:.3f} s (vision tower {w['vision_s']:.3f} s of it)"),
            f"  TTFT {w['ttft_s']:.3f} s, decode {_f(w['decode_ms_per_token'], '.2f', ' ms/token')}"
            + (" (median step)" if "vision_s" in w else "")
            + f", peak allocated {_gib(w['peak_bytes'])}, max reserved {_gib(w['max_reserved_bytes'])}"]


def _agreement_line(ag: dict | None, other: str) -> list[str]:
    if ag is None:
        return [f"  vs {other}: — (no answer)"]
    out = [f"  vs {other}: tokens identical {'yes' if ag['identical'] else 'no'}, first divergence {_f(ag['first_divergence'], 'd')}, "
           f"max first-step logit diff {_f(ag['max_logit_diff'], '.3g')}"]
    if ag.get("margin_at_divergence") is not None:
        out.append(f"    where they part, {other}'s top two logits were {ag['margin_at_divergence']:.3g} apart "
                   "(a gap under the logit differences above is a rounding call, not a different computation)")
    return out


def text_table(r: dict) -> str:
    c, st, of, fa, fl, ra = r["config"], r["streaming"], r["offline"], r.get("fair"), r["floors"], r["rates"]
    mem = r.get("memory") or {}
    bounded = c["memory"]["mode"] == "bounded"
    out = [
        f"streamchat bench — {c['model']} on {c['device']} ({c['device_name']}), {c['dtype']}"
        + (f"; layers spread over {', '.join(c['devices'])}" if len(c.get("devices") or []) > 1 else ""),
        f"  {c['frames']} synthetic frames of {c['width']}x{c['height']}, chunks of {c['chunk_frames']}, positions at "
        f"{c['fps']:g} fps, {c['max_new_tokens']} new tokens; cuDNN SDPA {'on' if c['cudnn_sdp_streaming'] else 'off'} for streaming"
        + (f", {'on' if of['cudnn_sdp'] else 'off'} for the stock whole-video path (torch's setting before the engine ran)" if of else ""),
        f"  warmup: {r['warmup']['warms'] + ' (' + _f(r['warmup']['s'], '.2f', ' s') + '); ' + r['warmup']['whole_video'] if r['warmup']['ran'] else 'off'}",
        f"  memory: {c['memory']['mode']}, GPU KV budget {c['memory']['gpu_tokens']:,} tokens"
        + (f" (working set {c['memory']['working_tokens']:,} tokens: streaming is not the whole-video computation, so the "
           f"agreement below measures the policy; the comparison's default is --memory exact)" if bounded else ""),
        f"  cache sized for the whole video and question graphs captured before the first chunk "
        f"(StreamEngine.plan, as at load): {_f(r['warmup'].get('plan_cache_s'), '.2f', ' s')}",
        "",
    ]
    out += _whole_lines(of, "Whole video, stock transformers (one model(...) prefill with sdpa, the vision tower looping over its "
                            "windows in Python, the stock cache; then greedy)")
    out += [""] + _whole_lines(fa, "Whole video on streaming's kernels (the same prompt in one prefill: varlen vision windows, "
                                   "streamchat's attention, the cache sized once, the CUDA-graph decode step)")
    step = max(1, len(st["chunks"]) // 12)
    shown = [ch for ch in st["chunks"] if ch["chunk"] % step == 0 or ch["chunk"] == st["n_chunks"] - 1]
    out += ["", "Streaming, per chunk" + (f" (every {step}th and the last)" if step > 1 else "")
            + "; vision = the tower with the pixels' upload, from the chunk's start (host preprocessing ran ahead)"]
    out += _grid(["chunk", "frames", "cache before", "vision ms", "append ms", "total ms", "frames/s", "floor ms"],
                 [[str(ch["chunk"]), str(ch["frames"]), str(ch["cache_before"]), _f(ch["vision_ms"]), _f(ch["append_ms"]),
                   _f(ch["encode_ms"]), _f(ch["frames_per_s"], ".2f"), _f(ch["floor_ms"], ".2f")] for ch in shown])
    busy = _f(st["gpu_busy_pct"], ".0f", "% of encode wall") + f" ({st['gpu_busy_source']})"
    out += [
        "",
        "Streaming totals",
        f"  encode {st['encode_s']:.3f} s (vision tower + pixel upload {st['vision_s']:.3f}, LLM append {st['append_s']:.3f}) = "
        f"{st['frames_per_s']:.2f} frames/s; wall {st['wall_s']:.3f} s, {st['frame_wait_s'] * 1000:.1f} ms of it waiting for frames",
        f"  host preprocessing (normalise, patchify, pin) {st['preprocess_s']:.3f} s in all, {st['preprocess_ms_per_chunk']:.1f} ms/chunk "
        f"({st['preprocess_pct_of_wall']:.1f}% of wall), in the frame thread, outside encode",
        f"  streaming tax against the stock whole video {_f(st['streaming_tax_stock'], '.2f', 'x')}, against the whole video on "
        f"streaming's kernels {_f(st['streaming_tax_fair'], '.2f', 'x')} (encode / GPU prefill; preprocessing excluded on both sides)",
        f"  GPU busy {busy}",
        f"  memory: weights {_gib(st['weights_bytes'])}, peak allocated {_gib(st['peak_bytes'])} (encode {_gib(st['encode_peak_bytes'])}), "
        f"max reserved {_gib(st.get('max_reserved_bytes'))}, steady {_gib(st['steady_bytes'])}; "
        f"cache {_gib(st['cache_bytes'])} = {st['cache_tokens']} tokens x {st['cache_bytes_per_token']:.0f} B",
        *[f"    {d}: weights {_gib(m['weights_bytes'])}, steady {_gib(m['steady_bytes'])}, peak {_gib(m['peak_bytes'])}"
          for d, m in (st.get("devices") or {}).items()],
        f"  CUDA context (device memory in use beyond torch's allocator at load; assumes no other process): "
        f"{_gib(mem.get('cuda_context_bytes'))}",
        "",
        "Questions (each rolled back; 'again' = the same question at the same length straight after)",
    ]
    out += _grid(["frames", "cache tokens", "TTFT ms", "again", "floor", "decode ms/tok", "again", "floor"],
                 [[str(q["frames"]) + (" *" if q["first_of_process"] else ""), str(q["cache_tokens"]), _f(q["ttft_ms"]),
                   _f(q.get("ttft_ms_again")), _f(q["floor_ttft_ms"], ".2f"), _f(q["decode_ms_per_token"], ".2f"),
                   _f(q.get("decode_ms_per_token_again"), ".2f"), _f(q["floor_decode_ms_per_token"], ".2f")] for q in r["questions"]])
    if any(q["first_of_process"] for q in r["questions"]):
        out.append("  * the process's first question")
    fq = r.get("full_cache_questions")
    if fq and fq["n"]:
        out += [f"  at the full cache ({fq['cache_tokens']} tokens), {fq['n']} questions of different lengths: "
                f"TTFT ms {_pcts(fq['ttft_ms'])}; decode ms/token {_pcts(fq['decode_ms_per_token'], '.2f')}"]
    out += ["", "Agreement (the last streaming question against each whole-video path: same prompt and frames)"]
    out += _agreement_line(r["agreement"], "stock") + _agreement_line(r.get("agreement_fair"), "streaming's kernels")
    dec = r.get("decoding")
    if dec:
        out += ["", f"Real decoding (decord through VideoSource, {dec['clip']}, resized to {dec['resized_to']}, sampled at {dec['sampled_fps']:g} fps)",
                f"  {dec['sampled_frames_per_s']:.1f} sampled frames/s ({dec['native_frames_per_s']:.1f} native frames/s decoded); "
                f"the stream encodes {dec['stream_frames_per_s']:.1f} frames/s: {'keeps up' if dec['keeps_up_with_stream'] else 'decoding is the bottleneck'}; "
                f"real time needs {dec['realtime_frames_per_s']:g}: {'keeps up' if dec['keeps_up_with_realtime'] else 'falls behind'}"]
    out += [
        "",
        f"Floors (measured now: {ra['matmul_n']}³ matmul {ra['matmul_flop_per_s'] / 1e12:.1f} TFLOP/s, "
        f"copy {ra['copy_bytes_per_s'] / 1e9:.0f} GB/s read+write)",
    ]
    last = r["questions"][-1]
    out += _grid(["", "measured", "floor"], [
        ["streaming encode frames/s", _f(st["frames_per_s"], ".2f"), _f(fl["encode_frames_per_s"], ".2f")],
        ["stock whole-video GPU prefill s", _f(of["gpu_prefill_s"] if of and of["ok"] else None, ".3f"), _f(fl["offline_prefill_s"], ".3f")],
        ["whole video on streaming's kernels s", _f(fa["prefill_s"] if fa and fa["ok"] else None, ".3f"), _f(fl["offline_prefill_s"], ".3f")],
        [f"TTFT ms at {last['cache_tokens']} tokens", _f(last["ttft_ms"]), _f(fl["ttft_ms"], ".2f")],
        ["decode ms/token there", _f(last["decode_ms_per_token"], ".2f"), _f(fl["decode_ms_per_token"], ".2f")],
    ])
    return "\n".join(out)


def write_report(r: dict, path: Path) -> list[Path]:
    """Markdown at `path` with the table, and two PNG charts beside it."""
    from .plots import encode_plot, ttft_plot

    encode_png = encode_plot([(c["cache_after"], c["encode_ms"]) for c in r["streaming"]["chunks"]], path.with_name(path.stem + "-encode.png"))
    ttft_png = ttft_plot([(q["cache_tokens"], q["ttft_ms"]) for q in r["questions"]], path.with_name(path.stem + "-ttft.png"))
    path.write_text(
        f"# streamchat bench\n\n```text\n{text_table(r)}\n```\n\n"
        f"![encode time per chunk against cache length]({encode_png.name})\n\n![TTFT against cache size]({ttft_png.name})\n"
    )
    return [path, encode_png, ttft_png]


