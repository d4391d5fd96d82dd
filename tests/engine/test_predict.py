"""`python -m core predict RUN --data FILE`: rows without labels scored with a run's model, streamed,
written as JSONL or CSV (every class probability, `correct` where a row has a gold label), CSV cells
that a spreadsheet would run as formulas neutralised, and the training's column mapping and
bad-input answers, given before any model loads."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from core import predict as predict_module
from core.__main__ import main
from core.config import RunConfig
from core.predict import predict_file
from core.text import csv_cell


def run_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "predictions" / "test_after.jsonl").read_text().splitlines()]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def fake_run(root: Path) -> Path:
    """A run folder with a config and an (empty) epoch-1 adapter file: enough for every check that
    comes before the model loads."""
    run = root / "run"
    (run / "checkpoints" / "epoch-1").mkdir(parents=True)
    (run / "checkpoints" / "epoch-1" / "adapter_model.safetensors").write_bytes(b"")
    RunConfig().save(run / "config.json")
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1, "val_accuracy": 0.5}) + "\n")
    return run


def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(predict_module, "load_run_model", refuse)


@pytest.mark.parametrize(
    "value, written",
    [
        ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'),
        ("+1", "'+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("a = b", "a = b"),
        (0.25, 0.25),
        (-1.5, -1.5),
        (True, True),
        (None, None),
    ],
)
def test_csv_cell_neutralises_what_a_spreadsheet_would_run(value, written):
    assert csv_cell(value) == written


def test_predict_scores_a_file_without_labels_as_the_run_did(tiny_run, tmp_path):
    rows = run_rows(tiny_run)
    data = write_csv(
        tmp_path / "new.csv",
        ["premise", "hypothesis"],
        [[r["premise"], r["hypothesis"]] for r in rows]
        + [['=HYPERLINK("http://evil.example","click")', "@cmd"], ["", "an empty premise is dropped"]],
    )
    out = tmp_path / "out" / "predicted.csv"
    seen = []
    predict_module.CHUNK_ROWS, before = 16, predict_module.CHUNK_ROWS  # several chunks: streamed
    try:
        result = predict_file(  # the run's own probabilities: not temperature-scaled
            tiny_run, data, out=out, progress=lambda done, speed: seen.append(done), temperature=False
        )
    finally:
        predict_module.CHUNK_ROWS = before
    assert seen == [16, 32, 48, 49]  # progress after every chunk
    assert result["n"] == len(rows) + 1 and result["labelled"] == 0 and result["accuracy"] is None
    assert result["dropped_empty"] == 1
    got = list(csv.DictReader(out.read_text(encoding="utf-8").splitlines()))
    labels = ["entailment", "neutral", "contradiction"]
    assert list(got[0]) == ["id", "premise", "hypothesis", "pred"] + [f"prob_{x}" for x in labels]
    for want, row in zip(rows, got):
        assert row["premise"] == want["premise"] and row["pred"] == want["pred"]
        probs = [float(row[f"prob_{x}"]) for x in labels]
        assert max(abs(a - b) for a, b in zip(probs, want["probs"])) < 1e-4  # the run's own probabilities
    assert got[-1]["premise"] == '\'=HYPERLINK("http://evil.example","click")'  # shown, never run
    assert got[-1]["hypothesis"] == "'@cmd"
    assert not list(out.parent.glob(".*tmp*"))  # written through a temporary file, renamed into place


def test_predict_adds_correct_where_rows_have_labels_and_writes_jsonl(tiny_run, tmp_path, capsys):
    rows = run_rows(tiny_run)[:12]
    data = tmp_path / "mixed.jsonl"
    lines = []
    for i, r in enumerate(rows):
        label = None if i % 3 == 0 else r["gold"]
        lines.append(
            json.dumps({"id": r["id"], "premise": r["premise"], "hypothesis": r["hypothesis"], "label": label})
        )
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["predict", str(tiny_run), "--data", str(data)]) == 0
    out = tiny_run / "predictions" / "mixed_predicted.jsonl"  # the default: inside the run folder
    try:
        printed = capsys.readouterr()
        assert "predicted 12 rows with epoch" in printed.out and str(out) in printed.out
        assert "accuracy" in printed.out and "on the 8 labelled" in printed.out
        assert "predict: 12 rows scored" in printed.err  # the progress line
        got = [json.loads(line) for line in out.read_text().splitlines()]
    finally:
        out.unlink(missing_ok=True)  # tiny_run is shared: leave it as it was
    for i, (want, row) in enumerate(zip(rows, got)):
        assert row["id"] == want["id"] and row["pred"] == want["pred"]
        assert list(row["probs"]) == ["entailment", "neutral", "contradiction"]
        assert abs(sum(row["probs"].values()) - 1) < 1e-3
        if i % 3 == 0:
            assert "gold" not in row and "correct" not in row
        else:
            assert row["gold"] == want["gold"] and row["correct"] == want["correct"]


def test_predict_gives_the_training_answers_to_bad_inputs_before_loading_a_model(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path)
    no_model(monkeypatch)

    def error(*args) -> str:
        assert main(["predict", *map(str, args)]) == 2
        return capsys.readouterr().err

    good = write_csv(tmp_path / "good.csv", ["premise", "hypothesis"], [["a", "b"]])
    assert "error: --out x.txt: the predictions are written as .jsonl or .csv" in error(
        run, "--data", good, "--out", "x.txt"
    )
    assert f"error: {tmp_path} is not a run folder (no config.json)" in error(tmp_path, "--data", good)
    assert "error: run run has no checkpoint of epoch 3 (it has epoch-1)" in error(run, "--data", good, "--epoch", 3)
    assert f"error: data file not found: {tmp_path / 'nope.csv'}" in error(run, "--data", tmp_path / "nope.csv")
    no_text = write_csv(tmp_path / "none.csv", ["a", "b"], [["x", "y"]])
    assert "found no premise/hypothesis columns and no text column; columns are ['a', 'b']" in error(
        run, "--data", no_text
    )
    unknown = write_csv(
        tmp_path / "unknown.csv", ["premise", "hypothesis", "label"], [["a", "b", "neutral"], ["c", "d", "maybe"]]
    )
    assert f"error: predict ({tmp_path / 'unknown.csv'}) row 2: unknown label 'maybe'" in error(run, "--data", unknown)
    empty = write_csv(tmp_path / "empty.csv", ["premise", "hypothesis"], [["", "b"]])
    assert "no usable rows to predict: of 1 rows, 1 have an empty premise, hypothesis or text" in error(
        run, "--data", empty
    )
    latin = tmp_path / "latin.csv"
    latin.write_bytes("premise,hypothesis\ncaf\xe9,b\n".encode("latin-1"))
    assert "line 2 is not UTF-8 text" in error(run, "--data", latin)
