"""Bounded memory: a working set on the device, every page archived exactly, pages retrieved per question.

The references here are written in the tests: brute-force loops for the scores, the exact engine for
the answers, and a stock transformers prefill over the stream's whole KV (working set + archive, put
back in stream order) for what retrieval must reassemble.
"""

from __future__ import annotations

import math

import pytest
import torch

from streamchat import hf
from streamchat.config import SessionConfig
from streamchat.errors import UserError
from streamchat.memory import MemoryConfig, mean_queries, page_scores, parse_size, resolve, retention_scores, select_pages
from streamchat.stream import Stream
from streamchat.video import Sampling, VideoSource

TOL = 1e-4
Q = "What color is the square?"


def config(mode="bounded", budget="4096", retrieve=1024, history="drop", host="64GiB", max_new=8):
    return SessionConfig(
        model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4, history=history, max_new_tokens=max_new,
        memory=MemoryConfig(mode=mode, gpu_kv_budget=budget, host_kv_budget=host, retrieve_tokens=retrieve),
    )


def room(tiny, max_new=8) -> int:
    """What bounded memory keeps beside the working set for a question and its answer."""
    from streamchat.engine import RESERVE_MARGIN
    from streamchat.layout import Vocab

    return max_new + RESERVE_MARGIN + len(Vocab(tiny.tokenizer, SessionConfig().system_prompt).question("?", block_open=True))


def page_starts(e) -> list[tuple[int, int]]:
    """(page, first row) of every page in the engine's cache."""
    return [(sp.page, st) for st, sp in zip(e.cache.starts(), e.cache.spans) if sp.page is not None]


def stream_of(tiny, clip, cfg, **kw):
    return Stream(tiny, VideoSource(clip, cfg.sampling), cfg, **kw)


def test_bounded_with_room_for_the_whole_stream_is_the_exact_engine(tiny, clip_24fps):
    exact = stream_of(tiny, clip_24fps, config(mode="exact"))
    bounded = stream_of(tiny, clip_24fps, config())
    assert exact.budget.mode == "exact" and bounded.budget.mode == "bounded"
    chunks = bounded.encode_until(24)
    exact.encode_until(24)
    assert sum(c.evicted_pages for c in chunks) == 0 and len(bounded.engine.book.archive) == 0
    for k1, k2 in zip(hf.cache_layers(exact.engine.cache.hf), hf.cache_layers(bounded.engine.cache.hf)):
        assert torch.equal(k1[0], k2[0]) and torch.equal(k1[1], k2[1])
    a, b = exact.engine.ask(Q), bounded.engine.ask(Q)
    assert a.token_ids == b.token_ids
    assert (a.first_logits - b.first_logits).abs().max() <= TOL
    assert b.retrieved == []


def test_every_page_retrieved_gives_the_exact_engines_answer(tiny, clip_24fps):
    """Encoded whole, then bounded to 40 tokens: retrieving every archived page brings back exactly the
    KV the exact engine has (keys keep their M-RoPE rotation), so the answer is the exact one."""
    exact = stream_of(tiny, clip_24fps, config(mode="exact"))
    bounded = stream_of(tiny, clip_24fps, config())
    exact.encode_until(24)
    bounded.encode_until(24)
    e = bounded.engine
    pages = len(e.book.pages)
    evicted = e.evict_to(40)
    assert evicted > 0 and e.cache_tokens <= 40 and len(e.book.archive) == evicted
    assert sorted(e.cache.pages() + list(e.book.archive.pages)) == list(range(pages))
    a, b = exact.engine.ask(Q), e.ask(Q)
    assert a.token_ids == b.token_ids
    assert (a.first_logits - b.first_logits).abs().max() <= TOL
    covered = sum(s["last_page"] - s["first_page"] + 1 for s in b.retrieved)
    assert covered == evicted
    assert e.cache_tokens <= 40  # the retrieved pages left again with the rollback


def test_a_small_budget_bounds_the_cache_and_archives_every_page_exactly(tiny, clip_24fps):
    cfg = config(budget=str(100 + 64 + room(tiny)), retrieve=64)  # working set 100 tokens
    s = stream_of(tiny, clip_24fps, cfg)
    e = s.engine
    assert (e.budget.working_tokens, e.budget.retrieve_tokens) == (100, 64)
    written = {}  # the reference: each page's KV right after its chunk was encoded

    def grab(c):
        assert c.cache_tokens <= 100
        for page, start in page_starts(e):
            if page not in written:
                written[page] = [(k.clone(), v.clone()) for k, v in e.cache.rows(start, start + e.book.pages[page].tokens)]

    s.encode_until(24, on_chunk=grab)
    assert len(e.book.archive) > 0
    for page in e.book.archive.pages:
        keys, values = e.book.archive.get(page)
        assert torch.equal(keys, torch.stack([k[0] for k, _ in written[page]]))
        assert torch.equal(values, torch.stack([v[0] for _, v in written[page]]))


def test_retrieval_reassembles_the_streams_kv_for_the_question(tiny, clip_24fps):
    """With a 100-token working set and retrieval of everything, the question sees the whole stream's
    KV (as encoded, drift included): the same logits as a stock prefill over that KV in stream order."""
    s = stream_of(tiny, clip_24fps, config(budget=str(100 + 1024 + room(tiny)), retrieve=1024))
    e = s.engine
    e.budget.working_tokens = 100
    s.encode_until(24)
    assert len(e.book.archive) > 0
    # the reference cache: text and pages in stream order, pages from wherever they are now
    rows_by_page = {p: e.book.archive.get(p) for p in e.book.archive.pages}
    for page, start in page_starts(e):
        rows = e.cache.rows(start, start + e.book.pages[page].tokens)
        rows_by_page[page] = (torch.stack([k[0] for k, _ in rows]), torch.stack([v[0] for _, v in rows]))
    text = [(st, sp.tokens) for st, sp in zip(e.cache.starts(), e.cache.spans) if sp.page is None]
    assert len(text) == 1  # the prompt's head: text is never archived
    head = e.cache.rows(text[0][0], text[0][0] + text[0][1])
    layers = []
    for i, (hk, hv) in enumerate(head):
        ks = [hk] + [rows_by_page[p][0][i : i + 1] for p in sorted(rows_by_page)]
        vs = [hv] + [rows_by_page[p][1][i : i + 1] for p in sorted(rows_by_page)]
        layers.append((torch.cat(ks, dim=2).clone(), torch.cat(vs, dim=2).clone()))
    reference = hf.cache_from_layers(tiny.model, layers)
    feed = e.pending + e.question_ids(Q)
    cursor = e.cursor.copy()
    with torch.inference_mode():
        embeds = hf.embed_tokens(tiny.model, torch.tensor(feed))
        expected = hf.lm_head(tiny.model, hf.lm_forward(tiny.model, embeds, cursor.text(len(feed)), reference))
    ans = e.ask(Q)
    assert (ans.first_logits - expected).abs().max() <= TOL
    assert int(torch.argmax(expected)) == ans.token_ids[0]
    assert sum(x["last_page"] - x["first_page"] + 1 for x in ans.retrieved) == len(e.book.archive)


def test_keep_mode_under_a_small_budget_answers_and_keeps_its_turns(tiny, clip_24fps):
    s = stream_of(tiny, clip_24fps, config(budget=str(100 + 64 + room(tiny)), retrieve=64, history="keep"))
    e = s.engine
    for at in (1.0, 2.0, 3.0):
        s.encode_until(s.frames_at(at))
        before = e.cache_tokens
        ans = e.ask(Q)
        assert ans.new_tokens >= 1
        # the kept question and answer stay; retrieved pages leave again
        assert e.cache_tokens == before + len(ans.prompt[-1].ids) + ans.new_tokens - 1
        assert sum(sp.tokens for sp in e.cache.spans) == e.cache_tokens
    assert e.cache_tokens <= 100 + 3 * 40


def test_page_scores_and_selection_equal_brute_force_loops():
    g = torch.Generator().manual_seed(0)
    pages, layers, kv_heads, group, tokens, dh = 9, 3, 2, 3, 5, 8
    index = torch.randn(pages, layers, kv_heads, dh, generator=g)
    queries = torch.randn(layers, kv_heads * group, tokens, dh, generator=g)
    scores = page_scores(index, mean_queries(queries, kv_heads))
    for p in range(pages):
        total = 0.0
        for layer in range(layers):
            for h in range(kv_heads * group):
                for t in range(tokens):
                    total += float(queries[layer, h, t] @ index[p, layer, h // group]) / (group * tokens)
        assert math.isclose(float(scores[p]), total / math.sqrt(dh), rel_tol=1e-4, abs_tol=1e-4)
    ids = [3, 5, 8, 13, 21, 34, 55, 89, 144]
    sizes = [10, 10, 10, 10, 25, 10, 10, 10, 10]
    chosen = select_pages(scores, ids, sizes, 40)
    ranked = sorted(range(pages), key=lambda i: -float(scores[i]))
    expected, used = [], 0
    for i in ranked:  # greedy by score, skipping pages that no longer fit
        if used + sizes[i] <= 40:
            expected.append(ids[i])
            used += sizes[i]
    assert chosen == sorted(expected)


def test_retention_scores_equal_a_hand_loop():
    g = torch.Generator().manual_seed(1)
    layers, kv_heads, pages, n, dh = 2, 2, 3, 4, 6
    keys = torch.randn(layers, kv_heads, pages, n, dh, generator=g)
    values = torch.randn(layers, kv_heads, pages, n, dh, generator=g)
    previous = torch.randn(layers, kv_heads, n, dh, generator=g)
    scores = retention_scores(keys, values, previous)
    for p in range(pages):
        cos, norm, count = 0.0, 0.0, 0
        for layer in range(layers):
            for h in range(kv_heads):
                for t in range(n):
                    before = previous[layer, h, t] if p == 0 else keys[layer, h, p - 1, t]
                    k = keys[layer, h, p, t]
                    cos += float(k @ before / (k.norm() * before.norm()))
                    norm += float(values[layer, h, p, t].norm())
                    count += 1
        assert math.isclose(float(scores[p]), (1 - cos / count) * (norm / count), rel_tol=1e-4)
    # a page identical to its predecessor has no novelty
    same = keys.clone()
    same[:, :, 1] = same[:, :, 0]
    assert float(retention_scores(same, values, previous)[1]) == pytest.approx(0.0, abs=1e-5)


def test_budgets_parse_and_refuse_what_cannot_work():
    assert parse_size("65536", "--b", tokens_ok=True) == (65536, "tokens")
    assert parse_size("64k", "--b", tokens_ok=True) == (65536, "tokens")
    assert parse_size("2GiB", "--b", tokens_ok=True) == (2 * 2**30, "bytes")
    assert parse_size("500MB", "--b", tokens_ok=False) == (500 * 10**6, "bytes")
    for bad in ("-5", "abc", "0", "12 parsecs"):
        with pytest.raises(UserError, match="--b"):
            parse_size(bad, "--b", tokens_ok=True)
    with pytest.raises(UserError, match="--host-kv-budget"):
        MemoryConfig(host_kv_budget="100").validate()  # host budgets are bytes, with a unit
    # bytes become tokens at the model's KV size; auto picks exact when the stream fits, bounded when not
    b = resolve(MemoryConfig(gpu_kv_budget="1MiB"), bytes_per_token=1024, max_context=32768, planned_tokens=500,
                chunk_tokens=32, answer_room=264)
    assert (b.mode, b.gpu_tokens, b.reason) == ("exact", 1024, "")
    b = resolve(MemoryConfig(gpu_kv_budget="1MiB", retrieve_tokens=64), bytes_per_token=1024, max_context=32768,
                planned_tokens=5000, chunk_tokens=32, answer_room=264)
    assert (b.mode, b.working_tokens, b.retrieve_tokens) == ("bounded", 1024 - 64 - 264, 64)
    assert "5,000 cache tokens" in b.reason
    with pytest.raises(UserError, match="cannot hold two chunks"):
        resolve(MemoryConfig(mode="bounded", gpu_kv_budget="300", retrieve_tokens=0), bytes_per_token=1, max_context=32768,
                planned_tokens=5000, chunk_tokens=32, answer_room=264)


def test_exact_memory_refuses_a_stream_it_cannot_hold_before_any_work(tiny, clip_24fps):
    with pytest.raises(UserError, match="exact memory cannot hold this stream: 24 frames .* Use --memory bounded"):
        stream_of(tiny, clip_24fps, config(mode="exact", budget="200"))


def test_archive_spills_past_the_host_budget_and_answers_the_same(tiny, clip_24fps, tmp_path):
    answers = []
    for host, spill in (("64GiB", None), ("1KiB", tmp_path / "pages")):
        s = stream_of(tiny, clip_24fps, config(budget=str(100 + 1024 + room(tiny)), retrieve=1024, host=host), spill_dir=spill)
        s.engine.budget.working_tokens = 100
        s.encode_until(24)
        archive = s.engine.book.archive
        answers.append(s.engine.ask(Q))
        if spill is not None:
            files = sorted(spill.glob("page-*.safetensors"))
            assert len(files) == len(archive) and archive.host_bytes <= 1024 and archive.disk_bytes > 0
            assert all(stored.keys is None for stored in archive.pages.values())
    assert answers[0].token_ids == answers[1].token_ids
    assert torch.equal(answers[0].first_logits, answers[1].first_logits)


def test_the_index_holds_each_pages_mean_key_before_the_rotary_embedding(tiny, clip_24fps):
    """Layer 0's keys before RoPE are k_proj(norm(embeddings)): computed here from the vision tower's
    output, they must average to the index's entries, so the un-rotation used the pages' own M-RoPE
    positions (t, h and w differ inside a video block)."""
    s = stream_of(tiny, clip_24fps, config())
    s.encode_until(4)
    e = s.engine
    frames = s.read_frames([0, 1, 2, 3])
    with torch.inference_mode():
        video = hf.embed_video(tiny.model, *e.preprocess(frames))  # [2 pages * N, D]
        layer = tiny.model.model.language_model.layers[0]
        keys = layer.self_attn.k_proj(layer.input_layernorm(video))  # [2N, H_kv * Dh]
    dh = keys.shape[-1] // e.kv_heads
    keys = keys.view(2, -1, e.kv_heads, dh).mean(dim=1)  # [pages, H_kv, Dh]
    assert torch.allclose(e.book.index[:2, 0], keys, atol=1e-4)
    assert not torch.allclose(e.book.index[1, 0], e.book.index[0, 0], atol=1e-3)  # two different pages


def test_the_question_pass_gives_the_queries_transformers_computes(tiny, clip_24fps):
    """Retrieval scores pages with the question's queries before RoPE, taken from the bucketed prefill
    (rotated there, un-rotated after). They must equal q_proj(norm(hidden)) on transformers' own
    hidden states for the same tokens over the same cache."""
    s = stream_of(tiny, clip_24fps, config())
    s.encode_until(8)
    e = s.engine
    feed = e.pending + e.question_ids(Q)  # 21 tokens: padded to a bucket of 32
    base = e.cache_tokens
    with torch.inference_mode():
        _, ours = e._prefill(feed, e.cursor.copy(), keep_queries=True)
        e.cache.truncate(base)
        embeds = hf.embed_tokens(tiny.model, torch.tensor(feed))
        reference = hf.question_queries(tiny.model, embeds, e.cursor.copy().text(len(feed)), e.cache.hf)
        e.cache.truncate(base)
    assert ours.shape == reference.shape == (2, 4, len(feed), 16)  # layers, heads, tokens, head dim
    assert torch.allclose(ours, reference, atol=1e-4)


def test_exact_memory_stops_at_its_limit_with_one_line_and_stays_askable(tiny, clip_24fps):
    """Planned for 8 frames under a budget that holds only them, the stream is asked for 24: the chunk
    that would cross the limit is refused, what was encoded stays, and questions are answered."""
    from streamchat.engine import ContextFull

    probe = stream_of(tiny, clip_24fps, config(mode="exact"), frames=8)
    budget = str(probe.engine.planned_tokens + 16)  # room for a real question, not for another chunk (32 tokens)
    s = stream_of(tiny, clip_24fps, config(mode="exact", budget=budget), frames=8)
    assert s.budget.working_tokens == int(budget)
    with pytest.raises(ContextFull, match=r"exact memory is full: .* frames 0-7 .* Use --memory bounded to go on"):
        s.encode_until(24)
    assert s.next_frame == 8 and s.engine.frames_seen == 8
    before = s.engine.cache_tokens
    assert s.engine.ask(Q).new_tokens >= 1 and s.engine.cache_tokens == before
