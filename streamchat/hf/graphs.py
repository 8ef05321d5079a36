"""CUDA graphs: the decode step, question prefills and short chunk appends (layer segments with
eager attention between them), and the vision tower."""

from __future__ import annotations

import torch


from .attention import _stream_sdpa, _window_groups
from .cache import BLOCK_TOKENS, buffers_key as _buffers_key
from .devices import is_split
from .rewrites import _mlp, _qkv

# CUDA graphs are captured in "thread_local" mode: the stream's frame thread pins host memory while the
# engine captures, and the pinned-memory allocator's event queries from that thread would invalidate a
# capture in the default "global" mode (seen on an H200: the decode graph's capture failed at 720p).
CAPTURE_MODE = "thread_local"


def _warm_on_side_stream(fn) -> None:
    """Run `fn` once on a side stream, as CUDA graph capture requires before capturing it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import rotate_half

    return rotate_half(x)


def _layer_first_half(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A decoder layer up to attention, for hidden [1, T, D]: q [1, H, T, Dh], k and v [1, H_kv, T, Dh],
    with the rotary embedding applied to q and k in one pass (the stock pair of calls is 10 small
    kernels, 5 here; the arithmetic per element is the same)."""
    attn = layer.self_attn
    t = hidden.shape[1]
    q, k, v = _qkv(attn, layer.input_layernorm(hidden))
    q = q.view(1, t, -1, attn.head_dim).transpose(1, 2)
    k = k.view(1, t, -1, attn.head_dim).transpose(1, 2)
    v = v.view(1, t, -1, attn.head_dim).transpose(1, 2)
    qk = torch.cat([q, k], dim=1)  # [1, H + H_kv, T, Dh]
    qk = qk * cos.unsqueeze(1) + _rotate_half(qk) * sin.unsqueeze(1)
    return qk[:, : q.shape[1]], qk[:, q.shape[1] :], v


def _layer_second_half(layer, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """A decoder layer from its attention output attn_out [1, T, H * Dh] on: o-projection, residual, MLP."""
    hidden = hidden + layer.self_attn.o_proj(attn_out)
    return hidden + _mlp(layer.mlp, layer.post_attention_layernorm(hidden))


# Graph tables are plain dicts owned by the caller (the engine's KVCache): nothing is hung on
# transformers' objects, so a cache and its graphs are freed together by reference counting.


def vision_graph(model, grid_thw: torch.Tensor, pixel_shape, table: dict | None) -> "VisionGraph | None":
    """The VisionGraph for one video's grid [1, 3] in `table` (made on first use), or None without a
    table, off the GPU or for a model spread over several devices."""
    if table is None or len(grid_thw) != 1 or is_split(model) or model.device.type != "cuda":
        return None
    key = ("vision",) + tuple(int(x) for x in grid_thw[0])
    graphs = table
    if key not in graphs:
        graphs[key] = VisionGraph(model, grid_thw, pixel_shape)
    return graphs[key]


class VisionGraph:
    """The vision tower for one frame grid: its index tables computed once, then (GPU) one CUDA graph.

    The stock forward recomputes rotary positions, window order and sequence bounds from the grid on
    every call, with host syncs among them, then launches ~30 kernels per block: at 448x448 a chunk's
    tower was ~17 ms of host time for ~5 ms of GPU work (H200). The tables go in as transformers'
    precomputed kwargs, so the tower's own forward runs unchanged, and on a GPU that forward is
    captured once and replayed per chunk with the pixels copied into a fixed input buffer.
    """

    def __init__(self, model, grid_thw: torch.Tensor, pixel_shape) -> None:
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

        vis = model.model.visual
        dev = model.device
        grid = grid_thw.to(dev)
        cu, _ = get_vision_attention_seqlens(grid, vis.config, kwargs={"max_seqlen": 0})
        window_index, cu_window = get_vision_window_index(
            grid, spatial_merge_size=vis.spatial_merge_size, window_size=vis.window_size, patch_size=vis.patch_size
        )
        self.kwargs = dict(
            position_ids=get_vision_position_ids(grid, vis.spatial_merge_size),
            cu_seqlens=cu,
            max_seqlen=int((cu[1:] - cu[:-1]).max()),
            window_index=window_index.to(dev),
            cu_window_seqlens=cu_window,
            max_window_seqlen=int((cu_window[1:] - cu_window[:-1]).max()),
        )
        # the per-window index tables of the float32/float16 window attention, made now: inside a
        # capture their host<->device copies fail (the float32 `compare` crash on an H200); held here
        # so they live as long as the graph that reads them
        self.window_groups = [_window_groups(cu), _window_groups(cu_window)]
        self.vis, self.grid = vis, grid
        self.pixels = torch.zeros(tuple(pixel_shape), dtype=vis.dtype, device=dev)
        self.out = None
        self.graph = None

    def forward(self) -> torch.Tensor:
        """The stock tower on `self.pixels` with the precomputed tables (it pops them: pass a copy)."""
        return self.vis(self.pixels, grid_thw=self.grid, **dict(self.kwargs)).pooler_output

    @torch.inference_mode()
    def run(self, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The tower's embeddings [tokens, D] of `pixel_values` (None: of whatever the buffer holds)."""
        if pixel_values is not None:
            self.pixels.copy_(pixel_values, non_blocking=True)
        if self.pixels.device.type != "cuda":
            return self.forward()
        if self.graph is None:
            _warm_on_side_stream(self.forward)  # Triton compiles, cuBLAS picks kernels, off the capture
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode=CAPTURE_MODE):
                self.out = self.forward()
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites `out`


# --- decode steps as one CUDA graph --------------------------------------------------------------


class StaticDecoder:
    """Greedy decode steps over the growing cache's fixed-capacity buffers.

    A step in eager transformers is ~900 small kernels and ~20 ms of Python for the 3B model, 8x its
    memory floor. Here a step reads and writes only fixed-shape tensors: the token, its position and
    the cache length live in device buffers, the new K/V go in with `index_copy_`, and attention runs
    over the whole buffer with a mask of the filled part (grouped heads as a batched matmul, no KV
    copies). That makes a step capturable once as a CUDA graph and replayed per token; the graph is
    captured again only when the cache's buffers are reallocated. On the CPU `step()` runs eagerly.

    On a GPU in bf16/fp16 attention is flash attention's varlen entry point instead of the masked
    product: it reads the cache length from a device tensor (`cu_k`), so it sits in the graph, and for
    one query with grouped KV heads it splits the cache across the GPU (H200, 115k tokens: 0.08 ms a
    layer against 0.33 for the masked product, `scripts/attn_probe.py`).
    """

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.lm = model.model.language_model
        dev = model.device
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # text position of `token`
        self.length = torch.zeros(1, dtype=torch.long, device=dev)  # cache tokens before `token`
        self.mask = None  # [capacity]: 0 where filled, -inf beyond (the masked path)
        self.flash = dev.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)
        self.cu_q = torch.tensor([0, 1], dtype=torch.int32, device=dev)  # varlen bounds: one query ...
        self.cu_k = torch.zeros(2, dtype=torch.int32, device=dev)  # ... over cu_k[1] keys (length + 1)
        self.logits = torch.zeros(model.lm_head.out_features, dtype=model.lm_head.weight.dtype, device=dev)  # the last step's
        self.graph = None
        self._graph_key = None

    def prepare(self, token: int, pos: int, max_steps: int) -> None:
        """Room for `max_steps` more tokens, and the step inputs set for feeding `token` at `pos`."""
        n = self.cache.get_seq_length()
        for layer in self.cache.layers:
            layer._reserve(n + max_steps, layer._k, layer._v)
        cap = self.cache.layers[0]._k.shape[-2]
        if self.mask is None or self.mask.shape[0] != cap:
            self.mask = torch.empty(cap, dtype=self.cache.layers[0]._k.dtype, device=self.token.device)
        self.mask.fill_(float("-inf"))
        self.mask[:n] = 0.0
        self.token.fill_(token)
        self.pos.fill_(pos)
        self.length.fill_(n)

    def step(self) -> None:
        """Feed `token` at `pos`: append its K/V at `length`, write the next greedy token into `token`."""
        lm = self.lm
        hidden = lm.embed_tokens(self.token.view(1, 1))  # [1, 1, D]
        cos, sin = lm.rotary_emb(hidden, self.pos.view(1, 1, 1).expand(3, 1, 1))
        if self.flash:
            self.cu_k[1:].copy_(self.length + 1)
        else:
            self.mask.index_fill_(0, self.length, 0.0)
        for layer, kv in zip(lm.layers, self.cache.layers):
            attn = layer.self_attn
            q, k, v = _layer_first_half(layer, hidden, cos, sin)  # q [1, H, 1, Dh], k/v [1, H_kv, 1, Dh]
            kv._k.index_copy_(2, self.length, k)
            kv._v.index_copy_(2, self.length, v)
            if self.flash:
                out = torch.ops.aten._flash_attention_forward(
                    q[0].transpose(0, 1).contiguous(), kv._k[0].transpose(0, 1), kv._v[0].transpose(0, 1),
                    self.cu_q, self.cu_k, 1, kv._k.shape[-2], 0.0, False, False, scale=attn.scaling,
                )[0]  # [1, H, Dh]
                hidden = _layer_second_half(layer, hidden, out.reshape(1, 1, -1))
                continue
            h_kv = kv._k.shape[1]
            qg = q.reshape(1, h_kv, -1, attn.head_dim)  # [1, H_kv, G, Dh]: heads grouped by their KV head
            scores = torch.matmul(qg, kv._k.transpose(-1, -2)).float() * attn.scaling + self.mask  # [1, H_kv, G, C]
            probs = torch.softmax(scores, dim=-1).to(kv._v.dtype)
            # probs @ V reduces over the whole capacity with only G rows: split it into blocks so the GPU
            # runs one small product per block instead of a few long ones (split-K), then sum the blocks
            g, cap = probs.shape[2], probs.shape[3]
            blocks = cap // BLOCK_TOKENS
            p_blk = probs.view(1, h_kv, g, blocks, BLOCK_TOKENS).transpose(2, 3)  # [1, H_kv, S, G, B]
            v_blk = kv._v.view(1, h_kv, blocks, BLOCK_TOKENS, attn.head_dim)  # [1, H_kv, S, B, Dh]
            out = torch.matmul(p_blk, v_blk).float().sum(2).to(kv._v.dtype)  # [1, H_kv, G, Dh]
            hidden = _layer_second_half(layer, hidden, out.reshape(1, 1, -1))  # out: [1, 1, H * Dh]
        logits = self.model.lm_head(lm.norm(hidden))[0, -1]
        self.logits.copy_(logits)  # kept for teacher-forced checks (tests/test_gpu_tier.py)
        self.token.copy_(torch.argmax(logits).view(1))
        self.length.add_(1)
        self.pos.add_(1)

    def run(self) -> None:
        """One step: a CUDA graph replay on the GPU (captured on first use per buffer set), eager on the CPU."""
        if self.token.device.type != "cuda":
            self.step()
            return
        key = _buffers_key(self.cache)
        if self.graph is None or key != self._graph_key:
            saved = (self.token.clone(), self.pos.clone(), self.length.clone(), self.mask.clone())
            _warm_on_side_stream(self.step)
            for buf, val in zip((self.token, self.pos, self.length, self.mask), saved):
                buf.copy_(val)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode=CAPTURE_MODE):
                self.step()
            for buf, val in zip((self.token, self.pos, self.length, self.mask), saved):
                buf.copy_(val)  # capture ran the step's kernels once more; undo, then replay for real
            self._graph_key = key
        self.graph.replay()

    def commit(self, steps: int) -> None:
        """Tell the cache layers how many tokens the steps appended."""
        for layer in self.cache.layers:
            layer._len += steps
            layer._views()


class QuestionPrefill:
    """A question's prefill for one length bucket as CUDA graphs, attention run eagerly between them.

    An eager prefill of a 32-token question is ~740 kernel launches and ~16 ms of host time for the 3B
    model (H200), more than its GPU time, and the stream's frame thread competes for the same host.
    Here the work between two attention calls (the o-projection, MLP and norms of layer i, then the
    q/k/v projections and rotary of layer i+1, with K/V written into the cache buffers at `slot`) is
    one graph: 37 replays and 36 flash calls per question. Attention stays eager because its length
    changes with the cache. Inputs are fixed-shape buffers (`ids`, `pos`, `slot`, `last`), so the
    graphs are captured once per cache buffer set. On the CPU the same segments run eagerly.

    With `chunk=True` the same graphs append a video chunk: the input is the chunk's embeddings
    (copied into `hidden`) at its M-RoPE positions, and nothing after the last layer's attention is
    computed (only the K/V a chunk leaves in the cache matter).
    """

    def __init__(self, model, cache, bucket: int, chunk: bool = False):
        lm = model.model.language_model
        self.model, self.cache, self.lm, self.t, self.chunk = model, cache, lm, bucket, chunk
        dev, dt = model.device, lm.embed_tokens.weight.dtype
        cfg = lm.config
        self.dh = cfg.hidden_size // cfg.num_attention_heads
        self.ids = torch.zeros(bucket, dtype=torch.long, device=dev)
        self.pos = torch.zeros(3, bucket, dtype=torch.long, device=dev)
        self.arange = torch.arange(bucket, device=dev)
        self.slot = torch.zeros(bucket, dtype=torch.long, device=dev)  # cache rows the bucket's K/V go to
        self.last = torch.zeros(1, dtype=torch.long, device=dev)  # the last real token
        self.hidden = torch.zeros(1, bucket, cfg.hidden_size, dtype=dt, device=dev)
        self.q = torch.zeros(1, cfg.num_attention_heads, bucket, self.dh, dtype=dt, device=dev)
        self.attn_out = torch.zeros(1, bucket, cfg.num_attention_heads * self.dh, dtype=dt, device=dev)
        self.logits = torch.zeros(model.lm_head.out_features, dtype=torch.float32, device=dev)
        self.cos = self.sin = None
        self.queries: torch.Tensor | None = None  # [L, H, bucket, Dh] rotated: kept while `keep_queries`
        self.keep_queries = False
        self.graphs: list | None = None
        self._graph_key = None

    def _segment(self, i: int) -> None:
        """Layer i-1's second half (i > 0) and layer i's first half (i < layers); the head at the end."""
        lm = self.lm
        if i == 0:
            if not self.chunk:
                self.hidden.copy_(lm.embed_tokens(self.ids.view(1, -1)))
            cos, sin = lm.rotary_emb(self.hidden, self.pos.view(3, 1, -1))
            if self.cos is None:  # the first (eager) run allocates them outside any graph
                self.cos, self.sin = torch.empty_like(cos), torch.empty_like(sin)
            self.cos.copy_(cos)
            self.sin.copy_(sin)
        else:
            self.hidden.copy_(_layer_second_half(lm.layers[i - 1], self.hidden, self.attn_out))
        if i < len(lm.layers):
            kv = self.cache.layers[i]
            q, k, v = _layer_first_half(lm.layers[i], self.hidden, self.cos, self.sin)
            kv._k.index_copy_(2, self.slot, k)
            kv._v.index_copy_(2, self.slot, v)
            self.q.copy_(q)
        else:
            hidden = lm.norm(self.hidden.index_select(1, self.last))  # [1, 1, D]
            self.logits.copy_(self.model.lm_head(hidden)[0, 0].float())

    def _attend(self, i: int, n: int) -> None:
        """Layer i's attention: the bucket's queries over the cache's first n tokens and the bucket."""
        if self.keep_queries:  # eager, between the graphs: a copy of this layer's (rotated) queries
            if self.queries is None:
                self.queries = torch.zeros((len(self.lm.layers),) + tuple(self.q.shape[1:]), dtype=self.q.dtype, device=self.q.device)
            self.queries[i].copy_(self.q[0])
        kv = self.cache.layers[i]
        k, v = kv._k[..., : n + self.t, :], kv._v[..., : n + self.t, :]
        out, _ = _stream_sdpa(None, self.q, k, v, None, scaling=self.lm.layers[i].self_attn.scaling)
        self.attn_out.copy_(out.view(1, self.t, -1))

    @property
    def segments(self) -> int:
        return len(self.lm.layers) + (0 if self.chunk else 1)

    def _eager(self, n: int) -> None:
        layers = len(self.lm.layers)
        for i in range(self.segments):
            self._segment(i)
            if i < layers:
                self._attend(i, n)

    @torch.inference_mode()
    def capture(self, n: int) -> None:
        """Capture the segments' graphs (GPU only); runs them once eagerly first, writing K/V rows
        [n, n + bucket) beyond the cache's length, which the next append or prefill overwrites."""
        if self.hidden.device.type != "cuda":
            return
        torch.add(self.arange, n, out=self.slot)
        _warm_on_side_stream(lambda: self._eager(n))
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        for i in range(self.segments):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, capture_error_mode=CAPTURE_MODE):
                self._segment(i)
            graphs.append(g)
        self.graphs, self._graph_key = graphs, _buffers_key(self.cache)

    def _inputs(self, ids, positions, n: int, n_real: int) -> None:
        if self.chunk:
            self.hidden.copy_(ids)
        else:
            self.ids.copy_(ids, non_blocking=True)
        self.pos.copy_(positions, non_blocking=True)
        torch.add(self.arange, n, out=self.slot)
        self.last.fill_(n_real - 1)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, n_real: int) -> torch.Tensor:
        """Prefill `ids` [bucket] (the first n_real real, the rest padding) at `positions` [3, bucket]
        after the cache's tokens; the cache keeps the n_real real ones. Returns the logits [V] of the
        last real token. For a chunk `ids` are the embeddings [1, bucket, D] and nothing is returned."""
        n = self.cache.get_seq_length()
        for layer in self.cache.layers:
            layer._reserve(n + self.t, layer._k, layer._v)
        self._inputs(ids, positions, n, n_real)
        if self.hidden.device.type == "cuda" and self.t <= (MAX_CHUNK_GRAPH if self.chunk else MAX_GRAPH_BUCKET):
            if self.graphs is None or self._graph_key != _buffers_key(self.cache):
                self.capture(n)
                self._inputs(ids, positions, n, n_real)
            layers = len(self.lm.layers)
            for i, graph in enumerate(self.graphs):
                graph.replay()
                if i < layers:
                    self._attend(i, n)
        else:
            self._eager(n)
        for layer in self.cache.layers:
            layer._len = n + n_real
            layer._views()
        return self.logits


    def queries_before_rope(self, n_real: int) -> torch.Tensor:
        """The last run's queries of its n_real real tokens, every layer, with the rotary embedding
        undone: [L, H, n_real, Dh] (the run must have had `keep_queries` set)."""
        from .forward import unrotate

        return unrotate(self.queries[:, :, :n_real], self.cos[:, :n_real], self.sin[:, :n_real])


MAX_GRAPH_BUCKET = 256  # longer questions run the same segments eagerly, with no graphs


def question_prefill(model, cache, bucket: int, table: dict) -> QuestionPrefill | None:
    """The QuestionPrefill for `bucket` tokens on `cache`, kept in `table` (made on first use), or None
    where it does not apply (the stock cache, a model spread over several devices)."""
    if static_decoder(model, cache, table) is None:
        return None
    key = ("question", bucket)
    if key not in table:
        table[key] = QuestionPrefill(model, cache, bucket)
    return table[key]


SEGMENTS_ON_CPU = False  # tests run chunk appends through the graphs' segments (eagerly) on the CPU
MAX_CHUNK_GRAPH = 1024  # larger chunks are GPU-bound: eager (their graphs would hold 100s of MB)


def chunk_append(model, cache, tokens: int, table: dict) -> QuestionPrefill | None:
    """The graphs appending a video chunk of `tokens` tokens to `cache` (see QuestionPrefill), kept in
    `table`, or None where they do not apply (not a GPU, a chunk over MAX_CHUNK_GRAPH, the stock
    cache, several devices)."""
    if (model.device.type != "cuda" and not SEGMENTS_ON_CPU) or tokens > MAX_CHUNK_GRAPH or static_decoder(model, cache, table) is None:
        return None
    key = ("chunk", tokens)
    if key not in table:
        table[key] = QuestionPrefill(model, cache, tokens, chunk=True)
    return table[key]


def static_decoder(model, cache, table: dict) -> StaticDecoder | None:
    """The StaticDecoder for `cache`, kept in `table`, or None where it does not apply (the stock
    cache, a model spread over several devices by accelerate)."""
    if is_split(model):
        return None
    if not cache.layers or not hasattr(cache.layers[0], "_reserve") or not cache.layers[0].is_initialized:
        return None
    if "decoder" not in table:
        table["decoder"] = StaticDecoder(model, cache)
    return table["decoder"]
