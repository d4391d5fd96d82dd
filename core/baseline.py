"""The zero-shot baseline: what the pretrained causal LM says with no training at all.

    result = zero_shot(model, tokenizer, model_cfg, examples, labels, device, dtype)
    result["probs"]          # [n, labels]: softmax over the label words' next-token logits
    result["why_not"]        # instead, one sentence saying why a model has no such baseline

The fine-tuning report compares against two "before" numbers: the random-head baseline (the
adapter at its initialisation and a freshly initialised head: what the reference script measured)
and this one, which asks the pretrained LM head for the next word after a prompt. For NLI the
prompt is the classic "{premise}\\nQuestion: {hypothesis} Yes, Maybe, or No?\\nAnswer:" with the
words Yes / Maybe / No for entailment / neutral / contradiction; for other labels the run's own
template followed by each label name. The LM head is read from the model's weights (only the rows
of the label words), and applied to the last real token's hidden state of the model's body with
the LoRA adapters disabled, so no second copy of the model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

NLI_PROMPT = "{premise}\nQuestion: {hypothesis} Yes, Maybe, or No?\nAnswer:"
NLI_WORDS = {"entailment": " Yes", "neutral": " Maybe", "contradiction": " No"}


def prompt_and_words(labels: list[str], template: str | None) -> tuple[str, list[str]]:
    """The prompt (with {premise}/{hypothesis} or {text}) and one word per label."""
    if all(label in NLI_WORDS for label in labels):
        return NLI_PROMPT, [NLI_WORDS[label] for label in labels]
    from .data import DEFAULT_TEMPLATE

    return (template or DEFAULT_TEMPLATE), [" " + label for label in labels]


def _weight_files(name: str, revision: str | None) -> list[Path]:
    """The safetensors files of a model folder or of a Hub model in the local cache."""
    from .model import resolve_model_name

    folder = Path(resolve_model_name(name))
    if folder.is_dir():
        return sorted(folder.glob("*.safetensors"))
    from huggingface_hub import hf_hub_download

    try:
        index = json.loads(Path(hf_hub_download(name, "model.safetensors.index.json", revision=revision)).read_text())
        shards = sorted(set(index["weight_map"].values()))
    except Exception:  # a single-file model
        shards = ["model.safetensors"]
    return [Path(hf_hub_download(name, s, revision=revision)) for s in shards]


def lm_head_rows(name: str, revision: str | None, token_ids: list[int], tied: bool):
    """(W [k, hidden], bias [k] or None) of the LM head for `token_ids`, read from the weights
    without loading the rest; the input embedding rows when the head is tied to it. None if absent."""
    from safetensors import safe_open

    def rows(f, key):  # only these rows are read from the file
        part = f.get_slice(key)
        return torch.cat([part[i : i + 1] for i in token_ids]).float()

    weight = bias = embedding = None
    for file in _weight_files(name, revision):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key in ("lm_head.weight", "model.lm_head.weight"):
                    weight = rows(f, key)
                elif key in ("lm_head.bias", "model.lm_head.bias"):
                    bias = torch.cat([f.get_slice(key)[i : i + 1] for i in token_ids]).float()
                elif tied and (key.endswith("embed_tokens.weight") or key.endswith("wte.weight")):
                    embedding = rows(f, key)
    weight = weight if weight is not None else embedding
    return None if weight is None else (weight, bias)


def zero_shot(
    model,
    tokenizer,
    model_cfg,
    examples,
    labels: list[str],
    device: torch.device,
    dtype: torch.dtype,
    template: str | None = None,
    batch_size: int = 32,
) -> dict:
    """Zero-shot probabilities of the pretrained causal LM on `examples` (see the module doc), or
    {"why_not": ...} for a model that has no LM head to ask."""
    from .model import autocast, is_causal

    if not is_causal(model):
        return {
            "why_not": f"{model.config.model_type} is an encoder: it has no language-model head that "
            "predicts a next word, so there is no zero-shot baseline; the random-head "
            "baseline is the only 'before'."
        }
    prompt, words = prompt_and_words(labels, template)
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    if any(not i for i in ids) or len({i[0] for i in ids}) < len(ids):
        return {"why_not": f"the label words {words} do not start with distinct tokens for this tokenizer"}
    head = lm_head_rows(
        model_cfg.name,
        model_cfg.revision,
        [i[0] for i in ids],
        bool(getattr(model.config, "tie_word_embeddings", False)),
    )
    if head is None:
        return {
            "why_not": "the model's weights hold no language-model head (a checkpoint saved for "
            "classification only), so there is no zero-shot baseline"
        }
    weight, bias = head[0].to(device), (head[1].to(device) if head[1] is not None else None)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "model", None) or getattr(inner, "transformer", None)
    texts = [
        prompt.format(text=e.text) if e.text else prompt.format(premise=e.premise, hypothesis=e.hypothesis)
        for e in examples
    ]
    out = []
    was_training = model.training
    model.eval()
    adapters = model.disable_adapter() if hasattr(model, "disable_adapter") else _nothing()
    with torch.inference_mode(), adapters:
        for s in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[s : s + batch_size], padding=True, truncation=True, max_length=512, return_tensors="pt"
            ).to(device)
            with autocast(device, dtype):
                hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            last = batch["attention_mask"].sum(1) - 1  # right padding: the last real token
            h = hidden[torch.arange(len(last), device=device), last].float()
            logits = h @ weight.T + (bias if bias is not None else 0.0)
            out.append(torch.softmax(logits, -1).cpu())
    model.train(was_training)
    return {"probs": torch.cat(out).numpy() if out else np.zeros((0, len(labels))), "prompt": prompt, "words": words}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
