"""Phi's attention with the partial rotary embedding done in one pass, and the packing hook.

    patch_phi_attention(model, triton=True)   # every PhiAttention; returns how many were patched

The patched forward reads core.speed.packing's keyword (rows laid end to end) and then attends
per row; without it, it runs transformers' attention. Same maths as transformers' forward, which
still runs whenever this one does not apply (a KV cache, q/k LayerNorm).
"""

from __future__ import annotations

import torch

from . import packing
from . import rope as triton_rope
from .patch import is_patched, original_forward, patch_forward


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
    packed = kwargs.pop(packing.KEY, None)
    if packed is not None:  # rows laid end to end (packing.py): per-row positions and attention
        cos, sin = packing.rotary_tables(packed, cos, sin)

    if self._qlora_triton and triton_rope.available(hidden_states):  # one kernel each way (rope.py)

        def rope(x):
            return triton_rope.rope(x, cos, sin, self.head_dim).view(shape).transpose(1, 2)
    else:
        c, s, p = _rotary_tables(cos, sin, self.head_dim)

        def rope(x):
            x = x.view(shape)
            return torch.addcmul(x * c, (x.reshape(-1, self.head_dim) @ p).view(x.shape), s).transpose(1, 2)

    query_states = rope(self.q_proj(hidden_states))
    key_states = rope(self.k_proj(hidden_states))
    value_states = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    if packed is not None:  # [1, heads, T, head_dim] views -> [T, heads, head_dim]
        out = packing.attention(
            query_states[0].transpose(0, 1),
            key_states[0].transpose(0, 1),
            value_states[0].transpose(0, 1),
            packed,
            self.scaling,
        )
        return self.dense(out.reshape(*hidden_states.shape[:-1], -1)), None
    impl = self.config._attn_implementation
    attention = modeling_phi.eager_attention_forward if impl == "eager" else modeling_phi.ALL_ATTENTION_FUNCTIONS[impl]
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


def patch_phi_attention(model, triton: bool = True) -> int:
    """Route every PhiAttention of `model` through _phi_attention_forward (the Triton rotary only
    where `triton` and the GPU allow it); returns how many layers were patched."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "PhiAttention" and hasattr(module, "rotary_ndims") and not is_patched(module):
            module._qlora_triton = triton
            patch_forward(module, _phi_attention_forward)
            count += 1
    return count
