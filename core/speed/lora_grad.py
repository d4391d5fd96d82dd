"""The LoRA path's share of the input gradient, under dropout, as one Triton kernel.

    add_masked(gx, v, a, mask, p)   # gx += mask * (v @ a) / (1 - p), in place

In QLoRALinearFn's backward the input gradient is gx = g W + m * (v A), with v = s g B (rows x r)
and m the dropout mask. In torch ops that is a GEMM writing v A (rows x d_in), the mask applied
(another tensor of that size) and an add into gx: three kernels and two temporaries per LoRA
layer. Here one kernel computes each tile of v A (K = r, padded to 16 for the tensor cores) in
fp32, applies the mask and adds it into gx (rounded once; torch rounds v A and the masked copy to
the dtype first: the two differ by about a unit in the last place). On an Ampere or newer GPU with
Triton for a bool mask (CUDA's dropout); `available(gx)` says where (under TRITON_INTERPRET=1
anywhere: the tests); elsewhere qlinear keeps its torch ops.
"""

from __future__ import annotations

import functools
import os

import torch

BM, BN = 64, 128


def available(gx: torch.Tensor) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _kernel() is not None
    return gx.is_cuda and _capable(gx.device.index) and _kernel() is not None


@functools.cache
def _capable(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


@functools.cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    # the row count varies with the batch: not specialised on (a new shape never compiles)
    @triton.jit(do_not_specialize=["rows", "keep"])
    def add_masked_kernel(
        gx_ptr,
        v_ptr,
        a_ptr,
        mask_ptr,
        rows,
        keep,
        N: tl.constexpr,
        R: tl.constexpr,
        R_PAD: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        m = tl.program_id(0) * BM + tl.arange(0, BM)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        k = tl.arange(0, R_PAD)
        v = tl.load(
            v_ptr + m[:, None].to(tl.int64) * R + k[None, :], mask=(m[:, None] < rows) & (k[None, :] < R), other=0.0
        )
        a = tl.load(a_ptr + k[:, None] * N + n[None, :], mask=(k[:, None] < R) & (n[None, :] < N), other=0.0)
        # fp32 operands: a 16-bit value is exact in TF32 as in fp32, so the products are exact either way
        # (and Triton's interpreter multiplies no bf16); fp32 inputs ask for IEEE products
        if IEEE:
            va = tl.dot(v.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        else:
            va = tl.dot(v.to(tl.float32), a.to(tl.float32))
        inside = (m[:, None] < rows) & (n[None, :] < N)
        offs = m[:, None].to(tl.int64) * N + n[None, :]
        kept = tl.load(mask_ptr + offs, mask=inside, other=0).to(tl.float32)
        g = tl.load(gx_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(gx_ptr + offs, (g + va * kept * keep).to(gx_ptr.dtype.element_ty), mask=inside)

    return add_masked_kernel, triton.next_power_of_2


def add_masked(gx: torch.Tensor, v: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """gx [rows, d_in] += mask * (v [rows, r] @ a [r, d_in]) / (1 - p), in place; returns gx. gx,
    v and a share a dtype; mask is bool, gx's shape."""
    kernel, next_pow2 = _kernel()
    rows, n = gx.shape
    r = v.shape[1]
    if rows:
        kernel[(-(-rows // BM), -(-n // BN))](
            gx,
            v.contiguous(),
            a.contiguous(),
            mask.contiguous(),
            rows,
            1.0 / (1.0 - p),
            N=n,
            R=r,
            R_PAD=max(16, next_pow2(r)),
            BM=BM,
            BN=BN,
            IEEE=gx.dtype == torch.float32,
            num_warps=4,
        )
    return gx
