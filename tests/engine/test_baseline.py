"""The zero-shot baseline (core/baseline.py): on a tiny random causal LM saved with its LM head, the
label-word probabilities equal those of transformers' own AutoModelForCausalLM in the same 4-bit
format; an encoder, or a causal checkpoint without an LM head, says why it has none."""

from __future__ import annotations

import json

import torch

from core.baseline import zero_shot
from core.config import LoraSettings, ModelConfig
from core.data import NLI_PROMPT, Example
from core.model import add_lora, load_model, load_tokenizer, quantization_config
from tests.helpers import CPU, SNLI, save_tiny_model, save_word_tokenizer

LABELS = ["entailment", "neutral", "contradiction"]


def examples(n=10):
    rows = [json.loads(l) for l in (SNLI / "test.jsonl").read_text().splitlines()[:n]]
    return [
        Example(id=f"t-{i}", premise=r["premise"], hypothesis=r["hypothesis"], label=LABELS.index(r["label"]))
        for i, r in enumerate(rows)
    ]


def vocabulary():
    rows = [json.loads(l) for l in (SNLI / "test.jsonl").read_text().splitlines()[:60]]
    words = [w for r in rows for w in (r["premise"] + " " + r["hypothesis"]).replace(".", " . ").split()]
    return words + ["Question", ":", "Yes", ",", "Maybe", "or", "No", "?", "Answer"]


def test_zero_shot_equals_the_causal_lm_on_the_label_words(tmp_path):
    from transformers import AutoModelForCausalLM, PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / "phi"
    PhiForCausalLM(
        PhiConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            partial_rotary_factor=0.5,
            eos_token_id=1,
            bos_token_id=1,
            pad_token_id=None,
        )
    ).save_pretrained(folder)
    save_word_tokenizer(folder, vocabulary(), causal=True)
    cfg = ModelConfig(name=str(folder))
    tok = load_tokenizer(cfg)
    model = add_lora(load_model(cfg, 3, tok.pad_token_id, CPU, torch.float32), LoraSettings(r=4, alpha=8))
    for n, p in model.named_parameters():  # a trained adapter: zero-shot must not see it
        if "lora_B" in n:
            p.data.normal_(0, 1.0)
    ex = examples()
    result = zero_shot(model, tok, cfg, ex, LABELS, CPU, torch.float32)
    assert result["words"] == [" Yes", " Maybe", " No"] and result["prompt"] == NLI_PROMPT
    q = quantization_config(cfg, torch.float32)  # the run's 4-bit body; the LM head stays full precision
    q.llm_int8_skip_modules = [*q.llm_int8_skip_modules, "lm_head"]
    lm = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.float32).eval()
    for module in lm.modules():  # float32 as the run computes: on a CPU with AVX512-BF16, bitsandbytes
        if hasattr(module, "support_avx512bf16_for_cpu"):  # would repack the weights for a bf16 kernel
            module.support_avx512bf16_for_cpu = False  # at the first eval forward (load_model turns it off)
    ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in result["words"]]
    want = []
    for e in ex:
        batch = tok(NLI_PROMPT.format(premise=e.premise, hypothesis=e.hypothesis), return_tensors="pt")
        with torch.no_grad():
            want.append(lm(**batch).logits[0, -1, ids].softmax(-1))
    torch.testing.assert_close(torch.from_numpy(result["probs"]), torch.stack(want), rtol=0, atol=1e-4)
    assert not torch.allclose(torch.from_numpy(result["probs"][0]), torch.full((3,), 1 / 3), atol=1e-3)


def test_models_without_an_lm_head_say_why(tmp_path):
    bert = save_tiny_model("bert", tmp_path / "bert")
    save_word_tokenizer(bert, vocabulary(), causal=False)
    cfg = ModelConfig(name=str(bert))
    tok = load_tokenizer(cfg)
    model = add_lora(load_model(cfg, 3, tok.pad_token_id, CPU, torch.float32), LoraSettings(r=4, alpha=8))
    assert "is an encoder" in zero_shot(model, tok, cfg, examples(2), LABELS, CPU, torch.float32)["why_not"]

    llama = save_tiny_model("llama", tmp_path / "llama")  # saved for classification: no lm_head weights
    save_word_tokenizer(llama, vocabulary(), causal=True)
    cfg = ModelConfig(name=str(llama))
    tok = load_tokenizer(cfg)
    model = add_lora(load_model(cfg, 3, tok.pad_token_id, CPU, torch.float32), LoraSettings(r=4, alpha=8))
    assert "no language-model head" in zero_shot(model, tok, cfg, examples(2), LABELS, CPU, torch.float32)["why_not"]
