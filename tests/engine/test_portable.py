"""Checkpoints that work outside the app: every epoch folder holds the adapter, the tokenizer,
classifier.json and a model card; plain peft + transformers reproduce a tiny causal LM's test
probabilities from the folder alone; a mean-pooled run (the embedded model) says so first on its
card, and core.classifier.load_classifier reproduces it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.classifier import load_classifier
from core.config import DataConfig, LoraSettings, ModelConfig, RunConfig, TrainConfig
from tests.helpers import SNLI, save_tiny_model, save_word_tokenizer


def test_plain_peft_reloads_a_tiny_causal_lm_to_the_runs_test_probabilities(tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer, BitsAndBytesConfig

    from core.train import train

    rows = [json.loads(l) for l in (SNLI / "train.jsonl").read_text().splitlines()[:200]]
    words = [w for r in rows for w in (r["premise"] + " " + r["hypothesis"]).replace(".", " . ").split()]
    folder = save_tiny_model("llama", tmp_path / "model")
    save_word_tokenizer(folder, words + ["Premise", "Hypothesis", "Relation", ":"], causal=True)
    cfg = RunConfig(
        model=ModelConfig(name=str(folder)),
        data=DataConfig(
            source="files",
            train=str(SNLI / "train.jsonl"),
            test=str(SNLI / "test.jsonl"),
            max_train_rows=48,
            max_validation_rows=16,
            max_test_rows=12,
            max_length=64,
        ),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        train=TrainConfig(epochs=2, batch_size=16, lr=3e-3, head_lr=1e-2),
    )
    report = train(cfg, tmp_path / "run")
    best = tmp_path / "run" / "checkpoints" / f"epoch-{report['best_epoch']}"
    for epoch in (0, 1, 2):
        names = {p.name for p in (tmp_path / "run" / "checkpoints" / f"epoch-{epoch}").iterdir()}
        assert {
            "adapter_model.safetensors",
            "adapter_config.json",
            "classifier.json",
            "README.md",
            "tokenizer.json",
            "tokenizer_config.json",
        } <= names, names
    info = json.loads((best / "classifier.json").read_text())
    assert info["labels"] == ["entailment", "neutral", "contradiction"]
    assert (
        info["input_template"] == "{premise}\nQuestion: {hypothesis} Yes, Maybe, or No?\nAnswer:"
    )  # the zero-shot prompt
    assert info["pooling"] == "model" and info["base_model"] == str(folder) and info["max_length"] == 64
    card = (best / "README.md").read_text()
    assert "AutoPeftModelForSequenceClassification" in card and "Test accuracy" in card
    assert "Read this first" not in card
    assert json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)

    # a stranger's program: only the folder, peft, transformers and the template
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        best,
        num_labels=3,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["classifier", "score"],
        ),
    )
    tokenizer = AutoTokenizer.from_pretrained(best)
    model.eval()
    for module in model.modules():  # float32 as the run computed: on a CPU with AVX512-BF16, bitsandbytes
        if hasattr(module, "support_avx512bf16_for_cpu"):  # would switch to a bf16 kernel at the first eval
            module.support_avx512bf16_for_cpu = False  # forward (about 2e-4 off; a GPU has no such kernel)
    got = []
    predictions = [
        json.loads(l) for l in (tmp_path / "run" / "predictions" / "test_after.jsonl").read_text().splitlines()
    ]
    for row in predictions:
        text = info["input_template"].format(premise=row["premise"], hypothesis=row["hypothesis"])
        with torch.no_grad():
            got.append(
                model(**tokenizer(text, return_tensors="pt", truncation=True, max_length=64)).logits.softmax(-1)[0]
            )
    want = torch.tensor([r["probs"] for r in predictions])
    torch.testing.assert_close(torch.stack(got), want, rtol=0, atol=2e-4)
    # and the project's one-call loader, in batches with padding
    clf = load_classifier(best, temperature=False)  # the run's own probabilities, not temperature-scaled
    torch.testing.assert_close(torch.from_numpy(clf.predict(predictions)), want, rtol=0, atol=2e-4)


def test_a_mean_pooled_run_says_so_and_the_project_loader_reproduces_it(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    best = tiny_run / "checkpoints" / f"epoch-{report['best_epoch']}"
    card = (best / "README.md").read_text()
    assert card.index("Read this first") < card.index("Fine-tuned with QLoRA")  # before anything else
    assert "load_classifier" in card
    info = json.loads((best / "classifier.json").read_text())
    assert info["pooling"] == "mean" and info["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["input"]["template"] is None  # the tokenizer's own pair encoding
    assert (
        json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "sentence-transformers/all-MiniLM-L6-v2"
    )  # not a path inside this virtual environment
    predictions = [json.loads(l) for l in (tiny_run / "predictions" / "test_after.jsonl").read_text().splitlines()]
    clf = load_classifier(best, temperature=False)  # the run's own probabilities, not temperature-scaled
    torch.testing.assert_close(
        torch.from_numpy(clf.predict(predictions[:16])),
        torch.tensor([r["probs"] for r in predictions[:16]]),
        rtol=0,
        atol=2e-4,
    )


def test_load_classifier_explains_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="classifier.json"):
        load_classifier(Path(tmp_path))
