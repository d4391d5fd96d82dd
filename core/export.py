"""Merged models: a run's checkpoint as one plain transformers model, without peft or bitsandbytes.

    python -m core export runs/<id> --out merged/ [--epoch K] [--dtype float16|bfloat16|float32]
    result = export_merged(Path("runs/<id>"), Path("merged"))     # the same from Python
    AutoModelForSequenceClassification.from_pretrained("merged")   # then plain transformers
    AutoTokenizer.from_pretrained("merged")

How: the run's model is built as it trained (the 4-bit NF4 base, the LoRA layout) and the
checkpoint's adapter and head loaded into it. Every 4-bit weight is dequantised with bitsandbytes'
own dequantize_4bit into float32 (the values the run computed with), each LoRA adapter's update
B·A·scaling (peft's get_delta_weight) is added to it in float32, the trained head is taken as it
is, and the whole is saved in the export dtype with the model's own config (id2label, label2id,
pad_token_id), the tokenizer, classifier.json and a model card. Merging into the 4-bit base instead
(peft's merge_and_unload on a bitsandbytes model) requantises each merged weight to the 4-bit grid,
which rounds away much of the small LoRA update: the known quality loss this avoids.

The default dtype: bfloat16 where the run trained in bf16, float16 for other GPU runs, float32
for CPU runs. After writing, the export is loaded back by plain transformers and scored on the
run's test rows (up to check_rows of them): `parity` is the largest difference of a class
probability from the run's own (float32: within 2e-3, usually about 1e-6).

A mean-pooled run (the embedded all-MiniLM-L6-v2) fed its head the mean of the token states, which
no plain transformers class does for BERT (its pooler reads [CLS]). Such an export carries its own
small model class (core/mean_pooled_bert.py, named in config.json's auto_map): plain transformers
loads it with trust_remote_code=True and gives the run's probabilities, and refuses it without that
rather than load it wrong. core.classifier.load_classifier loads it without running that code.
Mean-pooled encoders other than BERT get no such class: `note` says so and the card shows
load_classifier.
"""

from __future__ import annotations

import copy
import json
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_adapter_weights, run_checkpoint
from .classifier import CLASSIFIER_FILE, load_classifier
from .config import RunConfig
from .evaluate import load_run_model
from .model import DTYPES, pretrained_source
from .runs import rundir
from .text import code_span, markdown_text

MEAN_POOLED_CODE = Path(__file__).with_name("mean_pooled_bert.py")
MEAN_POOLED_FILE = "modeling_mean_pooled_bert.py"  # its name inside an export
MEAN_POOLED_TYPE = "mean_pooled_bert"  # the model_type of such an export (core/mean_pooled_bert.py)
CHECK_ROWS = 64


def default_dtype(setup: dict) -> str:
    """The export dtype of a run by its setup record: bf16 if it trained in bf16, else float16 on a
    GPU, float32 on a CPU."""
    if setup.get("compute_dtype") == "bfloat16":
        return "bfloat16"
    if str(setup.get("device", "")).startswith("cuda"):
        return "float16"
    return "float32"


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A weight in float32: a bitsandbytes 4-bit one through bitsandbytes' own dequantize_4bit
    (its quant state asked for float32 output, not the compute dtype it was loaded in)."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.detach().float()
    from bitsandbytes.functional import dequantize_4bit

    state = copy.copy(state)
    state.dtype = torch.float32
    return dequantize_4bit(weight.data, state)


def merged_state_dict(peft_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict of the plain transformers model under `peft_model`, in `dtype` on the CPU:
    each LoRA layer's base weight dequantised and its update added in float32 (for DoRA, then
    scaled row by row to the learned magnitude), the head's trained copy (peft's modules_to_save)
    under the head's own name, everything else as it is."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    out: dict[str, torch.Tensor] = {}

    def put(key: str, tensor: torch.Tensor) -> None:
        out[key] = tensor.detach().to(device="cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype)

    def visit(prefix: str, module: torch.nn.Module) -> None:
        if isinstance(module, LoraLayer):
            if list(module.active_adapters) != ["default"] or module.merged:
                raise RuntimeError(f"{prefix}: expected one unmerged adapter 'default', found {module.active_adapters}")
            base = module.get_base_layer()
            weight = dequantized(base.weight) + module.get_delta_weight("default").float()  # rsLoRA: in scaling
            if module.use_dora.get("default"):  # DoRA: each output row's magnitude times its direction
                magnitude = module.lora_magnitude_vector["default"].weight.float()
                weight = (magnitude / torch.linalg.norm(weight, dim=1)).view(-1, 1) * weight
            put(prefix + "weight", weight)
            if base.bias is not None:
                put(prefix + "bias", base.bias)
            return
        if isinstance(module, ModulesToSaveWrapper):  # the head: its trained copy
            for key, tensor in module.modules_to_save["default"].state_dict().items():
                put(prefix + key, tensor)
            return
        for name, param in module._parameters.items():
            if param is not None:
                put(prefix + name, dequantized(param))
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                put(prefix + name, buffer)
        for name, child in module._modules.items():
            if child is not None:
                visit(f"{prefix}{name}.", child)

    with torch.no_grad():
        visit("", peft_model.get_base_model())
    return out


def plain_config(cfg: RunConfig, pad_token_id: int | None, dtype: str):
    """The base model's own config, as a classifier of the run's labels (no quantization config)."""
    from transformers import AutoConfig

    name, source = pretrained_source(cfg.model.name, cfg.model.revision)
    labels = list(cfg.data.labels)
    config = AutoConfig.from_pretrained(
        name,
        **source,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    config.pad_token_id = pad_token_id  # causal LMs find the last real token with it
    config.dtype = dtype
    return config


def export_merged(
    run_dir: Path,
    out: Path,
    epoch: int | None = None,
    dtype: str | None = None,
    check_rows: int = CHECK_ROWS,
) -> dict:
    """Write the merged model of the run's checkpoint of `epoch` (default: the epoch the run
    selected) into the folder `out` (made, or replaced when it holds an earlier export) and check
    it against the run's test probabilities. Returns {"out", "epoch", "dtype", "architecture",
    "pooling", "parity" (max |p_export - p_run| or None), "parity_rows", "load" (how plain
    transformers loads it), "note"}."""
    from transformers import AutoModelForSequenceClassification

    run_dir = Path(run_dir)
    folder, epoch = run_checkpoint(run_dir, epoch)
    out = Path(out)
    _check_out(out)
    cfg = RunConfig.load(run_dir / rundir.CONFIG)
    setup = (rundir.read_metrics(run_dir)["setup"] or [{}])[0]
    dtype = dtype or default_dtype(setup)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    info = json.loads((folder / CLASSIFIER_FILE).read_text(encoding="utf-8"))
    model, tokenizer, _, _, _ = load_run_model(cfg, tune=False)  # the plain layout: peft's LoRA layers
    load_adapter_weights(model, folder)
    state = merged_state_dict(model, DTYPES[dtype])
    del model
    config = plain_config(cfg, tokenizer.pad_token_id, dtype)
    with torch.device("meta"):
        plain = AutoModelForSequenceClassification.from_config(config)
    architecture = type(plain).__name__
    mean = info["pooling"] == "mean"
    if mean:
        plain.base_model.pooler = None  # no pooler weights: the run's head read the mean of the tokens
    _check_keys(set(plain.state_dict()), set(state))
    plain.load_state_dict(state, strict=True, assign=True)
    custom = mean and config.model_type == "bert"
    if mean and custom:
        load = "AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)"
        note = (
            "no plain transformers class feeds a BERT head the mean of the token states: the folder carries "
            f"its own class ({MEAN_POOLED_FILE}, in config.json's auto_map); plain transformers loads it with "
            "trust_remote_code=True, or use core.classifier.load_classifier(folder)"
        )
    elif mean:
        load = "core.classifier.load_classifier(folder)"
        note = (
            f"no plain transformers class pools {config.model_type} by the mean of the tokens, as this run did: "
            "load it with core.classifier.load_classifier(folder); plain transformers would read [CLS]"
        )
    else:
        load = "AutoModelForSequenceClassification.from_pretrained(folder)"
        note = ""
    info["merged"] = {
        "epoch": epoch,
        "dtype": dtype,
        "architecture": architecture,
        "run_id": run_dir.name,
        "load": load,
        **({"note": note} if note else {}),
    }
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if custom:
            _mean_pooled_config(tmp / "config.json")
            shutil.copyfile(MEAN_POOLED_CODE, tmp / MEAN_POOLED_FILE)
        (tmp / CLASSIFIER_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(merged_card(info, run_dir), encoding="utf-8")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del plain, state
    parity, rows = check_parity(run_dir, out, epoch, check_rows)
    return {
        "out": str(out),
        "epoch": epoch,
        "dtype": dtype,
        "architecture": architecture,
        "pooling": info["pooling"],
        "parity": parity,
        "parity_rows": rows,
        "load": load,
        "note": note,
    }


def check_parity(run_dir: Path, out: Path, epoch: int, rows: int = CHECK_ROWS) -> tuple[float | None, int]:
    """(the largest difference of a class probability between the export in `out` and the run,
    over up to `rows` test rows; the rows compared). The run's probabilities are those of
    predictions/test_after.jsonl for the selected epoch, else of dynamics.jsonl for that epoch;
    (None, 0) when the run kept neither or rows is 0."""
    if rows <= 0:
        return None, 0
    test = rundir.read_jsonl(rundir.predictions_file(run_dir, "test", "after"))
    report = rundir.read_json(run_dir / rundir.REPORT) or {}
    if report.get("best_epoch") == epoch:
        want = {r["id"]: r["probs"] for r in test}
    else:
        dynamics = run_dir / rundir.PREDICTIONS / rundir.DYNAMICS
        found = [r for r in rundir.read_jsonl(dynamics) if r.get("split") == "test" and r.get("epoch") == epoch]
        want = dict(zip(found[-1]["ids"], found[-1]["probs"])) if found else {}
    test = [r for r in test if r["id"] in want][:rows]
    if not test:
        return None, 0
    got = load_classifier(out, temperature=False).predict(test)  # the run's predictions are uncalibrated
    return float(np.abs(got - np.array([want[r["id"]] for r in test])).max()), len(test)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the merged model")
    if out.is_dir() and any(out.iterdir()):
        info = rundir.read_json(out / CLASSIFIER_FILE)
        if not (isinstance(info, dict) and info.get("merged")):
            raise ValueError(
                f"--out {out} is a folder that holds other files: give a new or empty folder (an earlier export "
                "is replaced)"
            )


def _check_keys(want: set[str], have: set[str]) -> None:
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        raise RuntimeError(
            f"the merged weights do not fit the plain model: missing {missing[:5]}, unexpected {extra[:5]}"
        )


def _mean_pooled_config(path: Path) -> None:
    """config.json of a mean-pooled BERT export: its own model_type and classes (auto_map)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    module = MEAN_POOLED_FILE.removesuffix(".py")
    config["model_type"] = MEAN_POOLED_TYPE
    config["architectures"] = ["MeanPooledBertForSequenceClassification"]
    config["auto_map"] = {
        "AutoConfig": f"{module}.MeanPooledBertConfig",
        "AutoModelForSequenceClassification": f"{module}.MeanPooledBertForSequenceClassification",
    }
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replace(tmp: Path, out: Path) -> None:
    """Put the folder `tmp` in place of `out`; an earlier export there is deleted once the new one is in."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        out.rename(old)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def merged_card(info: dict, run_dir: Path) -> str:
    """README.md of a merged export: what it is, and how plain transformers loads and feeds it."""
    merged = info["merged"]
    labels = info["labels"]
    fmt = info["input"]
    lines = [
        f"# {markdown_text(info['base_model'])} + LoRA, merged: a {len(labels)}-class classifier "
        f"(epoch {merged['epoch']})",
        "",
    ]
    if merged.get("note"):
        lines += [f"**Read this first:** {merged['note']}.", ""]
    lines += [
        f"Fine-tuned with QLoRA by QLoRA Studio (run `{run_dir.name}`), then merged: the 4-bit base dequantised, "
        "the LoRA update added in float32 and the trained head included. It loads without peft or "
        "bitsandbytes.",
        "",
        f"- Base model: {code_span(info['base_model'])}",
        f"- Weights: {merged['dtype']}, `{merged['architecture']}`",
        f"- Labels, in output order: {', '.join(map(code_span, labels))} (also `id2label` in config.json)",
        f"- Pooling: {info['pooling']}; maximum length {info['max_length']} tokens",
    ]
    if info.get("temperature"):
        lines.append(
            f"- Temperature: {info['temperature']:.3f}, fitted on validation: divide the logits by it for calibrated "
            "probabilities (the code below gives the raw ones, as the run's own predictions)"
        )
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        'folder = "PATH/TO/THIS/FOLDER"',
        "tokenizer = AutoTokenizer.from_pretrained(folder)",
    ]
    if merged["load"].startswith("core."):
        lines += [
            "from core.classifier import load_classifier  # QLoRA Studio",
            "clf = load_classifier(folder)",
            'clf.predict([{"premise": "A man plays a guitar.", "hypothesis": "A man makes music."}])',
            "```",
        ]
        return "\n".join(lines) + "\n"
    trust = ", trust_remote_code=True" if "trust_remote_code" in merged["load"] else ""
    lines.append(f"model = AutoModelForSequenceClassification.from_pretrained(folder{trust}).eval()")
    if fmt["template"]:
        example = (
            'text="Your text."'
            if fmt["kind"] == "text"
            else 'premise="A man plays a guitar.", hypothesis="A man makes music."'
        )
        special = ", add_special_tokens=False" if fmt.get("add_special_tokens") is False else ""
        lines += [
            f"text = {fmt['template']!r}.format({example})",
            f'inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length={info["max_length"]}{special})',
        ]
    else:
        lines += [
            'inputs = tokenizer("A man plays a guitar.", "A man makes music.", return_tensors="pt",',
            f"                   truncation=True, max_length={info['max_length']})",
        ]
    lines += [
        "with torch.no_grad():",
        "    probs = model(**inputs).logits.float().softmax(-1)[0]",
        "print(dict(zip(model.config.id2label.values(), probs.tolist())))",
        "```",
        "",
        "`classifier.json` holds the labels, the input template, the pooling and the base model as data; "
        "`core.classifier.load_classifier(folder)` (QLoRA Studio) loads this folder too.",
    ]
    return "\n".join(lines) + "\n"
