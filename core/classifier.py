"""Portable classifiers: what every checkpoints/epoch-K/ folder holds besides the adapter, and
the one-call loader that the evaluate command and the Playground use.

    files = folder_files(cfg, tokenizer)         # tokenizer files + classifier.json, added to every epoch folder
    card = model_card(info, epoch=2, validation=(0.81, 204), run_id="...")   # the folder's README.md
    clf = load_classifier("runs/<id>/checkpoints/epoch-2")                     # base model + adapter + head
    clf.predict([{"premise": "...", "hypothesis": "..."}])                     # probabilities, label order

classifier.json says how the run fed the model: the labels in order, the input (a template with
{premise}/{hypothesis} or {text} placeholders, or the tokenizer's own pair encoding), the pooling,
the maximum length and the base model as the user named it. For a standard head (causal LMs, BERT
[CLS] pooling) plain peft + transformers reproduce the run's probabilities (the card shows how); a
run that pooled by the mean of the tokens changed the head's input, which plain loading does not
know: the card says so first and points to load_classifier.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig, RunConfig
from .data import prompt_for
from .embedded import hub_id, weights_note
from .text import code_span, markdown_text

CLASSIFIER_FILE = "classifier.json"
VARIANT_NAMES = {"lora": "LoRA", "rslora": "rsLoRA (scale alpha / sqrt(r))", "dora": "DoRA (weight-decomposed LoRA)"}


def input_format(cfg: RunConfig, tokenizer) -> dict:
    """How data.encode turned a row into text for this run (core/data.py, prompt_for)."""
    text = bool(cfg.data.text_column)
    prompt = prompt_for(cfg.data, tokenizer, text=text)
    if prompt.template is None:
        return {
            "kind": "pair",
            "template": None,
            "note": "tokenizer(premise, hypothesis): the tokenizer's own pair encoding",
        }
    fmt = {"kind": "text" if text else "pair", "template": prompt.template}
    if prompt.chat:
        fmt["chat_template"] = True
        fmt["add_special_tokens"] = False
        fmt["note"] = (
            "the tokenizer's chat template with the question as the user turn; its special tokens are in "
            "the text: tokenize with add_special_tokens=False"
        )
    if prompt.words:
        fmt["label_words"] = list(prompt.words)
    return fmt


def classifier_info(cfg: RunConfig, tokenizer, head: dict | None = None) -> dict:
    """classifier.json: how the run fed the model and what it started from. `head` is what
    model.init_head did (the setup record's head_init)."""
    from .model import resolve_pooling

    fmt = input_format(cfg, tokenizer)
    return {
        "labels": list(cfg.data.labels),
        "input": fmt,
        "input_template": fmt["template"],
        "pooling": resolve_pooling(cfg.model),
        "max_length": cfg.data.max_length,
        "base_model": hub_id(cfg.model.name),
        "base_model_as_named": cfg.model.name,
        "base_weights_note": weights_note(cfg.model.name),
        "revision": cfg.model.revision,
        "quantize": cfg.model.quantize,
        "double_quant": cfg.model.double_quant,
        "pad_token_id": tokenizer.pad_token_id,
        "head_init": head or {"head_init": cfg.model.head_init},
        "preset": cfg.preset,
        "lora_variant": cfg.lora.variant,
    }


def folder_files(cfg: RunConfig, tokenizer, head: dict | None = None) -> dict[str, bytes]:
    """The files every epoch folder gets beside the adapter: the tokenizer's and classifier.json."""
    tmp = Path(tempfile.mkdtemp(prefix="qlora-tokenizer-"))
    try:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in tmp.iterdir() if p.is_file()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files[CLASSIFIER_FILE] = (json.dumps(classifier_info(cfg, tokenizer, head), indent=2) + "\n").encode()
    return files


def portable_adapter_config(config: bytes, info: dict) -> bytes:
    """adapter_config.json naming the base model as the user did (the Hub id for the embedded one)."""
    d = json.loads(config)
    d["base_model_name_or_path"] = info["base_model"]
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()


def model_card(
    info: dict,
    epoch: int,
    validation: tuple[float, int] | None = None,
    run_id: str = "",
    test: tuple[float, int] | None = None,
) -> str:
    """The README.md of an epoch folder: what it is, how well it did (with intervals), how to load it."""
    labels = info["labels"]
    lines = [f"# {markdown_text(info['base_model'])} + LoRA: a {len(labels)}-class classifier (epoch {epoch})", ""]
    if info["pooling"] == "mean":
        lines += [
            "**Read this first: this run pooled the encoder's token states by their mean** (the model "
            "was trained for it), while plain `transformers` feeds the head its [CLS] pooler. Loaded "
            "with plain peft, the adapter gives wrong answers. Load it with the project's loader:",
            "",
            "```python",
            "from core.classifier import load_classifier  # QLoRA Studio",
            'clf = load_classifier("PATH/TO/THIS/FOLDER")',
            'clf.predict([{"premise": "A man plays a guitar.", "hypothesis": "A man makes music."}])',
            "```",
            "",
        ]
    lines += [
        "Fine-tuned with QLoRA (4-bit NF4 base, LoRA adapters, full-precision head) by QLoRA Studio"
        + (f", run {code_span(run_id)}" if run_id else "")
        + ".",
        "",
        f"- Base model: {code_span(info['base_model'])} (named {code_span(info['base_model_as_named'])} in the run)",
        f"- Labels, in output order: {', '.join(map(code_span, labels))}",
        f"- Input: {_input_line(info)}",
        f"- Pooling: {info['pooling']}; maximum length {info['max_length']} tokens",
        f"- Adapter: {VARIANT_NAMES.get(info.get('lora_variant') or 'lora', info.get('lora_variant'))}",
    ]
    if info.get("temperature"):
        lines.append(
            f"- Temperature: {info['temperature']:.3f}, fitted on the validation split (temperature scaling): "
            "`load_classifier` divides the logits by it for calibrated probabilities (the argmax is unchanged); "
            "plain peft does not"
        )
    head = info.get("head_init") or {}
    label_words = head.get("head_init") == "label-words"
    if label_words:
        words = ", ".join(markdown_text(w.strip()) for w in head.get("words", []))
        lines.append(
            f"- Head: started from the language-model head's rows of the label words ({words}), so the "
            "untrained classifier is the zero-shot baseline"
        )
    if info.get("base_weights_note"):
        lines.append(f"- Base weights: {markdown_text(info['base_weights_note'])}")
    if epoch == 0:
        start = "the label words' head, so it IS the zero-shot baseline" if label_words else "a random head"
        lines.append(f"- This is the model **before** fine-tuning: the adapter at its initialisation and {start}.")
    for name, score in (("Validation", validation), ("Test", test)):
        if score:
            acc, n = score
            from .results.stats import wilson

            lo, hi = wilson(round(acc * n), n)
            lines.append(
                f"- {name} accuracy: {100 * acc:.1f}% (95% Wilson interval {100 * lo:.1f}-{100 * hi:.1f}%, n = {n})"
            )
    if info["pooling"] != "mean":
        lines += [
            "",
            "## Load with peft",
            "",
            "```python",
            "import torch",
            "from peft import AutoPeftModelForSequenceClassification",
            "from transformers import AutoTokenizer, BitsAndBytesConfig",
            "",
            'folder = "PATH/TO/THIS/FOLDER"',
            "tokenizer = AutoTokenizer.from_pretrained(folder)",
            "model = AutoPeftModelForSequenceClassification.from_pretrained(",
            f"    folder, num_labels={len(labels)},",
            '    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",',
            f"        bnb_4bit_use_double_quant={info.get('double_quant', True)},"
            " bnb_4bit_compute_dtype=torch.float32,",
            '        llm_int8_skip_modules=["classifier", "score"]))  # as trained; omit to load unquantised',
            f"model.config.pad_token_id = {info.get('pad_token_id')}",
            "model.eval()",
        ]
        if info["input"]["template"]:
            example = (
                'text="Your text."'
                if info["input"]["kind"] == "text"
                else 'premise="A man plays a guitar.", hypothesis="A man makes music."'
            )
            special = ", add_special_tokens=False" if info["input"].get("add_special_tokens") is False else ""
            lines += [
                f"text = {info['input']['template']!r}.format({example})",
                'inputs = tokenizer(text, return_tensors="pt", truncation=True, '
                f"max_length={info['max_length']}{special})",
            ]
        else:
            lines += [
                'inputs = tokenizer("A man plays a guitar.", "A man makes music.", return_tensors="pt",',
                f"                   truncation=True, max_length={info['max_length']})",
            ]
        lines += [
            "with torch.no_grad():",
            "    probs = model(**inputs).logits.float().softmax(-1)[0]",
            f"labels = {labels!r}",
            "```",
            "",
            "Or with QLoRA Studio: `from core.classifier import load_classifier`.",
        ]
        if info.get("base_weights_note"):
            lines += [
                "",
                f"The adapter names {code_span(info['base_model'])}, whose Hub weights differ a little from those "
                "it was trained on (see Base weights above): for the run's exact probabilities, load the base "
                "model from the converted folder "
                "(`AutoModelForSequenceClassification.from_pretrained(that folder, ...)`, then "
                "`PeftModel.from_pretrained(base, folder)`).",
            ]
    lines += ["", "`classifier.json` in this folder holds the labels, input, pooling and base model as data."]
    return "\n".join(lines) + "\n"


def _input_line(info: dict) -> str:
    fmt = info["input"]
    if fmt["template"] is None:
        return "the tokenizer's pair encoding of (premise, hypothesis)"
    return f"the text {markdown_text(repr(fmt['template']))}"


class Classifier:
    """A base model with a saved adapter and head, ready to score rows (see load_classifier)."""

    def __init__(self, model, tokenizer, info: dict, device: torch.device, dtype: torch.dtype):
        self.model, self.tokenizer, self.info, self.device, self.dtype = model, tokenizer, info, device, dtype
        self.labels = info["labels"]
        self.temperature = float(info.get("temperature") or 1.0)  # classifier.json's, fitted on validation

    def texts(self, rows: list[dict]):
        fmt = self.info["input"]
        if fmt["kind"] == "text":
            return [fmt["template"].format(text=r["text"]) for r in rows], None
        if fmt["template"] is None:
            return [r["premise"] for r in rows], [r["hypothesis"] for r in rows]
        return [fmt["template"].format(premise=r["premise"], hypothesis=r["hypothesis"]) for r in rows], None

    @torch.inference_mode()
    def predict(self, rows: list[dict]) -> np.ndarray:
        """Probabilities [len(rows), labels] for rows with premise/hypothesis (or text): the softmax
        of the logits divided by the temperature (calibrated; 1 when classifier.json has none, or
        load_classifier was told not to)."""
        from .model import autocast

        first, second = self.texts(rows)
        out = []
        for s in range(0, len(rows), 32):
            pair = (first[s : s + 32],) if second is None else (first[s : s + 32], second[s : s + 32])
            batch = self.tokenizer(
                *pair,
                truncation=True,
                max_length=self.info["max_length"],
                padding=True,
                return_tensors="pt",
                add_special_tokens=self.info["input"].get("add_special_tokens", True),
            ).to(self.device)
            with autocast(self.device, self.dtype):
                out.append((self.model(**batch).logits.float() / self.temperature).softmax(-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.labels)))


def load_classifier(
    folder: Path, device: str = "auto", base_model: str | None = None, temperature: bool = True
) -> Classifier:
    """The classifier saved in `folder` (an epoch folder of a run): its base model loaded as the
    run loaded it (4-bit NF4 when it was, the run's pooling), the adapter and head from the folder,
    the tokenizer from the folder. `base_model` overrides the base model's name or path. A merged
    export (core/export.py) loads as plain transformers weights (load_merged). With `temperature`
    (the default) predict() divides the logits by classifier.json's temperature; False keeps the raw
    probabilities."""
    from transformers import AutoTokenizer

    from .model import load_model, pick_compute_dtype, pick_device

    folder = Path(folder)
    try:
        info = json.loads((folder / CLASSIFIER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{folder} holds no readable {CLASSIFIER_FILE} (a checkpoint folder of a QLoRA Studio run has one): {e}"
        ) from None
    if not temperature:
        info = {**info, "temperature": None}
    if info.get("merged"):
        return load_merged(folder, info, device)
    from peft import PeftModel

    cfg = ModelConfig(
        name=base_model or info["base_model_as_named"],
        quantize=info.get("quantize"),
        double_quant=info.get("double_quant", True),
        revision=info.get("revision"),
        device=device,
        pooling=info["pooling"],
    )
    dev = pick_device(cfg.device)
    dtype = pick_compute_dtype(dev, cfg.compute_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    base = load_model(
        cfg, len(info["labels"]), tokenizer.pad_token_id, dev, dtype, id2label=dict(enumerate(info["labels"]))
    )
    model = PeftModel.from_pretrained(base, folder, is_trainable=False)
    model.eval()
    return Classifier(model, tokenizer, info, dev, dtype)


def load_merged(folder: Path, info: dict, device: str = "auto") -> Classifier:
    """A merged export (core/export.py): transformers' own class of its architecture, loaded from
    the folder in its dtype with the run's pooling set, no adapter, peft and bitsandbytes unused.
    The folder's own model code (a mean-pooled BERT export's auto_map) never runs."""
    import transformers

    from .model import DTYPES, pick_device, set_pooling

    merged = info["merged"]
    architecture = str(merged.get("architecture", ""))
    if not architecture.endswith("ForSequenceClassification") or not hasattr(transformers, architecture):
        raise ValueError(f"{folder}: {CLASSIFIER_FILE} names no transformers classifier class ({architecture!r})")
    dev = pick_device(device)
    dtype = DTYPES[merged["dtype"]]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a mean-pooled export has no pooler weights: set_pooling replaces it
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model = getattr(transformers, architecture).from_pretrained(
            folder, dtype=dtype, device_map={"": dev}, trust_remote_code=False
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    set_pooling(model, info["pooling"])
    model.eval()
    return Classifier(model, tokenizer, info, dev, dtype)
