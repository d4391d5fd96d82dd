"""Packed batches for decoder classifiers: the rows of a batch laid end to end, no padding.

A padded batch of sentence pairs is about a quarter padding (the reference experiment's
training micro-batches; bench/RESULTS.md), and every linear layer pays for it. Packed, the rows
form one sequence of T tokens (T rounded up to a multiple of 64 with one filler segment),
attention runs per row through FlashAttention's variable-length kernel (`cu_seqlens`, causal),
and the classifier reads the last token of each row.

    changes = install(model)                                   # tune_model does it; None or why not
    batch = pack([encoded[i] for i in idx], pad_id, slots=32)   # CPU tensors, fixed slot count
    logits = packed_logits(model, batch, max_len)              # [slots, classes]

One mechanism for every family, transformers' own packed-sequence support: the model is called
with position ids that restart at each row (its rotary embedding, or its position embedding,
then sees each token's position within its row) and with the varlen keywords that transformers
passes from the model's forward down to the attention function (`cu_seq_lens_q`, `max_length_q`,
as DataCollatorWithFlattening makes them). The attention function is ours, registered in
transformers' AttentionInterface under IMPLEMENTATION: with those keywords it attends within each
row (FlashAttention varlen on a GPU, one masked SDPA on a CPU: the tests), sliding windows
included; without them it is transformers' SDPA attention, so padded batches (the T4, `pack =
off`, the CPU by default) compute what they did. Its mask function is SDPA's, except that it
builds no mask where there is no padding mask (packed_mask).

Used where `why_not(model)` is None (FAMILIES: each tested on CPU against the padded path, tests/
speed/test_packing_families.py) and `enabled(model, device, dtype, mode)` (mode = speed.pack):
`auto` on a GPU that runs FlashAttention 2, `off` never, `on` wherever supported, CPU included.
Models that soft-cap attention logits (Gemma 2) stay padded: torch's FlashAttention kernel does not
cap, and SDPA cannot either (transformers runs them eagerly); the reason is in the setup record.
Empty slots (fewer rows than slots, so a CUDA graph's shapes stay fixed) are zero-length rows
whose loss weight is 0.
"""

from __future__ import annotations

import functools

import torch

MULTIPLE = 64  # packed length rounded up to this: few shapes to capture, filler < MULTIPLE
IMPLEMENTATION = "qlora_packed"  # our attention implementation's name in transformers' registries
# the decoder families packing may take, each tested against its padded path on CPU (Gemma 2 among
# them: its checkpoints soft-cap attention logits, so why_not() keeps it padded)
FAMILIES = ("phi", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def why_not(model) -> str | None:
    """Why this model's batches cannot be packed (None: they can), from the model alone."""
    inner = _inner(model)
    config = inner.config
    kind = config.model_type
    causal = [m.is_causal for m in inner.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if not causal or not all(causal):  # bucketed batches leave 1-6% padding: packing would not pay (bench.padding)
        return f"{kind} is an encoder (bidirectional attention, first-token or mean pooling): padded batches"
    if kind not in FAMILIES:
        return f"{kind} is not among the families tested packed ({', '.join(FAMILIES)})"
    if not isinstance(getattr(inner, "score", None), torch.nn.Module) or inner.base_model is inner:
        return f"{type(inner).__name__} is not a sequence classifier with a last-token head named score"
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap:
        return (
            f"{kind} soft-caps its attention logits (attn_logit_softcapping={softcap}), which torch's "
            "FlashAttention kernel does not compute"
        )
    implementation = config._attn_implementation
    if implementation not in ("sdpa", IMPLEMENTATION):
        return f"the model runs {implementation} attention; packing takes the place of sdpa only"
    if getattr(config, "attention_dropout", 0.0):
        return f"attention dropout ({config.attention_dropout}) is not implemented for packed rows"
    return None


def register() -> None:
    """Our attention implementation in transformers' registries (the same name in both)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, packed_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, packed_mask)


def packed_mask(*, attention_mask=None, **kwargs):
    """The mask function of IMPLEMENTATION: SDPA's, but none for a batch without a padding mask
    and without cached keys. Packed rows then attend per row through cu_seq_lens with no mask
    built (SDPA's would be T x T: 256 MiB at 16,384 tokens, and a waste); a padded batch of a
    causal model without a mask (right padding: core.model.is_causal) is causal by itself, its
    sliding window added by packed_attention where a row is longer than the window."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and kwargs["q_length"] == kwargs["kv_length"]:
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def install(model) -> str | None:
    """Route the model's attention through IMPLEMENTATION (padded batches: SDPA as before, packed
    ones per row); returns why not where why_not() says so, else None."""
    why = why_not(model)
    if why is not None:
        return why
    register()
    _inner(model).set_attn_implementation(IMPLEMENTATION)
    return None


def supported(model) -> bool:
    """A classifier whose batches can be packed and whose attention runs IMPLEMENTATION (install)."""
    return why_not(model) is None and _inner(model).config._attn_implementation == IMPLEMENTATION


def _head_dim(model) -> int:
    return next(m.head_dim for m in _inner(model).modules() if hasattr(m, "head_dim") and hasattr(m, "is_causal"))


def enabled(model, device: torch.device, dtype: torch.dtype, mode: str = "auto") -> bool:
    """Whether training and evaluation pack this model's batches (mode = speed.pack): off never,
    on wherever supported (CPU included: the tests), auto on a GPU that runs FlashAttention."""
    if mode == "off" or (mode != "on" and device.type != "cuda") or not supported(model):
        return False
    if device.type != "cuda":
        return True
    head_dim = _head_dim(model)
    return flash_ok(torch.cuda.get_device_capability(device), dtype, head_dim) and _flash_runs(
        torch.device(device.type, torch.cuda.current_device() if device.index is None else device.index),
        dtype,
        head_dim,
    )


@functools.cache
def _flash_runs(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """One tiny varlen call (two query heads on one key/value head, as grouped-query attention
    has them), once per device and dtype: a torch build without the kernel for this GPU falls
    back to padded batches instead of failing in the first training step."""
    try:
        q = torch.zeros(8, 2, head_dim, device=device, dtype=dtype)
        kv = torch.zeros(8, 1, head_dim, device=device, dtype=dtype)
        cu = torch.tensor([0, 5, 8], device=device, dtype=torch.int32)
        _FlashVarlen.apply(q, kv, kv, cu, 8, 1.0, None)
        torch.cuda.synchronize(device)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def flash_ok(capability: tuple[int, int], dtype: torch.dtype, head_dim: int) -> bool:
    """FlashAttention 2 (torch's varlen kernel): Ampere or newer (not a T4: sm 7.5), 16-bit
    inputs, head size a multiple of 8 up to 256."""
    return capability >= (8, 0) and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def round_up(n: int, multiple: int = MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def max_len(rows: list[dict]) -> int:
    """The bound on a row's length that packed_logits needs for these rows: the longest, rounded up."""
    return round_up(max((len(r["input_ids"]) for r in rows), default=1))


def _last_token(ids: list[int], pad_id: int) -> int:
    """The position the padded path's classifier reads in a row: its last token that is not the
    pad token (transformers' sequence classifiers find the last real token so, which skips a
    final EOS where EOS is the pad token); the first token when every one is."""
    k = len(ids) - 1
    while k > 0 and ids[k] == pad_id:
        k -= 1
    return k


def pack(
    rows: list[dict], pad_id: int, slots: int | None = None, labels: bool = True, weight: float | None = None
) -> dict[str, torch.Tensor]:
    """One packed batch of `rows` (encoded examples): input_ids and position_ids [T],
    cu_seqlens [slots + 2] (int32: the rows, empty slots, then the filler segment up to T),
    last [slots] (index of the token each row is classified by), labels and weight [slots]
    (weight = `weight` for real rows, 0 for empty slots)."""
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
        last[j] = at + _last_token(r["input_ids"], pad_id)
        at += n
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
    inner = _inner(model)
    cu = batch["cu_seqlens"]
    hidden = inner.base_model(
        input_ids=batch["input_ids"].unsqueeze(0),
        position_ids=batch["position_ids"].unsqueeze(0),
        use_cache=False,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max_len,
        max_length_k=max_len,
    ).last_hidden_state
    return inner.score(hidden[0, batch["last"]])


def packed_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function of IMPLEMENTATION, called by every attention layer as transformers
    calls SDPA's (query [1, heads, T, head_dim], key and value with their own head count). With
    the varlen keywords of a packed batch it attends causally within each row (and within the
    layer's sliding window, where a row is longer than it) and ignores the mask; without them it
    is transformers' SDPA attention (with the sliding window that packed_mask leaves to it)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        window = kwargs.get("sliding_window")
        length = query.shape[2]
        if attention_mask is None and window is not None and length > window and key.shape[2] == length:
            back = torch.arange(length, device=query.device)
            back = back[:, None] - back[None, :]  # query minus key position
            attention_mask = (back >= 0) & (back < window)  # what SDPA's mask function builds (packed_mask)
        if query.device.type == "cpu" and query.dtype == torch.bfloat16:
            # torch's CPU attention backward is ~5x slower in bf16 than in fp32 (0.70 s against
            # 0.15 s of a 3 s SmolLM2 training step, measured): on a CPU attention runs in fp32
            if attention_mask is not None and attention_mask.is_floating_point():
                attention_mask = attention_mask.float()
            query, key, value = query.float(), key.float(), value.float()
            out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
            return out.to(torch.bfloat16), weights
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("dropout"):
        raise ValueError("packed rows support neither soft-capped attention logits nor attention dropout")
    longest = kwargs["max_length_q"]
    window = kwargs.get("sliding_window")
    if window is not None and longest <= window:
        window = None  # no row is longer than the window: plain causal attention within each row
    scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [1, heads, T, D] -> [T, heads, D]
    return attention(q, k, v, cu, longest, scale, window).unsqueeze(0), None


class _FlashVarlen(torch.autograd.Function):
    """FlashAttention's variable-length kernel, causal, forward and backward (aten ops that
    torch's CUDA builds carry; the public wrapper's arguments changed between torch releases).
    Keys and values may have fewer heads than queries (grouped-query attention); `window`, a
    sliding window of that many tokens (the token itself included), or None."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale, window):
        left = None if window is None else window - 1
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale, window_size_left=left
        )
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.max_len, ctx.scale, ctx.left = max_len, scale, left
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
            window_size_left=ctx.left,
        )
        return dq, dk, dv, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention within each segment of a packed batch (and within `window` tokens, the
    token itself included, where given): q [T, heads, head_dim], k and v [T, kv_heads, head_dim]
    -> [T, heads, head_dim]."""
    if q.is_cuda:
        return _FlashVarlen.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_len, scale, window)
    # CPU (tests): the same attention as one masked SDPA; the mask needs the lengths on the host
    cu = cu_seqlens.long()
    segment = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    position = torch.arange(q.shape[0])
    back = position[:, None] - position[None, :]  # query minus key position
    mask = (segment[:, None] == segment[None, :]) & (back >= 0)
    if window is not None:
        mask &= back < window
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.transpose(0, 1)
