"""The look at the data on the Train page (app_pages/preview.py over core/preview.py) and the new
training controls in the form: what core.preview computes on the built-in sample, a large file and
uploads (row counts after dropping, class balance, lengths against max_length, duplicates between
splits, sampling said so); under AppTest the table, the imbalance warning whose button sets balanced
class weights (launched into config.json), and the lower GPU-memory estimate with gradient
checkpointing."""

from __future__ import annotations

import json

import pytest

from core import estimate, jobs
from core.config import get_preset, override
from core.preview import preview
from core.runs.state import list_runs
from tests.helpers import start, text_of


@pytest.fixture(scope="module")
def tokenizer():
    from core.model import load_tokenizer

    return load_tokenizer(get_preset("demo").model)


def rows_file(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pair(i: int, label: str) -> dict:
    return {"premise": f"A man plays guitar number {i}.", "hypothesis": f"Someone makes music {i}.", "label": label}


def test_the_preview_of_the_built_in_sample_is_what_the_trainer_reads(tokenizer):
    from core.data import load_splits

    cfg = override(get_preset("demo"), {"data.max_train_rows": 300, "data.max_length": 24})
    look = preview(cfg, tokenizer)
    splits, stats = load_splits(cfg.data, cfg.train.seed)
    for split in ("train", "validation", "test"):
        s = look["splits"][split]
        assert s["complete"] and s["kept"] == stats[split]["kept"] and s["used"] == len(splits[split])
        assert sum(s["label_counts"].values()) == s["kept"]
        assert len(s["examples"]) == 3 and set(s["examples"][0]) == {"premise", "hypothesis", "label"}
    lengths = look["splits"]["train"]["lengths"]
    from core.data import encode

    full = [
        len(e["input_ids"]) for e in encode(splits["train"], tokenizer, override(cfg, {"data.max_length": 512}).data)
    ]
    assert lengths["sampled"] == 948 and lengths["longest"] == max(full)  # every train row, untruncated
    assert lengths["over_max_length"] > 0 and sum(b["n"] for b in lengths["histogram"]) == 948
    assert look["duplicates"] == [] and look["imbalanced"] is None and look["notes"] == []


def test_a_large_file_is_read_in_part_and_says_so(tmp_path, tokenizer):
    big = rows_file(
        tmp_path / "big.jsonl", [pair(i, ("entailment", "neutral", "contradiction")[i % 3]) for i in range(3000)]
    )
    cfg = override(get_preset("demo"), {"data.source": "files", "data.train": big, "data.test": big})
    look = preview(cfg, tokenizer, scan=1000, sample=200)
    train = look["splits"]["train"]
    assert not train["complete"] and train["rows_read"] == 1000 and train["total_rows"] == 3000
    assert train["lengths"]["sampled"] == 200 and train["lengths"]["of"] == train["kept"]
    assert train["used"] == round(train["kept"] * 3) and look["splits"]["validation"]["carved_from_train"]
    assert any(n.startswith("train: from the first 1,000 of 3,000 rows") for n in look["notes"])
    assert look["duplicates"][0]["splits"] == ["train", "test"]  # the same file as test: every row leaks


def test_dropped_rows_duplicates_and_imbalance_of_uploaded_rows(tokenizer):
    train = [pair(i, "entailment") for i in range(20)] + [pair(100 + i, "neutral") for i in range(4)]
    train += [pair(200, "contradiction"), {"premise": "", "hypothesis": "x", "label": "neutral"}]
    train += [{"premise": "a", "hypothesis": "b", "label": "-"}]
    test = [pair(3, "entailment"), {**pair(200, "contradiction"), "premise": "a  MAN plays guitar number 200."}]
    test += [pair(900, "neutral")]
    cfg = override(get_preset("demo"), {"data.source": "files"})
    look = preview(cfg, tokenizer, sources={"train": train, "test": test})
    s = look["splits"]["train"]
    assert (s["rows_read"], s["dropped_empty"], s["dropped_unlabelled"]) == (27, 1, 1)
    assert s["kept"] + look["splits"]["validation"]["kept"] == 25  # validation carved from train, as the trainer does
    dup = look["duplicates"]
    assert dup[0]["splits"] == ["train", "test"] and dup[0]["n"] == 2  # case and spaces ignored
    assert look["imbalanced"]["largest"] == "entailment" and look["imbalanced"]["smallest"] == "contradiction"


def test_the_train_page_shows_the_data_and_offers_balanced_weights(tmp_path, monkeypatch):
    class FakePopen:
        calls: list = []

        def __init__(self, args, **kwargs):
            FakePopen.calls.append(args)

    at = start(tmp_path / "runs", monkeypatch)
    text = text_of(at)
    assert "A look at the data" in text and "would be cut" in text
    table = next(d.value for d in at.dataframe if "the run uses" in d.value.columns)
    assert list(table["split"]) == ["train", "validation", "test"] and list(table["kept"]) == [948, 204, 204]
    assert not any("imbalanced" in w.value for w in at.warning)

    train = "premise,hypothesis,label\n" + "".join(
        f"A man plays guitar {i}.,He plays {i}.,entailment\n" for i in range(30)
    )
    train += "".join(f"A dog runs {i}.,A cat sits {i}.,contradiction\n" for i in range(3))
    train += "".join(f"A woman sings {i}.,She is tall {i}.,neutral\n" for i in range(3))
    test = "premise,hypothesis,label\nA man plays guitar 1.,He plays 1.,entailment\n"
    test += "A dog barks.,An animal is loud.,neutral\n"
    at.radio(key="data_kind@demo").set_value("upload").run()
    at.file_uploader(key="upload:train").set_value(("train.csv", train.encode(), "text/csv"))
    at.file_uploader(key="upload:test").set_value(("test.csv", test.encode(), "text/csv"))
    at.run()
    warnings = [w.value for w in at.warning]
    # 26 : 3 : 3 after the validation carve (10%, stratified)
    assert any("The training split is imbalanced: **entailment** has 8.7x the rows of" in w for w in warnings)
    assert any("**1 test row** has the same text as a train row" in w for w in warnings)
    at.button(key="use_balanced").click().run()
    assert at.text_input(key="class_weights@demo").value == "balanced"
    assert not at.button(key="launch").disabled
    monkeypatch.setattr(jobs.subprocess, "Popen", FakePopen)  # the trainer is not started
    at.button(key="launch").click().run()
    cfg = json.loads((list_runs(tmp_path / "runs")[0]["path"] / "config.json").read_text())
    assert cfg["train"]["class_weights"] == "balanced"


def test_the_gpu_memory_estimate_drops_with_gradient_checkpointing(tmp_path, monkeypatch):
    """On a GPU machine (the device choice stands in: the plan reads it from pick_device_dtype)."""
    monkeypatch.setattr(
        estimate,
        "pick_device_dtype",
        lambda cfg: {"device": "cuda", "dtype": "bfloat16", "error": None, "gpu": "a GPU", "gpu_memory_gb": 80.0},
    )
    at = start(tmp_path / "runs", monkeypatch)
    at.number_input(key="batch@demo").set_value(512).run()

    def estimated() -> float:
        value = {m.label: m.value for m in at.metric}["Estimated GPU memory"]
        return float(value.removeprefix("≤ ").removesuffix(" GiB"))

    plain = estimated()
    at.checkbox(key="gradient_checkpointing@demo").check().run()
    checkpointed = estimated()
    assert checkpointed < plain
    cfg = get_preset("demo")
    facts = estimate.model_facts_or_error(cfg)
    big = override(cfg, {"train.batch_size": 512})
    on = override(big, {"train.gradient_checkpointing": True})
    args = (facts["params"], facts["shape"])
    assert (
        estimate.gpu_memory_gb(*args, on, "bfloat16") == checkpointed < estimate.gpu_memory_gb(*args, big, "bfloat16")
    )
