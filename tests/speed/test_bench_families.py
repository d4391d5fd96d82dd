"""The per-family benchmark's CPU-testable parts (bench/assets.py, bench/run.py, bench/ours.py).

The GPU run itself is `python -m bench.run --arch ...` on an H200 (bench/RESULTS.md). Here: the
shapes are the real models' (parameter counts on the meta device), the one tokenizer survives
AutoTokenizer under every architecture (transformers rebuilt Qwen2's from the vocabulary and the
old word-level one lost every token), a tiny model of the shape that crashed trains through
bench.ours' run config on CPU, and the table says each goal met or not.
"""

from __future__ import annotations

import json

import pytest

from bench import assets
from bench.run import family_table

# parameter counts of the real checkpoints' bodies (no LM head: Phi-2's 2.78B less its 0.13B
# untied head; the others tie it to the embedding), within 1%
PARAMS = {"phi2": 2.65e9, "llama3b": 3.21e9, "qwen1p5b": 1.54e9, "gemma3-1b": 1.0e9}


@pytest.mark.parametrize("arch", sorted(assets.ARCHS))
def test_shapes_are_the_real_models(arch):
    from accelerate import init_empty_weights
    from transformers import AutoModel

    with init_empty_weights():
        model = AutoModel.from_config(assets.model_config(arch))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / PARAMS[arch] - 1) < 0.01, n


def test_the_tokenizer_survives_every_architecture(tmp_path):
    """Under each architecture's config (the four, and the families that pack), AutoTokenizer
    gives the same ids: one per word and one per prompt marker, none dropped, all in every
    model's vocabulary."""
    import transformers
    from transformers import AutoTokenizer

    text = assets.TEMPLATE.format(premise=" ".join(assets.word(i) for i in (0, 77, 19999)), hypothesis=assets.word(5))
    others = {"mistral": "MistralConfig", "qwen3": "Qwen3Config", "gemma2": "Gemma2Config", "phi3": "Phi3Config"}
    seen = {}
    for arch in [*assets.ARCHS, *others]:
        folder = tmp_path / arch
        assets.build_tokenizer(folder)
        if arch in assets.ARCHS:
            assets.model_config(arch).save_pretrained(folder)
        else:
            getattr(transformers, others[arch])(vocab_size=51200).save_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        seen[arch] = tok(text)["input_ids"]
        assert tok.pad_token_id == tok.eos_token_id == 0, arch
    assert len({tuple(ids) for ids in seen.values()}) == 1, seen
    ids = seen["phi2"]
    assert len(ids) == 3 + 4 and max(ids) < min(s["vocab_size"] for s in (a["shape"] for a in assets.ARCHS.values()))
    config = json.loads((tmp_path / "phi2" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"


def test_a_tiny_qwen_trains_through_the_benchmark_config_on_cpu(tmp_path, monkeypatch):
    """The Qwen2.5 run crashed before training (no tokens in any row); the same path on a tiny
    model of that family, through bench.ours' run config and core.train."""
    from bench.ours import run_config, summarise
    from core.train import train

    monkeypatch.setenv("BENCH_TINY", "1")
    monkeypatch.setitem(assets.SPLITS, "train", 40)
    monkeypatch.setitem(assets.SPLITS, "validation", 16)
    monkeypatch.setitem(assets.SPLITS, "test", 16)
    info = assets.build(tmp_path, "qwen1p5b")
    assert (tmp_path / "model-qwen1p5b" / "model.safetensors").is_file()
    assert info["data"]["pairs"] == 72
    cfg = run_config(str(tmp_path), None, epochs=1, train_rows=40, arch="qwen1p5b", eval_rows=(16, 16))
    assert cfg.lora.target_modules == assets.ALL_LINEAR and cfg.data.template == assets.TEMPLATE
    train(cfg, tmp_path / "run")
    s = summarise(tmp_path / "run")
    assert s["losses_finite"] and s["eval_losses_finite"] and s["state"] == "done"
    assert "attention per packed row (padded batches: SDPA)" in s["speedups"]
    assert 20 < s["mean_tokens"]["train"] < 35  # 3 markers + the words: one token each


def test_family_table_says_each_goal_met_or_not():
    results = {
        "phi2": {
            "ours": {"pairs_per_s": 616.0, "mfu": 0.169, "peak_gib": 3.65, "speedups": ["attention per packed row"]},
            "tuned": {"pairs_per_s": 36.6, "peak_gib": 9.0},
            "seed": {"pairs_per_s": 14.3, "peak_gib": 2.51},
            "sweep": {
                "sweep": [
                    {"batch": 32, "mfu": 0.17, "pairs_per_s": 616},
                    {"batch": 256, "mfu": 0.31, "pairs_per_s": 900},
                ]
            },
        },
        "qwen1p5b": {"sweep": {"sweep": [{"batch": 512, "mfu": 0.296, "pairs_per_s": 2594}]}},
        "gemma3-1b": {"ours": {"pairs_per_s": 500.0, "speedups": ["rows not packed: gemma3_text soft-caps"]}},
    }
    text = family_table(results)
    assert (
        "| Phi-2 (2.7B) | 616.0 | 16.9% | 3.65 | 36.6 (16.8x) | 14.3 (43.1x) | 2.51 (1.5x) | 256: 900, 31.0% |" in text
    )
    assert "x the tuned HF Trainer 16.83 (>= 12: met)" in text
    assert "MFU at the best batch 31.0% (>= 30%: met)" in text
    assert "peak memory / the seed-like script's 1.45 (<= 1.6: met)" in text
    assert "- qwen1p5b: MFU at the best batch 29.6% (>= 30%: NOT met)" in text  # not a rounded 0.30
    assert "- gemma3-1b: rows not packed: gemma3_text soft-caps" in text
    assert text.count("\n| ") == 3


def test_table_only_joins_the_parts_of_several_calls_and_runs_nothing(tmp_path):
    """bench.run --table-only: one families.md from the <arch>/*.json of earlier calls (the GPU
    machine returns a call's files; bench/families_gpu.sh), without building assets or running parts."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    out, root = tmp_path / "out", tmp_path / "root"
    for arch, ours, seed in (("phi2", 616.0, 14.3), ("qwen1p5b", 672.5, 16.2)):
        (out / arch).mkdir(parents=True)
        (out / arch / "ours.json").write_text(json.dumps({"pairs_per_s": ours, "mfu": 0.1, "peak_gib": 3.0}))
        (out / arch / "seed.json").write_text(json.dumps({"pairs_per_s": seed, "peak_gib": 2.0}))
    args = ["--arch", "phi2,qwen1p5b", "--table-only", "--out", str(out), "--root", str(root)]
    proc = subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (out / "families.md").read_text()
    assert "| Phi-2 (2.7B) | 616.0 |" in text and "| Qwen2.5-1.5B (GQA 12/2) | 672.5 |" in text
    assert "x the seed-like script 41.51 (>= 40: met)" in text
    assert not root.exists() and not (out / "bench.log").exists()  # no assets, no part ran
