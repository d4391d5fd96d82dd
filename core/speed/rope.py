"""The rotary position embedding as one Triton kernel, forward and backward, partial or full.

    out = rope(x, cos, sin, head_dim)   # x [B, S, heads * head_dim] (Phi: rotary on part of a head)
    q = rope_heads(q, cos, sin)         # q [B, heads, S, head_dim], any layout (Llama-style families)

cos and sin are [B or 1, S, rotary_dims] as transformers' rotary modules return them. Same maths
as transformers' apply_rotary_pos_emb on the first `rotary_dims` of each head (the rotate_half
convention), the rest of the head passed through (rotary_dims = head_dim for most families; Phi
rotates 40% of it): for j < half, out[j] = x[j] cos[j] - x[j + half] sin[j]; for
half <= j < rotary_dims, out[j] = x[j] cos[j] + x[j - half] sin[j]. One read of x and one write,
where torch needs slices, a cat, broadcast multiplies and an add (Phi's partial rotary: about a
tenth of an evaluation pass of Phi-2 in torch ops, a fifth of that as this kernel:
bench/RESULTS.md). Computed in fp32, rounded once to x's dtype. The kernel reads x through its
strides (a head's dims contiguous), so a transposed [B, heads, S, D] view or a slice of a fused
qkv projection (Phi-3) is read in place, and writes its output in x's own layout.

On an Ampere or newer GPU with Triton (torch's CUDA builds ship it) unless speed.triton_rotary
is off (attention.py decides); `available(x)` says whether it can run. The tests run the same
kernel on CPU through Triton's interpreter (TRITON_INTERPRET=1, set before the first call).
"""

from __future__ import annotations

import functools

import torch

from . import triton_gpu


def available(x: torch.Tensor) -> bool:
    """True where the kernel runs (triton_gpu.runs_on: an Ampere or newer GPU, or Triton's
    interpreter; a T4 keeps the torch formula) and Triton imports."""
    return triton_gpu.runs_on(x) and _kernel() is not None


@functools.cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    # Token count, sequence length and every stride vary with the batch shape: not specialised on,
    # so a new shape never compiles (nor does it inside a CUDA graph capture).
    @triton.jit(
        do_not_specialize=[
            "n_tokens",
            "seq",
            "x_b",
            "x_s",
            "x_h",
            "o_b",
            "o_s",
            "o_h",
            "t_b",
            "t_s",
        ]
    )
    def rope_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        n_tokens,
        seq,
        x_b,
        x_s,
        x_h,
        o_b,
        o_s,
        o_h,
        t_b,
        t_s,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HALF: tl.constexpr,
        ROT: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BACKWARD: tl.constexpr,
    ):
        n = tl.program_id(0)  # one token
        b = (n // seq).to(tl.int64)
        s = (n % seq).to(tl.int64)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # a block of its heads
        j = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < HEADS) & (j < HEAD_DIM)
        partner = tl.where(j < HALF, j + HALF, tl.where(j < ROT, j - HALF, j))
        row = x_ptr + b * x_b + s * x_s + h.to(tl.int64) * x_h
        x = tl.load(row + j, mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(row + partner, mask=mask, other=0.0).to(tl.float32)
        table = b * t_b + s * t_s
        c = tl.load(cos_ptr + table + j, mask=j < ROT, other=1.0).to(tl.float32)
        if BACKWARD:  # the transpose: dx[j] = g[j] cos[j] +- g[partner] sin[partner]
            sn = tl.load(sin_ptr + table + partner, mask=j < ROT, other=0.0).to(tl.float32)
            out = x * c + tl.where(j < HALF, xp * sn, -xp * sn)
        else:
            sn = tl.load(sin_ptr + table + j, mask=j < ROT, other=0.0).to(tl.float32)
            out = x * c + tl.where(j < HALF, -xp * sn, xp * sn)
        tl.store(
            out_ptr + b * o_b + s * o_s + h.to(tl.int64) * o_h + j,
            out.to(out_ptr.dtype.element_ty),
            mask=mask,
        )

    return rope_kernel, triton.next_power_of_2


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """The kernel over x [B, S, heads, head_dim] (any strides, the last 1); the output has x's
    layout where x is dense, else the contiguous one."""
    kernel, next_pow2 = _kernel()
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, seq, heads, head_dim = x.shape
    rot = cos.shape[-1]
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
        x.stride(0),
        x.stride(1),
        x.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
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
    """x [B, S, heads, head_dim] -> the same, rotated."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _launch(grad, cos, sin, backward=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x [B, S, heads * head_dim] with the rotary embedding applied (see the module docstring);
    cos and sin [B or 1, S, rotary_dims] as transformers' rotary module returns them."""
    b, s, width = x.shape
    out = _Rope.apply(x.reshape(b, s, width // head_dim, head_dim), cos.contiguous(), sin.contiguous())
    return out.reshape(b, s, width)


def rope_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, head_dim] (as transformers' attention modules hold queries and keys) with
    the rotary embedding applied, in x's layout; cos and sin [B or 1, S, rotary_dims]."""
    return _Rope.apply(x.transpose(1, 2), cos.contiguous(), sin.contiguous()).transpose(1, 2)


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """rope() in plain torch (transformers' formula), for tests."""
    b, s, width = x.shape
    xh = x.view(b, s, width // head_dim, head_dim)
    rot = cos.shape[-1]
    xr, xpass = xh[..., :rot], xh[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = torch.cat((xr * cos.unsqueeze(2) + rotated * sin.unsqueeze(2), xpass), dim=-1)
    return out.view(b, s, width)


def reference_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope_heads() in plain torch, for tests and for telling whether a family's own
    apply_rotary_pos_emb computes this formula (attention.py)."""
    b, heads, s, d = x.shape
    flat = x.transpose(1, 2).reshape(b, s, heads * d)
    return reference(flat, cos, sin, d).view(b, s, heads, d).transpose(1, 2)
