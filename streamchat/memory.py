"""Memory policies: how much of the stream stays in GPU memory, and how the rest is chosen.

- exact: every token stays in the cache; the engine refuses to encode past the model's context or the
  GPU budget (saying how far it got), and keeps all it encoded.
- bounded: the GPU holds a working set of at most `--gpu-kv-budget`: all text, a window of the most
  recent pages, and older pages retained by a query-agnostic score. Every page that leaves it is kept
  exactly in the archive (host memory, then disk); at question time the pages whose mean pre-RoPE key
  best matches the question's pre-RoPE queries are brought back for that answer.
- auto (default): exact while the planned stream fits; bounded from the start when it would not.

The scores (functions below; the tests check them against brute-force loops):
- retention, per page, when it is appended (InfiniPot-V's two signals, on pre-RoPE keys):
  novelty = 1 - mean cosine between each token's key and the same spatial patch's key in the
  previous page (temporal redundancy), and the mean value norm (what the page would add to an
  output); score = novelty x value norm. The lowest-scored pages outside the window leave first.
- retrieval, per archived page: sum over layers and KV heads of q_mean . k_mean / sqrt(Dh), where
  q_mean averages the question's queries over its tokens and the query heads of that KV head, and
  k_mean is the page's mean key (the index). One selection serves every layer, so every layer's
  cache keeps the same length (the decode graph and the positions stay uniform).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # torch is imported inside the score functions: the CLI's parsers read MemoryConfig without it
    import torch

MEMORY_MODES = ("auto", "exact", "bounded")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class MemoryConfig:
    mode: str = "auto"  # exact while the stream fits, bounded when it would not
    # all KV on the GPU: working set + retrieved pages + a question and its answer. 65,536 tokens
    # (2.25 GiB for the 3B model) keeps a 720p chunk near 30 frames/s on an H200 at any stream length
    gpu_kv_budget: str = "65536"
    host_kv_budget: str = "64GiB"  # archive pages in host memory; past this they spill to disk
    retrieve_tokens: int = 8192  # archived tokens brought back per question
    window: float = 0.5  # share of the working set kept for the most recent pages

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "MemoryConfig":
        if self.mode not in MEMORY_MODES:
            raise UserError(f"--memory must be one of {', '.join(MEMORY_MODES)}; got {self.mode}")
        parse_size(self.gpu_kv_budget, "--gpu-kv-budget", tokens_ok=True)
        parse_size(self.host_kv_budget, "--host-kv-budget", tokens_ok=False)
        if self.retrieve_tokens < 0:
            raise UserError(f"--retrieve-tokens must be 0 or more; got {self.retrieve_tokens}")
        if not 0.0 < self.window <= 1.0:
            raise UserError(f"the recent window must be a share in (0, 1]; got {self.window}")
        return self


def parse_size(text: str, flag: str, *, tokens_ok: bool) -> tuple[int, str]:
    """'65536' or '64k' tokens (where tokens_ok), or bytes with a unit ('2.5GiB', '800MB'):
    (value, 'tokens' | 'bytes')."""
    s = str(text).strip().lower().replace("_", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", s)
    example = "65536 (tokens), 64k (tokens) or 2GiB" if tokens_ok else "64GiB or 500MB"
    if not m:
        raise UserError(f"{flag} {text!r} is not a size; write it as {example}")
    value, unit = float(m.group(1)), m.group(2)
    if unit in ("", "k", "m") and tokens_ok:
        n = value * {"": 1, "k": 1024, "m": 1024**2}[unit]
        kind = "tokens"
    elif unit in _UNITS:
        n = value * _UNITS[unit]
        kind = "bytes"
    else:
        raise UserError(f"{flag} {text!r} has an unknown unit {unit!r}; write it as {example}")
    if n <= 0:
        raise UserError(f"{flag} {text!r} must be more than 0; write it as {example}")
    return int(n), kind


@dataclass
class Budget:
    """A memory config resolved for one model and one stream, in tokens."""

    mode: str  # exact | bounded (auto resolved)
    gpu_tokens: int  # every KV row on the GPU
    working_tokens: int  # the working set's limit (bounded); the stream's limit (exact)
    window_tokens: int
    retrieve_tokens: int
    host_bytes: int
    reason: str = ""  # why auto chose what it chose

    def to_json(self) -> dict:
        return asdict(self)


def resolve(config: MemoryConfig, *, bytes_per_token: int, max_context: int, planned_tokens: int,
            chunk_tokens: int, answer_room: int) -> Budget:
    """The token budgets for a stream that will hold `planned_tokens` (prompt, video, a question
    and its answer) in exact mode. Budgets too small for one chunk and a question are refused."""
    value, kind = parse_size(config.gpu_kv_budget, "--gpu-kv-budget", tokens_ok=True)
    gpu_tokens = value if kind == "tokens" else value // bytes_per_token
    host_bytes = parse_size(config.host_kv_budget, "--host-kv-budget", tokens_ok=False)[0]
    limit = min(gpu_tokens, max_context)
    fits = planned_tokens <= limit
    mode = config.mode
    reason = ""
    if mode == "auto":
        mode = "exact" if fits else "bounded"
        if not fits:
            reason = (f"the stream needs {planned_tokens:,} cache tokens, over the "
                      f"{'GPU KV budget' if gpu_tokens < max_context else 'model context'} of {limit:,}: "
                      f"memory is bounded (every page stays retrievable)")
    if mode == "exact":
        return Budget("exact", gpu_tokens, limit, limit, 0, host_bytes, reason)
    retrieve = min(config.retrieve_tokens, gpu_tokens // 4)
    working = min(gpu_tokens, max_context) - retrieve - answer_room
    need = 2 * chunk_tokens + answer_room + retrieve
    if working < 2 * chunk_tokens:
        raise UserError(
            f"--gpu-kv-budget {config.gpu_kv_budget} ({gpu_tokens:,} tokens) cannot hold two chunks "
            f"({chunk_tokens:,} tokens each), a question and its answer; give at least {need:,} tokens"
        )
    window = max(chunk_tokens, int(working * config.window))
    return Budget("bounded", gpu_tokens, working, window, retrieve, host_bytes, reason)


# --- scores -------------------------------------------------------------------------------------


def retention_scores(keys: torch.Tensor, values: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """Scores [P] of P pages from their pre-RoPE keys and values [L, H_kv, P, N, Dh] (N tokens a page)
    and the previous page's pre-RoPE keys [L, H_kv, N, Dh] (None at the start of the stream)."""
    import torch

    k = keys.float()
    before = torch.cat([previous.float().unsqueeze(2), k[:, :, :-1]], dim=2) if previous is not None else None
    cos = torch.zeros(k.shape[:4], dtype=torch.float32, device=k.device)  # [L, H_kv, P, N]
    if before is not None:
        cos = torch.nn.functional.cosine_similarity(k, before, dim=-1)
    elif k.shape[2] > 1:
        cos[:, :, 1:] = torch.nn.functional.cosine_similarity(k[:, :, 1:], k[:, :, :-1], dim=-1)
    novelty = 1.0 - cos.mean(dim=(0, 1, 3))  # [P]
    value_norm = values.float().norm(dim=-1).mean(dim=(0, 1, 3))  # [P]
    return novelty * value_norm


def mean_queries(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Pre-RoPE queries [L, H, T, Dh] -> [L, H_kv, Dh]: averaged over tokens and each KV head's query heads."""
    layers, heads, tokens, dh = queries.shape
    return queries.float().view(layers, kv_heads, heads // kv_heads, tokens, dh).mean(dim=(2, 3))


def page_scores(index: torch.Tensor, q_mean: torch.Tensor) -> torch.Tensor:
    """Scores [P] of pages with mean pre-RoPE keys `index` [P, L, H_kv, Dh] for q_mean [L, H_kv, Dh]:
    one matrix-vector product over the index as it lies (a view, no copy of its P x L x H_kv x Dh)."""
    q = q_mean.to(device=index.device, dtype=index.dtype).reshape(-1)
    return (index.reshape(index.shape[0], -1) @ q) / index.shape[-1] ** 0.5


def select_pages(scores: torch.Tensor, ids: list[int], tokens: list[int], budget: int) -> list[int]:
    """The best-scored pages (ties: the earlier page) whose tokens fit `budget`, in stream order."""
    values = scores.tolist()  # one device sync, not one per page
    order = sorted(range(len(ids)), key=lambda i: (-values[i], ids[i]))
    chosen, used = [], 0
    for i in order:
        if used + tokens[i] > budget:
            continue
        chosen.append(ids[i])
        used += tokens[i]
    return sorted(chosen)
