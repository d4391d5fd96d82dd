"""What a run will do before it starts: device and dtype, parameter counts, rows, steps, and
rough estimates of time and GPU memory.

    p = plan(cfg)                        # what the Train page shows above the Launch button
    p = plan(cfg, rows={"train": 500, "test": 100})   # row counts known by the caller (uploads)

Time comes from the measured speed of an earlier finished run of the same model on the same
kind of device (there is no honest way to guess it otherwise); GPU memory from the model's shape
(weights + LoRA optimiser state + activations), or from an earlier run's measured peak.
Every estimate says where it came from; a number that cannot be estimated is None with a reason.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import BUILTIN_DATA, BUILTIN_DIR, LoraSettings, RunConfig, speed_from_env
from .model import (
    HEAD_NAMES,
    add_lora,
    pick_compute_dtype,
    pick_device,
    pretrained_source,
    resolve_pooling,
    set_pooling,
)
from .runs import rundir
from .runs.state import list_runs
from .speed.step import micro_token_budget
from .tables import iter_table

# transformers and accelerate are imported where they are used: the Train page imports this file
# to show a plan, and builds a model on the meta device only when it asks for parameter counts.

CUDA_CONTEXT_GB = 0.5  # what the CUDA runtime and cuBLAS workspaces take before any tensor
# What one layer keeps for its backward pass, per token, in 16-bit: bytes per hidden unit and per
# intermediate (MLP) unit. A gated MLP (GATED_MLP) keeps [gate | up] (2 values an intermediate unit)
# and the down projection's dropout mask; a plain one its fc1 output and mask; the hidden part is
# the norms' and projections' inputs, the adapters' masks and the attention's q, k, v and output.
# Fitted to the growth of the peak from 768 to 1,472 tokens a micro-batch on one H100 (Phi-2,
# Llama-3.2-3B, Qwen2.5-1.5B and Gemma 3 1B shapes, bench/RESULTS.md 2026-12-06): within 7%.
ACTIVATION_BYTES = {"gated": (20.0, 5.5), "plain": (15.0, 3.0)}
GATED_MLP = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3")


def pick_device_dtype(cfg: RunConfig) -> dict:
    """The device and compute dtype the trainer will choose (same functions it uses)."""
    try:
        device = pick_device(cfg.model.device)
        dtype = pick_compute_dtype(device, cfg.model.compute_dtype, cfg.speed.cpu_bf16)
    except RuntimeError as e:
        return {"device": None, "dtype": None, "error": str(e)}
    out = {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "error": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["gpu"] = props.name
        out["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    return out


def count_file_rows(path: str | Path) -> int | None:
    """Rows of a local data file (JSONL counted by lines, others parsed); None if unreadable."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            with open(path, "rb") as f:
                return sum(1 for line in f if line.strip())
        return sum(1 for _ in iter_table(path))  # streamed: never the whole file in memory
    except (OSError, ValueError):
        return None


def planned_rows(cfg: RunConfig, known: dict[str, int] | None = None) -> dict[str, int | None]:
    """Rows per split the run will use: what the source holds, capped by data.max_*_rows."""
    d = cfg.data
    rows: dict[str, int | None] = {"train": None, "validation": None, "test": None}
    for split in rows:
        if known and known.get(split) is not None:
            rows[split] = known[split]
        elif getattr(d, split):
            rows[split] = count_file_rows(getattr(d, split))
        elif d.source == BUILTIN_DATA:
            rows[split] = count_file_rows(BUILTIN_DIR / f"{split}.jsonl")
    if (
        rows["validation"] is None
        and rows["train"] is not None
        and (d.source in (BUILTIN_DATA, "files") or not d.validation_split)
    ):
        carved = max(1, round(rows["train"] * d.validation_fraction))  # carved from train
        rows["validation"], rows["train"] = carved, rows["train"] - carved
    limits = {"train": d.max_train_rows, "validation": d.max_validation_rows, "test": d.max_test_rows}
    for split, cap in limits.items():
        if cap is not None:
            rows[split] = cap if rows[split] is None else min(rows[split], cap)
    return rows


def model_shape(name: str, revision: str | None = None) -> dict:
    """hidden size, layers, heads, MLP width (intermediate) and model type of a model, from its
    config (no weights)."""
    from transformers import AutoConfig  # here, not at the top: see the imports

    name, source = pretrained_source(name, revision)
    c = AutoConfig.from_pretrained(name, **source)
    return {
        "hidden": getattr(c, "hidden_size", None) or getattr(c, "n_embd", None),
        "layers": getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None),
        "heads": getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None),
        "intermediate": getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None),
        "model_type": getattr(c, "model_type", None),
    }


def activation_bytes(shape: dict, width: int = 2) -> float:
    """Bytes one layer keeps for backward per token (ACTIVATION_BYTES) for model_shape's `shape`;
    `width`: bytes per value of the compute dtype. Without a known MLP width, 4 x hidden."""
    hidden = shape["hidden"]
    intermediate = shape.get("intermediate") or 4 * hidden
    per_hidden, per_intermediate = ACTIVATION_BYTES["gated" if shape.get("model_type") in GATED_MLP else "plain"]
    return (per_hidden * hidden + per_intermediate * intermediate) * width / 2


def gpu_memory_gb(params: dict, shape: dict, cfg: RunConfig, dtype: str) -> float | None:
    """A rough upper bound of the peak GPU memory of training, in GiB.

    weights: quantised linear weights at 4 bits (+ about 0.13 bit of scales with double
    quantisation, and 0.5 bit more where speed.keep_absmax keeps them dequantised), the rest in
    the compute dtype; trainable weights in fp32 with their gradient and two AdamW moments (16
    bytes each); activations of one micro-batch at max_length, split as the trainer splits it on
    a GPU (speed.micro_tokens), activation_bytes per token and layer; plus the CUDA
    context. Batches are padded only to their longest row, so real use is usually lower. With
    train.gradient_checkpointing a layer keeps only its input (one value per token and hidden
    unit), and the layer computed again in backward holds about twice one layer's activations
    (its own and its backward's buffers: fitted to a Phi-shaped model on an H200, bench/RESULTS.md)."""
    if not params or not shape.get("hidden") or not shape.get("layers"):
        return None
    width = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 2)
    quantised = 2 * (params["total"] - params["packed"]) if cfg.model.quantize else 0
    other = params["total"] - quantised
    speed = speed_from_env(cfg.speed)
    bits = 4 + (0.127 if cfg.model.double_quant else 0.5)
    if cfg.model.double_quant and speed.fused_linear and speed.keep_absmax:
        bits += 0.5  # the block scales kept dequantised, fp32 (core/speed/qlinear.keep_absmax)
    weights = quantised * bits / 8 + other * width + params["trainable"] * 16
    tokens = (cfg.train.micro_batch_size or cfg.train.batch_size) * cfg.data.max_length
    budget = micro_token_budget(torch.device("cuda"), speed.micro_tokens)
    if budget:  # long micro-batches are split in row halves; one row is never split
        tokens = min(tokens, max(budget, cfg.data.max_length))
    per_layer = activation_bytes(shape, width) * tokens
    activations = per_layer * shape["layers"]
    if cfg.train.gradient_checkpointing:  # each layer keeps its input; the layer computed again is on top
        kept = tokens * shape["layers"] * shape["hidden"] * width
        activations = kept + 2 * per_layer
    return round((weights + activations) / 2**30 + CUDA_CONTEXT_GB, 2)


SIMILAR_RUNS = 10  # the newest similar runs plan() reads the reports of (a runs folder may hold thousands)


def similar_runs(cfg: RunConfig, device: str | None, root: Path | None = None, limit: int = SIMILAR_RUNS) -> list[dict]:
    """Finished runs of the same model on the same kind of device, newest first (their reports),
    `limit` at most: only their report.json files are read."""
    out = []
    for r in list_runs(root):
        if len(out) >= limit:
            break
        if r["state"] != "done" or r["model"] != cfg.model.name:
            continue
        report = rundir.read_json(r["path"] / rundir.REPORT, {}) or {}
        if not report.get("epochs") or not report.get("data"):
            continue
        if device and not str(report.get("device") or "").startswith(device):
            continue
        out.append(report)
    return out


def time_seconds(rows: dict, cfg: RunConfig, history: list[dict]) -> dict | None:
    """Training + evaluation + load time scaled from the newest similar run's measured speed:
    seconds per training row and per evaluated row (assumes similar text lengths)."""
    if not history or rows.get("train") is None or rows.get("test") is None:
        return None
    ref = history[0]
    used = ref["data"]
    n_epochs = len(ref["epochs"])
    train_rows = (used.get("train") or {}).get("used") or 0
    eval_rows = sum(e.get("n") or 0 for e in ref.get("evals") or [])
    if not (train_rows and ref.get("train_s") and eval_rows and ref.get("eval_s")):
        return None
    per_train_row = ref["train_s"] / (n_epochs * train_rows)
    per_eval_row = ref["eval_s"] / eval_rows
    val = rows.get("validation") or 0
    seconds = (
        cfg.train.epochs * rows["train"] * per_train_row
        + (val * (cfg.train.epochs + 1) + 2 * rows["test"]) * per_eval_row
        + (ref.get("load_s") or 0)
    )
    return {"seconds": round(seconds, 1), "from_run": ref["run_id"], "train_rows_per_s": round(1 / per_train_row, 2)}


def plan(
    cfg: RunConfig, rows: dict[str, int] | None = None, root: Path | None = None, facts: dict | None = None
) -> dict:
    """Everything the Train page shows before Launch. `facts` ({"params", "shape", "error"}, as
    model_facts_or_error returns) may be passed in when the caller has them cached: they need the
    model's config (local files, the Hub, or its cache) and building the model on the meta device."""
    dev = pick_device_dtype(cfg)
    facts = facts if facts is not None else model_facts_or_error(cfg)
    out: dict = {**dev, "quantize": cfg.model.quantize, "params": facts["params"], "params_error": facts["error"]}
    shape = facts["shape"] or {}
    n = planned_rows(cfg, rows)
    out["rows"] = n
    if n["train"] is not None:
        out["steps_per_epoch"] = math.ceil(n["train"] / cfg.train.batch_size)
        out["total_steps"] = out["steps_per_epoch"] * cfg.train.epochs
    history = similar_runs(cfg, dev.get("device"), root)
    out["time"] = time_seconds(n, cfg, history)
    if dev.get("device") == "cuda":
        measured = next((h for h in history if (h.get("resources") or {}).get("torch_peak_gb")), None)
        out["gpu_memory"] = {
            "estimate_gb": gpu_memory_gb(out["params"], shape or {}, cfg, dev["dtype"]),
            "measured_gb": measured["resources"]["torch_peak_gb"] if measured else None,
            "measured_run": measured["run_id"] if measured else None,
        }
    else:
        out["gpu_memory"] = None
    return out


def model_facts_or_error(cfg: RunConfig) -> dict:
    """{"params": parameter counts, "shape": model_shape, "error": None}, without loading any
    weights; on failure (a Hub id without network, a typo) params is None and error says why."""
    try:
        params = estimate_parameters(
            cfg.model.name,
            len(cfg.data.labels),
            cfg.lora,
            quantize=cfg.model.quantize is not None,
            revision=cfg.model.revision,
            pooling=resolve_pooling(cfg.model),
        )
        return {"params": params, "shape": model_shape(cfg.model.name, cfg.model.revision), "error": None}
    except Exception as e:  # noqa: BLE001 - any failure here only means "no estimate"
        return {"params": None, "shape": {}, "error": f"{type(e).__name__}: {e}"}


def estimate_parameters(
    model_name: str,
    num_labels: int,
    lora: LoraSettings,
    quantize: bool = True,
    revision: str | None = None,
    pooling: str = "model",
) -> dict[str, int]:
    """count_parameters without loading weights: the model is built on the meta device from its
    config (which for a Hub model needs the network or a cached config)."""
    from transformers import AutoConfig  # here, not at the top: see the imports

    name, source = pretrained_source(model_name, revision)
    config = AutoConfig.from_pretrained(name, **source, num_labels=num_labels)
    return estimate_parameters_from_config(config, lora, quantize, pooling)


def estimate_parameters_from_config(
    config, lora: LoraSettings, quantize: bool = True, pooling: str = "model"
) -> dict[str, int]:
    """count_parameters of `config`'s classifier with LoRA, built on the meta device (no weights)."""
    from accelerate import init_empty_weights  # here, not at the top: see the imports
    from transformers import AutoModelForSequenceClassification

    if config.pad_token_id is None:
        config.pad_token_id = 0
    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(config)
    set_pooling(model, pooling)
    quantized = set()
    if quantize:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in HEAD_NAMES:
                quantized.add(id(module.weight))
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = add_lora(model, lora)
    total = packed = trainable = 0
    for p in peft_model.parameters():
        n = p.numel()
        total += n
        packed += (n + 1) // 2 if id(p) in quantized else n
        trainable += n if p.requires_grad else 0
    return {"total": total, "packed": packed, "trainable": trainable}
