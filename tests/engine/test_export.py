"""`python -m core export RUN --out DIR`: a run's checkpoint as one merged model (the NF4 base
dequantised, LoRA merged in float32, the head included) that plain transformers loads, in a process
where peft and bitsandbytes cannot be imported, and that reproduces the run's test probabilities
(float32: within 2e-3) for a causal LM and a [CLS] encoder; a mean-pooled run (the embedded
MiniLM) carries its own small class and reproduces them with trust_remote_code=True, and the
project's one-call loader reads it without running that code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from core.__main__ import main
from core.classifier import load_classifier
from core.config import RunConfig
from core.export import export_merged
from tests.helpers import ROOT, train_tiny

# A stranger's program: transformers only. peft and bitsandbytes are hidden from the import system
# (as if they were not installed; transformers' own availability checks see nothing either).
PLAIN = r"""
import importlib.machinery, json, sys
class Hidden(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in ("peft", "bitsandbytes") else super().find_spec(name, path, target)
sys.meta_path = [Hidden if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, rows_file, trust = sys.argv[1], sys.argv[2], sys.argv[3] == "trust"
rows = [json.loads(l) for l in open(rows_file)]
info = json.load(open(folder + "/classifier.json"))
tokenizer = AutoTokenizer.from_pretrained(folder)
refused = None
if trust:
    try:
        AutoModelForSequenceClassification.from_pretrained(folder)
    except Exception as e:
        refused = type(e).__name__ + ": " + str(e)
model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=trust).eval()
fmt = info["input"]
if fmt["template"] is None:
    enc = tokenizer([r["premise"] for r in rows], [r["hypothesis"] for r in rows], padding=True, truncation=True,
                    max_length=info["max_length"], return_tensors="pt")
else:
    texts = [fmt["template"].format(premise=r["premise"], hypothesis=r["hypothesis"]) for r in rows]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=info["max_length"], return_tensors="pt")
with torch.no_grad():
    probs = model(**enc).logits.float().softmax(-1)
diff = (probs - torch.tensor([r["probs"] for r in rows])).abs().max().item()
print("\nRESULT " + json.dumps({"max_diff": diff, "id2label": model.config.id2label,
                  "pad_token_id": model.config.pad_token_id, "class": type(model).__name__, "refused": refused,
                  "peft": "peft" in sys.modules, "bitsandbytes": "bitsandbytes" in sys.modules}))
"""


def plain_transformers(folder: Path, rows_file: Path, trust: bool = False) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN, str(folder), str(rows_file), "trust" if trust else "plain"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("\nRESULT ")[-1])  # after whatever transformers printed (its prompt)


@pytest.mark.slow
@pytest.mark.parametrize("arch, variant", [("llama", "lora"), ("bert", "lora"), ("llama", "dora"), ("bert", "rslora")])
def test_a_merged_export_reloads_in_plain_transformers_to_the_runs_probabilities(arch, variant, tmp_path):
    run = train_tiny(arch, tmp_path, lora={"variant": variant})
    out = tmp_path / "merged"
    result = export_merged(run, out)  # a CPU run: float32 by default
    assert result["dtype"] == "float32" and result["note"] == "" and result["parity_rows"] == 24
    assert result["parity"] < 2e-3  # checked by the command itself, through load_classifier
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "classifier.json", "README.md"} <= names
    assert not any("adapter" in n for n in names)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}
    assert config["label2id"] == {"entailment": 0, "neutral": 1, "contradiction": 2}
    info = json.loads((out / "classifier.json").read_text())
    assert info["merged"]["epoch"] == json.loads((run / "report.json").read_text())["best_epoch"]
    card = (out / "README.md").read_text()
    assert "AutoModelForSequenceClassification.from_pretrained(folder)" in card and "PeftModel" not in card

    got = plain_transformers(out, run / "predictions" / "test_after.jsonl")
    assert not got["peft"] and not got["bitsandbytes"]
    assert got["pad_token_id"] is not None
    print(f"{arch} {variant}: max |p_export - p_run| = {got['max_diff']:.2e} (plain transformers, float32)")
    assert got["max_diff"] < 2e-3

    half = export_merged(run, tmp_path / "merged-bf16", dtype="bfloat16", check_rows=8)
    with safe_open(str(tmp_path / "merged-bf16" / "model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    assert half["parity"] < 5e-2  # bf16 weights: close, not exact


@pytest.mark.e2e
def test_the_mean_pooled_demo_exports_with_its_own_class_and_the_one_call_loader(tiny_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(tiny_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity: max |p_export - p_run| = " in printed and "over 48 test rows (float32)" in printed
    assert "note: no plain transformers class feeds a BERT head the mean of the token states" in printed
    assert "load: AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mean_pooled_bert" and "AutoModelForSequenceClassification" in config["auto_map"]
    card = (out / "README.md").read_text()
    assert card.index("Read this first") < card.index("Fine-tuned with QLoRA") and "trust_remote_code=True" in card

    rows = tiny_run / "predictions" / "test_after.jsonl"
    got = plain_transformers(out, rows, trust=True)
    assert not got["peft"] and not got["bitsandbytes"]
    assert got["class"] == "MeanPooledBertForSequenceClassification"
    assert got["refused"] and "trust_remote_code" in got["refused"]  # never loaded wrong without a word
    print(f"mean-pooled MiniLM: max |p_export - p_run| = {got['max_diff']:.2e} (plain transformers, float32)")
    assert got["max_diff"] < 2e-3

    want = [json.loads(line) for line in rows.read_text().splitlines()]
    probs = load_classifier(out, temperature=False).predict(want)  # the folder's code never runs here
    assert abs(probs - [r["probs"] for r in want]).max() < 2e-3

    # an export is replaced by the next one; another folder's files are never touched
    assert main(["export", str(tiny_run), "--out", str(out), "--epoch", "1", "--dtype", "float16"]) == 0
    merged = json.loads((out / "classifier.json").read_text())["merged"]
    assert (merged["epoch"], merged["dtype"]) == (1, "float16")
    assert "over 48 test rows (float16)" in capsys.readouterr().out  # epoch 1's own test probabilities


def test_export_refuses_what_it_cannot_write_before_loading_a_model(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-1").mkdir(parents=True)
    (run / "checkpoints" / "epoch-1" / "adapter_model.safetensors").write_bytes(b"")
    RunConfig().save(run / "config.json")
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1, "val_accuracy": 0.5}) + "\n")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")

    def error(*args) -> str:
        assert main(["export", *map(str, args)]) == 2
        return capsys.readouterr().err

    assert f"error: --out {taken} is a folder that holds other files" in error(run, "--out", taken)
    assert (taken / "notes.txt").read_text() == "mine"
    assert f"error: --out {taken / 'notes.txt'} is a file" in error(run, "--out", taken / "notes.txt")
    assert "error: run run has no checkpoint of epoch 4 (it has epoch-1)" in error(
        run, "--out", tmp_path / "m", "--epoch", 4
    )
    assert "error: run x has no trained adapter yet" in error(_empty_run(tmp_path / "x"), "--out", tmp_path / "m")
    with pytest.raises(SystemExit):
        main(["export", str(run), "--out", str(tmp_path / "m"), "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def _empty_run(run: Path) -> Path:
    run.mkdir()
    RunConfig().save(run / "config.json")
    (run / "metrics.jsonl").write_text("")
    return run


class RecordingApi:
    """huggingface_hub.HfApi as far as share.push_to_hub uses it, recording what it was given (the
    Hub is not reachable here): the folder's files are listed at upload time (it is temporary)."""

    uploads: list = []

    def __init__(self, token=None, **kw):
        pass

    def create_repo(self, repo_id, **kw):
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, folder_path, **kw):
        RecordingApi.uploads.append({**kw, "files": sorted(p.name for p in Path(folder_path).iterdir())})


def test_the_report_page_offers_the_merged_model_and_pushes_it(tiny_run, tmp_path, monkeypatch):
    import io
    import shutil
    import zipfile

    import huggingface_hub

    from core import share
    from tests.helpers import start

    root = tmp_path / "runs"
    run = Path(shutil.copytree(tiny_run, root / tiny_run.name))
    at = start(root, monkeypatch, page="report")
    assert "Download merged model" in [d.proto.label for d in at.get("download_button")]

    data = share.merged_zip(run, f"{run.name}-merged")
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path / "unzipped")
    folder = tmp_path / "unzipped" / f"{run.name}-merged"
    assert {"config.json", "model.safetensors", "classifier.json", "README.md", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    rows = [json.loads(line) for line in (run / "predictions" / "test_after.jsonl").read_text().splitlines()]
    assert abs(load_classifier(folder, temperature=False).predict(rows) - [r["probs"] for r in rows]).max() < 2e-3

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.uploads = []
    at = start(root, monkeypatch, page="report")
    at.radio(key="push_what").set_value("merged model").run()
    at.text_input(key="push_repo").set_value("me/nli-merged").run()
    at.button(key="push").click().run()
    assert [s.value for s in at.success] == ["Pushed to https://huggingface.co/me/nli-merged"]
    (upload,) = RecordingApi.uploads
    assert upload["repo_id"] == "me/nli-merged" and "model.safetensors" in upload["files"]
    assert not any(name.startswith("adapter") for name in upload["files"])
    assert upload["commit_message"].startswith(f"Upload the merged model of {run.name} epoch-")
