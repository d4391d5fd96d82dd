"""Packed batches for Phi classifiers: the rows of a batch laid end to end, no padding.

A padded batch of sentence pairs is about a quarter padding (the reference experiment's
training micro-batches; bench/RESULTS.md), and every linear layer pays for it. Packed, the rows form one sequence of T tokens (T rounded up to a multiple of
64 with one filler segment), attention runs per row through FlashAttention's variable-length
kernel (`cu_seqlens`, causal), and the classifier reads the last token of each row.

    batch = pack([encoded[i] for i in idx], pad_id, slots=32)   # CPU tensors, fixed slot count
    logits = packed_logits(model, batch, max_len)              # [slots, classes]

Used for Phi-family models whose attention phi_attention.py has patched
(`enabled(model, device, dtype, mode)`, mode = speed.pack): `auto` on a GPU that runs
FlashAttention 2, `off` never, `on` wherever supported: on CPU the same code runs with a
block-diagonal causal mask (the tests).
Empty slots (fewer rows than slots, so a CUDA graph's shapes stay fixed) are zero-length rows
whose loss weight is 0.
"""

from __future__ import annotations

import functools

import torch

from .patch import is_patched

MULTIPLE = 64  # packed length rounded up to this: few shapes to capture, filler < MULTIPLE
KEY = "qlora_packed"  # the keyword that carries the packing through the model to attention


def enabled(model, device: torch.device, dtype: torch.dtype, mode: str = "auto") -> bool:
    """Whether training and evaluation pack this model's batches (mode = speed.pack): off never,
    on wherever supported (CPU included: the tests), auto on a GPU that runs FlashAttention."""
    if mode == "off" or (mode != "on" and device.type != "cuda") or not supported(model):
        return False
    if device.type != "cuda":
        return True
    head_dim = next(m.head_dim for m in model.modules() if type(m).__name__ == "PhiAttention")
    return flash_ok(torch.cuda.get_device_capability(device), dtype, head_dim) and _flash_runs(
        torch.device(device.type, torch.cuda.current_device() if device.index is None else device.index),
        dtype,
        head_dim,
    )


@functools.cache
def _flash_runs(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """One tiny varlen call, once per device and dtype: a torch build without the kernel for this
    GPU falls back to padded batches instead of failing in the first training step."""
    try:
        q = torch.zeros(8, 1, head_dim, device=device, dtype=dtype)
        cu = torch.tensor([0, 5, 8], device=device, dtype=torch.int32)
        _FlashVarlen.apply(q, q, q, cu, 8, 1.0)
        torch.cuda.synchronize(device)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def flash_ok(capability: tuple[int, int], dtype: torch.dtype, head_dim: int) -> bool:
    """FlashAttention 2 (torch's varlen kernel): Ampere or newer (not a T4: sm 7.5), 16-bit
    inputs, head size a multiple of 8 up to 256."""
    return capability >= (8, 0) and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def supported(model) -> bool:
    """A Phi sequence classifier whose attention layers run phi_attention.py's forward (which
    reads the packing), without attention dropout or q/k LayerNorm."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = [m for m in inner.modules() if type(m).__name__ == "PhiAttention"]
    return (
        bool(attention)
        and hasattr(inner, "score")
        and hasattr(inner, "model")
        and all(is_patched(m) and not m.qk_layernorm and not getattr(m, "attention_dropout", 0.0) for m in attention)
    )


def round_up(n: int, multiple: int = MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def max_len(rows: list[dict]) -> int:
    """The bound on a row's length that packed_logits needs for these rows: the longest, rounded up."""
    return round_up(max((len(r["input_ids"]) for r in rows), default=1))


def pack(
    rows: list[dict], pad_id: int, slots: int | None = None, labels: bool = True, weight: float | None = None
) -> dict[str, torch.Tensor]:
    """One packed batch of `rows` (encoded examples): input_ids and position_ids [T],
    cu_seqlens [slots + 2] (int32: the rows, empty slots, then the filler segment up to T),
    last [slots] (index of each row's last token), labels and weight [slots] (weight = `weight`
    for real rows, 0 for empty slots)."""
    slots = slots or len(rows)
    if len(rows) > slots:
        raise ValueError(f"{len(rows)} rows do not fit {slots} slots")
    lengths = [len(r["input_ids"]) for r in rows]
    total = sum(lengths)
    tokens = round_up(max(total, 1))
    ids = torch.full((tokens,), pad_id, dtype=torch.long)
    pos = torch.zeros(tokens, dtype=torch.long)
    cu = torch.zeros(slots + 2, dtype=torch.int32)
    last = torch.zeros(slots, dtype=torch.long)
    at = 0
    for j, (r, n) in enumerate(zip(rows, lengths)):
        ids[at : at + n] = torch.tensor(r["input_ids"], dtype=torch.long)
        pos[at : at + n] = torch.arange(n)
        at += n
        last[j] = at - 1
        cu[j + 1] = at
    cu[len(rows) + 1 : slots + 1] = at  # empty slots: zero-length rows
    cu[slots + 1] = tokens  # the filler: its own segment, so it attends only to itself
    pos[at:] = torch.arange(tokens - at)
    out = {"input_ids": ids, "position_ids": pos, "cu_seqlens": cu, "last": last}
    if labels:
        out["labels"] = torch.zeros(slots, dtype=torch.long)
        out["labels"][: len(rows)] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    if weight is not None:
        out["weight"] = torch.zeros(slots, dtype=torch.float32)
        out["weight"][: len(rows)] = weight
    return out


def split_rows(rows: list[dict], token_budget: int | None, max_rows: int) -> list[list[dict]]:
    """`rows` in order, cut into the fewest micro-batches of at most max_rows rows and
    token_budget packed tokens (as pack() rounds; a longer row goes alone), of balanced size."""
    lengths = [len(r["input_ids"]) for r in rows]
    total = max(sum(lengths), 1)
    parts = max(1, -(-len(rows) // max_rows), -(-round_up(total) // token_budget) if token_budget else 1)

    def fits(part: list[dict]) -> bool:
        tokens = round_up(sum(len(r["input_ids"]) for r in part))
        return len(part) <= max_rows and (not token_budget or len(part) == 1 or tokens <= token_budget)

    while parts < len(rows):
        out = [[] for _ in range(parts)]
        seen = 0
        for r, n in zip(rows, lengths):  # each row to the part its middle token falls in
            out[min(parts - 1, int((seen + n / 2) * parts / total))].append(r)
            seen += n
        out = [p for p in out if p]
        if all(fits(p) for p in out):
            return out
        parts += 1
    return [[r] for r in rows]


def packed_logits(model, batch: dict[str, torch.Tensor], max_len: int) -> torch.Tensor:
    """Logits [slots, classes] of a packed batch (on the model's device). max_len bounds every
    segment's length (FlashAttention sizes its grid by it): the longest row, rounded up."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    ctx = {"position_ids": batch["position_ids"], "cu_seqlens": batch["cu_seqlens"], "max_len": max_len}
    hidden = inner.model(input_ids=batch["input_ids"].unsqueeze(0), **{KEY: ctx}).last_hidden_state
    return inner.score(hidden[0, batch["last"]])


class _FlashVarlen(torch.autograd.Function):
    """FlashAttention's variable-length kernel, causal, forward and backward (aten ops that
    torch's CUDA builds carry; the public wrapper's arguments changed between torch releases)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            cu,
            cu,
            ctx.max_len,
            ctx.max_len,
            0.0,
            True,
            rng,
            unused,
            scale=ctx.scale,
        )
        return dq, dk, dv, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: dict, scale: float) -> torch.Tensor:
    """Causal attention within each segment of a packed batch: q, k, v [T, heads, head_dim] ->
    [T, heads, head_dim]."""
    if q.is_cuda:
        return _FlashVarlen.apply(q, k, v, ctx["cu_seqlens"], ctx["max_len"], scale)
    # CPU (tests): the same attention as one masked SDPA; the mask needs the lengths on the host
    cu = ctx["cu_seqlens"].long()
    segment = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    position = torch.arange(q.shape[0])
    mask = (segment[:, None] == segment[None, :]) & (position[None, :] <= position[:, None])
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


def rotary_tables(ctx: dict, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin at each packed token's position within its row, from the model's tables for
    positions 0..T-1 ([1, T, rotary_dims]); computed by the first layer, reused by the others."""
    if "cos" not in ctx:
        pos = ctx["position_ids"]
        ctx["cos"], ctx["sin"] = cos[:, pos], sin[:, pos]
    return ctx["cos"], ctx["sin"]
