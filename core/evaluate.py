"""Scoring: predictions of a model on encoded examples, and `evaluate RUN_DIR --data FILE`.

probs, loss = predict(model, encoded, batch_size=128, pad_id=0, device=dev, dtype=torch.float32)
rows = prediction_rows(examples, probs, labels)     # what predictions/*.jsonl hold
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_adapter_weights, run_checkpoint
from .config import RunConfig, SpeedConfig, speed_from_env
from .data import Example, collate, encode, to_examples
from .model import add_lora, autocast, is_causal, load_model, load_tokenizer, pick_compute_dtype, pick_device
from .runs import rundir
from .speed import packing
from .speed.graphs import EvalGraphs
from .speed.tune import tune_model
from .tables import iter_table


@torch.inference_mode()
def predict(
    model,
    encoded: list[dict],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    graphs: EvalGraphs | None = None,
    speed: SpeedConfig | None = None,
) -> tuple[np.ndarray, float]:
    """Class probabilities (n, classes) in the order of `encoded`, and the mean cross-entropy.

    Packed batches where the model allows it (core/speed/packing.py: no padding; at most
    batch_size rows and speed.eval_tokens tokens), else padded batches of rows of similar length
    (eval_batches). `graphs` (an EvalGraphs kept across calls) replays captured forwards on a GPU:
    worth it when the same examples are scored again, as the validation set is after every epoch."""
    speed = speed or SpeedConfig()
    if not encoded:
        return np.zeros((0, 0)), float("nan")
    if packing.enabled(model, device, dtype, speed.pack):
        max_len = packing.max_len(encoded)  # graphs bake it in: part of their key
        order = list(range(len(encoded)))
        batches = (packing.pack(part, pad_id) for part in packing.split_rows(encoded, speed.eval_tokens, batch_size))
        key = max_len

        def run(batch):
            return packing.packed_logits(model, batch, max_len)
    else:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))  # less padding
        drop_mask = is_causal(model)  # right padding + causal attention: the mask changes nothing

        def padded(idx):
            batch = collate(encoded, idx, pad_id)
            if drop_mask:
                batch.pop("attention_mask")
            return batch

        batches = (padded(idx) for idx in eval_batches(encoded, order, batch_size, device, speed))
        key = None

        def run(batch):
            return model(**batch).logits

    def forward(batch):
        with autocast(device, dtype):
            return run(batch).float()

    was_training = model.training
    model.eval()
    chunks, losses = [], []
    for batch in batches:  # rows and tokens bounded
        labels = batch.pop("labels").to(device, non_blocking=True)
        if graphs is not None:
            logits = graphs.logits(batch, forward, extra_key=key)
        else:
            logits = forward({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        chunks.append(torch.softmax(logits, -1))  # stays on the device: one copy and sync at the end
    model.train(was_training)
    probs = torch.empty((len(encoded), chunks[0].shape[-1]), dtype=torch.float32)
    probs[torch.tensor(order)] = torch.cat(chunks).cpu()
    return probs.numpy(), float(torch.stack(losses).sum().item()) / len(encoded)


def eval_batches(
    encoded: list[dict], order: list[int], batch_size: int, device: torch.device, speed: SpeedConfig | None = None
) -> list[list[int]]:
    """Split `order` (rows sorted by length) into evaluation batches with the fewest padded tokens
    plus a fixed cost per batch: each batch holds rows of neighbouring lengths, at most batch_size
    rows and, on a GPU, at most speed.eval_tokens padded tokens (memory bound).

    Exact, by dynamic programming over the distinct lengths: cost = padded tokens + a fixed cost
    per batch in tokens (speed.eval_batch_cost): on a GPU 1024, about what dequantising Phi-2's
    weights for one forward costs in GPU time; on a CPU, little (32). One long row no longer
    pads hundreds of short ones."""
    speed = speed or SpeedConfig()
    gpu = device.type == "cuda"
    budget = speed.eval_tokens if gpu else 0
    batch_cost = speed.eval_batch_cost if speed.eval_batch_cost is not None else (1024 if gpu else 32)
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
        rows = order[starts[a] : starts[b]]
        k = -(-len(rows) // cap(lengths[b - 1]))  # batches this span needs; equal sizes
        size = -(-len(rows) // k)
        batches += [rows[s : s + size] for s in range(0, len(rows), size)]
    return batches


def prediction_rows(examples: list[Example], probs: np.ndarray, labels: list[str]) -> list[dict]:
    rows = []
    for ex, p in zip(examples, probs):
        pred = int(p.argmax())
        row = ex.as_dict()
        row.pop("label")
        row.update(
            gold=labels[ex.label], pred=labels[pred], correct=pred == ex.label, probs=[round(float(x), 5) for x in p]
        )
        rows.append(row)
    return rows


def accuracy(probs: np.ndarray, examples: list[Example]) -> float:
    if len(examples) == 0:
        return float("nan")
    gold = np.array([e.label for e in examples])
    return float((probs.argmax(-1) == gold).mean())


RUN_SPLITS = ("train", "validation", "test")


def evaluation_name(data_file: Path, name: str | None = None) -> str:
    """The name of `evaluate RUN --data FILE`'s predictions files: `name` as given (checked), else
    the file's stem with anything but letters, digits, '.', '_', '-' replaced, and `-file` added
    when it is one of the run's own split names (test.jsonl -> test-file)."""
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}", name) or name in RUN_SPLITS:
            hint = f" (e.g. {name}-file)" if name in RUN_SPLITS else ""
            raise ValueError(
                f"invalid evaluation name {name!r}: use 1-60 letters, digits, '.', '_', '-', and not "
                f"train/validation/test, which the run itself writes{hint}"
            )
        return name
    base = Path(data_file).name
    stem = Path(base[:-3] if base.endswith(".gz") else base).stem  # test.jsonl.gz -> test
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:55] or "data"
    return f"{stem}-file" if stem in RUN_SPLITS else stem


def load_run_model(cfg: RunConfig, tune: bool = True) -> tuple:
    """(model, tokenizer, device, dtype, speed): the run's model as it trained (4-bit base, LoRA
    layout, and with `tune` its speed-ups), ready for load_adapter_weights of one of its checkpoints."""
    device = pick_device(cfg.model.device)
    dtype = pick_compute_dtype(device, cfg.model.compute_dtype, cfg.speed.cpu_bf16)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(
        cfg.model,
        len(cfg.data.labels),
        tokenizer.pad_token_id,
        device,
        dtype,
        id2label=dict(enumerate(cfg.data.labels)),
    )
    model = add_lora(model, cfg.lora)
    speed = speed_from_env(cfg.speed)
    if tune:
        tune_model(model, dtype, speed)  # the same numerics as during training
    return model, tokenizer, device, dtype, speed


def evaluate_run(run_dir: Path, data_file: Path, name: str | None = None, batch_size: int | None = None) -> dict:
    """Score the run's base model (its step-0 adapter) and its selected adapter on a labelled file.

    Writes predictions/<name>_before.jsonl and predictions/<name>_after.jsonl into the run folder
    and returns {"n", "accuracy_before", "accuracy_after", "dropped_unlabelled", "dropped_empty",
    "name", "files"}. The name defaults to the file's stem, made safe; a stem that is one of the
    run's own splits (test.jsonl) becomes <stem>-file, so the obvious command works."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder not found: {run_dir}")
    if not (run_dir / rundir.CONFIG).is_file():
        raise ValueError(f"{run_dir} is not a run folder (no {rundir.CONFIG})")
    name = evaluation_name(data_file, name)
    rows = iter_table(data_file)  # a missing file or an unknown type fails here, before any model loads
    cfg = RunConfig.load(run_dir / rundir.CONFIG)
    after_dir, best = run_checkpoint(run_dir)  # the epoch the run selected
    before_dir, _ = run_checkpoint(run_dir, 0)  # the base model: the step-0 adapter
    examples, stats = to_examples(rows, cfg.data, name, source=str(data_file))
    if not examples:
        raise ValueError(
            f"{data_file}: no usable rows to evaluate ({stats.rows_read} rows, "
            f"{stats.dropped_unlabelled} without a gold label, {stats.dropped_empty} with an empty text)"
        )
    model, tokenizer, device, dtype, speed = load_run_model(cfg)
    encoded = encode(examples, tokenizer, cfg.data)
    bs = batch_size or cfg.train.eval_batch_size
    result = {
        "name": name,
        "n": len(examples),
        "dropped_unlabelled": stats.dropped_unlabelled,
        "dropped_empty": stats.dropped_empty,
        "best_epoch": best,
        "files": [],
    }
    for stage, ckpt in (("before", before_dir), ("after", after_dir)):
        load_adapter_weights(model, ckpt)
        t0 = time.perf_counter()
        probs, loss = predict(model, encoded, bs, tokenizer.pad_token_id, device, dtype, speed=speed)
        out = rundir.predictions_file(run_dir, name, stage)
        rundir.atomic_write_jsonl(out, prediction_rows(examples, probs, cfg.data.labels))
        result["files"].append(str(out))
        result[f"accuracy_{stage}"] = accuracy(probs, examples)
        result[f"loss_{stage}"] = loss
        result[f"seconds_{stage}"] = round(time.perf_counter() - t0, 3)
    return result
