"""Phi's partial rotary embedding as one Triton kernel, forward and backward.

    out = rope(x, cos, sin, head_dim)   # x [B, S, heads * head_dim], cos/sin [B or 1, S, rotary_dims]

Same maths as transformers' apply_rotary_pos_emb on the first `rotary_dims` of each head (the
rotate_half convention), the rest of the head passed through: for j < half,
out[j] = x[j] cos[j] - x[j + half] sin[j]; for half <= j < rotary_dims,
out[j] = x[j] cos[j] + x[j - half] sin[j]. One read of x and one write, where torch needs
broadcast multiplies that it does not vectorise (about a tenth of an evaluation pass of Phi-2
in torch ops, a fifth of that as this kernel: bench/RESULTS.md). Computed in fp32, rounded once
to x's dtype.

On an Ampere or newer GPU with Triton (torch's CUDA builds ship it) unless speed.triton_rotary
is off (phi_attention.py decides); `available(x)` says whether it can run. The tests run the same kernel on CPU through Triton's interpreter
(TRITON_INTERPRET=1, set before the first call).
"""

from __future__ import annotations

import functools
import os

import torch


def available(x: torch.Tensor) -> bool:
    """True where the kernel runs: a CUDA tensor (or any, under Triton's interpreter) and Triton."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _kernel() is not None
    # Ampere or newer: the GPUs it was measured on; elsewhere (a T4) the torch formula runs
    return x.is_cuda and _capable(x.device.index) and _kernel() is not None


@functools.cache
def _capable(index: int | None) -> bool:  # asked by every attention layer: once per device
    return torch.cuda.get_device_capability(index) >= (8, 0)


@functools.cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    # Token count, sequence length and the tables' strides vary with every batch shape: not
    # specialised on, so a new shape never compiles (nor does it inside a CUDA graph capture).
    @triton.jit(do_not_specialize=["n_tokens", "seq", "stride_b", "stride_s"])
    def rope_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        n_tokens,
        seq,
        stride_b,
        stride_s,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HALF: tl.constexpr,
        ROT: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BACKWARD: tl.constexpr,
    ):
        n = tl.program_id(0)  # one token
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # a block of its heads
        j = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < HEADS) & (j < HEAD_DIM)
        partner = tl.where(j < HALF, j + HALF, tl.where(j < ROT, j - HALF, j))
        row = x_ptr + n.to(tl.int64) * (HEADS * HEAD_DIM) + h * HEAD_DIM
        x = tl.load(row + j, mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(row + partner, mask=mask, other=0.0).to(tl.float32)
        table = (n // seq) * stride_b + (n % seq) * stride_s
        c = tl.load(cos_ptr + table + j, mask=j < ROT, other=1.0).to(tl.float32)
        if BACKWARD:  # the transpose: dx[j] = g[j] cos[j] +- g[partner] sin[partner]
            s = tl.load(sin_ptr + table + partner, mask=j < ROT, other=0.0).to(tl.float32)
            out = x * c + tl.where(j < HALF, xp * s, -xp * s)
        else:
            s = tl.load(sin_ptr + table + j, mask=j < ROT, other=0.0).to(tl.float32)
            out = x * c + tl.where(j < HALF, -xp * s, xp * s)
        tl.store(
            out_ptr + n.to(tl.int64) * (HEADS * HEAD_DIM) + h * HEAD_DIM + j,
            out.to(out_ptr.dtype.element_ty),
            mask=mask,
        )

    return rope_kernel, triton.next_power_of_2


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, backward: bool) -> torch.Tensor:
    kernel, next_pow2 = _kernel()
    batch, seq, width = x.shape
    heads, rot = width // head_dim, cos.shape[-1]
    cos = cos.expand(batch, seq, rot)
    sin = sin.expand(batch, seq, rot)
    assert cos.stride() == sin.stride() and cos.stride(-1) == 1, "cos and sin must share a layout"
    out = torch.empty_like(x)
    block_h = min(next_pow2(heads), 16)
    kernel[(batch * seq, -(-heads // block_h))](
        x,
        cos,
        sin,
        out,
        batch * seq,
        seq,
        cos.stride(0),
        cos.stride(1),
        HEADS=heads,
        HEAD_DIM=head_dim,
        HALF=rot // 2,
        ROT=rot,
        BLOCK_H=block_h,
        BLOCK_D=next_pow2(head_dim),
        BACKWARD=backward,
        num_warps=4,
    )
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, head_dim):
        ctx.save_for_backward(cos, sin)
        ctx.head_dim = head_dim
        return _launch(x.contiguous(), cos, sin, head_dim, backward=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _launch(grad.contiguous(), cos, sin, ctx.head_dim, backward=True), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x [B, S, heads * head_dim] with the rotary embedding applied (see the module docstring);
    cos and sin [B or 1, S, rotary_dims] as transformers' rotary module returns them."""
    return _Rope.apply(x, cos.contiguous(), sin.contiguous(), head_dim)


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The same in plain torch (transformers' formula), for tests."""
    b, s, width = x.shape
    xh = x.view(b, s, width // head_dim, head_dim)
    rot = cos.shape[-1]
    xr, xpass = xh[..., :rot], xh[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = torch.cat((xr * cos.unsqueeze(2) + rotated * sin.unsqueeze(2), xpass), dim=-1)
    return out.view(b, s, width)
