"""Uploaded files (core/uploads.py) and launching a run on them (core/jobs.py): safe names, refused
types, parsing like the trainer, the config pointing at the saved files. No Streamlit, no training."""

import json
from pathlib import Path

import pytest

from core import jobs, uploads
from core.config import get_preset
from core.runs.state import read_status

# --- uploads ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, safe",
    [
        ("train.csv", "train.csv"),
        ("../../etc/passwd.jsonl", "passwd.jsonl"),
        ("C:\\Users\\me\\my data.CSV", "my_data.csv"),
        ("a b;rm -rf.jsonl", "a_b_rm_-rf.jsonl"),
        (".hidden.tsv", "hidden.tsv"),
        ("..csv", "data.csv"),
    ],
)
def test_safe_filename(name, safe):
    assert uploads.safe_filename(name) == safe


@pytest.mark.parametrize("name", ["model.exe", "noext", "data.csv.sh"])
def test_unsupported_upload_types_are_refused(name):
    with pytest.raises(ValueError, match="unsupported file type"):
        uploads.safe_filename(name)


def test_uploads_parse_like_the_trainer_and_stay_inside_the_run(tmp_path):
    rows = uploads.read_upload("x.csv", b"sentence1,sentence2,gold_label\nA,B,neutral\n")
    assert rows == [{"sentence1": "A", "sentence2": "B", "gold_label": "neutral"}]
    assert uploads.guess_columns(list(rows[0])) == {
        "premise": "sentence1",
        "hypothesis": "sentence2",
        "label": "gold_label",
        "text": None,
    }
    with pytest.raises(ValueError, match="not valid JSON"):
        uploads.read_upload("x.jsonl", b'{"a": 1}\n{oops\n')
    saved = uploads.save_uploads(tmp_path / "run", {"train": ("../../../x.jsonl", b"{}\n")})
    assert Path(saved["train"]) == tmp_path / "run" / "uploads" / "train-x.jsonl"


def test_launch_with_uploads_points_the_config_at_the_saved_files(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_STUDIO_RUNS", str(tmp_path))
    started = []
    monkeypatch.setattr(jobs.subprocess, "Popen", lambda args, **kw: started.append(args))
    run = jobs.launch_with_uploads(get_preset("demo"), {"train": ("t.jsonl", b"{}\n"), "test": ("e.csv", b"a\n1\n")})
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["source"] == "files" and cfg["data"]["validation"] is None
    assert cfg["data"]["train"] == str(run / "uploads" / "train-t.jsonl")
    assert cfg["data"]["test"] == str(run / "uploads" / "test-e.csv")
    assert read_status(run)["state"] == "queued" and started and started[0][-1] == str(run)
    with pytest.raises(ValueError, match="already holds a run"):
        jobs.launch(get_preset("demo"), run_dir=run)
