"""The gate of a gated MLP, act(gate) * up, as one Triton kernel each way (SwiGLU, GeGLU).

    h = forward(x, act)          # x [rows, 2I] = [gate | up] -> h [rows, I]
    dx = backward(g, x, act)     # g [rows, I], the gradient with respect to h -> dx [rows, 2I]

qlinear.py computes a gated MLP's act(gate) * up inside down_proj's function and recomputes it in
backward; in torch ops that is a chunk into two strided halves, the activation, a product (and in
backward five kernels and a cat), none vectorised over the strided halves. These kernels read the
two halves in place, compute in fp32 and round once (torch rounds act(gate) to the input's dtype
before the product: the two differ by at most a unit in the last place), and backward writes
[d gate | d up] straight into one tensor. act: "silu_glu" (Llama, Mistral, Qwen, Phi-3) or
"gelu_tanh_glu" (Gemma). On an Ampere or newer GPU with Triton; `available(x)` says where (under
TRITON_INTERPRET=1 anywhere: the tests); elsewhere qlinear keeps its torch ops.
"""

from __future__ import annotations

import functools

import torch

from . import triton_gpu

BLOCK = 1024


def available(x: torch.Tensor) -> bool:
    """True where the kernels run (triton_gpu.runs_on) and Triton imports."""
    return triton_gpu.runs_on(x) and _kernels() is not None


@functools.cache
def _kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    # the row count varies with the batch: not specialised on (a new shape never compiles)
    @triton.jit(do_not_specialize=["rows"])
    def forward_kernel(x_ptr, h_ptr, rows, WIDTH: tl.constexpr, BLOCK: tl.constexpr, GELU: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = j < WIDTH
        gate = tl.load(x_ptr + r * (2 * WIDTH) + j, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + r * (2 * WIDTH) + WIDTH + j, mask=inside, other=0.0).to(tl.float32)
        if GELU:  # the tanh GELU, tanh(u) as 2 sigmoid(2u) - 1
            t = 2.0 * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)) - 1.0
            a = 0.5 * gate * (1.0 + t)
        else:  # SiLU
            a = gate * tl.sigmoid(gate)
        tl.store(h_ptr + r * WIDTH + j, (a * up).to(h_ptr.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["rows"])
    def backward_kernel(g_ptr, x_ptr, dx_ptr, rows, WIDTH: tl.constexpr, BLOCK: tl.constexpr, GELU: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = j < WIDTH
        g = tl.load(g_ptr + r * WIDTH + j, mask=inside, other=0.0).to(tl.float32)
        gate = tl.load(x_ptr + r * (2 * WIDTH) + j, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + r * (2 * WIDTH) + WIDTH + j, mask=inside, other=0.0).to(tl.float32)
        if GELU:  # the tanh GELU, tanh(u) as 2 sigmoid(2u) - 1
            t = 2.0 * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)) - 1.0
            a = 0.5 * gate * (1.0 + t)
            da = 0.5 * (1.0 + t) + 0.3989422804014327 * gate * (1.0 - t * t) * (1.0 + 0.134145 * gate * gate)
        else:  # SiLU
            s = tl.sigmoid(gate)
            a = gate * s
            da = s * (1.0 + gate * (1.0 - s))
        out = dx_ptr.dtype.element_ty
        tl.store(dx_ptr + r * (2 * WIDTH) + j, (g * up * da).to(out), mask=inside)
        tl.store(dx_ptr + r * (2 * WIDTH) + WIDTH + j, (g * a).to(out), mask=inside)

    return forward_kernel, backward_kernel


def forward(x: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up for x [rows, 2I] (contiguous) = [gate | up]; [rows, I] in x's dtype."""
    rows, width = x.shape[0], x.shape[1] // 2
    h = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    if rows:
        _kernels()[0][(rows, -(-width // BLOCK))](
            x.contiguous(), h, rows, WIDTH=width, BLOCK=BLOCK, GELU=act == "gelu_tanh_glu", num_warps=4
        )
    return h


def backward(g: torch.Tensor, x: torch.Tensor, act: str) -> torch.Tensor:
    """[d gate | d up] [rows, 2I] in g's dtype from g [rows, I], the gradient with respect to the
    output, and x [rows, 2I], the input (the activation recomputed from it)."""
    rows, width = x.shape[0], x.shape[1] // 2
    dx = torch.empty((rows, 2 * width), dtype=g.dtype, device=g.device)
    if rows:
        _kernels()[1][(rows, -(-width // BLOCK))](
            g.contiguous(), x.contiguous(), dx, rows, WIDTH=width, BLOCK=BLOCK, GELU=act == "gelu_tanh_glu", num_warps=4
        )
    return dx
