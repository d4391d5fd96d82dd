"""Model surgery that keeps the function and makes it cheaper: tune_model(model, dtype, speed).

changes = tune_model(model, torch.bfloat16, cfg.speed)   # a list of what was changed
"""

from __future__ import annotations

import torch

from ..config import SpeedConfig
from ..model import is_lora_part
from .phi_attention import patch_phi_attention


class _LayerNormInDtype(torch.nn.Module):
    """LayerNorm that returns the compute dtype (statistics in fp32 inside the kernel) instead of
    autocast's fp32 output, so the activations after it stay 16-bit (half the memory and bytes).
    The residual stream keeps the dtype of its input (fp32 where the embedding is fp32)."""

    def __init__(self, ln: torch.nn.LayerNorm, dtype: torch.dtype):
        super().__init__()
        self.ln = ln
        self.dtype = dtype

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):  # normalise in x's dtype, then cast
            w = self.ln.weight.to(x.dtype) if self.ln.weight is not None else None
            b = self.ln.bias.to(x.dtype) if self.ln.bias is not None else None
            return torch.nn.functional.layer_norm(x, self.ln.normalized_shape, w, b, self.ln.eps).to(self.dtype)


def tune_model(model, dtype: torch.dtype, speed: SpeedConfig | None = None) -> list[str]:
    """Changes that keep the function and make it cheaper; returns what was changed.

    - GELU written out in Python (gelu_new: 8 kernels, 4 saved tensors) -> the fused tanh GELU
      (the same formula in one kernel);
    - every bitsandbytes 4-bit linear layer, with its LoRA adapter if it has one, runs as one
      autograd function (qlinear.py; speed.fused_linear = false keeps peft's path);
    - Phi's partial rotary embedding in one pass (phi_attention.py; speed.fused_rotary);
    - on a 16-bit compute dtype, LayerNorm outputs that dtype (see _LayerNormInDtype);
    - with float16, the embedding is kept in float32 so the residual stream is float32 and cannot
      overflow (Phi's activations exceed fp16's 65504 in the residual stream)."""
    speed = speed or SpeedConfig()
    changes = []
    try:
        from transformers.activations import GELUTanh, NewGELUActivation
    except ImportError:  # pragma: no cover - older transformers
        GELUTanh = NewGELUActivation = None
    lowp = dtype in (torch.bfloat16, torch.float16)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if NewGELUActivation is not None and type(child) is NewGELUActivation:
                setattr(module, child_name, GELUTanh())
                changes.append("gelu_new->fused tanh gelu")
            elif lowp and type(child) is torch.nn.LayerNorm and not is_lora_part(f"{name}.{child_name}"):
                setattr(module, child_name, _LayerNormInDtype(child, dtype))
                changes.append("layernorm->compute dtype")
    if speed.fused_rotary and patch_phi_attention(model, triton=speed.triton_rotary):
        changes.append("partial rotary embedding fused (one Triton kernel on GPU, three torch kernels elsewhere)")
    from . import qlinear  # bitsandbytes' kernels: imported once a model is loaded

    if speed.fused_linear and qlinear.install(model):  # fewer kernels and saved tensors per 4-bit linear (+ LoRA)
        changes.append("4-bit linear + LoRA as one autograd function")
    if dtype == torch.float16:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None and emb.weight.dtype != torch.float32:
            emb.to(torch.float32)
            changes.append("embedding->float32 (fp32 residual stream)")
    return sorted(set(changes))
