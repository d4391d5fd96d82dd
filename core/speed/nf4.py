"""NF4 dequantisation, double quantisation included, as one Triton kernel.

    w = dequantize(weight, quant_state)   # the 16-bit (or fp32) [out, in] weight of a bnb Params4bit

qlinear.py dequantises every 4-bit weight twice a micro-batch (forward, and backward for the
input's gradient): on an H200 bitsandbytes' kernels took a tenth to an eighth of a batch-32 step
of the Llama, Qwen and Gemma shapes (bench/RESULTS.md), in three kernels a call where the weight's
absmax is itself quantised (double quantisation, the QLoRA default): the 8-bit absmax dequantised,
the offset added, then the 4-bit values. Here one kernel reads the packed bytes, the 8-bit absmax
and its own scale and writes the weight: per element i (byte i // 2, the high nibble first, as
bitsandbytes packs), w[i] = code[nibble] * absmax[i // blocksize], with, under double
quantisation, absmax[b] = code2[absmax8[b]] * absmax2[b // blocksize2] + offset; in fp32, rounded
once to the output dtype, as bitsandbytes computes it. The offset is read on the device (no host
sync: this runs inside CUDA graph captures).

On an Ampere or newer GPU with Triton, NF4 only; `available(weight, quant_state)` says where
(under TRITON_INTERPRET=1 anywhere: the tests compare it with bitsandbytes' own on CPU); elsewhere
qlinear calls bitsandbytes.
"""

from __future__ import annotations

import functools
import os

import torch

BLOCK = 1024  # packed bytes a program: 2,048 weights


def available(weight: torch.Tensor, quant_state) -> bool:
    if getattr(quant_state, "quant_type", None) != "nf4" or weight.dtype != torch.uint8:
        return False
    if getattr(quant_state, "packing_format_for_cpu", False):
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _kernel() is not None
    return weight.is_cuda and _capable(weight.device.index) and _kernel() is not None


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

    # the weight's size is a constant of each layer, but not specialised on either: one compiled
    # kernel for all of them
    @triton.jit(do_not_specialize=["n"])
    def nf4_kernel(
        q_ptr,
        absmax_ptr,
        code_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        out_ptr,
        n,
        BLOCK: tl.constexpr,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        NESTED: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        k = pid * BLOCK + tl.arange(0, BLOCK)  # byte k holds weights 2k (high nibble) and 2k + 1
        inside = 2 * k < n
        q = tl.load(q_ptr + k, mask=inside, other=0).to(tl.int32)
        block = (2 * k) // BLOCKSIZE  # blocksize is even: both weights of a byte share a block
        if NESTED:
            a8 = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
            scale = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=inside, other=0.0)
            absmax = tl.load(code2_ptr + a8, mask=inside, other=0.0) * scale
            absmax = absmax + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + block, mask=inside, other=0.0)
        high = tl.load(code_ptr + (q >> 4), mask=inside, other=0.0) * absmax
        low = tl.load(code_ptr + (q & 15), mask=inside, other=0.0) * absmax
        both = tl.reshape(tl.join(high, low), [2 * BLOCK])  # interleaved: w[2k], w[2k + 1]
        i = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + i, both.to(out_ptr.dtype.element_ty), mask=i < n)

    return nf4_kernel


def dequantize(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """The weight [quant_state.shape] in quant_state.dtype (see the module docstring)."""
    out = torch.empty(quant_state.shape, dtype=quant_state.dtype, device=weight.device)
    n = out.numel()
    code = quant_state.code.to(device=weight.device, dtype=torch.float32)
    if quant_state.nested:
        s2 = quant_state.state2
        absmax2, code2, block2 = s2.absmax, s2.code.to(device=weight.device, dtype=torch.float32), s2.blocksize
        offset = quant_state.offset.reshape(1).float()
    else:
        absmax2 = code2 = offset = quant_state.absmax  # unused
        block2 = 1
    if n:
        _kernel()[(-(-n // (2 * BLOCK)),)](
            weight.reshape(-1),
            quant_state.absmax,
            code,
            absmax2,
            code2,
            offset,
            out,
            n,
            BLOCK=BLOCK,
            BLOCKSIZE=quant_state.blocksize,
            BLOCKSIZE2=block2,
            NESTED=quant_state.nested,
            num_warps=4,
        )
    return out


def reference(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """dequantize() in plain torch ops (the formula of the module docstring), for tests."""
    n = 1
    for d in quant_state.shape:
        n *= d
    q = weight.reshape(-1).to(torch.int64)
    nibbles = torch.stack([q >> 4, q & 15], dim=-1).reshape(-1)[:n]
    absmax = quant_state.absmax
    if quant_state.nested:
        s2 = quant_state.state2
        scale = s2.absmax.float().repeat_interleave(s2.blocksize)[: absmax.numel()]
        absmax = s2.code.float()[absmax.to(torch.int64)] * scale + quant_state.offset.float()
    absmax = absmax.float().repeat_interleave(quant_state.blocksize)[:n]
    return (quant_state.code.float()[nibbles] * absmax).to(quant_state.dtype).reshape(quant_state.shape)
