"""The GPU tier: every GPU fast path against a float32 reference, with teacher forcing, logits compared
at every step. Skipped without CUDA (CI); on the GPU machine:

    python3 -m pytest -m gpu tests/test_gpu_tier.py -q

Each test streams frames through the engine on the GPU (its CUDA graphs, split attention, static
decoder, bounded memory), asks a question, then feeds the same fixed answer tokens one by one
(teacher forcing), so both sides see identical inputs at every step. The reference is stock
transformers in float32 on the same weights: one `model(...)` prefill of the exact prompt the turn saw
(sdpa, the stock cache, the vision tower's own window loop), then one forward per forced token.

Per step the check is the relative RMS error ||engine - reference|| / ||reference|| of the logits,
under TOL[dtype]; float32 must also pick the reference's top token at every step. Set
STREAMCHAT_GPU_TIER_REPORT=FILE to get one JSON line per checked path (the figures for
docs/benchmarks.md). STREAMCHAT_GPU_TIER_DEVICE=cpu runs the tier's float32 tests on the CPU (a dry run
of the harness: the graphs there run their eager forms).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from streamchat import hf
from streamchat.config import SessionConfig
from streamchat.memory import MemoryConfig
from streamchat.models import load
from streamchat.stream import Stream
from streamchat.video import Sampling, VideoSource

DEVICE = os.environ.get("STREAMCHAT_GPU_TIER_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
ON_GPU = DEVICE is not None and DEVICE.startswith("cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU (or STREAMCHAT_GPU_TIER_DEVICE=cpu for a dry run)"),
]

# Relative RMS error of the logits per step, engine against the float32 reference. float32: the same
# arithmetic up to kernel order (TF32 is switched off). float16 / bfloat16: 11 and 8 mantissa bits;
# the weights themselves are rounded, so the bound is what rounding through the layers gives, with a
# margin; a wrong position, a stale graph or a missing page gives errors of order 1.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if ON_GPU or os.environ.get("STREAMCHAT_GPU_TIER_DTYPES") == "all" else [torch.float32]
QUESTION = "What color is the square?"
FORCED_TEXT = " The red square moves from the left to the right while the green disc circles."


@pytest.fixture(scope="module", autouse=True)
def true_float32():
    """TF32 off, so float32 is float32 on both sides (cuDNN's convolutions use TF32 by default)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


_models: dict = {}


def tiny_on(dtype: torch.dtype):
    """tiny-random on the tier's device in `dtype` (loaded once per dtype; float32 is the reference)."""
    name = str(dtype).replace("torch.", "")
    if name not in _models:
        _models[name] = load("tiny-random", device=DEVICE, dtype=name)
    return _models[name]


@pytest.fixture(scope="module")
def clip_448(tmp_path_factory):
    """9 s at 8 fps, 448x448: 72 frames, 256 tokens per frame pair (512-token chunks)."""
    from streamchat.clips import make_clip

    return make_clip(tmp_path_factory.mktemp("clips") / "clip448.mp4", seconds=9.0, fps=8.0, width=448, height=448)


def config(chunk_frames=4, fps=8.0, history="drop", memory=None, max_frames=None) -> SessionConfig:
    return SessionConfig(model="tiny-random", sampling=Sampling(fps=fps, max_frames=max_frames), chunk_frames=chunk_frames,
                         history=history, max_new_tokens=32, memory=memory or MemoryConfig(mode="exact"))


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", dtype=torch.float32, copy=True)


@torch.inference_mode()
def engine_forced(engine, forced: list[int], question: str = QUESTION) -> tuple[torch.Tensor, list, dict]:
    """The engine's logits [1 + len(forced), V]: the question's prefill (graphs on a GPU), then one static
    decoder step per forced token, as `ask` runs them; the turn is rolled back after. Also the prompt
    the turn saw and what was retrieved (bounded memory)."""
    hf.use_stream_attention(engine.model, engine.config.stream_attention)
    q_ids = engine.question_ids(question)
    prompt = engine.prompt_with(q_ids)
    feed = engine.pending + q_ids
    base, saved = engine.cache_tokens, engine.cursor.copy()
    info = {"archived": len(engine.book.archived(set(engine.cache.pages()))) if engine.bounded else 0}
    try:
        info["retrieved"] = engine._retrieve(feed) if engine.bounded else []
        cursor = engine.cursor.copy()
        logits, _ = engine._prefill(feed, cursor)
        rows = [_copy(logits)]
        decoder = hf.static_decoder(engine.model, engine.cache.hf, engine.cache.graphs)
        assert decoder is not None
        decoder.prepare(forced[0], cursor.next_pos, len(forced))
        for token in forced:
            decoder.token.fill_(token)  # teacher forcing: the step reads its input from this buffer
            decoder.run()
            rows.append(_copy(decoder.logits))
        decoder.commit(len(forced))
    finally:
        engine.cache.truncate(base)
        engine.cursor = saved
    return torch.stack(rows), prompt, info


@torch.inference_mode()
def reference_forced(ref, prompt, read_frames, fps: float, vocab, forced: list[int]) -> torch.Tensor:
    """Stock transformers in float32: one model(...) prefill of `prompt`, then one forward per forced token."""
    from streamchat.layout import VideoSeg, render
    from streamchat.positions import Cursor, temporal_interval

    model = ref.model
    hf.use_stream_attention(model, False)
    vc = hf.vision_config(model)
    pixels, grids, merged = [], [], []
    for seg in prompt:
        if isinstance(seg, VideoSeg):
            pv, grid = hf.video_pixels(ref.processor, read_frames(seg.frames))
            pixels.append(pv)
            grids.append(grid)
            merged.append((int(grid[0, 0]), int(grid[0, 1]) // vc.spatial_merge_size, int(grid[0, 2]) // vc.spatial_merge_size))
    ids, positions = render(prompt, vocab, merged, temporal_interval(fps, vc.tokens_per_second, vc.temporal_patch_size))
    cache = hf.new_cache(model, growing=False)
    rows = [_copy(hf.full_forward(model, torch.tensor(ids), torch.cat(pixels), torch.cat(grids), positions, cache))]
    cursor = Cursor(next_pos=int(positions.max()) + 1)
    for token in forced:
        hidden = hf.lm_forward(model, hf.embed_tokens(model, torch.tensor([token], device=model.device)), cursor.text(1), cache)
        rows.append(_copy(hf.lm_head(model, hidden)))
    return torch.stack(rows)


def stock_error(loaded, dtype, prompt, read_frames, fps, vocab, forced, want) -> float | None:
    """The stock transformers path's own error in `dtype` against the float32 reference (max relative
    RMS over the steps): the rounding floor the fast paths are measured against (reported, not asserted)."""
    if dtype == torch.float32:
        return None
    same = reference_forced(loaded, prompt, read_frames, fps, vocab, forced)
    hf.use_stream_attention(loaded.model, True)
    return max(((same - want).norm(dim=-1) / want.norm(dim=-1)).tolist())


def check(path: str, dtype: torch.dtype, got: torch.Tensor, ref: torch.Tensor, **extra) -> dict:
    """Assert the per-step relative RMS error is under TOL[dtype] (and float32 picks the same tokens);
    report the figures."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
    top_agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    figures = {"path": path, "dtype": str(dtype).replace("torch.", ""), "device": torch.cuda.get_device_name() if ON_GPU else "cpu",
               "steps": len(rel), "max_rel_rms": max(rel), "mean_rel_rms": sum(rel) / len(rel),
               "max_abs": float((got - ref).abs().max()), "top1_agreement": top_agree, "tol": TOL[dtype], **extra}
    line = json.dumps(figures)
    print(line)
    if os.environ.get("STREAMCHAT_GPU_TIER_REPORT"):
        with open(os.environ["STREAMCHAT_GPU_TIER_REPORT"], "a") as f:
            f.write(line + "\n")
    worst = max(range(len(rel)), key=rel.__getitem__)
    assert max(rel) <= TOL[dtype], f"{path} {dtype}: step {worst} relative RMS error {rel[worst]:.3g} > {TOL[dtype]:g}"
    if dtype == torch.float32:
        assert top_agree == 1.0, f"{path}: float32 picked another token than the reference"
    return figures


def forced_ids(stream) -> list[int]:
    return stream.engine.vocab.ids(FORCED_TEXT)[:24]


def _graphs_in_use(engine) -> dict:
    """Which captured graphs the engine's table holds (GPU only)."""
    table = engine.cache.graphs
    vision = [g for k, g in table.items() if isinstance(k, tuple) and k[0] == "vision"]
    chunk = [g for k, g in table.items() if isinstance(k, tuple) and k[0] == "chunk"]
    question = [g for k, g in table.items() if isinstance(k, tuple) and k[0] == "question"]
    decoder = table.get("decoder")
    return {
        "vision": sum(g.graph is not None for g in vision),
        "chunk": sum(g.graphs is not None for g in chunk),
        "question": sum(g.graphs is not None for g in question),
        "decode": int(decoder is not None and decoder.graph is not None),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cuda_graphs_for_vision_chunks_questions_and_decode_match_float32(dtype, clip_24fps):
    """112x112 at 8 fps: 24 frames in 4-frame chunks (32 tokens: chunk graphs), the tower as one graph
    per chunk, the question in a 16/32-token bucket graph, every decode step a graph replay."""
    loaded, ref = tiny_on(dtype), tiny_on(torch.float32)
    cfg = config()
    stream = Stream(loaded, VideoSource(clip_24fps, cfg.sampling), cfg)
    stream.encode_until(stream.total_frames)
    forced = forced_ids(stream)
    got, prompt, _ = engine_forced(stream.engine, forced)
    used = _graphs_in_use(stream.engine)
    if ON_GPU:
        assert used["vision"] >= 1 and used["chunk"] >= 1 and used["question"] >= 1 and used["decode"] == 1, used
    want = reference_forced(ref, prompt, stream.read_frames, stream.fps, stream.engine.vocab, forced)
    stock = stock_error(loaded, dtype, prompt, stream.read_frames, stream.fps, stream.engine.vocab, forced, want)
    check("graphs: vision, chunks, questions, decode", dtype, got, want, stock_same_dtype=stock, graphs=used, cache_tokens=stream.engine.cache_tokens)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32] or [torch.float32], ids=lambda d: str(d).replace("torch.", ""))
def test_split_cudnn_and_flash_attention_match_float32(dtype, clip_448, monkeypatch):
    """448x448 at 8 fps: 72 frames, 512-token chunks; past 8192 cached tokens each chunk attends to the
    cache's whole 8k blocks through cuDNN and to the rest through flash attention, merged by log-sum-exp
    (bf16/fp16 only: float32 keeps one SDPA call). The decode steps run over a 9k-token cache."""
    from streamchat.hf import attention

    calls = {"split": 0, "cudnn": 0, "folded": 0}
    split, one = attention._split_attention, attention._attend_lse_one

    def counting_split(*args, flash=False):
        calls["split"] += 1
        calls["folded"] += int(flash)
        return split(*args, flash=flash)

    def counting_one(q, k, v, causal, scale, flash=False):
        calls["cudnn"] += int(q.is_cuda and not causal and not flash)
        return one(q, k, v, causal, scale, flash)

    monkeypatch.setattr(attention, "_split_attention", counting_split)
    monkeypatch.setattr(attention, "_attend_lse_one", counting_one)
    loaded, ref = tiny_on(dtype), tiny_on(torch.float32)
    cfg = config()
    stream = Stream(loaded, VideoSource(clip_448, cfg.sampling), cfg)
    assert stream.total_frames == 72
    stream.encode_until(stream.total_frames)
    assert stream.engine.cache_tokens > attention.PREFIX_BLOCK + 512
    if ON_GPU and dtype != torch.float32:
        assert calls["split"] >= 1 and calls["cudnn"] >= 1, calls
    calls["folded"] = 0
    forced = forced_ids(stream)
    got, prompt, _ = engine_forced(stream.engine, forced)
    if ON_GPU and dtype != torch.float32:  # the question: its cache part in one folded flash call
        assert calls["folded"] >= 1, calls
    want = reference_forced(ref, prompt, stream.read_frames, stream.fps, stream.engine.vocab, forced)
    stock = stock_error(loaded, dtype, prompt, stream.read_frames, stream.fps, stream.engine.vocab, forced, want)
    check("split cuDNN + flash attention, the question folded; static decoder at 9k tokens", dtype, got, want, stock_same_dtype=stock, split_calls=calls["split"],
          cache_tokens=stream.engine.cache_tokens)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_static_decoder_over_several_cache_blocks_matches_float32(dtype, clip_448):
    """history=keep, 448x448: a kept turn stays in the cache, and the second question's decode steps run
    over buffers of several 1024-token blocks (the masked product's split-K in float32, flash otherwise)."""
    loaded, ref = tiny_on(dtype), tiny_on(torch.float32)
    cfg = config(history="keep", max_frames=16)
    stream = Stream(loaded, VideoSource(clip_448, cfg.sampling), cfg)
    stream.encode_until(8)
    stream.engine.ask("What is moving?")  # kept: its question and answer stay in the cache
    stream.encode_until(stream.total_frames)
    forced = forced_ids(stream)
    got, prompt, _ = engine_forced(stream.engine, forced, "And now?")
    assert hf.cache_capacity(stream.engine.cache.hf) >= 2 * hf.BLOCK_TOKENS
    want = reference_forced(ref, prompt, stream.read_frames, stream.fps, stream.engine.vocab, forced)
    stock = stock_error(loaded, dtype, prompt, stream.read_frames, stream.fps, stream.engine.vocab, forced, want)
    check("static decoder, keep-mode turns", dtype, got, want, stock_same_dtype=stock, capacity=hf.cache_capacity(stream.engine.cache.hf))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_graphs_recaptured_after_restore_match_float32(dtype, clip_24fps, tmp_path):
    """A snapshot restored into a new stream (its graphs captured at plan time), then the buffers moved
    on purpose: every graph is made again for the new buffers, and the rest of the stream and the
    question still match the reference."""
    from streamchat import snapshots

    loaded, ref = tiny_on(dtype), tiny_on(torch.float32)
    cfg = config()
    first = Stream(loaded, VideoSource(clip_24fps, cfg.sampling), cfg)
    first.encode_until(12)
    path = tmp_path / "snap.safetensors"
    snapshots.save(first, path, video_path="clip", video_sha256="x")
    del first
    stream = Stream(loaded, VideoSource(clip_24fps, cfg.sampling), cfg)
    snapshots.load(path, stream)
    cache = stream.engine.cache
    generation, key = cache.generation, hf.buffers_key(cache.hf)
    cache.reserve(cache.capacity + 2 * hf.BLOCK_TOKENS)  # new buffers: every graph over the old ones is stale
    assert cache.generation == generation + 1 and hf.buffers_key(cache.hf) != key and cache.graphs == {}
    stream.encode_until(stream.total_frames)
    forced = forced_ids(stream)
    got, prompt, _ = engine_forced(stream.engine, forced)
    used = _graphs_in_use(stream.engine)
    if ON_GPU:
        assert used["vision"] >= 1 and used["chunk"] >= 1 and used["question"] >= 1 and used["decode"] == 1, used
        decoder = cache.graphs["decoder"]
        assert decoder._graph_key == hf.buffers_key(cache.hf)  # captured over the new buffers
    want = reference_forced(ref, prompt, stream.read_frames, stream.fps, stream.engine.vocab, forced)
    stock = stock_error(loaded, dtype, prompt, stream.read_frames, stream.fps, stream.engine.vocab, forced, want)
    check("graphs recaptured after restore", dtype, got, want, stock_same_dtype=stock, graphs=used)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_bounded_memory_with_every_page_retrieved_matches_float32(dtype, clip_24fps):
    """Encoded whole under bounded memory, then evicted to a 40-token working set: with room to
    retrieve every archived page, the question sees the exact engine's KV (pages out of order,
    rotations baked in), so the logits match the float32 reference of the whole prompt."""
    loaded, ref = tiny_on(dtype), tiny_on(torch.float32)
    cfg = config(memory=MemoryConfig(mode="bounded", gpu_kv_budget="4096", retrieve_tokens=1024))
    stream = Stream(loaded, VideoSource(clip_24fps, cfg.sampling), cfg)
    stream.encode_until(stream.total_frames)
    engine = stream.engine
    evicted = engine.evict_to(40)
    assert evicted > 0 and engine.cache_tokens <= 40
    forced = forced_ids(stream)
    got, prompt, info = engine_forced(engine, forced)
    assert info["archived"] == evicted and len(info["retrieved"]) == evicted  # every page came back
    assert engine.cache_tokens <= 40
    want = reference_forced(ref, prompt, stream.read_frames, stream.fps, engine.vocab, forced)
    stock = stock_error(loaded, dtype, prompt, stream.read_frames, stream.fps, engine.vocab, forced, want)
    check("bounded memory, every page retrieved", dtype, got, want, stock_same_dtype=stock, evicted_pages=evicted)


@pytest.mark.skipif(not ON_GPU, reason="the 3B architecture needs the GPU (22 GiB with its float32 reference)")
def test_random_qwen25vl_3b_loads_streams_and_matches_its_float32_copy(clip_448):
    """`random:qwen2.5-vl-3b` in bfloat16: the real architecture (qwen25vl.md), the GPU rewrites applied,
    and a short stream (224x224, 12 frames, 64 tokens a pair) teacher-forced against a float32 copy of
    the same weights."""
    from streamchat.engine import StreamEngine

    loaded = load("random:qwen2.5-vl-3b", device=DEVICE, dtype="bfloat16")
    model = loaded.model
    tc, vc = hf.text_config(model), hf.vision_config(model)
    assert (tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads) == (2048, 11008, 36, 16, 2)
    assert (vc.depth, vc.hidden_size, vc.intermediate_size, vc.num_heads, vc.window_size, vc.fullatt_block_indexes) == (32, 1280, 3420, 16, 112, [7, 15, 23, 31])
    assert model.device.type == "cuda" and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.visual.blocks[0].mlp.gate_proj.out_features == 3456  # padded for Hopper's GEMM kernels
    assert type(model.model.language_model.norm).__name__ == "FusedRMSNorm"  # the rewrite builds its class per call
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()  # tied
    cfg = SessionConfig(model="random:qwen2.5-vl-3b", sampling=Sampling(fps=8.0, max_frames=12, max_pixels=224 * 224),
                        chunk_frames=4, max_new_tokens=32, memory=MemoryConfig(mode="exact"))
    assert StreamEngine(loaded, cfg, 2.0).bytes_per_token == 36_864  # 36 layers x K,V x 2 heads x 128 x 2 bytes
    stream = Stream(loaded, VideoSource(clip_448, cfg.sampling), cfg)
    assert (stream.source.info.resized_width, stream.source.info.resized_height, stream.total_frames) == (224, 224, 12)
    stream.encode_until(stream.total_frames)
    forced = forced_ids(stream)
    got, prompt, _ = engine_forced(stream.engine, forced)
    used = _graphs_in_use(stream.engine)
    read, fps, vocab, tokens = stream.read_frames, stream.fps, stream.engine.vocab, stream.engine.cache_tokens
    del stream
    ref_model = copy.deepcopy(model).float()  # the same weights in float32 (the GPU rewrites are same-function)
    for layer in ref_model.model.language_model.layers:  # the fused copies stay bfloat16: let the modules compute
        layer.self_attn._streamchat_qkv = None
        layer.mlp._streamchat_gate_up = None
    ref = type(loaded)(ref_model, loaded.processor, loaded.model_id, loaded.device, torch.float32, loaded.fingerprint)
    want = reference_forced(ref, prompt, read, fps, vocab, forced)
    del ref_model, ref
    stock = stock_error(loaded, torch.bfloat16, prompt, read, fps, vocab, forced, want)
    check("random:qwen2.5-vl-3b, whole engine", torch.bfloat16, got, want, stock_same_dtype=stock, graphs=used, cache_tokens=tokens,
          params=sum(p.numel() for p in model.parameters()))


@pytest.mark.skipif(not ON_GPU, reason="the 3B architecture needs the GPU")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_compare_runs_the_3b_architecture_in_float32_and_float16(dtype, clip_448):
    """What `streamchat compare VIDEO --model random:qwen2.5-vl-3b --dtype float32` runs, which crashed in
    the vision graph's capture ("Cannot copy between CPU and CUDA tensors during CUDA graph capture"):
    float32 and float16 are how a user checks bfloat16's rounding, so both must stream, answer and compare."""
    from streamchat.compare import run_compare

    loaded = load("random:qwen2.5-vl-3b", device=DEVICE, dtype=dtype)
    cfg = SessionConfig(model="random:qwen2.5-vl-3b", sampling=Sampling(fps=8.0, max_frames=8, max_pixels=224 * 224),
                        chunk_frames=4, max_new_tokens=16)
    report = run_compare(loaded, VideoSource(clip_448, cfg.sampling), cfg, QUESTION)
    figures = {"path": "compare, random:qwen2.5-vl-3b", "dtype": dtype, "identical": report["match"]["identical"],
               "first_divergence": report["match"]["first_divergence"], "max_logit_diff": report["match"]["max_logit_diff"]}
    print(json.dumps(figures))
    if os.environ.get("STREAMCHAT_GPU_TIER_REPORT"):
        with open(os.environ["STREAMCHAT_GPU_TIER_REPORT"], "a") as f:
            f.write(json.dumps(figures) + "\n")
    assert report["streaming"]["new_tokens"] >= 1 and report["offline"] is not None and report["offline"]["new_tokens"] >= 1
    assert report["match"]["max_logit_diff"] is not None
    del loaded
