"""Attention layers with the rotary embedding in one pass (rope.py), for every rotary family.

    changes = patch_attention(model, triton=True)   # what was done, for tune_model's list

- Phi (partial rotary, 40% of each head): _phi_attention_forward below, the partial rotary in one
  Triton kernel per tensor on a GPU, elsewhere x * C + (x @ P) * S on the projections' own
  layout (three kernels instead of slices, a rotate_half cat, products and a cat back).
- Every other family whose attention forward calls transformers' apply_rotary_pos_emb(q, k, cos,
  sin) (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, ...): transformers' own forward, with that
  one name bound to rope.py's kernel for that class's forward only (a copy of the function with
  its own globals). Everything else stays transformers' code: q/k norms (Qwen3, Gemma 3), a fused
  qkv projection (Phi-3, whose slices the kernel reads in place), partial rotary (Phi-3's
  apply_rotary_pos_emb rotates cos.shape[-1] dims, as the kernel does). It is bound only where the
  family's function has transformers' signature and computes the rotate_half formula, checked once
  per function on a small input; elsewhere the reason joins tune_model's list. Where the kernel
  cannot run (a CPU, a T4) the bound function calls the family's own.

Both call the attention function of the model's attention implementation, as transformers does:
packing.py's, which attends packed rows per row and is SDPA for padded batches.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

from . import rope
from .patch import is_patched, original_forward, patch_forward

ROTARY = "apply_rotary_pos_emb"  # the name transformers' attention forwards call the rotary by
PHI_CHANGE = "partial rotary embedding fused (one Triton kernel on GPU, three torch kernels elsewhere)"
ROTARY_CHANGE = "rotary embedding in one Triton kernel per tensor (Ampere+ GPUs; transformers' formula elsewhere)"


def _rotary_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    """(C, S, P) with rope(x) = x * C + (x @ P) * S on whole heads [..., head_dim]: C and S are
    cos and sin padded with 1 and 0 over the dims that are not rotated, P the signed permutation
    of rotate_half. Kept for the last (cos, sin) seen: all layers of a forward share them."""
    cached = _rotary_tables.last
    if cached is not None and cached[0] is cos and cached[1] is sin and cached[2].shape[-1] == head_dim:
        return cached[2:]
    rd = cos.shape[-1]
    half = rd // 2
    pad = head_dim - rd
    c = torch.nn.functional.pad(cos, (0, pad), value=1.0).unsqueeze(-2)  # [B, S, 1, D]
    s = torch.nn.functional.pad(sin, (0, pad), value=0.0).unsqueeze(-2)
    # device-side ops only (no host scalars): this may run inside a CUDA graph capture
    eye = torch.eye(half, dtype=cos.dtype, device=cos.device)
    p = torch.zeros(head_dim, head_dim, dtype=cos.dtype, device=cos.device)
    p[half:rd, :half] = -eye  # out[j] = -x[j + half] for j < half
    p[:half, half:rd] = eye  # out[j + half] = x[j]
    _rotary_tables.last = (cos, sin, c, s, p)
    return c, s, p


_rotary_tables.last = None


def _phi_attention_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
    """PhiAttention.forward with the partial rotary embedding in one Triton kernel per tensor on a
    GPU (rope.py), elsewhere as x * C + (x @ P) * S on the projections' own [batch, seq,
    heads, head_dim] layout: three contiguous kernels per tensor instead of slices, a
    rotate_half cat, strided products and a cat back. Same maths; the original runs whenever
    this does not apply (cache, q/k LayerNorm)."""
    if past_key_values is not None or self.qk_layernorm:
        return original_forward(self)(
            hidden_states, position_embeddings, attention_mask, past_key_values=past_key_values, **kwargs
        )
    from transformers.models.phi import modeling_phi

    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    cos, sin = position_embeddings
    if self._qlora_triton and rope.available(hidden_states):  # one kernel each way (rope.py)

        def rotate(x):
            return rope.rope(x, cos, sin, self.head_dim).view(shape).transpose(1, 2)
    else:
        c, s, p = _rotary_tables(cos, sin, self.head_dim)

        def rotate(x):
            x = x.view(shape)
            return torch.addcmul(x * c, (x.reshape(-1, self.head_dim) @ p).view(x.shape), s).transpose(1, 2)

    query_states = rotate(self.q_proj(hidden_states))
    key_states = rotate(self.k_proj(hidden_states))
    value_states = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    attention = modeling_phi.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling_phi.eager_attention_forward
    )
    attn_output, attn_weights = attention(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return self.dense(attn_output), attn_weights


@functools.cache
def why_not_standard(function) -> str | None:
    """None when `function` (a family's apply_rotary_pos_emb) takes (q, k, cos, sin[,
    unsqueeze_dim]) and computes rope.reference_heads on q and k, checked on a small random
    input with grouped key heads and cos/sin halves that differ; else what is different."""
    try:
        params = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return f"{ROTARY} has no signature to check"
    if params not in (["q", "k", "cos", "sin"], ["q", "k", "cos", "sin", "unsqueeze_dim"]):
        return f"{ROTARY} takes ({', '.join(params)}), not transformers' (q, k, cos, sin, unsqueeze_dim)"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k = torch.randn(2, 2, 5, 8, generator=g)
    cos = torch.randn(2, 5, 8, generator=g)
    sin = torch.randn(2, 5, 8, generator=g)
    try:
        got_q, got_k = function(q, k, cos, sin)
        same = torch.allclose(got_q, rope.reference_heads(q, cos, sin), atol=1e-5) and torch.allclose(
            got_k, rope.reference_heads(k, cos, sin), atol=1e-5
        )
    except Exception as e:  # another layout or convention: not ours to replace
        return f"{ROTARY} failed on a transformers-shaped input ({type(e).__name__})"
    return None if same else f"{ROTARY} is not the rotate_half formula of rope.py"


@functools.cache
def fused_rotary_forward(cls) -> tuple[types.FunctionType | None, str | None]:
    """(cls.forward with apply_rotary_pos_emb bound to rope.py's kernel, None), or (None, why not;
    None too for a module that does not call it). Once per class."""
    forward = getattr(cls, "forward", None)
    if not isinstance(forward, types.FunctionType) or ROTARY not in forward.__code__.co_names:
        return None, None
    if hasattr(forward, "__wrapped__"):
        return None, f"{cls.__name__}.forward is wrapped by a decorator"
    own = forward.__globals__.get(ROTARY)
    why = why_not_standard(own) if callable(own) else f"{ROTARY} is not a function in {forward.__module__}"
    if why is not None:
        return None, f"{cls.__name__}: {why}"

    def fused(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim != 1 or not rope.available(q):
            return own(q, k, cos, sin, unsqueeze_dim)
        return rope.rope_heads(q, cos, sin), rope.rope_heads(k, cos, sin)

    scope = dict(forward.__globals__)
    scope[ROTARY] = fused
    bound = types.FunctionType(forward.__code__, scope, forward.__name__, forward.__defaults__, forward.__closure__)
    bound.__kwdefaults__ = forward.__kwdefaults__
    bound.__qualname__ = forward.__qualname__
    bound.__doc__ = forward.__doc__
    return bound, None


def patch_attention(model, triton: bool = True) -> list[str]:
    """Route every attention layer of `model` through a forward with the rotary fused: Phi's
    always (its torch path is faster too), the others only with `triton` (their torch path is
    transformers' own). Returns what was done, and why not for layers it could not take."""
    changes = set()
    for module in model.modules():
        if is_patched(module):
            continue
        if type(module).__name__ == "PhiAttention" and hasattr(module, "rotary_ndims"):
            module._qlora_triton = triton
            patch_forward(module, _phi_attention_forward)
            changes.add(PHI_CHANGE)
            continue
        if not triton:
            continue
        forward, why = fused_rotary_forward(type(module))
        if forward is not None:
            patch_forward(module, forward)
            changes.add(ROTARY_CHANGE)
        elif why is not None:
            changes.add(f"rotary embedding not fused: {why}")
    return sorted(changes)
