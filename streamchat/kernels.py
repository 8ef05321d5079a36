"""GPU kernels written for streamchat (Triton), each the same arithmetic as the torch code it replaces.

Imported lazily: Triton comes with CUDA builds of torch only, and nothing here runs on the CPU.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _rotary_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rotary(x_ptr, out_ptr, cos_ptr, sin_ptr, rows, heads, stride_n, stride_h, half,
               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # rows = tokens * heads; row r is token r // heads, head r % heads; out is contiguous [rows, 2 * half]
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        rmask = r < rows
        mask = rmask[:, None] & (d < half)[None, :]
        n, h = r // heads, r % heads
        src = x_ptr + (n * stride_n + h * stride_h)[:, None] + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        trig = (n * 2 * half)[:, None] + d[None, :]
        c1 = tl.load(cos_ptr + trig, mask=mask, other=0.0)
        c2 = tl.load(cos_ptr + trig + half, mask=mask, other=0.0)
        s1 = tl.load(sin_ptr + trig, mask=mask, other=0.0)
        s2 = tl.load(sin_ptr + trig + half, mask=mask, other=0.0)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): the stock float32 arithmetic
        o1 = x1 * c1 + (-x2) * s1
        o2 = x2 * c2 + x1 * s2
        dst = out_ptr + (r * 2 * half)[:, None] + d[None, :]
        tl.store(dst, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half, o2.to(out_ptr.dtype.element_ty), mask=mask)

    return rotary


def rotary_vision(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [N, H, D] (any row/head strides, unit last stride) with float32 cos/sin
    [N, D], computed in float32 and returned contiguous in x's dtype: one kernel instead of seven."""
    n, h, d = x.shape
    out = torch.empty((n, h, d), dtype=x.dtype, device=x.device)
    cos = cos.to(torch.float32).contiguous()
    sin = sin.to(torch.float32).contiguous()
    rows, half = n * h, d // 2
    block_r = 64
    grid = (triton_cdiv(rows, block_r),)
    _rotary_kernel()[grid](x, out, cos, sin, rows, h, x.stride(0), x.stride(1), half,
                           BLOCK_R=block_r, BLOCK_D=max(16, 1 << (half - 1).bit_length()))
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def available() -> bool:
    """Triton importable and a CUDA device present."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
