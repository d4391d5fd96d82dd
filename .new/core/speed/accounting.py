"""Accounting: model FLOPs, MFU, peak GPU memory, and reading step values without stalling the GPU.

info = flops_info(model)                          # N, LoRA term, layers, hidden size
f = flops_per_token(info, seq_len=32)             # 4N + 6*sum r(d_in+d_out) + 12*L*s*d
mfu(f, tokens_per_s, peak_flops(device))          # None where the peak is unknown (CPU)
memory = PeakMemory(device); memory.phase()       # peak GiB since the last phase()
StepLog(...)                                      # the training loop's per-step records, read late
"""

from __future__ import annotations

import time

import torch

# Dense peak rates (FLOP/s) of the matrix units in the dtype we train in (bf16; fp16 on a T4).
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L4": 121e12,
    "T4": 65e12,
    "A10": 125e12,
    "L40": 181e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device | None = None) -> float | None:
    """The GPU's dense bf16/fp16 peak from PEAK_FLOPS by name; None on CPU or for unknown GPUs."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_FLOPS[key]
    return None


def flops_info(model) -> dict:
    """What the FLOPs formula needs, read off a (peft) model.

    n_linear: weights of the linear layers that run for every token (base weights of attention and
    MLP projections; LoRA matrices and the classification head excluded); lora: sum over LoRA
    modules of r * (d_in + d_out); layers, hidden: L and d of the transformer."""
    from ..model import HEAD_NAMES, is_lora_part

    n_linear = 0
    lora = 0
    for name, module in model.named_modules():
        if is_lora_part(name) or "modules_to_save" in name or "original_module" in name:
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

    def totals(self) -> dict:
        """At the end of a run: torch_peak_gb, the highest of the phases after loading (the current
        phase closed), and torch_reserved_gb, what torch holds from the driver, CUDA graphs' memory
        pools included; {} on CPU."""
        self.phase()
        if self.overall is None:
            return {}
        return {
            "torch_peak_gb": self.overall,
            "torch_reserved_gb": round(torch.cuda.memory_reserved(self.device) / 2**30, 3),
        }


def round_or_none(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


class StepLog:
    """The training loop's per-step records (loss, lr, grad norm, pairs/s, tokens/s, MFU, padding),
    read one step late: a step's loss is read only once the next step is queued behind it, so
    the GPU keeps working while Python reads, logs and collates; the epoch's last step is read
    at once. log(**record) writes a record; progress(step) is called every 5 steps and at the
    end of each epoch.

        steps = StepLog(log, progress, model, device)
        steps.start_epoch(epoch, len(batches))
        steps.add(step, b + 1, rows, loss, grad_norm, lr, (real, processed), graphs)   # device values
        steps.flush(last=b + 1 == len(batches))
    """

    def __init__(self, log, progress, model, device: torch.device, devices: int = 1):
        """`devices`: the processes of a data-parallel run (rows and tokens are theirs together)."""
        self.log, self.progress = log, progress
        self.flops = flops_info(model)
        peak = peak_flops(device)
        self.peak = peak * devices if peak else None
        self.pending: list[dict] = []

    def start_epoch(self, epoch: int, steps: int, loss_sum: float = 0.0, rows: int = 0) -> None:
        """A new epoch of `steps` steps; a resumed epoch passes the loss sum and rows it had."""
        self.epoch, self.steps = epoch, steps
        self.t_epoch = self.t_done = time.time()
        self.loss_sum, self.rows = loss_sum, rows

    @property
    def train_loss(self) -> float:
        """The epoch's mean training loss per row so far."""
        return self.loss_sum / max(1, self.rows)

    def add(
        self,
        step: int,
        epoch_step: int,
        rows: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor | None,
        lr: float,
        tokens: tuple,
        graphs: bool,
    ) -> None:
        """`tokens`: (real, processed) as ints, or as device scalars (summed over processes)."""
        counted = isinstance(tokens[0], torch.Tensor)
        self.pending.append(
            {
                "step": step,
                "epoch_step": epoch_step,
                "rows": rows,
                "lr": lr,
                "graphs": graphs,
                "values": fetch_later(loss, grad_norm, *(tokens if counted else ())),
                "real": None if counted else tokens[0],
                "padded": None if counted else tokens[1],
            }
        )

    def flush(self, last: bool) -> None:
        while len(self.pending) > (0 if last else 1):
            r = self.pending.pop(0)
            step_loss, grad_norm, *counts = r["values"]()  # waits until the GPU has finished that step
            if counts:
                r["real"], r["padded"] = counts
            now = time.time()
            dt, self.t_done = now - self.t_done, now
            self.loss_sum += step_loss * r["rows"]
            self.rows += r["rows"]
            f = flops_per_token(self.flops, r["padded"] / r["rows"])
            self.log(
                kind="step",
                step=r["step"],
                epoch=self.epoch,
                epoch_step=r["epoch_step"],
                steps_per_epoch=self.steps,
                loss=step_loss,
                lr=r["lr"],
                grad_norm=grad_norm if grad_norm is not None else float("nan"),
                rows=r["rows"],
                samples_per_s=round(r["rows"] / dt, 2),
                tokens_per_s=round(r["real"] / dt, 1),
                mfu=round_or_none(mfu(f, r["real"] / dt, self.peak), 4),
                cuda_graphs=r["graphs"],
                pad_fraction=round(1 - r["real"] / r["padded"], 4),
                step_s=round(dt, 4),
            )
            if r["step"] % 5 == 0 or r["epoch_step"] == self.steps:
                self.progress(r["step"])
