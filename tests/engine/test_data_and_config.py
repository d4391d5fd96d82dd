"""Unit tests of the engine's pieces: data mapping and sampling, config and presets, parameter counts,
the learning-rate schedule."""

import json
from collections import Counter

import pytest

from core.config import DataConfig, LoraSettings, RunConfig, TrainConfig, get_preset, override
from core.data import Example, batch_indices, carve_validation, load_splits, map_label, stratified_sample, to_examples
from core.tables import read_table
from core.train import lr_factor
from tests.helpers import SNLI

LABELS = ["entailment", "neutral", "contradiction"]


# --- data ---------------------------------------------------------------------------------------


def test_snli_original_columns_and_unlabelled_rows_are_dropped_and_counted():
    rows = [
        {"sentence1": "A man sleeps.", "sentence2": "A man is awake.", "gold_label": "contradiction"},
        {"sentence1": "A dog runs.", "sentence2": "An animal moves.", "gold_label": "entailment"},
        {"sentence1": "Kids play.", "sentence2": "Kids are happy.", "gold_label": "-"},
        {"sentence1": "A cat.", "sentence2": "A pet.", "gold_label": "neutral"},
    ]
    examples, stats = to_examples(rows, DataConfig(), "train")
    assert [e.label for e in examples] == [2, 0, 1]
    assert examples[0].premise == "A man sleeps." and examples[0].hypothesis == "A man is awake."
    assert stats.rows_read == 4 and stats.dropped_unlabelled == 1 and stats.kept == 3


def test_hub_style_integer_labels_with_minus_one():
    rows = [{"premise": "p", "hypothesis": "h", "label": i} for i in (0, 1, 2, -1, 2)]
    examples, stats = to_examples(rows, DataConfig(), "test")
    assert [e.label for e in examples] == [0, 1, 2, 2]
    assert stats.dropped_unlabelled == 1


def test_label_mapping_and_explicit_columns():
    cfg = DataConfig(
        premise_column="a",
        hypothesis_column="b",
        label_column="y",
        labels=["no", "yes"],
        label_map={"0": "no", "1": "yes", "Y": "yes"},
    )
    rows = [{"a": "x", "b": "y", "y": "Y"}, {"a": "x", "b": "y", "y": 0}, {"a": "x", "b": "y", "y": "1"}]
    examples, _ = to_examples(rows, cfg, "train")
    assert [e.label for e in examples] == [1, 0, 1]


def test_single_text_column_classification():
    cfg = DataConfig(text_column="review", labels=["neg", "pos"])
    examples, _ = to_examples([{"review": "great", "label": "pos"}, {"review": "bad", "label": "neg"}], cfg, "t")
    assert [(e.text, e.label) for e in examples] == [("great", 1), ("bad", 0)]
    assert examples[0].premise == ""


def test_unknown_label_and_missing_column_give_clear_errors():
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        to_examples([{"premise": "p", "hypothesis": "h", "label": "maybe"}], DataConfig(), "train")
    with pytest.raises(ValueError, match="out of range"):
        map_label(7, LABELS, {})
    with pytest.raises(ValueError, match="no label column"):
        to_examples([{"premise": "p", "hypothesis": "h"}], DataConfig(), "train")
    with pytest.raises(ValueError, match="column 'nope' not found"):
        to_examples([{"premise": "p", "hypothesis": "h", "label": 0}], DataConfig(premise_column="nope"), "x")


def test_stratified_sample_keeps_proportions_and_is_deterministic():
    examples = [Example(id=str(i), label=0 if i < 600 else (1 if i < 900 else 2)) for i in range(1000)]
    a = stratified_sample(examples, 100, seed=3)
    b = stratified_sample(examples, 100, seed=3)
    c = stratified_sample(examples, 100, seed=4)
    assert [e.id for e in a] == [e.id for e in b]
    assert [e.id for e in a] != [e.id for e in c]
    assert Counter(e.label for e in a) == {0: 60, 1: 30, 2: 10}
    assert len({e.id for e in a}) == 100
    assert stratified_sample(examples, None, 0) == examples


def test_carved_validation_is_disjoint_and_stratified():
    examples = [Example(id=str(i), label=i % 3) for i in range(300)]
    train, val = carve_validation(examples, 0.1, seed=0)
    assert len(val) == 30 and len(train) == 270
    assert not {e.id for e in train} & {e.id for e in val}
    assert Counter(e.label for e in val) == {0: 10, 1: 10, 2: 10}


def test_file_formats_round_trip(tmp_path):
    rows = [
        {"premise": "p1", "hypothesis": "h1", "label": "neutral"},
        {"premise": "p2, with comma", "hypothesis": "h2", "label": "entailment"},
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.csv", "a.parquet"):
        assert read_table(tmp_path / name) == rows, name
    (tmp_path / "bad.jsonl").write_text('{"premise": "x"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_table(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "a.txt").write_text("x")
        read_table(tmp_path / "a.txt")
    with pytest.raises(ValueError, match="not found"):
        read_table(tmp_path / "missing.jsonl")


def test_genuine_snli_sample_loads_through_the_file_loader():
    cfg = DataConfig(
        source="files",
        train=str(SNLI / "train.jsonl"),
        validation=str(SNLI / "validation.jsonl"),
        test=str(SNLI / "test.jsonl"),
        max_train_rows=120,
    )
    splits, stats = load_splits(cfg, seed=0)
    assert len(splits["train"]) == 120 and len(splits["validation"]) == 60 and len(splits["test"]) == 60
    assert stats["train"]["rows_read"] == 240 and stats["train"]["dropped_unlabelled"] == 0
    # the 120 rows keep the file's class proportions (77/84/79 of 240): each class within one row of its share
    in_file = Counter(json.loads(l)["label"] for l in (SNLI / "train.jsonl").read_text().splitlines())
    assert sum(in_file.values()) == 240
    got = stats["train"]["label_counts"]
    assert set(got) == set(LABELS) and sum(got.values()) == 120
    assert Counter(LABELS[e.label] for e in splits["train"]) == got
    assert all(abs(got[lab] - 120 * in_file[lab] / 240) < 1 for lab in LABELS), (got, in_file)
    first = json.loads((SNLI / "test.jsonl").read_text().splitlines()[0])
    assert splits["test"][0].premise == first["premise"] and LABELS[splits["test"][0].label] == first["label"]


def test_builtin_sample_is_balanced_tagged_and_split_by_premise():
    cfg = get_preset("demo").data
    splits, stats = load_splits(cfg, seed=0)
    total = sum(len(v) for v in splits.values())
    assert total >= 1200
    premises = {s: {e.premise for e in ex} for s, ex in splits.items()}
    assert not premises["train"] & premises["test"] and not premises["train"] & premises["validation"]
    assert all(e.tag for ex in splits.values() for e in ex)
    for ex in splits.values():
        counts = Counter(e.label for e in ex)
        assert counts[0] == counts[1] == counts[2]


def test_length_bucketing_reduces_padding_and_covers_every_row():
    import random

    rnd = random.Random(0)
    encoded = [{"input_ids": [1] * rnd.randint(5, 60), "label": 0} for _ in range(512)]

    def padding(batches):
        return sum(max(len(encoded[i]["input_ids"]) for i in b) * len(b) for b in batches)

    plain = batch_indices(encoded, 32, shuffle=True, seed=1, bucket=False)
    bucketed = batch_indices(encoded, 32, shuffle=True, seed=1, bucket=True)
    assert sorted(i for b in bucketed for i in b) == list(range(512))
    assert padding(bucketed) < 0.8 * padding(plain)
    assert batch_indices(encoded, 32, shuffle=True, seed=1) == bucketed


# --- config -------------------------------------------------------------------------------------


def test_config_round_trip_and_validation(tmp_path):
    cfg = override(get_preset("demo"), {"train.epochs": 2, "lora.r": 8})
    cfg.save(tmp_path / "c.json")
    again = RunConfig.load(tmp_path / "c.json")
    assert again == cfg and again.train.epochs == 2 and again.lora.r == 8
    with pytest.raises(ValueError, match="train.epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="micro_batch_size must divide"):
        TrainConfig(batch_size=32, micro_batch_size=5)
    with pytest.raises(ValueError, match="lora.dropout"):
        LoraSettings(dropout=1.5)
    with pytest.raises(ValueError, match="unknown keys in train"):
        RunConfig.from_dict({"train": {"epoch": 3}})
    with pytest.raises(ValueError, match="unknown setting"):
        override(cfg, {"train.nope": 1})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        RunConfig.load(tmp_path / "bad.json")


def test_phi2_snli_preset_is_the_reference_experiment():
    cfg = get_preset("phi2-snli")
    assert cfg.model.name == "microsoft/phi-2" and cfg.model.quantize == "bnb.nf4" and cfg.model.double_quant
    assert cfg.data.source == "stanfordnlp/snli"
    assert (cfg.data.max_train_rows, cfg.data.max_test_rows) == (1000, 1000)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "v_proj", "fc1", "fc2"]
    assert cfg.train.epochs == 5


def test_phi2_parameter_counts_match_the_reference():
    """Phi-2's real shape on the meta device: 18,357,760 trainable, and the reference report's
    naive 4-bit count 1,408,634,880 (the head is counted twice there: original + trainable copy)."""
    from transformers import PhiConfig

    from core.estimate import estimate_parameters_from_config

    cfg = get_preset("phi2-snli")
    phi2 = PhiConfig(
        vocab_size=51200,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        partial_rotary_factor=0.4,
        num_labels=3,
        pad_token_id=50256,
    )
    counts = estimate_parameters_from_config(phi2, cfg.lora)
    assert counts["trainable"] == 18_357_760
    assert counts["packed"] == 1_408_634_880


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 100, 10, "linear") for s in range(100)]
    assert f[0] < f[5] < f[9] <= 1.0 and abs(f[10] - 1.0) < 1e-9 and f[99] < 0.02
    c = [lr_factor(s, 100, 0, "cosine") for s in range(100)]
    assert c[0] == 1.0 and c[50] == pytest.approx(0.5, abs=0.02)
    assert lr_factor(70, 100, 10, "constant") == 1.0
