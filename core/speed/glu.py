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

With speed.fused_dropout, down_proj's LoRA dropout is drawn inside the same kernels from a seed
(one int64 on the device, drawn from torch's generator: CUDA graphs replay it with new numbers):

    seed = new_seed(x.device)
    h, hd = forward_dropout(x, act, p, seed)   # h and dropout(h) in one pass, no mask stored
    hd = dropped(x, act, p, seed, s)           # backward: s * dropout(h) again, the same elements kept
    dx = backward(g, x, act, t, p, seed)       # with g + mask * t / (1 - p) as the output's gradient

An element (row r, column j) is kept where Philox(seed, r * I + j) >= p: the same distribution as
torch's dropout, other numbers.
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
    @triton.jit(do_not_specialize=["rows", "p", "mult"])
    def forward_kernel(
        x_ptr,
        h_ptr,
        hd_ptr,
        seed_ptr,
        p,
        mult,
        rows,
        WIDTH: tl.constexpr,
        BLOCK: tl.constexpr,
        GELU: tl.constexpr,
        WRITE_H: tl.constexpr,
        DROP: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = j < WIDTH
        gate = tl.load(x_ptr + r * (2 * WIDTH) + j, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + r * (2 * WIDTH) + WIDTH + j, mask=inside, other=0.0).to(tl.float32)
        if GELU:  # the tanh GELU, tanh(u) as 2 sigmoid(2u) - 1
            th = 2.0 * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)) - 1.0
            h = 0.5 * gate * (1.0 + th) * up
        else:  # SiLU
            h = gate * tl.sigmoid(gate) * up
        if WRITE_H:
            tl.store(h_ptr + r * WIDTH + j, h.to(h_ptr.dtype.element_ty), mask=inside)
        if DROP:  # dropout(h), rounded once
            keep = tl.rand(tl.load(seed_ptr), r * WIDTH + j) >= p  # Philox: the same draw in backward
            hd = tl.where(keep, h * mult, 0.0)
            tl.store(hd_ptr + r * WIDTH + j, hd.to(hd_ptr.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["rows", "p"])
    def backward_kernel(
        g_ptr,
        x_ptr,
        dx_ptr,
        t_ptr,
        seed_ptr,
        p,
        rows,
        WIDTH: tl.constexpr,
        BLOCK: tl.constexpr,
        GELU: tl.constexpr,
        HAS_T: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = j < WIDTH
        g = tl.load(g_ptr + r * WIDTH + j, mask=inside, other=0.0).to(tl.float32)
        if HAS_T:  # the LoRA path's share through its dropout: g + mask * t / (1 - p)
            t = tl.load(t_ptr + r * WIDTH + j, mask=inside, other=0.0).to(tl.float32)
            keep = tl.rand(tl.load(seed_ptr), r * WIDTH + j) >= p  # forward_dropout's draw
            g += tl.where(keep, t / (1.0 - p), 0.0)
        gate = tl.load(x_ptr + r * (2 * WIDTH) + j, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + r * (2 * WIDTH) + WIDTH + j, mask=inside, other=0.0).to(tl.float32)
        if GELU:  # the tanh GELU, tanh(u) as 2 sigmoid(2u) - 1
            th = 2.0 * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)) - 1.0
            a = 0.5 * gate * (1.0 + th)
            da = 0.5 * (1.0 + th) + 0.3989422804014327 * gate * (1.0 - th * th) * (1.0 + 0.134145 * gate * gate)
        else:  # SiLU
            s = tl.sigmoid(gate)
            a = gate * s
            da = s * (1.0 + gate * (1.0 - s))
        out = dx_ptr.dtype.element_ty
        tl.store(dx_ptr + r * (2 * WIDTH) + j, (g * up * da).to(out), mask=inside)
        tl.store(dx_ptr + r * (2 * WIDTH) + WIDTH + j, (g * a).to(out), mask=inside)

    return forward_kernel, backward_kernel


def _launch_forward(x: torch.Tensor, act: str, h, hd, p: float, seed, scale: float = 1.0) -> None:
    rows, width = x.shape[0], x.shape[1] // 2
    if rows:  # an output the kernel does not write gets the other one's pointer (never dereferenced)
        _kernels()[0][(rows, -(-width // BLOCK))](
            x.contiguous(),
            h if h is not None else hd,
            hd if hd is not None else h,
            seed if seed is not None else x,
            float(p),
            float(scale) / (1.0 - p),
            rows,
            WIDTH=width,
            BLOCK=BLOCK,
            GELU=act == "gelu_tanh_glu",
            WRITE_H=h is not None,
            DROP=hd is not None,
            num_warps=4,
        )


def forward(x: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up for x [rows, 2I] (contiguous) = [gate | up]; [rows, I] in x's dtype."""
    h = torch.empty((x.shape[0], x.shape[1] // 2), dtype=x.dtype, device=x.device)
    _launch_forward(x, act, h, None, 0.0, None)
    return h


def new_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed for forward_dropout: one int64 on `device`, drawn from torch's generator
    (seeded runs repeat it; a CUDA graph draws a new one at every replay)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def forward_dropout(x: torch.Tensor, act: str, p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, dropout(h)) with h = act(gate) * up, in one pass; the kept elements are seed's."""
    shape = (x.shape[0], x.shape[1] // 2)
    h = torch.empty(shape, dtype=x.dtype, device=x.device)
    hd = torch.empty(shape, dtype=x.dtype, device=x.device)
    _launch_forward(x, act, h, hd, p, seed)
    return h, hd


def dropped(x: torch.Tensor, act: str, p: float, seed: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * forward_dropout's dropout(h) again (backward recomputes it rather than keeping it)."""
    hd = torch.empty((x.shape[0], x.shape[1] // 2), dtype=x.dtype, device=x.device)
    _launch_forward(x, act, None, hd, p, seed, scale)
    return hd


def backward(
    g: torch.Tensor, x: torch.Tensor, act: str, t: torch.Tensor | None = None, p: float = 0.0, seed=None
) -> torch.Tensor:
    """[d gate | d up] [rows, 2I] in g's dtype from g [rows, I], the gradient with respect to the
    output, and x [rows, 2I], the input (the activation recomputed from it). With t and seed (the
    LoRA path's gradient through forward_dropout's dropout) the output's gradient is
    g + mask * t / (1 - p), summed inside the kernel."""
    rows, width = x.shape[0], x.shape[1] // 2
    dx = torch.empty((rows, 2 * width), dtype=g.dtype, device=g.device)
    if rows:
        _kernels()[1][(rows, -(-width // BLOCK))](
            g.contiguous(),
            x.contiguous(),
            dx,
            t.contiguous() if t is not None else g,
            seed if seed is not None else g,
            float(p),
            rows,
            WIDTH=width,
            BLOCK=BLOCK,
            GELU=act == "gelu_tanh_glu",
            HAS_T=t is not None,
            num_warps=4,
        )
    return dx
