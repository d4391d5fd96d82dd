"""The pre-launch plan (core/estimate.py): planned rows, the GPU memory estimate against a measured Phi-2
peak, the plan of the demo and its time estimate from an earlier run. No Streamlit, no training."""

import json

from core import estimate
from core.config import get_preset, override
from tests.helpers import SNLI

# --- estimate -----------------------------------------------------------------------------------


def test_planned_rows_follow_the_trainer(tmp_path):
    from core.config import BUILTIN_DIR

    n = {s: sum(1 for _ in open(BUILTIN_DIR / f"{s}.jsonl")) for s in ("train", "validation", "test")}
    assert estimate.planned_rows(get_preset("demo")) == n
    capped = override(get_preset("demo"), {"data.max_train_rows": 50, "data.max_test_rows": 10**6})
    assert estimate.planned_rows(capped) == {**n, "train": 50}
    # files without validation: 10% of train (240 rows -> 24) is carved out first (as load_splits does), then capped
    files = override(
        get_preset("demo"),
        {
            "data.source": "files",
            "data.train": str(SNLI / "train.jsonl"),
            "data.test": str(SNLI / "test.jsonl"),
            "data.max_train_rows": 64,
        },
    )
    assert estimate.planned_rows(files) == {"train": 64, "validation": 24, "test": 60}
    assert estimate.planned_rows(files, known={"train": 20, "test": 5}) == {"train": 18, "validation": 2, "test": 5}


def test_gpu_memory_estimate_is_close_to_the_measured_phi2_peak(monkeypatch):
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
    params = estimate_parameters_from_config(phi2, cfg.lora)
    shape = {"hidden": 2560, "layers": 32}
    gb = estimate.gpu_memory_gb(params, shape, cfg, "bfloat16")
    assert 3.52 <= gb <= 4.5  # measured on an H200: 3.52 GiB, micro-batches of <= 768 tokens (bench/RESULTS.md)
    monkeypatch.setenv("QLORA_MICRO_TOKENS", "1024")
    assert 4.20 <= estimate.gpu_memory_gb(params, shape, cfg, "bfloat16") <= 5.2  # measured: 4.20 GiB
    monkeypatch.setenv("QLORA_MICRO_TOKENS", "0")  # no split: the whole batch at max_length
    whole = estimate.gpu_memory_gb(params, shape, cfg, "bfloat16")
    smaller = override(cfg, {"train.batch_size": 8})
    assert estimate.gpu_memory_gb(params, shape, smaller, "bfloat16") < whole - 4


def test_plan_of_the_demo_and_the_time_estimate_from_an_earlier_run(tmp_path, tiny_run):
    cfg = override(get_preset("demo"), {"data.max_train_rows": 128, "train.epochs": 2})
    p = estimate.plan(cfg, root=tmp_path)
    assert p["device"] in ("cpu", "cuda") and p["error"] is None
    assert p["params"]["total"] > p["params"]["packed"] > p["params"]["trainable"] > 0
    assert p["steps_per_epoch"] == 4 and p["total_steps"] == 8
    assert p["time"] is None  # no earlier run in this runs folder
    p = estimate.plan(cfg, root=tiny_run.parent)
    report = json.loads((tiny_run / "report.json").read_text())
    assert p["time"]["from_run"] == tiny_run.name
    per_row = report["train_s"] / (2 * 64)
    assert p["time"]["seconds"] > 2 * 128 * per_row  # at least the training rows at the measured speed
    bad = estimate.plan(override(cfg, {"model.name": str(tmp_path / "no-such-model")}), root=tmp_path)
    assert bad["params"] is None and bad["params_error"]


def test_activation_bytes_follow_the_measured_growth_of_every_familys_peak():
    """activation_bytes per token and layer against what the peak grew by on one H100 from the
    768-token budget to one micro-batch a step (bench/h100-2026-12-06-s2: the largest micro-batch
    768 and about 1,472 tokens, counted in bench/RESULTS.md), for the four benchmark shapes."""
    import transformers

    from bench.assets import ARCHS
    from tests.helpers import ROOT

    runs = ROOT / "bench" / "h100-2026-12-06-s2" / "mt1" / "ab"
    for arch, spec in ARCHS.items():
        c = spec["shape"]
        shape = {
            "hidden": c["hidden_size"],
            "intermediate": c["intermediate_size"],
            "model_type": getattr(transformers, spec["config"]).model_type,
        }
        peak = {
            k: json.loads((runs / f"{arch}.{k}.json").read_text())["peak_gib"] for k in ("new", "QLORA_MICRO_TOKENS_0")
        }
        measured = (peak["QLORA_MICRO_TOKENS_0"] - peak["new"]) * 2**30 / (1472 - 768) / c["num_hidden_layers"]
        assert 0.9 <= estimate.activation_bytes(shape) / measured <= 1.1, (
            arch,
            estimate.activation_bytes(shape),
            measured,
        )
    # a plain MLP keeps less per intermediate unit than a gated one
    assert estimate.activation_bytes({"hidden": 64, "model_type": "phi"}) < estimate.activation_bytes(
        {"hidden": 64, "model_type": "llama"}
    )
