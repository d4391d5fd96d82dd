"""The training controls on real training runs of a tiny random BERT (train() in-process, CPU):
early stopping (when it stops, what the end record and the report say, and that a resumed run keeps
the count), class weights (the weights applied, and the gradient of every path against a plain
weighted cross-entropy), and the settings' checks and flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from core import checkpoint
from core.__main__ import build_config, main
from core.config import DataConfig, LoraSettings, ModelConfig, RunConfig, TrainConfig, get_preset, override
from core.speed.step import class_weights
from tests.engine.test_dist import make_tiny_bert
from tests.helpers import SNLI


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (SNLI / f"{split}.jsonl").read_text().splitlines()]


def write(path: Path, data: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("controls") / "tiny-bert")


@pytest.fixture(scope="module")
def no_neutral(tmp_path_factory) -> dict[str, str]:
    """Training rows without a single neutral pair and validation rows that are all neutral: the
    more the model learns, the worse validation gets, so the best epoch is the first."""
    tmp = tmp_path_factory.mktemp("no-neutral")
    return {
        "train": write(tmp / "train.jsonl", [r for r in rows("train") if r["label"] != "neutral"][:48]),
        "validation": write(tmp / "validation.jsonl", [r for r in rows("validation") if r["label"] == "neutral"]),
        "test": str(SNLI / "test.jsonl"),
    }


def config(bert: Path, files: dict[str, str], **train) -> RunConfig:
    return RunConfig(
        model=ModelConfig(name=str(bert), device="cpu", pooling="model"),
        data=DataConfig(source="files", max_test_rows=24, max_length=48, **files),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        train=TrainConfig(**{"epochs": 5, "batch_size": 16, "lr": 3e-3, "threads": 1, "track_test": False, **train}),
    )


def expected_stop(epochs: list[dict], patience: int) -> int | None:
    """The epoch after which the rule stops: the first k at which the best of epochs 1..k is
    `patience` epochs old (None: every epoch trains)."""
    for k in range(1, len(epochs) + 1):
        best = checkpoint.best_epoch(epochs[:k])
        if k - best["epoch"] >= patience:
            return k
    return None


def test_early_stopping_stops_when_the_best_epoch_is_patience_epochs_old(bert, no_neutral, tmp_path):
    from core.train import train

    report = train(config(bert, no_neutral, early_stopping_patience=2), tmp_path / "run")
    epochs = records(tmp_path / "run", "epoch")
    end = records(tmp_path / "run", "end")[-1]
    assert len(epochs) < 5  # it did stop early
    assert expected_stop(epochs, 2) == len(epochs) == end["early_stop"]["epoch"]
    stop = end["early_stop"]
    assert stop["best_epoch"] == end["best_epoch"] == report["best_epoch"] == len(epochs) - 2
    assert stop["patience"] == 2 and stop["epochs"] == 5
    assert stop["reason"].startswith(f"no epoch beat epoch {stop['best_epoch']}'s validation accuracy")
    assert report["early_stop"] == stop and report["controls"]["early_stopping_patience"] == 2
    from core.results.render import render_markdown

    assert f"stopped after epoch {len(epochs)} of 5" in render_markdown(report)
    from core.progress import summary

    assert f"stopped early after epoch {len(epochs)} of 5" in summary(report)  # what the CLI prints at the end
    # the test split is scored once, with the best epoch's adapter
    assert [r["stage"] for r in records(tmp_path / "run", "eval") if r["split"] == "test"] == ["before", "after"]


def test_a_resumed_run_keeps_the_early_stopping_count(bert, no_neutral, tmp_path, monkeypatch):
    """Stopped after epoch 2 (best epoch 1: one epoch of patience used), resumed: it stops after
    epoch 3 as the uninterrupted run does, not after epoch 4 (a count started again)."""
    import core.train
    from core.train import train

    cfg = config(bert, no_neutral, early_stopping_patience=2)
    straight = tmp_path / "straight"
    train(cfg, straight)
    assert records(straight, "end")[-1]["early_stop"]["epoch"] == 3  # the case this test is about

    run = tmp_path / "resumed"
    monkeypatch.setattr(core.train, "stop_requested", lambda d: len(records(Path(d), "epoch")) >= 2)
    assert train(cfg, run) == {}  # a clean stop at the start of epoch 3
    assert records(run, "end")[-1]["state"] == "stopped"
    monkeypatch.undo()
    report = train(cfg, run, resume=True)
    assert report["early_stop"] == records(straight, "end")[-1]["early_stop"]
    keys = ("epoch", "val_accuracy", "val_loss")
    assert [{k: e[k] for k in keys} for e in records(run, "epoch")] == [
        {k: e[k] for k in keys} for e in records(straight, "epoch")
    ]


def test_balanced_class_weights_follow_the_training_rows_and_average_one():
    w = class_weights("balanced", [60, 20, 20], ["a", "b", "c"])
    assert w[1] == w[2] == pytest.approx(3 * w[0])  # n / (k n_c)
    assert sum(wc * n for wc, n in zip(w, [60, 20, 20])) / 100 == pytest.approx(1.0)
    given = class_weights([1.0, 2.0, 2.0], [60, 20, 20], ["a", "b", "c"])
    assert given[1] / given[0] == pytest.approx(2.0)
    assert sum(wc * n for wc, n in zip(given, [60, 20, 20])) / 100 == pytest.approx(1.0)
    assert class_weights("none", [60, 20, 20], ["a", "b", "c"]) is None
    with pytest.raises(ValueError, match="none of c: give the weights by hand"):
        class_weights("balanced", [60, 20, 0], ["a", "b", "c"])


def test_class_weights_are_in_the_setup_record_the_report_and_the_loss(bert, tmp_path):
    """A real run with `balanced` weights on a 3:1:1 training sample: the setup record and the
    report carry the applied weights beside each split's class balance, and the first step's
    logged loss is the weighted mean cross-entropy, not the plain one."""
    from core.train import train

    train_rows = rows("train")
    sample = (
        [r for r in train_rows if r["label"] == "entailment"][:36]
        + [r for r in train_rows if r["label"] == "neutral"][:12]
        + [r for r in train_rows if r["label"] == "contradiction"][:12]
    )
    files = {
        "train": write(tmp_path / "train.jsonl", sample),
        "validation": str(SNLI / "validation.jsonl"),
        "test": str(SNLI / "test.jsonl"),
    }
    cfg = config(bert, files, epochs=1, class_weights="balanced", batch_size=60)
    report = train(cfg, tmp_path / "run")
    setup = records(tmp_path / "run", "setup")[0]
    assert setup["class_weights"] == pytest.approx({"entailment": 5 / 9, "neutral": 5 / 3, "contradiction": 5 / 3})
    assert setup["data"]["train"]["label_counts"] == {"entailment": 36, "neutral": 12, "contradiction": 12}
    assert report["controls"]["class_weights"] == "balanced"
    assert report["controls"]["class_weights_applied"] == setup["class_weights"]
    from core.results.render import class_balance_rows, render_markdown

    balance = {r["class"]: r for r in class_balance_rows(report)}
    assert balance["neutral"]["train"] == "12 (20%)" and balance["neutral"]["weight in the loss"] == "1.667"
    assert "| class weights in the loss | balanced: entailment 0.556" in render_markdown(report)

    # the one step's loss, recomputed from the epoch-0 adapter: weighted, and different from the plain mean
    from core.checkpoint import load_adapter_weights
    from core.data import collate, encode, load_splits
    from core.evaluate import load_run_model

    model, tokenizer, *_ = load_run_model(cfg)
    load_adapter_weights(model, tmp_path / "run" / "checkpoints" / "epoch-0")
    splits, _ = load_splits(cfg.data, cfg.train.seed)
    enc = encode(splits["train"], tokenizer, cfg.data)
    batch = collate(enc, list(range(len(enc))), tokenizer.pad_token_id)
    model.eval()  # no dropout in this BERT; eval keeps the comparison exact
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    weights = torch.tensor([setup["class_weights"][label] for label in cfg.data.labels])
    weighted = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none") * weights[batch["labels"]]
    plain = torch.nn.functional.cross_entropy(logits, batch["labels"]).item()
    step = records(tmp_path / "run", "step")[0]
    assert step["loss"] == pytest.approx(weighted.mean().item(), rel=1e-4)
    assert not math.isclose(step["loss"], plain, rel_tol=1e-3)


@pytest.mark.parametrize(
    "dotted,value,message",
    [
        ("train.early_stopping_patience", 0, "train.early_stopping_patience must be an integer in [1, 1000] or null"),
        ("train.early_stopping_patience", 2.5, "train.early_stopping_patience must be an integer or null, not 2.5"),
        (
            "train.class_weights",
            "heavy",
            "train.class_weights must be none, balanced or one weight per class, not 'heavy'",
        ),
        (
            "train.class_weights",
            "1,x,2",
            "train.class_weights must be none, balanced or numbers separated by commas, not '1,x,2'",
        ),
        ("train.class_weights", [1, 0, 2], "train.class_weights must hold one weight per class, each in (0, 1e6)"),
        (
            "train.class_weights",
            [1, 2],
            "train.class_weights has 2 weights but data.labels has 3 classes: give one weight per class, in "
            "label order",
        ),
        ("train.gradient_checkpointing", "yes", "train.gradient_checkpointing must be true or false, not 'yes'"),
        ("lora.variant", "qlora", "lora.variant must be lora, dora or rslora, not 'qlora'"),
    ],
)
def test_every_new_setting_is_checked_in_one_sentence(dotted, value, message):
    with pytest.raises(ValueError) as e:
        override(get_preset("demo"), {dotted: value})
    assert str(e.value) == message


def test_the_flags_set_the_new_settings_and_config_json_keeps_them(tmp_path, monkeypatch):
    import core.__main__ as cli

    captured = {}

    def fake_train(args) -> int:  # the config cmd_train would build from the parsed flags
        captured["cfg"] = build_config(args)
        return 0

    monkeypatch.setattr(cli, "cmd_train", fake_train)  # main() binds it when it builds the parser
    flags = ["--early-stopping", "3", "--class-weights", "1,2,2", "--lora-variant", "dora", "--gradient-checkpointing"]
    assert main(["train", *flags]) == 0
    cfg = captured["cfg"]
    assert cfg.train.early_stopping_patience == 3 and cfg.train.class_weights == [1.0, 2.0, 2.0]
    assert cfg.lora.variant == "dora" and cfg.train.gradient_checkpointing is True
    cfg.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["early_stopping_patience"] == 3 and saved["lora"]["variant"] == "dora"
    assert RunConfig.load(tmp_path / "config.json") == cfg
    from core.results.compare import config_diff

    diff = config_diff({"a": get_preset("demo").to_dict(), "b": saved})
    for key in ("train.early_stopping_patience", "train.class_weights", "train.gradient_checkpointing", "lora.variant"):
        assert key in diff  # the Compare page's config diff shows each of them


def test_balanced_class_weights_raise_macro_f1_on_an_imbalanced_sample(tmp_path):
    """A tiny BERT on pairs whose class is one cue word of the hypothesis, trained on 100 : 10 : 10
    rows: unweighted it answers the majority class only; with balanced weights it learns the
    minority cues, and test macro-F1 (balanced test rows) rises. The same on the real demo model:
    bench/controls.py (bench/RESULTS.md)."""
    import random

    from transformers import AutoModelForSequenceClassification, BertConfig

    from core.train import train
    from tests.helpers import save_word_tokenizer

    rng = random.Random(0)
    filler = [f"w{i}" for i in range(60)]
    cues = {"entailment": "alpha", "neutral": "beta", "contradiction": "gamma"}

    def sample(counts: dict[str, int]) -> list[dict]:
        out = []
        for label, n in counts.items():
            for _ in range(n):
                hypothesis = rng.choices(filler, k=3) + [cues[label]] + rng.choices(filler, k=2)
                out.append(
                    {"premise": " ".join(rng.choices(filler, k=6)), "hypothesis": " ".join(hypothesis), "label": label}
                )
        rng.shuffle(out)
        return out

    folder = tmp_path / "bert"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(
        BertConfig(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_labels=3,
            pad_token_id=0,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    ).save_pretrained(folder)
    save_word_tokenizer(folder, filler + list(cues.values()), causal=False)
    files = {
        "train": write(tmp_path / "train.jsonl", sample({"entailment": 100, "neutral": 10, "contradiction": 10})),
        "validation": write(tmp_path / "validation.jsonl", sample(dict.fromkeys(cues, 20))),
        "test": write(tmp_path / "test.jsonl", sample(dict.fromkeys(cues, 30))),
    }
    macro = {}
    for setting in ("none", "balanced"):
        cfg = RunConfig(
            model=ModelConfig(name=str(folder), device="cpu", pooling="model"),
            data=DataConfig(source="files", max_length=32, **files),
            lora=LoraSettings(r=4, alpha=8, dropout=0.0),
            train=TrainConfig(
                epochs=8, batch_size=16, lr=2e-2, head_lr=5e-2, threads=1, track_test=False, class_weights=setting
            ),
        )
        report = train(cfg, tmp_path / setting)
        macro[setting] = report["per_class_change"]["macro"]["f1_after"]
        recall = {c["label"]: c["recall"] for c in report["test_after"]["per_class"]}
        if setting == "none":
            assert recall["neutral"] == recall["contradiction"] == 0  # the majority class only
    assert macro["balanced"] > macro["none"] + 0.2, macro


@pytest.mark.e2e
def test_class_weights_in_a_data_parallel_run_equal_one_process(bert, tmp_path):
    """`--class-weights 1,3,2` with two gloo processes (each process weights its share of the
    batch; the gradients are all-reduced by rows) trains the adapter one process trains."""
    from tests.engine import test_dist

    weights = ("--class-weights", "1,3,2")
    one, two, plain = tmp_path / "one", tmp_path / "two", tmp_path / "plain"
    test_dist.run(*test_dist.args(bert, *weights), "--run-dir", one)
    test_dist.run(*test_dist.args(bert, *weights), "--nproc", 2, "--run-dir", two)
    test_dist.run(*test_dist.args(bert), "--run-dir", plain)
    a, b, c = test_dist.adapter(one, 2), test_dist.adapter(two, 2), test_dist.adapter(plain, 2)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.allclose(a[k], c[k], atol=1e-4) for k in a)  # and the weights changed the training
    setup = records(two, "setup")[0]
    assert setup["world_size"] == 2 and setup["class_weights"]["neutral"] / setup["class_weights"]["entailment"] == (
        pytest.approx(3.0)
    )


@pytest.mark.parametrize("variant", ["dora", "rslora"])
def test_a_lora_variant_trains_is_named_and_reloads_portably(bert, tmp_path, variant):
    """A real run with lora.variant: peft's flags in adapter_config.json, the variant in the setup
    record, report, classifier.json and model card, and load_classifier reproduces its test
    probabilities from the checkpoint folder alone."""
    from core.classifier import load_classifier
    from core.train import train

    files = {"train": str(SNLI / "train.jsonl"), "test": str(SNLI / "test.jsonl")}
    cfg = config(bert, files, epochs=1)
    cfg = override(cfg, {"lora.variant": variant, "data.max_train_rows": 48, "data.max_validation_rows": 16})
    report = train(cfg, tmp_path / "run")
    assert records(tmp_path / "run", "setup")[0]["lora_variant"] == variant == report["controls"]["lora_variant"]
    folder = tmp_path / "run" / "checkpoints" / f"epoch-{report['best_epoch']}"
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is (variant == "dora") and adapter_config["use_rslora"] is (variant == "rslora")
    assert json.loads((folder / "classifier.json").read_text())["lora_variant"] == variant
    card = (folder / "README.md").read_text()
    assert ("- Adapter: DoRA" if variant == "dora" else "- Adapter: rsLoRA") in card
    from core.results.render import render_markdown

    assert ("| LoRA variant | DoRA" if variant == "dora" else "| LoRA variant | rsLoRA") in render_markdown(report)
    speedups = records(tmp_path / "run", "setup")[0]["speedups"]
    assert any(s.startswith("not fused: ") for s in speedups) == (variant == "dora")  # the reason, in setup
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions" / "test_after.jsonl").open()]
    probs = load_classifier(folder, device="cpu", temperature=False).predict(predictions)
    assert abs(probs - [r["probs"] for r in predictions]).max() < 2e-4


def test_gradient_checkpointing_trains_the_same_run(bert, tmp_path):
    """The same real run with and without --gradient-checkpointing: equal step losses and adapters;
    the setup record says it was on."""
    from safetensors.torch import load_file

    from core.train import train

    files = {"train": str(SNLI / "train.jsonl"), "test": str(SNLI / "test.jsonl")}
    base = override(config(bert, files, epochs=1), {"data.max_train_rows": 48, "data.max_validation_rows": 16})
    for name, on in (("plain", False), ("checkpointed", True)):
        train(override(base, {"train.gradient_checkpointing": on}), tmp_path / name)
    setup = records(tmp_path / "checkpointed", "setup")[0]
    assert any(s.startswith("gradient checkpointing") for s in setup["speedups"])
    steps = [[r["loss"] for r in records(tmp_path / name, "step")] for name in ("plain", "checkpointed")]
    assert steps[1] == pytest.approx(steps[0], rel=1e-5)
    a, b = (
        load_file(tmp_path / name / "checkpoints" / "epoch-1" / "adapter_model.safetensors")
        for name in ("plain", "checkpointed")
    )
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
