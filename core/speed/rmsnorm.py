"""RMSNorm as one autograd function that keeps only its input and one number per row.

    changes = install(model)     # every RMSNorm whose forward computes one of FORMULAS

transformers writes each family's RMSNorm out in torch ops: a cast to fp32, pow, mean, rsqrt, two
products, a cast back. Autograd keeps the fp32 copy of the input for backward (4 bytes an element,
where a bf16 input is 2), and runs about eight kernels forward and ten backward, per norm: two to
six norms a layer (Gemma 3: four, and a q and a k norm). Here
forward keeps x (its own dtype) and rstd (fp32, one a row) and backward recomputes the normalised
rows from them; on an Ampere or newer GPU with Triton each direction is one kernel, elsewhere the
same maths in torch ops (the CPU, a T4, and the tests' reference). The two formulas (FORMULAS):

    "llama":  y = w * (x32 * rstd).to(x.dtype)          Llama, Mistral, Qwen2/3, Phi-3, SmolLM2
    "gemma":  y = ((x32 * rstd) * (1 + w32)).to(x.dtype)  Gemma 1/2/3 (their weight is an offset)

with rstd = 1 / sqrt(mean(x32^2) + eps), x32 the input in fp32. A module is taken when its class
name ends in RMSNorm, it has a 1-D weight and an eps, and its own forward gives the same numbers as
one of the formulas on a small random input (checked once per class): transformers' code stays the
reference, and a family whose norm computes something else keeps its own. Only the input gets a
gradient: a norm weight that trains (a user who targets it) runs the family's own forward.
"""

from __future__ import annotations

import functools

import torch

from . import triton_gpu
from .patch import is_patched, original_forward, patch_forward

FORMULAS = ("llama", "gemma")
CHANGE = "RMSNorm as one function keeping its input and rstd (one Triton kernel each way on Ampere+ GPUs)"


def available(x: torch.Tensor) -> bool:
    """True where the kernels run (triton_gpu.runs_on: an Ampere or newer GPU, or Triton's
    interpreter) and Triton imports."""
    return triton_gpu.runs_on(x) and _kernels() is not None


@functools.cache
def _kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    # the row count varies with the batch: not specialised on (a new shape never compiles)
    @triton.jit(do_not_specialize=["rows", "eps"])
    def forward_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        rstd_ptr,
        rows,
        eps,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_R: tl.constexpr,
        GEMMA: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        j = tl.arange(0, BLOCK_D)[None, :]
        inside = (r[:, None] < rows) & (j < D)
        offs = r[:, None].to(tl.int64) * D + j
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        n = x * rstd[:, None]
        w = tl.load(w_ptr + j, mask=j < D, other=0.0).to(tl.float32)
        if GEMMA:
            y = n * (1.0 + w)
        else:  # rounded to the input's dtype first, then multiplied (in fp32, rounded once more)
            y = n.to(x_ptr.dtype.element_ty).to(tl.float32) * w
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)
        tl.store(rstd_ptr + r, rstd, mask=r < rows)

    @triton.jit(do_not_specialize=["rows"])
    def backward_kernel(
        g_ptr,
        x_ptr,
        w_ptr,
        rstd_ptr,
        dx_ptr,
        rows,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_R: tl.constexpr,
        GEMMA: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        j = tl.arange(0, BLOCK_D)[None, :]
        inside = (r[:, None] < rows) & (j < D)
        offs = r[:, None].to(tl.int64) * D + j
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r, mask=r < rows, other=0.0)
        w = tl.load(w_ptr + j, mask=j < D, other=0.0).to(tl.float32)
        if GEMMA:
            w = 1.0 + w
        n = x * rstd[:, None]
        gn = g * w  # the gradient with respect to the normalised rows
        mean_gn_n = tl.sum(gn * n, axis=1) / D
        dx = rstd[:, None] * (gn - n * mean_gn_n[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inside)

    return forward_kernel, backward_kernel, triton.next_power_of_2


def _blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_R, num_warps): a row per BLOCK_D lanes, about 4,096 elements a program."""
    block_d = _kernels()[2](d)
    return block_d, max(1, min(64, 4096 // block_d)), 8 if block_d >= 4096 else 4


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, formula: str) -> torch.dtype:
    """The dtype transformers' forward returns: llama's `w * h` promotes, gemma's casts back."""
    return torch.promote_types(weight.dtype, x.dtype) if formula == "llama" else x.dtype


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float, formula: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) in torch ops: the forward where the kernels do not run, and the tests' reference."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    n = x32 * rstd
    if formula == "gemma":
        y = (n * (1.0 + weight.float())).to(x.dtype)
    else:
        y = weight * n.to(x.dtype)
    return y, rstd.squeeze(-1)


def _backward_torch(g, x, weight, rstd, formula: str) -> torch.Tensor:
    x32 = x.float()
    r = rstd.unsqueeze(-1)
    n = x32 * r
    w = weight.float()
    gn = g.float() * ((1.0 + w) if formula == "gemma" else w)
    dx = r * (gn - n * (gn * n).mean(-1, keepdim=True))
    return dx.to(x.dtype)


class RMSNormFn(torch.autograd.Function):
    """y = formula(x, weight, eps) over the last dim (see the module docstring); saves x and rstd."""

    @staticmethod
    def forward(ctx, x, weight, eps, formula):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        rows, d = x2.shape
        if available(x2) and rows:
            forward_kernel, _, _ = _kernels()
            block_d, block_r, warps = _blocks(d)
            y = torch.empty((rows, d), dtype=_out_dtype(x2, weight, formula), device=x2.device)
            rstd = torch.empty(rows, dtype=torch.float32, device=x2.device)
            forward_kernel[(-(-rows // block_r),)](
                x2,
                weight.contiguous(),
                y,
                rstd,
                rows,
                float(eps),
                D=d,
                BLOCK_D=block_d,
                BLOCK_R=block_r,
                GEMMA=formula == "gemma",
                num_warps=warps,
            )
        else:
            y, rstd = reference(x2, weight, eps, formula)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.formula, ctx.shape = formula, shape
        return y.view(*shape[:-1], d)

    @staticmethod
    def backward(ctx, grad):
        x2, weight, rstd = ctx.saved_tensors
        g = grad.reshape(x2.shape)
        if not g.is_contiguous():
            g = g.contiguous()
        rows, d = x2.shape
        if available(x2) and rows:
            _, backward_kernel, _ = _kernels()
            block_d, block_r, warps = _blocks(d)
            dx = torch.empty_like(x2)
            backward_kernel[(-(-rows // block_r),)](
                g,
                x2,
                weight.contiguous(),
                rstd,
                dx,
                rows,
                D=d,
                BLOCK_D=block_d,
                BLOCK_R=block_r,
                GEMMA=ctx.formula == "gemma",
                num_warps=warps,
            )
        else:
            dx = _backward_torch(g, x2, weight, rstd, ctx.formula)
        return dx.view(ctx.shape), None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, formula: str) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):  # transformers' norms compute in fp32 under autocast too
        return RMSNormFn.apply(x, weight, eps, formula)


def _eps(module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or (self.weight.requires_grad and torch.is_grad_enabled()):  # a trained norm weight
        return original_forward(self)(x, *args, **kwargs)
    return rms_norm(x, self.weight, self._qlora_eps, self._qlora_rmsnorm)


@functools.cache
def _formula_of(cls: type, weight_dtype: torch.dtype) -> str | None:
    """Which of FORMULAS the class's own forward computes (on a 2 x 3 x 40 input in bf16 and one
    in fp32, a random weight), None if neither."""
    gen = torch.Generator().manual_seed(0)
    probe = cls.__new__(cls)
    torch.nn.Module.__init__(probe)
    probe.weight = torch.nn.Parameter(torch.randn(40, generator=gen).to(weight_dtype), requires_grad=False)
    probe.variance_epsilon = probe.eps = 1e-6
    for formula in FORMULAS:
        same = True
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(2, 3, 40, generator=gen).mul(3).to(dtype)
            try:
                with torch.no_grad():
                    want = cls.forward(probe, x)
            except Exception:  # noqa: BLE001 - a forward that needs more than x: not an RMSNorm we know
                return None
            got, _ = reference(x, probe.weight, 1e-6, formula)
            if want.dtype != got.dtype or not torch.equal(want, got):
                same = False
                break
        if same:
            return formula
    return None


def install(model) -> list[str]:
    """Route every RMSNorm of the model that computes one of FORMULAS through RMSNormFn; returns the
    change for tune_model's list (empty when none was taken)."""
    count = 0
    for module in model.modules():
        if is_patched(module) or not type(module).__name__.endswith("RMSNorm"):
            continue
        weight, eps = getattr(module, "weight", None), _eps(module)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None:
            continue
        formula = _formula_of(type(module), weight.dtype)
        if formula is None:
            continue
        module._qlora_rmsnorm, module._qlora_eps = formula, eps
        patch_forward(module, _fused_forward)
        count += 1
    return [CHANGE] if count else []
