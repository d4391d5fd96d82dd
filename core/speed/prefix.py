"""The prompt's shared beginning computed once per batch, not once per row: causal LMs on a CPU.

    install_shared_prefix(model)     # the decoder body's forward, patched; False where it does not apply

A causal LM's rows all start with the same tokens when they come through a prompt: the chat
template's system turn and the start of the user turn, 24 of the 60 tokens of an NLI row for
SmolLM2-Instruct. With causal attention a token's hidden state depends only on the tokens before
it, so those positions are the same in every row: the patched forward runs them once (batch 1,
with their key/value cache), repeats the cache over the batch, and runs only the rest of each row
on top of it. The result is the same hidden states (float rounding apart), the gradient too: it
flows back into the shared part through the repeat, summed over the rows.

It applies on a CPU, to a batch of two or more rows that share at least MIN_TOKENS tokens (the
attention mask, where given, all ones over them), called with input_ids and an attention mask
only; in training only when the model has no active dropout (one shared part would share its
dropout mask). Anything else runs the original forward. On a GPU the original forward runs: the
shared length is read on the host, which CUDA graphs cannot capture, and a GPU has compute to spare.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from .patch import is_patched, original_forward, patch_forward

MIN_TOKENS = 8


def install_shared_prefix(model) -> bool:
    """Patch the decoder body of a causal sequence classifier (LlamaModel, Qwen2Model, ...: one
    whose forward takes past_key_values); returns whether it was patched."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "model", None)
    if body is None or not hasattr(inner, "score") or is_patched(body) or not _is_causal(body):
        return False
    body._qlora_dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    patch_forward(body, _forward)
    return True


def _is_causal(body) -> bool:
    return any(getattr(m, "is_causal", None) is True and hasattr(m, "q_proj") for m in body.modules())


def shared_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> int:
    """How many leading tokens every row has in common (real tokens under the mask), leaving at
    least one token per row for the second part."""
    same = (input_ids == input_ids[:1]).all(0)
    if attention_mask is not None:
        same &= attention_mask.bool().all(0)
    n = int(same.int().cumprod(0).sum())
    return min(n, input_ids.shape[1] - 1)


def _forward(self, input_ids=None, attention_mask=None, **kwargs):
    plain = original_forward(self)
    rest = {k: v for k, v in kwargs.items() if v is not None}
    if (
        rest
        or input_ids is None
        or input_ids.device.type != "cpu"
        or input_ids.shape[0] < 2
        or (self.training and self._qlora_dropout)
    ):
        return plain(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    n = shared_length(input_ids, attention_mask)
    if n < MIN_TOKENS:
        return plain(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    rows = input_ids.shape[0]
    cache = DynamicCache(config=self.config)
    head = plain(input_ids=input_ids[:1, :n], past_key_values=cache, use_cache=True).last_hidden_state
    cache.batch_repeat_interleave(rows)
    tail = plain(input_ids=input_ids[:, n:], attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    hidden = torch.cat([head.expand(rows, -1, -1), tail.last_hidden_state], dim=1)
    return BaseModelOutputWithPast(last_hidden_state=hidden)
