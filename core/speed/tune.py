"""Model surgery that keeps the function and makes it cheaper: tune_model(model, dtype, speed).

changes = tune_model(model, torch.bfloat16, cfg.speed)   # a list of what was changed
change = checkpoint_layers(model)                        # train.gradient_checkpointing: memory for time
"""

from __future__ import annotations

import torch

from ..config import SpeedConfig
from ..model import is_lora_part
from . import packing, rmsnorm
from .attention import patch_attention
from .prefix import install_shared_prefix


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
      autograd function (qlinear.py; speed.fused_linear = false keeps peft's path), and a gated
      MLP's act(gate) * up runs inside down_proj's (its product is never stored); on a GPU, layers
      that read one input (q/k/v, gate/up) run as one, a GEMM each way (qlinear.STACK_DEVICES);
      with speed.lora_stream, each LoRA path runs on a second CUDA stream beside its base layer;
      with speed.fused_dropout, down_proj's LoRA dropout is drawn inside glu.py's kernel;
    - on a CPU, the tokens that every row of a causal LM's batch starts with run once per batch
      (prefix.py; speed.shared_prefix);
    - the rotary embedding in one pass: Phi's partial one always, the other families' in one
      Triton kernel on Ampere+ GPUs (attention.py; speed.fused_rotary, speed.triton_rotary);
    - attention through packing.py's implementation, which attends packed rows per row and is
      SDPA for padded batches (speed.pack not off; a family it does not cover says why);
    - on a 16-bit compute dtype, LayerNorm outputs that dtype (see _LayerNormInDtype);
    - every RMSNorm that computes transformers' Llama or Gemma formula keeps only its input and
      rstd for backward, one Triton kernel each way on Ampere+ GPUs (rmsnorm.py; speed.fused_norm);
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
    if speed.fused_norm:
        changes += rmsnorm.install(model)
    if speed.fused_rotary:
        changes += patch_attention(model, triton=speed.triton_rotary)
    if speed.pack != "off":
        why = packing.install(model)
        changes.append(f"rows not packed: {why}" if why else "attention per packed row (padded batches: SDPA)")
    from . import qlinear  # bitsandbytes' kernels: imported once a model is loaded

    if speed.fused_linear and qlinear.install(
        model, absmax=speed.keep_absmax, side=speed.lora_stream, seeded=speed.fused_dropout
    ):
        changes.append("4-bit linear + LoRA as one autograd function")
        if speed.keep_absmax and any(qlinear.kept_absmax(m) for m in model.modules()):
            changes.append("double-quantised scales dequantised once (0.5 bit a weight; one kernel a dequantisation)")
        if any(getattr(m, "_qlora_glu", None) for m in model.modules()):
            changes.append("gated MLP: act(gate) * up inside down_proj's function, recomputed in backward")
        if speed.lora_stream and qlinear.side_streams(model):
            changes.append("LoRA paths on a second CUDA stream, beside the base layers' dequantisation and GEMM")
        if speed.fused_dropout and qlinear.seeded_dropout(model):
            changes.append("gated MLP: down_proj's LoRA dropout drawn inside the act(gate) * up kernel, no mask kept")
        groups = qlinear.stacks(model)
        if groups:
            changes.append(f"{' and '.join(groups)} stacked: one dequantised buffer, one GEMM each way")
    left = qlinear.left_to_peft(model) if speed.fused_linear else None  # DoRA: the fused function steps aside
    if left:
        changes.append(f"not fused: {left}")
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())  # the shared prefix runs on a CPU only
    if speed.shared_prefix and on_cpu and install_shared_prefix(model):
        changes.append("shared prompt prefix run once per batch (CPU)")
    if dtype == torch.float16:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None and emb.weight.dtype != torch.float32:
            emb.to(torch.float32)
            changes.append("embedding->float32 (fp32 residual stream)")
    return sorted(set(changes))


def checkpoint_layers(model) -> str:
    """Gradient checkpointing (train.gradient_checkpointing): each transformer layer keeps only its
    input for the backward pass and runs its forward again there, through transformers' own
    activation checkpointing, non-reentrant (torch.utils.checkpoint restores the RNG state, so
    dropout draws the same masks the second time: the same gradients). Only in training mode;
    evaluation is untouched. Returns the change, for the setup record's speedups."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.gradient_checkpointing is not available for {inner.config.model_type} models in "
            "transformers: turn it off"
        )
    if hasattr(inner, "activation_checkpointing_enable"):  # its newer name; older transformers have the other
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return "gradient checkpointing: each layer's forward runs again in backward (less memory, more time)"
