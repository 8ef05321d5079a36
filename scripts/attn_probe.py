"""Probe attention and GEMM primitives for the 3B model's shapes on a GPU (speed and correctness).

    python scripts/attn_probe.py --out probe.json

Answers, for one card, before any engine change: which SDPA backend appends a chunk to a long cache
fastest (flash lower-right as the engine does today, cuDNN or flash over the cache with the grouped
query heads folded into rows, merged with a causal self part by log-sum-exp), what cuDNN's plan costs
on a new length, whether flash's varlen entry point takes a device-side cache length inside a CUDA
graph (for static question prefill and decode), and what padding the vision MLP's width (3420, not a
multiple of 8) does to its matrix products.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

H, HK, D = 16, 2, 128
G = H // HK
SCALE = D**-0.5
DEV = "cuda"
DT = torch.bfloat16
results: dict = {}


def timed(fn, reps: int = 10) -> float:
    """Median ms of `fn` over `reps` runs (CUDA events), after two warm-ups."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def first_call_ms(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def merge(o1, l1, o2, l2):
    """Merge two partial attentions (outputs [.., L, D], lse [.., L] natural log) into one."""
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    s = w1 + w2
    return (o1.float() * (w1 / s)[..., None] + o2.float() * (w2 / s)[..., None]).to(DT)


def fold(q):
    """[1, H, L, D] -> [1, HK, G*L, D]: the G query heads of each KV head become rows."""
    return q.reshape(1, HK, G * q.shape[2], D)


def unfold(o, L):
    return o.reshape(1, H, L, D)


def note(key, value):
    results[key] = value
    print(f"{key}: {value}", flush=True)


def probe_append(L: int, S: int) -> None:
    tag = f"append L={L} S={S}"
    g = torch.Generator(device=DEV).manual_seed(L + S)
    q = torch.randn(1, H, L, D, device=DEV, dtype=DT, generator=g)
    k = torch.randn(1, HK, S + L, D, device=DEV, dtype=DT, generator=g)
    v = torch.randn(1, HK, S + L, D, device=DEV, dtype=DT, generator=g)
    flops = 4 * H * D * L * (S + L / 2)

    def ref():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, S + L), enable_gqa=True)

    out_ref = ref()
    t = timed(ref)
    note(f"{tag} flash_lr ms", round(t, 3))
    note(f"{tag} flash_lr TFLOP/s", round(flops / t / 1e9, 1))
    # aten flash with GQA K and is_causal (bottom-right for non-square), returning the lse
    try:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=SCALE)[:2]
        note(f"{tag} aten_flash_gqa rel", rel(o, out_ref))
        note(f"{tag} aten_flash lse shape", list(lse.shape))
    except Exception as e:  # noqa: BLE001
        note(f"{tag} aten_flash_gqa error", repr(e)[:300])
    kp, vp = k[:, :, :S], v[:, :, :S]
    kn, vn = k[:, :, S:], v[:, :, S:]
    qf = fold(q)

    def self_part():
        return torch.ops.aten._scaled_dot_product_flash_attention(q, kn, vn, 0.0, True, False, scale=SCALE)[:2]

    for backend in ("cudnn", "flash"):
        def prefix():
            if backend == "cudnn":
                return torch.ops.aten._scaled_dot_product_cudnn_attention(qf, kp, vp, None, True, 0.0, False, False, scale=SCALE)[:2]
            return torch.ops.aten._scaled_dot_product_flash_attention(qf, kp, vp, 0.0, False, False, scale=SCALE)[:2]

        try:
            note(f"{tag} {backend}_fold first call ms", round(first_call_ms(prefix), 1))

            def split():
                o1, l1 = prefix()
                o2, l2 = self_part()
                return merge(unfold(o1, L), l1.reshape(1, H, L), o2, l2.reshape(1, H, L))

            note(f"{tag} {backend}_fold+self rel", rel(split(), out_ref))
            t1 = timed(prefix)
            note(f"{tag} {backend}_fold prefix ms", round(t1, 3))
            note(f"{tag} {backend}_fold prefix TFLOP/s", round(4 * H * D * L * S / t1 / 1e9, 1))
            note(f"{tag} {backend}_fold+self+merge ms", round(timed(split), 3))
        except Exception as e:  # noqa: BLE001
            note(f"{tag} {backend}_fold error", repr(e)[:300])
    try:
        cu = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, kp, vp, None, True, 0.0, False, False, scale=SCALE)[:2]
        cu()
        note(f"{tag} cudnn_gqa_direct ms", round(timed(cu), 3))
    except Exception as e:  # noqa: BLE001
        note(f"{tag} cudnn_gqa_direct error", repr(e)[:200])
    del q, k, v, kp, vp
    torch.cuda.empty_cache()


def probe_static(T: int, n: int, cap: int = 131072, block: int = 8192) -> None:
    """Attention of T new queries over a fixed-capacity buffer with a device-side length n."""
    tag = f"static T={T} n={n}"
    g = torch.Generator(device=DEV).manual_seed(T + n)
    kbuf = torch.randn(1, HK, cap, D, device=DEV, dtype=DT, generator=g)
    vbuf = torch.randn(1, HK, cap, D, device=DEV, dtype=DT, generator=g)
    q = torch.randn(1, H, T, D, device=DEV, dtype=DT, generator=g)
    # reference: exact length, lower-right causal (new tokens already written at n..n+T)
    out_ref = F.scaled_dot_product_attention(
        q, kbuf[:, :, : n + T], vbuf[:, :, : n + T],
        attn_mask=None if T == 1 else causal_lower_right(T, n + T), enable_gqa=True)
    exact = lambda: F.scaled_dot_product_attention(
        q, kbuf[:, :, : n + T], vbuf[:, :, : n + T],
        attn_mask=None if T == 1 else causal_lower_right(T, n + T), enable_gqa=True)
    note(f"{tag} eager exact-length sdpa ms", round(timed(exact), 3))
    length = torch.tensor([n], device=DEV)

    # (a) masked matmul over the whole buffer, as StaticDecoder does today (T rows per group)
    def masked():
        qg = q.reshape(1, HK, G * T, D)
        scores = torch.matmul(qg, kbuf.transpose(-1, -2)).float() * SCALE
        kpos = torch.arange(cap, device=DEV)
        qpos = length + torch.arange(T, device=DEV).repeat(G)
        scores = scores.masked_fill(kpos.view(1, -1) > qpos.view(-1, 1), float("-inf"))
        p = torch.softmax(scores, -1).to(DT)
        return torch.matmul(p, vbuf).reshape(1, H, T, D)

    note(f"{tag} masked_mm rel", rel(masked(), out_ref))
    note(f"{tag} masked_mm ms", round(timed(masked), 3))
    k3 = kbuf[0].transpose(0, 1)  # [cap, HK, D] view
    v3 = vbuf[0].transpose(0, 1)
    q3 = q[0].transpose(0, 1).contiguous()  # [T, H, D]

    # (b) varlen flash, one sequence, device-side cu_seqlens_k
    cu_q = torch.tensor([0, T], device=DEV, dtype=torch.int32)
    cu_k = torch.tensor([0, n + T], device=DEV, dtype=torch.int32)

    def varlen_one():
        return torch.ops.aten._flash_attention_forward(q3, k3, v3, cu_q, cu_k, T, cap, 0.0, T > 1, False, scale=SCALE)[0]

    try:
        o = varlen_one()
        note(f"{tag} varlen_one rel", rel(o.transpose(0, 1).unsqueeze(0), out_ref))
        note(f"{tag} varlen_one ms", round(timed(varlen_one), 3))
    except Exception as e:  # noqa: BLE001
        note(f"{tag} varlen_one error", repr(e)[:300])

    # (c) varlen flash, prefix split in fixed blocks (seqused_k from the device length), GQA folded, + self part
    nb = cap // block
    cu_qb = torch.arange(0, (nb + 1) * G * T, G * T, device=DEV, dtype=torch.int32)
    cu_kb = torch.arange(0, (nb + 1) * block, block, device=DEV, dtype=torch.int32)
    starts = torch.arange(nb, device=DEV) * block

    def blocks():
        used = (length - starts).clamp(0, block).to(torch.int32)
        qf = q[0].reshape(HK, G * T, D).transpose(0, 1)  # [G*T, HK, D] rows: head-major within group
        qb = qf.unsqueeze(0).expand(nb, -1, -1, -1).reshape(nb * G * T, HK, D)
        o, lse = torch.ops.aten._flash_attention_forward(
            qb, k3, v3, cu_qb, cu_kb, G * T, block, 0.0, False, False, scale=SCALE, seqused_k=used)[:2]
        # o [nb*G*T, HK, D]; lse [HK, nb*G*T] (varlen layout) or other: normalise below
        o = o.view(nb, G * T, HK, D).float()
        if lse.dim() == 2:  # [HK, total_q]
            lse = lse.reshape(HK, nb, G * T).permute(1, 2, 0)  # [nb, G*T, HK]
        else:  # [nb, HK, max_q]
            lse = lse[:, :, : G * T].permute(0, 2, 1)
        lse = torch.where(used.view(nb, 1, 1) > 0, lse, float("-inf"))
        m = lse.amax(0, keepdim=True)
        w = torch.exp(lse - m)  # [nb, G*T, HK]
        o1 = (o * w[..., None]).sum(0) / w.sum(0)[..., None]  # [G*T, HK, D]
        l1 = (m[0] + torch.log(w.sum(0)))  # [G*T, HK]
        o1 = o1.transpose(0, 1).reshape(1, H, T, D)
        l1 = l1.transpose(0, 1).reshape(1, H, T)
        # self part: T new tokens at n..n+T, causal
        kn, vn = kbuf[:, :, n : n + T], vbuf[:, :, n : n + T]  # fixed n here; the engine would gather by index
        s = torch.matmul(q.reshape(1, HK, G * T, D), kn.transpose(-1, -2)).float() * SCALE
        causal = torch.ones(T, T, device=DEV, dtype=torch.bool).tril().repeat(G, 1)
        s = s.masked_fill(~causal, float("-inf"))
        l2 = torch.logsumexp(s, -1)
        o2 = torch.matmul(torch.softmax(s, -1).to(DT), vn).reshape(1, H, T, D)
        return merge(o1, l1, o2, l2.reshape(1, H, T))

    # the prefix excludes the new tokens: the blocks read [0, n)
    try:
        note(f"{tag} varlen_blocks rel", rel(blocks(), out_ref))
        note(f"{tag} varlen_blocks ms", round(timed(blocks), 3))
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            blocks()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out_static = blocks()
        graph.replay()
        torch.cuda.synchronize()
        note(f"{tag} varlen_blocks graph rel", rel(out_static, out_ref))
        note(f"{tag} varlen_blocks graph ms", round(timed(graph.replay), 3))
        # same graph, shorter length: must match the exact-length reference at n2
        n2 = n - 5000
        length.fill_(n2)
        graph.replay()
        ref2 = F.scaled_dot_product_attention(
            q, torch.cat([kbuf[:, :, :n2], kbuf[:, :, n : n + T]], 2), torch.cat([vbuf[:, :, :n2], vbuf[:, :, n : n + T]], 2),
            attn_mask=None if T == 1 else causal_lower_right(T, n2 + T), enable_gqa=True)
        note(f"{tag} varlen_blocks graph at n-5000 rel", rel(out_static, ref2))
        length.fill_(n)
    except Exception as e:  # noqa: BLE001
        note(f"{tag} varlen_blocks error", repr(e)[:300])
    del kbuf, vbuf
    torch.cuda.empty_cache()


def probe_mlp(tokens: int) -> None:
    x = torch.randn(tokens, 1280, device=DEV, dtype=DT)
    for width in (3420, 3424, 3456, 3584):
        w = torch.randn(width, 1280, device=DEV, dtype=DT) * 0.02
        b = torch.randn(width, device=DEV, dtype=DT)
        w2 = torch.randn(1280, width, device=DEV, dtype=DT) * 0.02
        b2 = torch.randn(1280, device=DEV, dtype=DT)
        h = torch.randn(tokens, width, device=DEV, dtype=DT)
        up = timed(lambda: F.linear(x, w, b), 20)
        up_nb = timed(lambda: F.linear(x, w) + b, 20)
        down = timed(lambda: F.linear(h, w2, b2), 20)
        down_nb = timed(lambda: F.linear(h, w2) + b2, 20)
        fl = 2 * tokens * 1280 * width / 1e9
        note(f"mlp tokens={tokens} width={width} up ms / TFLOP/s", [round(up, 3), round(fl / up, 1)])
        note(f"mlp tokens={tokens} width={width} up(no bias epilogue) ms", round(up_nb, 3))
        note(f"mlp tokens={tokens} width={width} down ms / TFLOP/s", [round(down, 3), round(fl / down, 1)])
        note(f"mlp tokens={tokens} width={width} down(no bias epilogue) ms", round(down_nb, 3))


def probe_split_keys(L: int, S: int) -> None:
    """cuDNN over the cache prefix with the keys split into s parts folded into the batch (more thread
    blocks for short chunks), against one call; each merged by log-sum-exp."""
    tag = f"splitk L={L} S={S}"
    g = torch.Generator(device=DEV).manual_seed(L * 7 + S)
    q = torch.randn(1, H, L, D, device=DEV, dtype=DT, generator=g)
    cap = S + 4096
    kbuf = torch.randn(1, HK, cap, D, device=DEV, dtype=DT, generator=g)
    vbuf = torch.randn(1, HK, cap, D, device=DEV, dtype=DT, generator=g)
    k, v = kbuf[:, :, :S], vbuf[:, :, :S]
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    qf = fold(q)
    for parts in (1, 2, 3, 4):
        if S % parts:
            continue

        def run(parts=parts):
            kk = k.view(1, HK, parts, S // parts, D).permute(0, 2, 1, 3, 4).reshape(parts, HK, S // parts, D) if parts > 1 else k
            vv = v.view(1, HK, parts, S // parts, D).permute(0, 2, 1, 3, 4).reshape(parts, HK, S // parts, D) if parts > 1 else v
            qq = qf.expand(parts, -1, -1, -1).contiguous() if parts > 1 else qf
            o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qq, kk, vv, None, True, 0.0, False, False, scale=SCALE)[:2]
            if parts == 1:
                return o
            w = torch.softmax(lse.reshape(parts, HK, -1).float(), dim=0).unsqueeze(-1)  # [parts, HK, G*L, 1]
            return (o.float() * w).sum(0, keepdim=True).to(DT)

        try:
            run()
            torch.cuda.synchronize()
            note(f"{tag} parts={parts} rel", rel(unfold(run(), L), ref))
            t = timed(run)
            note(f"{tag} parts={parts} ms / TFLOP/s", [round(t, 3), round(4 * H * D * L * S / t / 1e9, 1)])
        except Exception as e:  # noqa: BLE001
            note(f"{tag} parts={parts} error", repr(e)[:300])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="probe.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", default="all", help="all, or splitk (key-split cuDNN only)")
    args = ap.parse_args()
    if args.part == "splitk":
        with torch.inference_mode():
            for L, S in [(512, 49152), (512, 98304), (2392, 57344), (2392, 114688)]:
                probe_split_keys(L, S)
        return
    note("device", torch.cuda.get_device_name())
    note("torch", torch.__version__)
    note("cudnn", torch.backends.cudnn.version())
    with torch.inference_mode():
        probe_mlp(9568)
        probe_mlp(2048)
        for L, S in [(2392, 8192), (2392, 57344), (2392, 112640), (512, 49152), (512, 96256)]:
            probe_append(L, S)
            # a new length: what does cuDNN's plan cost once more
            if L == 2392 and S == 57344:
                probe_append(L, S + 2392)
        for T, n in [(1, 115000), (20, 115000), (64, 115000), (20, 2400)]:
            probe_static(T, n)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
