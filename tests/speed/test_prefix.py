"""core/speed/prefix.py against the plain path: a batch of a tiny causal LM (4-bit, LoRA) whose rows
share a prompt's beginning gives the same logits and the same LoRA and head gradients when that
beginning runs once; what does not share enough, or has dropout in training, runs the plain forward."""

from __future__ import annotations

import torch

from core.config import LoraSettings, ModelConfig
from core.model import add_lora, load_model, load_tokenizer
from core.speed.patch import is_patched
from core.speed.prefix import MIN_TOKENS, install_shared_prefix, shared_length
from tests.helpers import CPU, save_tiny_model, save_word_tokenizer


def tiny(tmp_path, dropout=0.0):
    folder = save_tiny_model("llama", tmp_path / "llama")
    save_word_tokenizer(folder, ["a", "b"], causal=True)
    cfg = ModelConfig(name=str(folder))
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = add_lora(load_model(cfg, 3, tok.pad_token_id, CPU, torch.float32), LoraSettings(r=4, dropout=dropout))
    for n, p in model.named_parameters():  # a trained adapter, so that its gradient path matters
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    return model, tok.pad_token_id


def batch(pad_id):
    torch.manual_seed(1)
    shared = torch.randint(3, 250, (12,))
    rows = [torch.cat([shared, torch.randint(3, 250, (n,))]) for n in (5, 9, 2)]
    ids = torch.full((3, 21), pad_id)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, torch.tensor([0, 2, 1])


def logits_and_grads(model, ids, labels):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits, labels).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def test_a_shared_prefix_run_once_gives_the_same_logits_and_gradients(tmp_path):
    model, pad_id = tiny(tmp_path)
    ids, labels = batch(pad_id)
    assert shared_length(ids, None) == 12
    model.train()
    want_logits, want_grads = logits_and_grads(model, ids, labels)
    with torch.no_grad():
        mask = (ids != pad_id).long()
        want_eval = model(input_ids=ids, attention_mask=mask).logits
    assert install_shared_prefix(model) and not install_shared_prefix(model)  # once
    got_logits, got_grads = logits_and_grads(model, ids, labels)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-5)
    assert set(got_grads) == set(want_grads) and any("lora_A" in n for n in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation, with the attention mask as the zero-shot baseline passes it
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=(ids != pad_id).long()).logits, want_eval, rtol=0, atol=1e-5
        )


def test_what_does_not_qualify_runs_the_plain_forward(tmp_path, monkeypatch):
    model, pad_id = tiny(tmp_path / "a")
    body = model.get_base_model().model
    ids, _ = batch(pad_id)
    assert install_shared_prefix(model) and is_patched(body)
    calls = []
    plain = body._qlora_original_forward
    monkeypatch.setattr(body, "_qlora_original_forward", lambda **kw: calls.append(kw) or plain(**kw))
    with torch.no_grad():
        model(input_ids=ids)
        assert len(calls) == 2  # the shared part, then the rest
        calls.clear()
        short = ids.clone()
        short[1, MIN_TOKENS - 2] = 1  # rows share fewer than MIN_TOKENS tokens
        model(input_ids=short)
        model(input_ids=ids[:1])  # one row
        assert len(calls) == 2 and all(c.get("past_key_values") is None for c in calls)

    dropout, pad_id = tiny(tmp_path / "b", dropout=0.1)
    install_shared_prefix(dropout)
    body = dropout.get_base_model().model
    calls = []
    plain = body._qlora_original_forward
    monkeypatch.setattr(body, "_qlora_original_forward", lambda **kw: calls.append(kw) or plain(**kw))
    dropout.train()
    dropout(input_ids=ids)
    assert len(calls) == 1  # one dropout mask per row, as without sharing
