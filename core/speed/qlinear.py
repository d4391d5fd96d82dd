"""A 4-bit linear layer and its LoRA adapter as one autograd function: the training hot path.

peft runs a LoRA layer on a bitsandbytes NF4 base as bnb's matmul_4bit (dequantise, GEMM), a
defensive clone of the output, dropout, autocast casts, two small GEMMs, a scale and an add: a
dozen kernels and as many saved tensors. `QLoRALinearFn` computes the same function with fewer
kernels and saved tensors (s = alpha / r, m = dropout mask / (1 - p), A' = s A the 16-bit copy
of A, made in one kernel: no kernel of its own scales u or v):

    forward:   W = dequant(W4);  y = x W^T + b;  u = (m * x) A'^T;  y += u B^T
    backward:  W = dequant(W4)              (dequantised again: a 16-bit W is never kept)
               v = g B;  gx = g W + m * (v A') (the mask and the add one kernel);
               gA = v^T (s * m * x) (s inside the mask's kernel);  gB = g^T u

It saves x, the dropout mask and u (rows x r, tiny), and recomputes m * x in backward: q, k, v
and fc1 read the same x, so they keep one copy between them. Never W. A base layer with no
adapter (k_proj, dense) saves nothing: a frozen weight needs no input to pass the gradient on.
With act="gelu_tanh" (Phi's MLP: fc2(gelu(h))) the input is h, the GELU runs inside and is
recomputed in backward, so its output is never stored; likewise act="silu_glu" / "gelu_tanh_glu"
(the gated MLPs of Llama, Mistral, Qwen, Gemma, Phi-3: down_proj(act(gate) * up)) takes the
input [gate | up] and never stores act(gate) nor the product. LoRA weights stay fp32 (the optimiser's
copy); their 16-bit copies are made per call (r x d: tiny) and their gradients come back in
fp32. Without gradients and on more rows than inputs, s B A is added into the call's own copy
of W instead (one GEMM over the rows, not two).

Layers that read one input run as one `QLoRAStackFn`: an attention layer's q_proj, k_proj and
v_proj (QKV_ATTENTION) and a gated MLP's gate_proj and up_proj. Their weights are dequantised into
one buffer, so each direction is one GEMM, and the MLP's [gate | up] needs no concatenation; each
adapter keeps its own dropout mask, drawn in the order the separate calls draw them. A
double-quantised weight's block scales are dequantised once and kept (keep_absmax: 0.5 bit a
weight), so each dequantisation is one kernel, not three.

Two switches: with speed.lora_stream (install's `side`; on by default) each LoRA path runs on a
second CUDA stream beside its base layer's dequantisation and GEMM (_Side); with
speed.fused_dropout (`seeded`; off, it saved memory but no time) a gated MLP's down_proj draws its
LoRA dropout inside glu.py's act(gate) * up kernel from a seed, which then stands in the mask's
place.

    install(model)     # every bnb Linear4bit, with or without a peft LoRA adapter; returns a count

A layer falls back to its original forward for anything the function does not cover (several or
disabled adapters, merged weights, LoRA bias, mixed-adapter batches). rsLoRA differs from LoRA
only in its scale, alpha / sqrt(r), which the function reads from peft like any other. DoRA
(peft's lora_variant) is left to peft altogether: install() does not take its layers, and
left_to_peft() says why for the setup record.
`speed.fused_linear = false` (QLORA_FUSED=0) keeps the original path everywhere (for comparisons).
"""

from __future__ import annotations

import contextlib
import itertools

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

from . import glu
from .patch import is_patched, original_forward, patch_forward

_ABSMAX = "_qlora_absmax"  # on a double-quantised QuantState: its block scales, dequantised once


def keep_absmax(quant_state) -> bool:
    """Dequantise a double-quantised weight's block scales once and keep them (fp32, one per block
    of 64 weights: 0.5 bit a weight, on top of the 4.127 bits stored), so each later dequantise()
    is one kernel instead of three (the scales' own dequantisation and offset add, then the
    weights'). The base weights are frozen, so the scales never change. Returns whether it kept
    them (False for a single-quantised weight, which has fp32 scales already). speed.keep_absmax."""
    if quant_state is None or not quant_state.nested:
        return False
    if getattr(quant_state, _ABSMAX, None) is None:
        absmax = bnbF.dequantize_blockwise(quant_state.absmax, quant_state.state2)
        absmax += quant_state.offset
        setattr(quant_state, _ABSMAX, absmax.float())
    return True


def kept_absmax(module) -> bool:
    """Whether a 4-bit layer (or the LoRA layer around one) dequantises from kept scales."""
    base = _base_of(module)
    return base is not None and getattr(base.weight.quant_state, _ABSMAX, None) is not None


def _kept(weight, quant_state) -> torch.Tensor | None:
    """The scales keep_absmax() kept for this weight, where bitsandbytes' kernel can take them
    (on the weight's device; not bitsandbytes' transposed [1, n] layout)."""
    absmax = getattr(quant_state, _ABSMAX, None)
    if absmax is None or absmax.device != weight.device or weight.shape[0] == 1:
        return None
    return absmax


def dequantize(weight, quant_state) -> torch.Tensor:
    """The 16-bit (or fp32) weight [out, in] of a bnb Params4bit, double quantisation included:
    bitsandbytes' own kernel, from the scales keep_absmax() kept where it did (the same numbers)."""
    absmax = _kept(weight, quant_state)
    if absmax is None:
        return bnbF.dequantize_4bit(weight, quant_state)
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        weight, absmax, quant_state.blocksize, quant_state.quant_type, quant_state.shape, quant_state.dtype
    )


def dequantize_into(weight, quant_state, out: torch.Tensor) -> None:
    """dequantize() written into `out` (rows of a larger buffer: QLoRAStackFn), straight from
    bitsandbytes' CUDA kernel where the scales are kept and the dtypes agree, else through a copy
    (bitsandbytes has no CPU kernel that writes into a given tensor)."""
    absmax = _kept(weight, quant_state)
    if absmax is None or not weight.is_cuda or out.dtype != quant_state.dtype:
        out.copy_(dequantize(weight, quant_state))
        return
    torch.ops.bitsandbytes.dequantize_4bit.out(
        weight, absmax, quant_state.blocksize, quant_state.quant_type, quant_state.shape, quant_state.dtype, out=out
    )


_MM_OUT_DTYPE: dict[str, bool] = {}  # device type -> torch.mm(..., out_dtype=) works there


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result (weight gradients of fp32 LoRA matrices): straight from
    cuBLAS's fp32 accumulator where torch supports out_dtype (checked once per device type)."""
    if a.dtype != torch.float32:
        kind = a.device.type
        if kind not in _MM_OUT_DTYPE:
            try:
                torch.mm(a[:1, :1], b[:1, :1], out_dtype=torch.float32)
                _MM_OUT_DTYPE[kind] = True
            except (RuntimeError, TypeError, NotImplementedError):
                _MM_OUT_DTYPE[kind] = False
        if _MM_OUT_DTYPE[kind]:
            return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


def _dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * mask / (1 - p), what backward needs to apply the mask again), drawing random numbers
    exactly as torch.nn.functional.dropout does on this device (so seeded runs match peft's)."""
    if x.is_cuda:
        return torch.native_dropout(x, p, True)  # one kernel; the mask is bool
    noise = torch.empty_like(x).bernoulli_(1 - p)  # torch's CPU dropout: bernoulli, divide, multiply
    noise.div_(1 - p)
    return x * noise, noise


def _apply_mask(x: torch.Tensor, mask: torch.Tensor, p: float, scale: float = 1.0) -> torch.Tensor:
    """scale * x * mask / (1 - p) with a mask from _dropout (the dropout's output, or its
    gradient): one kernel either way."""
    if mask.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(x, mask, scale / (1 - p))
    if scale == 1.0:
        return x * mask
    return torch.addcmul(torch.zeros((), dtype=x.dtype, device=x.device), x, mask, value=scale)


def _scaled(w: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale * w in `dtype` in one kernel (an fp32 LoRA matrix to the compute dtype); w itself
    where there is nothing to do."""
    if scale == 1.0:
        return w.to(dtype)
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    return torch.mul(w, scale, out=out)


def _add_masked(out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, p: float) -> None:
    """out += x * mask / (1 - p) in one kernel (a mask from _dropout: bool on a GPU, or already
    divided by 1 - p)."""
    out.addcmul_(x, mask, value=1.0 / (1 - p) if mask.dtype == torch.bool else 1.0)


def _lora_u(h: torch.Tensor, lora_a, lora_b, scale: float, p: float, dropped=None, copies=None):
    """What the LoRA path adds to the output is u B^T; returns what its backward needs: (mask or
    None, u = s * dropout(h) A^T, s A and B in h's dtype: the scale rides on A's copy, so no
    kernel scales u, nor v in backward). `dropped`: (dropout(h), its seed) where
    glu.forward_dropout drew it; the seed then stands in the mask's place (_is_seed). `copies`:
    (s A, B) made already for this step (LoraCopies), used where their dtype is h's."""
    if copies is not None and copies[0].dtype == h.dtype:
        a, b = copies
    else:
        a = _scaled(lora_a, scale, h.dtype)
        b = lora_b.to(h.dtype)
    if dropped is not None:
        hd, mask = dropped
    elif p > 0:
        hd, mask = _dropout(h, p)
    else:
        hd, mask = h, None
    u = torch.mm(hd, a.t())
    del hd
    return mask, u, a, b


def _lora_backward(g, x2, act, mask, u, a, b, scale: float, p: float, need_a: bool, need_b: bool):
    """The LoRA path's gradients from g (the output's, rows x d_out): (v, gA, gB), v = g B (rows
    x r: with `a` = s A from _lora_u, _add_lora_input_grad turns it into the input's share), gA
    and gB in fp32 (None where not needed). h = act(x2) is recomputed for gA (x2 itself without
    an activation), times s inside the mask's kernel where there is one."""
    v = torch.mm(g, b)
    ga = gb = None
    if need_a:
        after = 1.0  # what s is left to multiply gA by (none where the mask's kernel took it)
        if _is_seed(mask):  # s * dropout(act(x2)) from glu's kernel, the same elements kept
            hd = glu.dropped(x2, act, p, mask, scale)
        elif mask is not None:
            hd = _apply_mask(_activate(x2, act), mask, p, scale)
        else:
            hd, after = _activate(x2, act), scale
        ga = _mm_fp32(v.t(), hd)
        del hd
        if after != 1.0:
            ga.mul_(after)  # r x d_in: a small kernel in place of one over rows x r
    if need_b:
        gb = _mm_fp32(g.t(), u)
    return v, ga, gb


def _is_seed(mask) -> bool:
    """Whether a saved mask is glu.forward_dropout's seed (one int64) rather than a mask."""
    return mask is not None and mask.dtype == torch.int64


def _add_lora_input_grad(gx: torch.Tensor, v, a, mask, p: float, t: torch.Tensor | None = None) -> None:
    """gx += mask * (v A) / (1 - p) in place: the LoRA path's share of the input gradient (gx may
    be a stack's). t: v A where it was computed already, beside gx (_Side)."""
    if t is None and mask is None:
        gx.addmm_(v, a)
        return
    if t is None:
        t = torch.mm(v, a)
    if mask is None:
        gx.add_(t)
    else:
        _add_masked(gx, t, mask, p)


GLU = ("silu_glu", "gelu_tanh_glu")  # x = [gate | up] -> act(gate) * up (SwiGLU, GeGLU MLPs)


def _activate(h: torch.Tensor, act: str | None) -> torch.Tensor:
    if act == "gelu_tanh":
        return torch.nn.functional.gelu(h, approximate="tanh")
    if act in GLU:
        if glu.available(h):  # one kernel reading both halves in place (Ampere+ GPUs)
            return glu.forward(h.reshape(-1, h.shape[-1]), act).view(*h.shape[:-1], h.shape[-1] // 2)
        gate, up = h.chunk(2, dim=-1)
        return _gate(gate, act) * up
    return h


def _gate(gate: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu_glu":
        return torch.nn.functional.silu(gate)
    return torch.nn.functional.gelu(gate, approximate="tanh")


def _activation_backward(g: torch.Tensor, x: torch.Tensor, act: str) -> torch.Tensor:
    """The gradient with respect to the activation's input x, from g, the one with respect to its
    output (recomputed from x: the activation's output is never stored)."""
    if act == "gelu_tanh":
        return torch.ops.aten.gelu_backward(g, x, approximate="tanh")
    if glu.available(x):
        return glu.backward(g, x, act)
    gate, up = x.chunk(2, dim=-1)
    g_up = g * _gate(gate, act)
    g = g.mul_(up)  # the gradient with respect to act(gate)
    if act == "silu_glu":
        g_gate = torch.ops.aten.silu_backward(g, gate)
    else:
        g_gate = torch.ops.aten.gelu_backward(g, gate, approximate="tanh")
    return torch.cat([g_gate, g_up], dim=-1)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


class _Side:
    """The LoRA path of one call on a second CUDA stream (speed.lora_stream), beside the base
    layer's dequantisation and GEMM on the current one: at small batches each of those kernels
    leaves most of a GPU idle. Made once the inputs are ready (the side stream waits for all work
    queued on the current one), the LoRA work runs inside `with side:`, and join() comes before
    its results are used (the current stream waits for the side one).

    Memory needs no record_stream (which, during a CUDA graph capture, would keep every such block
    from being reused until the capture ends): the allocator hands a freed block only to the stream
    it was allocated on. The current stream never gets the side stream's blocks, and the side
    stream allocates only inside a side block. Every side block starts by waiting for all the work
    queued on the current stream, including the work that read a block freed before it. The
    current stream's tensors that the side stream reads (the input, the output's gradient) are
    held until join().

    Without a side stream (a CPU, or the switch off: enabled False) the same code runs in the
    same order on the current stream, so the CPU tests check the reordered maths."""

    def __init__(self, x: torch.Tensor, enabled: bool):
        self.stream = None
        if enabled and x.is_cuda:
            self.main = torch.cuda.current_stream(x.device)
            self.stream = _SIDE_STREAMS.get(x.device)
            if self.stream is None:
                self.stream = _SIDE_STREAMS[x.device] = torch.cuda.Stream(x.device)
            self.stream.wait_stream(self.main)
        self._context = None

    def __enter__(self):
        if self.stream is not None:
            self._context = torch.cuda.stream(self.stream)
            self._context.__enter__()
        return self

    def __exit__(self, *exc):
        if self._context is not None:
            self._context.__exit__(*exc)
            self._context = None
        return False

    def join(self) -> None:
        if self.stream is not None:
            self.main.wait_stream(self.stream)


class QLoRALinearFn(torch.autograd.Function):
    """y = h dequant(W4)^T + b [+ s * dropout(h) A^T B^T] with h = act(x), or x; see the module
    docstring. With an activation, its input x is saved and act(x) recomputed in backward."""

    @staticmethod
    def forward(
        ctx, x, weight, quant_state, bias, lora_a, lora_b, scale, p, act, side=False, seeded=False, copies=None
    ):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        dtype = x2.dtype
        dropped = None
        if seeded and act in GLU and lora_a is not None and p > 0 and any(ctx.needs_input_grad) and glu.available(x2):
            seed = glu.new_seed(x2.device)  # act(gate) * up and its dropout in one kernel, no mask kept
            h, hd = glu.forward_dropout(x2, act, p, seed)
            dropped = (hd, seed)
        else:
            h = _activate(x2, act)
        if lora_a is not None and p == 0 and not any(ctx.needs_input_grad) and h.shape[0] > h.shape[1]:
            # inference on many rows: add s B A into this call's copy of W (d_out x d_in) rather than
            # s (h A^T) B^T into the output (rows x d_out); the same sum, fewer bytes moved
            w = dequantize(weight, quant_state).to(dtype)
            w.addmm_(lora_b.to(dtype), lora_a.to(dtype), alpha=scale)
            lora_a = None
        else:
            w = None
        ctx.weight, ctx.quant_state, ctx.p, ctx.scale, ctx.act, ctx.side = weight, quant_state, p, scale, act, side
        ctx.x_shape = shape
        ctx.lora = lora_a is not None
        lora = _Side(h, side and ctx.lora)  # u = s * dropout(h) A^T beside the dequantisation and GEMM
        with lora:
            parts = _lora_u(h, lora_a, lora_b, scale, p, dropped, copies) if ctx.lora else None
        if w is None:
            w = dequantize(weight, quant_state)
            if w.dtype != dtype:
                w = w.to(dtype)
        y = torch.addmm(bias.to(dtype), h, w.t()) if bias is not None else torch.mm(h, w.t())
        del w
        if not ctx.lora:
            if act is not None:
                ctx.save_for_backward(x2)
            return y.view(*shape[:-1], y.shape[-1])
        lora.join()
        del dropped  # read by the side stream: held until join()
        mask, u, a, b = parts
        y.addmm_(u, b.t())
        # the input, not its dropped-out copy: layers that share an input (q, k, v, fc1) share it
        ctx.save_for_backward(x2, mask, u, a, b)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        g = grad.reshape(-1, grad.shape[-1])
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        gx = ga = gb = None
        x2 = mask = None
        if ctx.lora:
            x2, mask, u, a, b = ctx.saved_tensors
            if g.dtype != a.dtype:
                g = g.to(a.dtype)
        elif ctx.act is not None:
            (x2,) = ctx.saved_tensors
        lora = _Side(g, ctx.side and ctx.lora)  # the LoRA gradients beside the dequantisation and GEMM
        v = t = None
        with lora:
            if ctx.lora:
                v, ga, gb = _lora_backward(g, x2, ctx.act, mask, u, a, b, ctx.scale, ctx.p, need_a, need_b)
                if need_x and ctx.side:
                    t = torch.mm(v, a)
        if need_x:
            w = dequantize(ctx.weight, ctx.quant_state)
            if w.dtype != g.dtype:
                w = w.to(g.dtype)
            gx = torch.mm(g, w)  # the gradient with respect to h
            del w
        lora.join()
        if gx is not None:
            if ctx.lora and _is_seed(mask):  # the LoRA share through its dropout, inside glu's kernel
                gx = glu.backward(gx, x2, ctx.act, t if t is not None else torch.mm(v, a), ctx.p, mask)
            else:
                if ctx.lora:
                    _add_lora_input_grad(gx, v, a, mask, ctx.p, t)
                if ctx.act is not None:
                    gx = _activation_backward(gx, x2, ctx.act)
            gx = gx.view(ctx.x_shape)
        return gx, None, None, None, ga, gb, None, None, None, None, None, None


class QLoRAStackFn(torch.autograd.Function):
    """[y_1 | y_2 | ...] of several 4-bit (+ LoRA) layers that read the same x (a gated MLP's
    gate_proj and up_proj): their weights are dequantised into one [sum d_out, d_in] buffer, so
    each direction is one GEMM (and the MLP's [gate | up] needs no concatenation); every adapter
    keeps its own dropout mask, drawn in the layers' order as their separate calls would. `layers`:
    one (weight, quant_state, bias, scale, p) per layer; `loras`: lora_A, lora_B of each (None,
    None without an adapter)."""

    @staticmethod
    def forward(ctx, x, layers, side, copies, *loras):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        dtype = x2.dtype
        outs = [quant_state.shape[0] for _, quant_state, _, _, _ in layers]
        rows = list(zip([0, *itertools.accumulate(outs)], itertools.accumulate(outs)))
        pairs = [(loras[2 * k], loras[2 * k + 1]) for k in range(len(layers))]
        infer = not any(ctx.needs_input_grad) and x2.shape[0] > x2.shape[1]
        merge = infer and all(p == 0 for *_, p in layers)  # as QLoRALinearFn: s B A into the copy of W
        ctx.lora = [a is not None and not merge for a, _ in pairs]
        lora = _Side(x2, side and any(ctx.lora))  # every adapter's u beside the dequantisation and GEMM
        with lora:
            parts = [
                _lora_u(x2, a, b, scale, p, copies=c) if on else None
                for on, (a, b), (*_, scale, p), c in zip(ctx.lora, pairs, layers, copies)
            ]
        w = _dequantize_stack(layers, rows, x2)
        if merge:
            for (a, b), (*_, scale, _), (r0, r1) in zip(pairs, layers, rows):
                if a is not None:
                    w[r0:r1].addmm_(b.to(dtype), a.to(dtype), alpha=scale)
        if any(bias is not None for _, _, bias, _, _ in layers):
            bias = torch.cat(
                [b.to(dtype) if b is not None else w.new_zeros(n) for (_, _, b, _, _), n in zip(layers, outs)]
            )
            y = torch.addmm(bias, x2, w.t())
        else:
            y = torch.mm(x2, w.t())
        del w
        saved = [x2]
        lora.join()
        for part, (r0, r1) in zip(parts, rows):
            if part is not None:
                mask, u, a, b = part
                y[:, r0:r1].addmm_(u, b.t())
                saved += part
        ctx.layers, ctx.rows, ctx.x_shape, ctx.side = layers, rows, shape, side
        ctx.save_for_backward(*saved)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        g = grad.reshape(-1, grad.shape[-1])
        x2, *saved = ctx.saved_tensors
        if g.dtype != x2.dtype:
            g = g.to(x2.dtype)
        need_x = ctx.needs_input_grad[0]
        lora = _Side(g, ctx.side and any(ctx.lora))  # the adapters' gradients beside the dequantisation and GEMM
        lora_grads = []
        inputs = []  # per adapter: (mask, v, A, v A where computed beside gx)
        with lora:
            for k, ((*_, scale, p), (r0, r1)) in enumerate(zip(ctx.layers, ctx.rows)):
                if not ctx.lora[k]:
                    lora_grads += [None, None]
                    continue
                mask, u, a, b = saved[:4]
                saved = saved[4:]
                # the inputs: x, layers, side, copies, then lora_A and lora_B of each layer
                need_a, need_b = ctx.needs_input_grad[4 + 2 * k], ctx.needs_input_grad[5 + 2 * k]
                v, ga, gb = _lora_backward(g[:, r0:r1], x2, None, mask, u, a, b, scale, p, need_a, need_b)
                lora_grads += [ga, gb]
                inputs.append((mask, v, a, p, torch.mm(v, a) if need_x and ctx.side else None))
        gx = None
        if need_x:
            w = _dequantize_stack(ctx.layers, ctx.rows, x2)
            gx = torch.mm(g, w)
            del w
        lora.join()
        if gx is not None:
            for mask, v, a, p, t in inputs:
                _add_lora_input_grad(gx, v, a, mask, p, t)
            gx = gx.view(ctx.x_shape)
        return gx, None, None, None, *lora_grads


def _dequantize_stack(layers, rows, x2: torch.Tensor) -> torch.Tensor:
    """The stacked layers' weights [sum d_out, d_in] in x2's dtype, each dequantised into its rows."""
    w = torch.empty(rows[-1][1], x2.shape[1], dtype=x2.dtype, device=x2.device)
    for (weight, quant_state, _, _, _), (r0, r1) in zip(layers, rows):
        dequantize_into(weight, quant_state, w[r0:r1])
    return w


def _stack_args(modules, x: torch.Tensor):
    """QLoRAStackFn's (compute dtype, layers, copies, loras) for `modules`, all fused 4-bit layers (or LoRA layers on
    them) with one compute dtype; None where any of them is in a state _fused_forward hands to its
    original forward."""
    layers, loras, copies = [], [], []
    dtypes = set()
    for module in modules:
        args = _layer_args(module, x) if _fused(module) else None
        if args is None:
            return None
        compute, layer, a, b = args
        dtypes.add(compute)
        layers.append(layer)
        loras += [a, b]
        copies.append(_copies_of(module))
    if len(dtypes) != 1:
        return None
    return dtypes.pop(), tuple(layers), tuple(copies), loras


# Devices whose layers stack (QLoRAStackFn). With it, on one H200, Phi-2 was 5% and Qwen 11% faster
# (bench/RESULTS.md). On this project's 2-core CPU, llm-demo's SmolLM2 steps were 2-23% slower than
# the previous code's with it and 2-16% faster without it: there the dequantised weights are copied
# into the stack's buffer, and a CPU gains nothing from fewer, larger GEMMs. The tests add "cpu" to
# check the function against peft.
STACK_DEVICES = {"cuda"}


def _stacked(modules, x: torch.Tensor) -> torch.Tensor | None:
    """[m(x) for m in modules] concatenated on the last axis, as one QLoRAStackFn; None where the
    modules' state asks for their own forwards, or on a device not in STACK_DEVICES."""
    if x.device.type not in STACK_DEVICES:
        return None
    args = _stack_args(modules, x)
    if args is None:
        return None
    compute, layers, copies, loras = args
    h = x.to(compute) if x.dtype != compute else x
    with torch.autocast(x.device.type, enabled=False):
        y = QLoRAStackFn.apply(h, layers, _side_of(modules[0]), copies, *loras)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _side_of(module) -> bool:
    """Whether install() put this layer's LoRA path on a second CUDA stream (speed.lora_stream)."""
    return module.__dict__.get("_qlora_side", False)


def _seeded(module) -> bool:
    """Whether install() has this layer draw a gated MLP's LoRA dropout inside glu's kernels
    (speed.fused_dropout)."""
    return module.__dict__.get("_qlora_seeded", False)


_COPIES = "_qlora_copies"  # on a fused LoRA layer, while a LoraCopies is armed: (s A, B) for this step


def _copies_of(module):
    """The (s A, B) an armed LoraCopies made for this layer's adapter, or None."""
    return module.__dict__.get(_COPIES)


class LoraCopies:
    """The 16-bit copies of every fused LoRA layer's matrices, s A and B, made in a few
    multi-tensor kernels at the start of a micro-batch's forward instead of at every call (two
    kernels per adapter): TrainStep arms them around each forward and backward, inside the CUDA
    graph where there is one, so a replay makes them afresh from the weights of that moment. The
    numbers are those of the per-call copies, bit for bit.

        copies = LoraCopies(model, torch.bfloat16)   # false where there is nothing to copy
        with copies.armed():                          # refresh(), then the layers read them; gone after
            ...one forward and backward...

    Only while armed do the layers read them: evaluation and prediction cast per call as before."""

    def __init__(self, model, dtype: torch.dtype):
        self.modules, self.a_src, self.a, self.scales, self.b_src, self.b = [], [], [], [], [], []
        for module in model.modules():
            parts = _lora_parts(module) if _fused(module) else None
            if parts is None:
                continue
            lora_a, lora_b, scale, _ = parts
            compute = _base_of(module).compute_dtype or dtype
            self.modules.append(module)
            self.a_src.append(lora_a)
            self.a.append(torch.empty(lora_a.shape, dtype=compute, device=lora_a.device))
            self.scales.append(float(scale))
            self.b_src.append(lora_b)
            self.b.append(
                lora_b if lora_b.dtype == compute else torch.empty(lora_b.shape, dtype=compute, device=lora_b.device)
            )

    def __bool__(self) -> bool:
        return bool(self.modules)

    def refresh(self) -> None:
        """s A and B from the current weights (a few multi-tensor kernels)."""
        with torch.no_grad():
            torch._foreach_copy_(self.a, torch._foreach_mul(self.a_src, self.scales))  # rounded once, as per call
            copied = [(b, src) for b, src in zip(self.b, self.b_src) if b is not src]
            if copied:
                torch._foreach_copy_([b for b, _ in copied], [src for _, src in copied])

    @contextlib.contextmanager
    def armed(self):
        self.refresh()
        for module, a, b in zip(self.modules, self.a, self.b):
            module.__dict__[_COPIES] = (a, b)
        try:
            yield self
        finally:
            for module in self.modules:
                module.__dict__.pop(_COPIES, None)


def _base_of(module):
    """The bnb Linear4bit under a peft LoRA layer, or the module itself if it is one."""
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


def _layer_args(module, x: torch.Tensor):
    """(compute dtype, (weight, quant_state, bias, scale, p), lora_A, lora_B) of a 4-bit layer or
    the LoRA layer around one, as QLoRALinearFn and QLoRAStackFn take them (None, None and scale 1,
    p 0 without an adapter); None in a state the layer's original forward handles (several or
    disabled adapters, merged weights, LoRA bias, bitsandbytes' CPU packing)."""
    base = _base_of(module)
    parts = None
    if base is not module:  # a peft LoRA layer
        parts = _lora_parts(module)
        if parts is None:
            return None
    fix_4bit_weight_quant_state_from_module(base)
    quant_state = base.weight.quant_state
    if getattr(quant_state, "packing_format_for_cpu", False):
        return None
    compute = base.compute_dtype or x.dtype
    if parts is None:
        return compute, (base.weight, quant_state, base.bias, 1.0, 0.0), None, None
    a, b, scale, drop = parts
    p = drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    return compute, (base.weight, quant_state, base.bias, float(scale), float(p)), a, b


def _fused_forward(self, x: torch.Tensor, *args, act: str | None = None, **kwargs) -> torch.Tensor:
    """forward() of a 4-bit layer (or its LoRA wrapper) through QLoRALinearFn; `act` applies an
    activation to x first, inside the function (see _mlp_forward)."""
    stack = self.__dict__.get("_qlora_stack")  # q_proj, k_proj, v_proj of one attention layer
    if stack is not None and not args and not kwargs and act is None:
        if stack[0] is self:  # the first: all of them as one QLoRAStackFn, the others' outputs kept
            y = _stacked(stack, x)
            if y is not None:
                first, *rest = y.split([_base_of(m).out_features for m in stack], dim=-1)
                for module, out in zip(stack[1:], rest):
                    module.__dict__["_qlora_next"] = (x, out)
                return first
        else:
            kept = self.__dict__.pop("_qlora_next", None)
            if kept is not None and kept[0] is x:  # the same input the first one had: its output
                return kept[1]
    layer = None if args or kwargs else _layer_args(self, x)  # adapter_names and the like: peft's
    if layer is None:
        return original_forward(self)(_activate(x, act), *args, **kwargs)
    compute, (weight, quant_state, bias, scale, p), a, b = layer
    h = x.to(compute) if x.dtype != compute else x
    with torch.autocast(x.device.type, enabled=False):
        y = QLoRALinearFn.apply(
            h, weight, quant_state, bias, a, b, scale, p, act, _side_of(self), _seeded(self), _copies_of(self)
        )
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """fc2(gelu_tanh(fc1(x))) with the GELU inside fc2's function: its output is never stored."""
    return self.fc2(self.fc1(hidden_states), act="gelu_tanh")


def _glu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """down_proj(act(gate_proj(x)) * up_proj(x)) (Llama, Mistral, Qwen, Gemma) with the gating
    inside down_proj's function: of the four intermediate-wide tensors autograd would keep per
    token (gate, act(gate), up, their product), only gate and up are stored."""
    h = _stacked((self.gate_proj, self.up_proj), x)  # one GEMM each way, no concatenation
    if h is None:
        h = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
    return self.down_proj(h, act=self._qlora_glu)


def _fused_glu_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Phi-3's MLP: gate_up_proj already gives [gate | up]; the gating runs inside down_proj."""
    return self.down_proj(self.gate_up_proj(hidden_states), act=self._qlora_glu)


def _is_tanh_gelu(module) -> bool:
    if isinstance(module, torch.nn.GELU):
        return module.approximate == "tanh"
    return type(module).__name__ in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh")


def _glu_kind(act) -> str | None:
    """The GLU gate QLoRALinearFn computes for an MLP's activation module (SiLU or tanh GELU)."""
    if isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return "silu_glu"
    return "gelu_tanh_glu" if _is_tanh_gelu(act) else None


def _variant(module) -> bool:
    """Whether a peft LoRA layer runs a variant of LoRA (DoRA) that QLoRALinearFn does not compute."""
    return bool(getattr(module, "lora_variant", None)) or any(getattr(module, "use_dora", {}).values())


def left_to_peft(model) -> str | None:
    """Why install() leaves some 4-bit LoRA layers to peft's own forward (DoRA), None when it
    takes them all."""
    n = sum(1 for m in model.modules() if hasattr(m, "lora_A") and _base_of(m) is not None and _variant(m))
    if not n:
        return None
    return (
        f"{n} DoRA layers run peft's own DoRA forward (its weight norm needs the dequantised weight plus "
        "the LoRA update at every call, which the fused 4-bit + LoRA function does not compute)"
    )


def install(model, absmax: bool = True, side: bool = True, seeded: bool = False) -> int:
    """Route every 4-bit linear layer (LoRA-wrapped or plain) through QLoRALinearFn, but the layers
    of a LoRA variant it does not compute (DoRA: left_to_peft); returns how many layers now take
    it (core.speed.tune skips it when speed.fused_linear is off). `absmax`: keep each
    double-quantised weight's scales dequantised (keep_absmax; speed.keep_absmax). `side`: each
    LoRA path on a second CUDA stream beside its base layer (_Side; speed.lora_stream). `seeded`:
    down_proj's LoRA dropout drawn inside glu's kernels from a seed, no mask kept (where those
    kernels run; speed.fused_dropout). The defaults are SpeedConfig's."""
    under_lora = {id(m.base_layer) for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    count = 0
    for module in model.modules():
        if is_patched(module) or id(module) in under_lora:  # a wrapped base runs via its wrapper
            continue
        if hasattr(module, "lora_A") and _variant(module):  # DoRA: peft's own forward
            continue
        if _base_of(module) is None:  # neither a Linear4bit nor a layer wrapping one
            continue
        patch_forward(module, _fused_forward)
        module.__dict__["_qlora_side"] = side
        module.__dict__["_qlora_seeded"] = seeded
        count += 1
        if absmax:
            base = _base_of(module)
            fix_4bit_weight_quant_state_from_module(base)
            keep_absmax(base.weight.quant_state)
    for module in model.modules():
        qkv = tuple(getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj"))
        if type(module).__name__ in QKV_ATTENTION and all(m is not None and _fused(m) for m in qkv):
            for m in qkv:
                m.__dict__["_qlora_stack"] = qkv
    for module in model.modules():
        if is_patched(module):
            continue
        fc1, fc2, act = (getattr(module, n, None) for n in ("fc1", "fc2", "activation_fn"))
        if fc1 is not None and is_patched(fc2) and _is_tanh_gelu(act):  # Phi: fc1 -> tanh GELU -> fc2
            patch_forward(module, _mlp_forward)
            continue
        down = getattr(module, "down_proj", None)
        if not is_patched(down) or type(module).__name__ not in GLU_MLPS:
            continue
        kind = _glu_kind(getattr(module, "act_fn", None) or getattr(module, "activation_fn", None))
        if kind is None:
            continue
        module._qlora_glu = kind
        patch_forward(module, _fused_glu_forward if hasattr(module, "gate_up_proj") else _glu_forward)
    return count


def side_streams(model) -> bool:
    """Whether this model's LoRA paths run on a second CUDA stream (install's `side`, on a GPU)."""
    param = next(model.parameters(), None)
    return param is not None and param.is_cuda and any(_side_of(m) for m in model.modules())


def seeded_dropout(model) -> bool:
    """Whether some gated MLP's down_proj draws its LoRA dropout inside glu's kernels (install's
    `seeded`, where they run and the adapter has dropout)."""
    param = next(model.parameters(), None)
    if param is None or not glu.available(param):
        return False
    for module in model.modules():
        down = getattr(module, "down_proj", None) if getattr(module, "_qlora_glu", None) else None
        parts = _lora_parts(down) if down is not None and _seeded(down) else None
        if parts is not None and isinstance(parts[3], torch.nn.Dropout) and parts[3].p > 0:
            return True
    return False


def stacks(model) -> list[str]:
    """The groups of layers that run as one QLoRAStackFn in this model ("q/k/v", "gate/up"), where
    its device stacks (STACK_DEVICES); for the setup record."""
    param = next(model.parameters(), None)
    if param is None or param.device.type not in STACK_DEVICES:
        return []
    groups = []
    if any("_qlora_stack" in m.__dict__ for m in model.modules()):
        groups.append("q/k/v")
    if any(getattr(m, "_qlora_glu", None) and not hasattr(m, "gate_up_proj") for m in model.modules()):
        groups.append("gate/up")
    return groups


def _fused(module) -> bool:
    """Whether install() routed this layer through _fused_forward."""
    return is_patched(module) and _base_of(module) is not None


# Attention classes whose forward calls q_proj, k_proj and v_proj in that order on one input (read
# in transformers 5.17; PhiAttention's is core/speed/attention.py's too): their three projections
# run as one QLoRAStackFn (_fused_forward), the second and third returning what the first computed
QKV_ATTENTION = {
    "LlamaAttention",
    "MistralAttention",
    "Qwen2Attention",
    "Qwen3Attention",
    "GemmaAttention",
    "Gemma2Attention",
    "Gemma3Attention",
    "PhiAttention",
}


# MLP classes whose forward is down_proj(act(gate_proj(x)) * up_proj(x)), or Phi-3's with one
# gate_up_proj: their forward is replaced, so only classes read to compute exactly that are listed
GLU_MLPS = {
    "LlamaMLP",
    "MistralMLP",
    "Qwen2MLP",
    "Qwen3MLP",
    "GemmaMLP",
    "Gemma2MLP",
    "Gemma3MLP",
    "Phi3MLP",
}
