"""The zero-shot baseline: what the pretrained causal LM says with no training at all.

    result = zero_shot(model, tokenizer, model_cfg, examples, labels, device, dtype, max_length=128)
    result["probs"]          # [n, labels]: softmax over the label words' next-token logits
    result["why_not"]        # instead, one sentence saying why a model has no such baseline

The fine-tuning report compares against two "before" numbers: the untrained classifier (the
adapter at its initialisation and the new head) and this one, which asks the pretrained LM head
for the next word after a prompt (core/data.py, causal_prompt): for NLI "{premise}\\nQuestion:
{hypothesis} Yes, Maybe, or No?" answered by Yes / Maybe / No, through the chat template for
instruct models; for other labels the run's template and the label names. The LM head is read
from the model's weights (only the rows of the label words), and applied to the last real token's
hidden state of the model's body with the LoRA adapters disabled, so no second copy of the model
is loaded. A causal LM's run takes the same prompt as its input, so with a label-word head
(model.head_init) the untrained classifier computes these same logits: its "before" IS this
baseline, computed twice (core/model.py, init_head).
"""

from __future__ import annotations

import numpy as np
import torch

from .data import causal_prompt, tokenize
from .model import autocast, is_causal, label_word_ids, lm_head_rows


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
    max_length: int = 512,
) -> dict:
    """Zero-shot probabilities of the pretrained causal LM on `examples` (see the module doc), or
    {"why_not": ...} for a model that has no LM head to ask. `template` and `max_length` are the
    run's (data.template, data.max_length), so that the rows read as the run reads them."""
    if not is_causal(model):
        return {
            "why_not": f"{model.config.model_type} is an encoder: it has no language-model head that "
            "predicts a next word, so there is no zero-shot baseline; the random-head "
            "baseline is the only 'before'."
        }
    prompt = causal_prompt(labels, tokenizer, text=bool(examples and examples[0].text), template=template)
    token_ids, why_not = label_word_ids(model, prompt, tokenizer)
    if why_not is not None:
        return {"why_not": why_not}
    head = lm_head_rows(
        model_cfg.name, model_cfg.revision, token_ids, bool(getattr(model.config, "tie_word_embeddings", False))
    )
    if head is None:
        return {
            "why_not": "the model's weights hold no language-model head (a checkpoint saved for "
            "classification only), so there is no zero-shot baseline"
        }
    weight, bias = head[0].to(device), (head[1].to(device) if head[1] is not None else None)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "model", None) or getattr(inner, "transformer", None)
    ids = tokenize(prompt, examples, tokenizer, max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # rows of similar length: little padding
    probs = np.zeros((len(ids), len(labels)), dtype=np.float32)
    was_training = model.training
    model.eval()
    adapters = model.disable_adapter() if hasattr(model, "disable_adapter") else _nothing()
    with torch.inference_mode(), adapters:
        for s in range(0, len(order), batch_size):
            rows = [ids[i] for i in order[s : s + batch_size]]
            batch = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt").to(device)
            with autocast(device, dtype):
                hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            last = batch["attention_mask"].sum(1) - 1  # right padding: the last real token
            h = hidden[torch.arange(len(last), device=device), last].float()
            logits = h @ weight.T + (bias if bias is not None else 0.0)
            probs[order[s : s + batch_size]] = torch.softmax(logits, -1).cpu().numpy()
    model.train(was_training)
    return {"probs": probs, "prompt": prompt.template, "words": list(prompt.words)}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
