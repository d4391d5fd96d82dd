"""Speed: model FLOPs utilisation, and the optimised training step (CUDA graphs, lean dtypes).

    info = flops_info(model)                          # N, LoRA term, layers, hidden size
    f = flops_per_token(info, seq_len=32)             # 4N + 6*sum r(d_in+d_out) + 12*L*s*d
    mfu(f, tokens_per_s, peak_flops(device))          # None where the peak is unknown (CPU)

    tune_model(model, dtype)                          # fused GELU, LayerNorm in the compute dtype
    step = TrainStep(model, device, dtype, pad_id)    # forward+backward of micro-batches
    step.zero_grad(); step.run(batch, rows_in_step); loss = step.take_loss()

TrainStep packs a micro-batch's rows end to end where the model allows it (run_packed,
core/packing.py), else pads it to a width that is a multiple of 16 (few distinct shapes); on a
CUDA GPU it captures forward+backward of each shape once as a CUDA graph and
replays it: one launch instead of thousands of kernel launches and the Python of
peft/bitsandbytes/transformers per step. Rows (or packed slots) that only fill a graph's shape
have loss weight 0. Set QLORA_CUDA_GRAPHS=0 to run the same step eagerly.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import types

import torch

from . import packing
from . import rope as triton_rope

# Dense peak rates (FLOP/s) of the matrix units in the dtype we train in (bf16; fp16 on a T4).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
              "L4": 121e12, "T4": 65e12, "A10": 125e12, "L40": 181e12, "V100": 125e12}
WIDTH_MULTIPLE = 16


def peak_flops(device: torch.device | None = None) -> float | None:
    """The GPU's dense bf16/fp16 peak from PEAK_FLOPS by name; None on CPU or for unknown GPUs."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_FLOPS[key]
    return None


def _is_lora_part(name: str) -> bool:
    return any(part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
               for part in name.split("."))


def flops_info(model) -> dict:
    """What the FLOPs formula needs, read off a (peft) model.

    n_linear: weights of the linear layers that run for every token (base weights of attention and
    MLP projections; LoRA matrices and the classification head excluded); lora: sum over LoRA
    modules of r * (d_in + d_out); layers, hidden: L and d of the transformer."""
    from .model import HEAD_NAMES
    n_linear = 0
    lora = 0
    for name, module in model.named_modules():
        if _is_lora_part(name) or "modules_to_save" in name or "original_module" in name:
            continue
        if name.split(".")[-1] in HEAD_NAMES:
            continue
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict):  # a peft LoRA layer: r * (d_in + d_out)
            for a in lora_a.values():
                lora += a.out_features * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Linear):  # bnb's Linear4bit is a Linear too
            n_linear += module.in_features * module.out_features
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None) or 0
    hidden = getattr(cfg, "hidden_size", None) or 0
    return {"n_linear": n_linear, "lora": lora, "layers": layers, "hidden": hidden}


def flops_per_token(info: dict, seq_len: float) -> float:
    """F = 4N + 6*sum r(d_in+d_out) + 12*L*s*d per real token: forward (2N) and the input gradient
    of the frozen weights (2N), LoRA forward + both gradients, and attention scores/values."""
    return 4 * info["n_linear"] + 6 * info["lora"] + 12 * info["layers"] * seq_len * info["hidden"]


def mfu(flops_per_tok: float, tokens_per_s: float, peak: float | None) -> float | None:
    if not peak:
        return None
    return flops_per_tok * tokens_per_s / peak


# --- model tuning -----------------------------------------------------------------------------

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


def _phi_attention_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None,
                           **kwargs):
    """PhiAttention.forward with the partial rotary embedding in one Triton kernel per tensor on a
    GPU (core/rope.py), elsewhere as x * C + (x @ P) * S on the projections' own [batch, seq,
    heads, head_dim] layout: three contiguous kernels per tensor instead of slices, a
    rotate_half cat, strided products and a cat back. Same maths; the original runs whenever
    this does not apply (cache, q/k LayerNorm)."""
    if past_key_values is not None or self.qk_layernorm:
        return self._qlora_original_forward(hidden_states, position_embeddings, attention_mask,
                                            past_key_values=past_key_values, **kwargs)
    from transformers.models.phi import modeling_phi
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    cos, sin = position_embeddings
    packed = kwargs.pop(packing.KEY, None)
    if packed is not None:  # rows laid end to end (core/packing.py): per-row positions and attention
        cos, sin = packing.rotary_tables(packed, cos, sin)

    if triton_rope.available(hidden_states):  # one kernel each way (core/rope.py)
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
        out = packing.attention(query_states[0].transpose(0, 1), key_states[0].transpose(0, 1),
                                value_states[0].transpose(0, 1), packed, self.scaling)
        return self.dense(out.reshape(*hidden_states.shape[:-1], -1)), None
    impl = self.config._attn_implementation
    attention = (modeling_phi.eager_attention_forward if impl == "eager"
                 else modeling_phi.ALL_ATTENTION_FUNCTIONS[impl])
    attn_output, attn_weights = attention(self, query_states, key_states, value_states, attention_mask,
                                          dropout=0.0 if not self.training else self.attention_dropout,
                                          scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return self.dense(attn_output), attn_weights


def tune_model(model, dtype: torch.dtype) -> list[str]:
    """Changes that keep the function and make it cheaper; returns what was changed.

    - GELU written out in Python (gelu_new: 8 kernels, 4 saved tensors) -> the fused tanh GELU
      (the same formula in one kernel);
    - every bitsandbytes 4-bit linear layer, with its LoRA adapter if it has one, runs as one
      autograd function (core.qlinear; QLORA_FUSED=0 keeps peft's path);
    - on a 16-bit compute dtype, LayerNorm outputs that dtype (see _LayerNormInDtype);
    - with float16, the embedding is kept in float32 so the residual stream is float32 and cannot
      overflow (Phi's activations exceed fp16's 65504 in the residual stream)."""
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
            elif lowp and type(child) is torch.nn.LayerNorm and not _is_lora_part(f"{name}.{child_name}"):
                setattr(module, child_name, _LayerNormInDtype(child, dtype))
                changes.append("layernorm->compute dtype")
    if os.environ.get("QLORA_ROTARY", "1") != "0":
        for module in model.modules():
            if (type(module).__name__ == "PhiAttention" and hasattr(module, "rotary_ndims")
                    and not hasattr(module, "_qlora_original_forward")):
                module._qlora_original_forward = module.forward
                module.forward = types.MethodType(_phi_attention_forward, module)
                changes.append("partial rotary embedding fused (one Triton kernel on GPU, three torch kernels elsewhere)")
    from . import qlinear
    if qlinear.install(model):  # fewer kernels and saved tensors per 4-bit linear (+ LoRA) layer
        changes.append("4-bit linear + LoRA as one autograd function")
    if dtype == torch.float16:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None and emb.weight.dtype != torch.float32:
            emb.to(torch.float32)
            changes.append("embedding->float32 (fp32 residual stream)")
    return sorted(set(changes))


def is_causal(model) -> bool:
    """True for decoder-only models (attention modules with is_causal): with right padding, real
    tokens never attend to the pads after them, so the attention mask can be left out (SDPA then
    runs its causal flash kernel, no mask is built, no host sync)."""
    for m in model.modules():
        if getattr(m, "is_causal", None) is True and hasattr(m, "q_proj"):
            return True
    return False


def pad_width(width: int, multiple: int = WIDTH_MULTIPLE) -> int:
    return -(-width // multiple) * multiple


def pad_batch(batch: dict[str, torch.Tensor], pad_id: int, width: int | None = None,
              rows: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Right-pad a collated batch to `width` columns and `rows` rows (filler rows copy real rows
    cyclically); returns the batch and the number of real rows."""
    n = batch["input_ids"].shape[0]
    w = batch["input_ids"].shape[1]
    width = width or w
    rows = rows or n
    out = {}
    for k, v in batch.items():
        if v.ndim == 2 and width > w:
            fill = pad_id if k == "input_ids" else 0
            v = torch.cat([v, torch.full((n, width - w), fill, dtype=v.dtype)], dim=1)
        if rows > n:
            v = v[torch.arange(rows) % n]
        out[k] = v
    return out, n


# --- the training step -----------------------------------------------------------------------

def capture_graph(run, device: torch.device, pool, warm_up: bool):
    """(CUDA graph of run(), what run() returned inside it), in memory pool `pool`. With warm_up,
    run() goes once on a side stream first, so lazy initialisation stays out of the capture.
    Raises whatever the capture raises (an op that syncs or cannot be captured)."""
    if warm_up:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out


class TrainStep:
    """Forward + backward of micro-batches into the .grad of the trainable weights."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype, pad_id: int, scaler=None,
                 graphs: bool | None = None):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.pad_id = pad_id
        self.scaler = scaler
        if graphs is None:
            graphs = os.environ.get("QLORA_CUDA_GRAPHS", "1") != "0"
        # with a GradScaler (fp16) the graph multiplies the loss by the scaler's scale tensor, which
        # GradScaler.update() changes in place: the replays see each step's scale
        self.graphs = bool(graphs) and device.type == "cuda"
        self.drop_mask = is_causal(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        self.cache: dict[tuple, dict] = {}
        self.packed = packing.enabled(model, device, dtype)  # rows laid end to end: use run_packed()
        self.max_len = 0
        self.pool = None
        self.captures = 0
        self.capture_s = 0.0  # wall time spent capturing graphs (warm-up included)
        self.graph_error: str | None = None
        self.token_budget = micro_token_budget(device)
        self.warmup_each = os.environ.get("QLORA_GRAPH_WARMUP", "first") == "each"

    # grads stay allocated (graphs add into them): zero in place instead of setting to None
    def zero_grad(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_zero_([p.grad for p in self.params])  # a few launches instead of one per tensor

    def width(self, width: int) -> int:
        """The padded width a batch of `width` columns runs at: a multiple of 16 on GPU (few shapes
        to capture, tensor-core friendly), unchanged on CPU where every extra column costs time."""
        return pad_width(width) if self.device.type == "cuda" else width

    def take_loss(self) -> float:
        """The summed loss since the last call (one host sync)."""
        return float(self.take_loss_tensor())

    def take_loss_tensor(self) -> torch.Tensor:
        """The summed loss since the last call as a device scalar (no host sync)."""
        value = self.loss_sum.clone()
        self.loss_sum.zero_()
        return value

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.dtype, cache_enabled=False)
        return contextlib.nullcontext()

    def _fwd_bwd(self, b: dict[str, torch.Tensor]) -> None:
        if "cu_seqlens" in b:  # packed (core/packing.py)
            with self._autocast():
                logits = packing.packed_logits(self.model, b, self.max_len)
        else:
            kwargs = {"input_ids": b["input_ids"]}
            if not self.drop_mask:
                kwargs["attention_mask"] = b["attention_mask"]
            if "token_type_ids" in b:
                kwargs["token_type_ids"] = b["token_type_ids"]
            with self._autocast():
                logits = self.model(**kwargs).logits
        ce = torch.nn.functional.cross_entropy(logits.float(), b["labels"], reduction="none")
        loss = (ce * b["weight"]).sum()
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.loss_sum.add_(loss.detach())

    def run(self, batch: dict[str, torch.Tensor], step_rows: int, rows: int | None = None) -> None:
        """Add the gradient of sum(CE over the batch's rows) / step_rows into .grad.

        `batch` is a CPU batch from data.collate; `rows` pads it to a fixed row count (the
        micro-batch size) so that the last, shorter batch of an epoch reuses a graph. A batch of
        more than token_budget padded tokens is split into micro-batches of rows/2, rows/4, ...
        (the same gradient: each row's loss is weighted 1/step_rows), so a batch of long rows
        takes no more activation memory than a batch of short ones."""
        width = self.width(batch["input_ids"].shape[1])
        n = batch["input_ids"].shape[0]
        cap = rows or n
        if self.token_budget and cap * width > self.token_budget and cap > 1:
            while cap > 1 and cap * width > self.token_budget:
                cap //= 2
            for s in range(0, n, cap):
                part = {k: v[s:s + cap] for k, v in batch.items()}  # same width: no new shapes
                self.run(part, step_rows, rows=cap)
            return
        padded, n = pad_batch(batch, self.pad_id, width, rows if self.graphs else None)
        weight = torch.zeros(padded["input_ids"].shape[0], dtype=torch.float32)
        weight[:n] = 1.0 / step_rows
        padded["weight"] = weight
        self._launch(padded)

    def run_packed(self, rows: list[dict], step_rows: int, max_rows: int, max_len: int) -> tuple[int, int]:
        """run() for a model that packs (core/packing.py): `rows` (encoded examples) laid end to
        end in micro-batches of at most max_rows rows and token_budget tokens, no padding but the
        filler up to a multiple of 64. max_len: the longest row of the data, rounded up (fixed
        for the run: graphs bake it in). Returns (real tokens, tokens processed)."""
        self.max_len = max_len
        real = processed = 0
        for part in packing.split_rows(rows, self.token_budget, max_rows):
            batch = packing.pack(part, self.pad_id, slots=max_rows if self.graphs else None,
                                 weight=1.0 / step_rows)
            real += sum(len(r["input_ids"]) for r in part)
            processed += len(batch["input_ids"])
            self._launch(batch)
        return real, processed

    def _launch(self, batch: dict[str, torch.Tensor]) -> None:
        """Forward + backward of one CPU batch: replayed from its shape's graph, captured first."""
        if not self.graphs:
            self._fwd_bwd({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
            return
        key = (self.max_len if "cu_seqlens" in batch else None, *(tuple(v.shape) for _, v in sorted(batch.items())))
        entry = self.cache.get(key)
        if entry is None:
            entry = self._capture(batch, key)
            if entry is None:  # capture failed: run eagerly from now on
                self._fwd_bwd({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
                return
        for k, v in batch.items():  # from pinned memory: the copy waits in the stream, not the host
            entry["static"][k].copy_(v.pin_memory(), non_blocking=True)
        entry["graph"].replay()

    def _capture(self, example: dict[str, torch.Tensor], key) -> dict | None:
        t0 = time.perf_counter()
        static = {k: v.to(self.device).clone() for k, v in example.items()}  # outside the graph pool
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        saved = [p.grad.clone() for p in self.params]
        saved_loss = self.loss_sum.clone()
        try:  # later shapes: capture without a warm-up
            graph, _ = capture_graph(lambda: self._fwd_bwd(static), self.device, self.pool,
                                     warm_up=self.captures == 0 or self.warmup_each)
        except Exception as e:  # an op that syncs or is not capturable: fall back to eager
            self.graphs = False
            self.graph_error = f"{type(e).__name__}: {e}"[:500]
            torch.cuda.synchronize(self.device)
            return None
        finally:
            for p, g in zip(self.params, saved):  # the warm-up's gradient does not count
                p.grad.copy_(g)
            self.loss_sum.copy_(saved_loss)
            self.capture_s += time.perf_counter() - t0
        self.pool = graph.pool()
        self.captures += 1
        entry = {"graph": graph, "static": static}
        self.cache[key] = entry
        return entry


class EvalGraphs:
    """Evaluation forwards captured as CUDA graphs, one per batch shape, and replayed: a run scores
    the same validation batches after every epoch (and the same test batches before and after), so
    each shape is captured once and every later pass runs without Python or launch overhead.
    On a GPU unless QLORA_EVAL_GRAPHS=0 (measured 2026-11-29 on an H200, 1,000 padded test pairs
    of the reference experiment: 2,597 pairs/s replayed against 1,967 eager; a capture costs about
    the time of one eager pass). Packed evaluation runs a few large batches, which gain nothing
    from it (3,563 against 3,566 pairs/s): core.train uses it for padded models only. Eager on CPU,
    and after a capture fails."""

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = device.type == "cuda" and os.environ.get("QLORA_EVAL_GRAPHS", "1") != "0"
        self.cache: dict[tuple, dict] = {}
        self.pool = None
        self.error: str | None = None

    def logits(self, batch: dict[str, torch.Tensor], forward, extra_key=None) -> torch.Tensor:
        """forward(batch on the device) -> logits, run through a graph for this batch's shape (and
        extra_key: what else forward bakes in). The result of a replay lives in the graph's
        output: use it before the same shape runs again."""
        entry = None
        if self.enabled:
            key = (extra_key, *((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items())))
            entry = self.cache.get(key) or self._capture(batch, forward, key)
        if entry is None:  # disabled, or the capture just failed
            return forward({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        for k, v in batch.items():
            entry["static"][k].copy_(v.pin_memory(), non_blocking=True)
        entry["graph"].replay()
        return entry["out"]

    def _capture(self, batch, forward, key) -> dict | None:
        static = {k: v.to(self.device) for k, v in batch.items()}
        try:
            graph, out = capture_graph(lambda: forward(static), self.device, self.pool, warm_up=not self.cache)
        except Exception as e:  # not capturable: evaluate eagerly from now on
            self.enabled = False
            self.error = f"{type(e).__name__}: {e}"[:500]
            torch.cuda.synchronize(self.device)
            return None
        self.pool = graph.pool()
        self.cache[key] = entry = {"graph": graph, "static": static, "out": out}
        return entry


def micro_token_budget(device: torch.device) -> int | None:
    """Most tokens (padding included) in one forward/backward (QLORA_MICRO_TOKENS; 0 = no limit).
    Default on a GPU: 768, which keeps a Phi-2-sized model's whole run under 4 GiB (measured
    2026-11-29 on an H200, the reference experiment at batch 32, packed: peak 3.68 GiB at 768,
    4.21 GiB at 1024 with 15% more pairs/s; bench/RESULTS.md); none on CPU."""
    env = os.environ.get("QLORA_MICRO_TOKENS")
    if env is not None:
        return int(env) or None
    return 768 if device.type == "cuda" else None


def eval_batches(encoded: list[dict], order: list[int], batch_size: int, device: torch.device) -> list[list[int]]:
    """Split `order` (rows sorted by length) into evaluation batches with the fewest padded tokens
    plus a fixed cost per batch: each batch holds rows of neighbouring lengths, at most batch_size
    rows and, on a GPU, at most QLORA_EVAL_TOKENS (default 16384) padded tokens (memory bound).

    Exact, by dynamic programming over the distinct lengths: cost = padded tokens + a fixed cost
    per batch in tokens (QLORA_EVAL_BATCH_COST): on a GPU 1024, about what dequantising Phi-2's
    weights for one forward costs in GPU time; on a CPU, little (32). One long row no longer
    pads hundreds of short ones."""
    gpu = device.type == "cuda"
    budget = int(os.environ.get("QLORA_EVAL_TOKENS", "16384")) if gpu else 0
    batch_cost = int(os.environ.get("QLORA_EVAL_BATCH_COST", "1024" if gpu else "32"))
    lengths, counts = [], []  # distinct lengths in order, and how many rows have each
    for i in order:
        n = len(encoded[i]["input_ids"])
        if lengths and lengths[-1] == n:
            counts[-1] += 1
        else:
            lengths.append(n)
            counts.append(1)

    def cap(width: int) -> int:  # most rows of this width in one batch
        return max(1, min(batch_size, budget // width if budget else batch_size))

    best = [0.0] + [math.inf] * len(lengths)  # best[j]: cost of the first j lengths
    cut = [0] * (len(lengths) + 1)
    for j in range(1, len(lengths) + 1):
        rows = 0
        for i in range(j, 0, -1):  # the last span holds lengths i-1 .. j-1, padded to lengths[j-1]
            rows += counts[i - 1]
            cost = best[i - 1] + rows * lengths[j - 1] + -(-rows // cap(lengths[j - 1])) * batch_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    spans, j = [], len(lengths)
    while j > 0:
        spans.append((cut[j], j))
        j = cut[j]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    batches = []
    for a, b in reversed(spans):
        rows = order[starts[a]:starts[b]]
        k = -(-len(rows) // cap(lengths[b - 1]))  # batches this span needs; equal sizes
        size = -(-len(rows) // k)
        batches += [rows[s:s + size] for s in range(0, len(rows), size)]
    return batches


def fetch_later(*values: torch.Tensor | None):
    """Start copying device scalars to the host now; returns a function that waits for exactly
    this copy (not for the work queued after it) and gives the floats (None stays None).

    Reading a CUDA tensor with .item() waits for everything queued on the stream before the read,
    so a training loop that reads step n-1's loss after queueing step n waits for step n too; an
    event recorded right after step n-1 does not."""
    present = [v.detach().float().reshape(()) for v in values if v is not None]
    if not present:
        return lambda: [None] * len(values)
    stacked = torch.stack(present)
    if stacked.is_cuda:
        host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
        host.copy_(stacked, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    else:
        host, done = stacked, None

    def get() -> list[float | None]:
        if done is not None:
            done.synchronize()
        floats = iter(host.tolist())
        return [None if v is None else next(floats) for v in values]
    return get


class PeakMemory:
    """Peak GPU memory (torch's allocator, GiB) per phase and overall; all None on CPU.

        peaks = PeakMemory(device); ...; peaks.phase()  # peak since the last phase() call"""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.overall: float | None = None

    def phase(self, in_overall: bool = True) -> float | None:
        if not self.cuda:
            return None
        gib = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        torch.cuda.reset_peak_memory_stats(self.device)
        if in_overall:
            self.overall = gib if self.overall is None else max(self.overall, gib)
        return gib


def round_or_none(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)
