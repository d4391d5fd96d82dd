"""The training step: forward + backward of one optimiser step's rows into .grad, fast.

    step = TrainStep(model, device, dtype, pad_id, cfg.speed, scaler=None, data=encoded_train,
                     class_weights=class_weights(cfg.train.class_weights, counts, labels))
    step.zero_grad()
    real, processed = step.forward_backward(rows, micro=32)   # packed or padded, micro-batches, graphs
    loss = step.take_loss_tensor()                            # the step's summed loss, on the device

The rows are laid end to end where the model allows it (packing.py), else padded to a width that is
a multiple of 16 on a GPU (few distinct shapes). A step of more than the token budget is split
into micro-batches with the same gradient. On a CUDA GPU each shape's forward+backward is
captured once as a CUDA graph (graphs.py) and replayed; rows (or packed slots) that only fill a
graph's shape have loss weight 0. speed.cuda_graphs = false runs the same step eagerly. Each
micro-batch's forward starts by making the 16-bit copies of every fused LoRA adapter at once
(qlinear.LoraCopies, inside the graph where there is one), which its layers then read.

Class weights (train.class_weights) multiply each row's cross-entropy by its class's weight in
_fwd_bwd, the one place every path (padded, packed, graphs; each process of a data-parallel run)
computes the loss; the sum is still divided by the rows, not by the weights (class_weights
rescales them to a mean of 1 over the training rows), so micro-batches and processes need nothing
new.
"""

from __future__ import annotations

import contextlib
import time

import torch

from ..config import SpeedConfig
from ..data import collate
from ..model import autocast, is_causal
from . import packing
from .graphs import capture_graph

WIDTH_MULTIPLE = 16


def micro_token_budget(device: torch.device, micro_tokens: int | None = None) -> int | None:
    """Most tokens (padding included) in one forward/backward: speed.micro_tokens (0 = no limit);
    by default 768 on a GPU (the Phi-2 reference under 4 GiB, bench/RESULTS.md), none on CPU."""
    if micro_tokens is not None:
        return micro_tokens or None
    return 768 if device.type == "cuda" else None


def class_weights(setting: str | list[float], counts: list[int], labels: list[str]) -> list[float] | None:
    """The weight of each class in the training loss for train.class_weights (config.TrainConfig),
    from `counts` (training rows per class, in label order): None for `none`; for `balanced`
    n / (k n_c), scikit-learn's rule (each class then weighs as much as the others in the loss);
    given weights as they are. Both are rescaled so that the training rows' mean weight is 1: the
    loss keeps its scale, so the learning rate keeps its meaning."""
    if setting == "none":
        return None
    if setting == "balanced":
        missing = [labels[c] for c, n in enumerate(counts) if n == 0]
        if missing:
            raise ValueError(
                f"train.class_weights balanced needs training rows of every class, and there are none of "
                f"{', '.join(missing)}: give the weights by hand or leave the class out of data.labels"
            )
        weights = [sum(counts) / (len(counts) * n) for n in counts]
    else:
        weights = [float(w) for w in setting]
    mean = sum(w * n for w, n in zip(weights, counts)) / max(1, sum(counts))
    return [w / mean for w in weights]


def pad_width(width: int, multiple: int = WIDTH_MULTIPLE) -> int:
    return -(-width // multiple) * multiple


def pad_batch(
    batch: dict[str, torch.Tensor], pad_id: int, width: int | None = None, rows: int | None = None
) -> tuple[dict[str, torch.Tensor], int]:
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


class TrainStep:
    """Forward + backward of micro-batches into the .grad of the trainable weights."""

    def __init__(
        self,
        model,
        device: torch.device,
        dtype: torch.dtype,
        pad_id: int,
        speed: SpeedConfig | None = None,
        scaler=None,
        data: list[dict] | None = None,
        micro: int | None = None,
        class_weights: list[float] | None = None,
    ):
        """`data`: the encoded training rows, whose longest row bounds a packed row's length;
        `micro`: rows per forward/backward (forward_backward's default); `class_weights`: each
        class's weight in the loss (the function class_weights; None: all 1)."""
        speed = speed or SpeedConfig()
        self.model = model
        self.device = device
        self.dtype = dtype
        self.pad_id = pad_id
        self.scaler = scaler
        graphs = speed.cuda_graphs
        # with a GradScaler (fp16) the graph multiplies the loss by the scaler's scale tensor, which
        # GradScaler.update() changes in place: the replays see each step's scale
        self.graphs = bool(graphs) and device.type == "cuda"
        self.drop_mask = is_causal(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        self.cache: dict[tuple, dict] = {}
        self.packed = packing.enabled(model, device, dtype, speed.pack)  # rows laid end to end: run_packed()
        self.longest = packing.max_len(data) if data else 0  # fixed for the run: graphs bake it in
        self.max_len = 0
        self.pool = None
        self.captures = 0
        self.capture_s = 0.0  # wall time spent capturing graphs (warm-up included)
        self.graph_error: str | None = None
        self.token_budget = micro_token_budget(device, speed.micro_tokens)
        self.copies = None  # the fused layers' LoRA copies, made once a micro-batch (qlinear.LoraCopies)
        if speed.fused_linear and any(type(m).__name__ == "Linear4bit" for m in model.modules()):
            from . import qlinear  # bitsandbytes: only for a 4-bit model

            self.copies = qlinear.LoraCopies(model, dtype) or None
        self.warmup_each = speed.graph_warmup == "each"
        self.micro = micro
        self.oom_retries = 0
        self.class_weights = None if class_weights is None else torch.tensor(class_weights, device=device)
        self.zero_grad()

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

    def forward_backward(self, rows: list[dict], micro: int | None = None) -> tuple[int, int]:
        """Add the gradient of sum(w CE over `rows`) / len(rows) into .grad (w: the row's class
        weight, 1 without class_weights): one optimiser step's
        encoded rows, in micro-batches of at most `micro` rows (default: the constructor's; and
        token_budget tokens), packed where the model allows it. Returns (real tokens, tokens
        processed, padding included).

        Out of GPU memory, the step is run again once with half the micro-batch and half the token
        budget (the same gradient), which then hold for the rest of the run; out of memory again,
        it fails saying what to lower."""
        micro = micro or self.micro or len(rows)
        try:
            return self._forward_backward(rows, micro)
        except torch.cuda.OutOfMemoryError as e:
            smaller = max(1, micro // 2)
            if self.oom_retries or smaller == micro:
                raise self._out_of_memory(micro) from e
            self.oom_retries += 1
            print(f"out of GPU memory with micro-batches of {micro} rows: retrying with {smaller}", flush=True)
            self.zero_grad()
            self.loss_sum.zero_()
            self.cache.clear()  # graphs of the old shapes hold memory
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.micro = smaller
            self.token_budget = self.token_budget // 2 if self.token_budget else None
        try:
            return self._forward_backward(rows, smaller)
        except torch.cuda.OutOfMemoryError as e:
            raise self._out_of_memory(smaller) from e

    def _out_of_memory(self, micro: int) -> RuntimeError:
        return RuntimeError(
            f"out of GPU memory with micro-batches of {micro} rows (token budget "
            f"{self.token_budget or 'none'}), after one retry at half the micro-batch: lower "
            "train.micro_batch_size, speed.micro_tokens or train.batch_size"
        )

    def _forward_backward(self, rows: list[dict], micro: int) -> tuple[int, int]:
        if self.packed:
            return self.run_packed(rows, step_rows=len(rows), max_rows=micro, max_len=self.longest)
        real = processed = 0
        for s in range(0, len(rows), micro):
            batch = collate(rows, range(s, min(s + micro, len(rows))), self.pad_id)
            self.run(batch, step_rows=len(rows), rows=micro)
            real += int(batch["attention_mask"].sum())
            processed += len(batch["input_ids"]) * self.width(batch["input_ids"].shape[1])
        return real, processed

    def take_loss(self) -> float:
        """The summed loss since the last call (one host sync)."""
        return float(self.take_loss_tensor())

    def take_loss_tensor(self) -> torch.Tensor:
        """The summed loss since the last call as a device scalar (no host sync)."""
        value = self.loss_sum.clone()
        self.loss_sum.zero_()
        return value

    def _fwd_bwd(self, b: dict[str, torch.Tensor]) -> None:
        # the LoRA copies made once for the micro-batch (inside its graph where there is one), not per call
        with self.copies.armed() if self.copies else contextlib.nullcontext():
            self._loss_backward(b)

    def _loss_backward(self, b: dict[str, torch.Tensor]) -> None:
        if "cu_seqlens" in b:  # packed (packing.py)
            with autocast(self.device, self.dtype, cache_enabled=False):
                logits = packing.packed_logits(self.model, b, self.max_len)
        else:
            kwargs = {"input_ids": b["input_ids"]}
            if not self.drop_mask:
                kwargs["attention_mask"] = b["attention_mask"]
            if "token_type_ids" in b:
                kwargs["token_type_ids"] = b["token_type_ids"]
            with autocast(self.device, self.dtype, cache_enabled=False):
                logits = self.model(**kwargs).logits
        # weight=: each row's CE times its class's weight (train.class_weights); filler rows weigh 0 below
        ce = torch.nn.functional.cross_entropy(logits.float(), b["labels"], weight=self.class_weights, reduction="none")
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
                part = {k: v[s : s + cap] for k, v in batch.items()}  # same width: no new shapes
                self.run(part, step_rows, rows=cap)
            return
        padded, n = pad_batch(batch, self.pad_id, width, rows if self.graphs else None)
        weight = torch.zeros(padded["input_ids"].shape[0], dtype=torch.float32)
        weight[:n] = 1.0 / step_rows
        padded["weight"] = weight
        self._launch(padded)

    def run_packed(self, rows: list[dict], step_rows: int, max_rows: int, max_len: int) -> tuple[int, int]:
        """run() for a model that packs (packing.py): `rows` (encoded examples) laid end to
        end in micro-batches of at most max_rows rows and token_budget tokens, no padding but the
        filler up to a multiple of 64. max_len: the longest row of the data, rounded up (fixed
        for the run: graphs bake it in). Returns (real tokens, tokens processed)."""
        self.max_len = max_len
        real = processed = 0
        for part in packing.split_rows(rows, self.token_budget, max_rows):
            batch = packing.pack(part, self.pad_id, slots=max_rows if self.graphs else None, weight=1.0 / step_rows)
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
            graph, _ = capture_graph(
                lambda: self._fwd_bwd(static), self.device, self.pool, warm_up=self.captures == 0 or self.warmup_each
            )
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
