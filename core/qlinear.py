"""A 4-bit linear layer and its LoRA adapter as one autograd function: the training hot path.

peft runs a LoRA layer on a bitsandbytes NF4 base as bnb's matmul_4bit (dequantise, GEMM), a
defensive clone of the output, dropout, autocast casts, two small GEMMs, a scale and an add: a
dozen kernels and as many saved tensors. `QLoRALinear` computes the same function with the fewest
kernels and saved tensors (s = alpha / r, m = dropout mask / (1 - p)):

    forward:   W = dequant(W4);  y = x W^T + b;  xd = m * x;  u = s * xd A^T;  y += u B^T
    backward:  W = dequant(W4)              (dequantised again: a 16-bit W is never kept)
               v = s * g B;  gx = g W + m * (v A);  gA = v^T xd;  gB = g^T u

It saves xd, the dropout mask and u (rows x r, tiny); never W, never x itself. A base layer with
no adapter (k_proj, dense) takes the same path with nothing saved at all: a frozen weight needs no
input to pass the gradient on. LoRA weights stay fp32 (the optimiser's copy); their 16-bit copies
are made per call (r x d: tiny) and their gradients come back in fp32.

    install(model)     # every bnb Linear4bit, with or without a peft LoRA adapter; returns a count
    uninstall(model)   # back to peft's and bitsandbytes' own forward

A layer falls back to its original forward for anything the function does not cover (several or
disabled adapters, merged weights, DoRA and other variants, LoRA bias, mixed-adapter batches).
`QLORA_FUSED=0` keeps the original path everywhere (for side-by-side comparisons).
"""

from __future__ import annotations

import os
import types

import torch

_ORIGINAL = "_qlora_original_forward"


def dequantize(weight, quant_state) -> torch.Tensor:
    """The 16-bit (or fp32) weight [out, in] of a bnb Params4bit, double quantisation included."""
    import bitsandbytes.functional as bnbF
    return bnbF.dequantize_4bit(weight, quant_state)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result (weight gradients of fp32 LoRA matrices)."""
    if a.dtype != torch.float32 and a.is_cuda:
        try:  # cuBLAS writes fp32 directly from its fp32 accumulator
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return torch.mm(a, b).float()


def _dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * mask / (1 - p), what backward needs to apply the mask again), drawing random numbers
    exactly as torch.nn.functional.dropout does on this device (so seeded runs match peft's)."""
    if x.is_cuda:
        return torch.native_dropout(x, p, True)  # one kernel; the mask is bool
    noise = torch.empty_like(x).bernoulli_(1 - p)  # torch's CPU dropout: bernoulli, divide, multiply
    noise.div_(1 - p)
    return x * noise, noise


def _dropout_backward(grad: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1 - p))
    return grad * mask


class QLoRALinearFn(torch.autograd.Function):
    """y = x dequant(W4)^T + b [+ s * dropout(x) A^T B^T]; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, quant_state, bias, lora_a, lora_b, scale, p):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        dtype = x2.dtype
        w = dequantize(weight, quant_state)
        if w.dtype != dtype:
            w = w.to(dtype)
        y = torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else torch.mm(x2, w.t())
        del w
        ctx.weight, ctx.quant_state, ctx.p, ctx.scale = weight, quant_state, p, scale
        ctx.x_shape = shape
        if lora_a is None:
            ctx.lora = False
            return y.view(*shape[:-1], y.shape[-1])
        ctx.lora = True
        a = lora_a.to(dtype)
        b = lora_b.to(dtype)
        if p > 0:
            xd, mask = _dropout(x2, p)
        else:
            xd, mask = x2, None
        u = torch.mm(xd, a.t()).mul_(scale)
        y.addmm_(u, b.t())
        ctx.save_for_backward(xd, mask, u, a, b)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        g = grad.reshape(-1, grad.shape[-1])
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        gx = ga = gb = None
        if ctx.lora:
            xd, mask, u, a, b = ctx.saved_tensors
            if g.dtype != a.dtype:
                g = g.to(a.dtype)
        if need_x:
            w = dequantize(ctx.weight, ctx.quant_state)
            if w.dtype != g.dtype:
                w = w.to(g.dtype)
            gx = torch.mm(g, w)
            del w
        if ctx.lora:
            v = torch.mm(g, b).mul_(ctx.scale)  # gradient of xd A^T, rows x r
            if need_x:
                if mask is None:
                    gx.addmm_(v, a)
                else:
                    gx.add_(_dropout_backward(torch.mm(v, a), mask, ctx.p))
            if need_a:
                ga = _mm_fp32(v.t(), xd)
            if need_b:
                gb = _mm_fp32(g.t(), u)
        if gx is not None:
            gx = gx.view(ctx.x_shape)
        return gx, None, None, None, ga, gb, None, None


def _base_of(module):
    """The bnb Linear4bit under a peft LoRA layer, or the module itself if it is one."""
    import bitsandbytes as bnb
    base = getattr(module, "base_layer", module)
    return base if isinstance(base, bnb.nn.Linear4bit) else None


def _lora_parts(module):
    """(lora_A, lora_B, scale, dropout module) of the one active vanilla adapter, None if the
    layer is in a state the function does not cover."""
    if not hasattr(module, "lora_A"):
        return None
    if module.disable_adapters or module.merged:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A.keys()]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name):
        return None
    lora_b = module.lora_B[name]
    if getattr(lora_b, "bias", None) is not None:
        return None
    return module.lora_A[name].weight, lora_b.weight, module.scaling[name], module.lora_dropout[name]


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    original = getattr(self, _ORIGINAL)
    if args or kwargs:  # adapter_names (mixed batches) and the like
        return original(x, *args, **kwargs)
    base = _base_of(self)
    parts = None
    if base is not self:  # a peft LoRA layer
        parts = _lora_parts(self)
        if parts is None:
            return original(x)
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
    fix_4bit_weight_quant_state_from_module(base)
    quant_state = base.weight.quant_state
    if getattr(quant_state, "packing_format_for_cpu", False):
        return original(x)
    compute = base.compute_dtype or x.dtype
    inp_dtype = x.dtype
    h = x.to(compute) if x.dtype != compute else x
    with torch.autocast(x.device.type, enabled=False):
        if parts is None:
            y = QLoRALinearFn.apply(h, base.weight, quant_state, base.bias, None, None, 1.0, 0.0)
        else:
            a, b, scale, drop = parts
            p = drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
            y = QLoRALinearFn.apply(h, base.weight, quant_state, base.bias, a, b, float(scale), float(p))
    return y if y.dtype == inp_dtype else y.to(inp_dtype)


def enabled() -> bool:
    return os.environ.get("QLORA_FUSED", "1") != "0"


def install(model) -> int:
    """Route every 4-bit linear layer (LoRA-wrapped or plain) through QLoRALinearFn; returns how
    many layers now take it. No-op (0) when QLORA_FUSED=0 or bitsandbytes is absent."""
    if not enabled():
        return 0
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:  # pragma: no cover - bnb is a requirement
        return 0
    under_lora = {id(m.base_layer) for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    count = 0
    for module in model.modules():
        if hasattr(module, _ORIGINAL) or id(module) in under_lora:  # a wrapped base runs via its wrapper
            continue
        if _base_of(module) is None:  # neither a Linear4bit nor a layer wrapping one
            continue
        setattr(module, _ORIGINAL, module.forward)
        module.forward = types.MethodType(_fused_forward, module)
        count += 1
    return count


def uninstall(model) -> None:
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            module.forward = getattr(module, _ORIGINAL)
            delattr(module, _ORIGINAL)
