"""The report's statistics sections (core/results/sections.py, core/results/render.py, core/results/bundle.py) and the
Report and Failures pages that draw them, on a run folder written by hand whose counts are known:
n = 204 test rows, 69 right before and 161 after, 13 regressed and 105 fixed (McNemar p about
5e-19, tested in tests/results/test_stats.py), three kinds of hypothesis (68 rows each) for the slices,
confidences chosen so that the ECE can be written down, and per-epoch test probabilities in
predictions/dynamics.jsonl. Then the same on the real tiny run (conftest's `tiny_run`)."""

import csv
import io
import json
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.config import get_preset
from core.results import sections, slices, stats
from core.results.bundle import MEMBERS, PACKAGES, build_bundle
from core.results.render import render_html, render_markdown
from core.results.report import build_report, damaged_files, load_report
from core.results.seeds import group_summary
from core.runs import rundir
from core.runs.state import write_status
from tests.helpers import ROOT, text_of
from tests.helpers import start as start_app

LABELS = ["entailment", "neutral", "contradiction"]
E, N, C = LABELS
RUN_ID = "20990101-000000-stats"
# (premise, hypothesis, tag): high overlap / short / no negation; low / long / negation; medium / medium / none
KINDS = [
    ("A man is riding a red bike.", "A man rides a bike.", "lexical"),
    ("Two dogs run on the beach.", "The cat is not sleeping on the sofa today.", "negation"),
    ("A woman is cooking dinner in a small kitchen.", "The woman is cooking lunch outside.", "paraphrase"),
]
# (category, gold, pred before, pred after, how many)
PLAN = [
    ("still right", E, E, E, 20),
    ("still right", N, N, N, 18),
    ("still right", C, C, C, 18),
    ("regressed", N, N, E, 13),
    ("fixed", E, N, E, 35),
    ("fixed", N, C, N, 35),
    ("fixed", C, E, C, 35),
    ("still failing", C, E, E, 10),
    ("still failing", C, N, E, 20),
]
PROMPT = "{premise}\nQuestion: {hypothesis} Yes, Maybe, or No?\nAnswer:"
WORDS = [" Yes", " Maybe", " No"]


def probs(pred: str, conf: float) -> list[float]:
    p = [round((1 - conf) / 2, 5)] * 3
    p[LABELS.index(pred)] = conf
    return p


def plan_rows() -> list[dict]:
    """One dict per test row: id, texts, gold, preds and confidences before / epoch 1 / after."""
    rows, i = [], 0
    for category, gold, before, after, count in PLAN:
        for j in range(count):
            premise, hypothesis, tag = KINDS[i % 3]
            conf_after = 0.9 if after == gold else 0.6
            epoch1 = after
            if category == "still failing" and before == E:  # 10 confidently contradicted ...
                conf_after = 0.95
                epoch1 = N if j < 5 else after  # ... 5 of them consistently (epochs 1 and 2)
            if category == "still right" and gold == E and j < 6:
                epoch1 = N  # right, wrong at epoch 1, right again: forgotten once
            rows.append(
                {
                    "id": f"t{i:03d}",
                    "premise": premise,
                    "hypothesis": hypothesis,
                    "tag": tag,
                    "gold": gold,
                    "before": before,
                    "after": after,
                    "epoch1": epoch1,
                    "conf_after": conf_after,
                    "category": category,
                }
            )
            i += 1
    return rows


def prediction(r: dict, pred: str, conf: float) -> dict:
    return {
        "id": r["id"],
        "premise": r["premise"],
        "hypothesis": r["hypothesis"],
        "tag": r["tag"],
        "gold": r["gold"],
        "pred": pred,
        "correct": pred == r["gold"],
        "probs": probs(pred, conf),
    }


def make_stats_run(root: Path, run_id: str = RUN_ID, seed: int = 0, group: str | None = None) -> Path:
    run = root / run_id
    run.mkdir(parents=True)
    get_preset("demo").save(run / "config.json")
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["seed"], cfg["group"], cfg["train"]["epochs"] = seed, group, 2
    (run / "config.json").write_text(json.dumps(cfg))
    write_status(
        run,
        state="done",
        pid=None,
        created_at="2099-01-01T00:00:00+00:00",
        started_at="2099-01-01T00:00:00+00:00",
        finished_at="2099-01-01T00:01:00+00:00",
    )
    rows = plan_rows()
    before = [prediction(r, r["before"], 0.5) for r in rows]
    after = [prediction(r, r["after"], r["conf_after"]) for r in rows]
    zero = [prediction(r, r["gold"] if i % 2 else E, 0.7) for i, r in enumerate(rows)]
    epoch1 = [probs(r["epoch1"], r["conf_after"]) for r in rows]
    pred_dir = run / "predictions"
    rundir.atomic_write_jsonl(pred_dir / "test_before.jsonl", before)
    rundir.atomic_write_jsonl(pred_dir / "test_after.jsonl", after)
    rundir.atomic_write_jsonl(pred_dir / "test_zero_shot.jsonl", zero)
    ids = [r["id"] for r in rows]
    dyn = pred_dir / "dynamics.jsonl"
    rundir.append_jsonl(dyn, {"split": "validation", "epoch": 0, "ids": ["v0", "v1"], "probs": [[0.4, 0.3, 0.3]] * 2})
    rundir.append_jsonl(dyn, {"split": "test", "epoch": 0, "ids": ids, "probs": [b["probs"] for b in before]})
    rundir.append_jsonl(
        dyn, {"split": "test", "epoch": 1, "ids": ids, "probs": [probs(E, 0.99)] * len(ids)}
    )  # replaced
    rundir.append_jsonl(dyn, {"split": "test", "epoch": 1, "ids": ids, "probs": epoch1})  # a resume redid epoch 1
    rundir.append_jsonl(dyn, {"split": "test", "epoch": 2, "ids": ids, "probs": [a["probs"] for a in after]})
    m = run / "metrics.jsonl"
    t = 4102444800.0
    rundir.append_jsonl(
        m,
        {
            "t": t,
            "kind": "setup",
            "device": "cpu",
            "compute_dtype": "float32",
            "labels": LABELS,
            "hardware": {"cpu": "x86_64", "cpu_cores": 2, "ram_gb": 8.0, "gpus": [], "torch": "2"},
            "params": {"total": 1000, "packed": 800, "trainable": 50},
            "epochs": 2,
            "data": {s: {"used": n} for s, n in (("train", 600), ("validation", 60), ("test", 204))},
        },
    )
    for stage, rs in (("before", before), ("zero-shot", zero), ("after", after)):
        rundir.append_jsonl(
            m,
            {
                "t": t + 1,
                "kind": "eval",
                "split": "test",
                "stage": stage,
                "n": 204,
                "accuracy": sum(r["correct"] for r in rs) / 204,
                "seconds": 1.0,
                **({"prompt": PROMPT, "words": WORDS} if stage == "zero-shot" else {}),
            },
        )
    for epoch in (1, 2):
        rundir.append_jsonl(
            m,
            {
                "t": t + 2,
                "kind": "epoch",
                "epoch": epoch,
                "train_loss": 1.0 / epoch,
                "val_accuracy": 0.5 + 0.1 * epoch,
                "val_loss": 1.0,
                "epoch_s": 10.0,
            },
        )
    rundir.append_jsonl(m, {"t": t + 3, "kind": "end", "state": "done", "total_s": 30.0, "best_epoch": 2})
    return run


@pytest.fixture
def stats_run(tmp_path) -> Path:
    return make_stats_run(tmp_path / "runs")


def fixed_ids() -> list[str]:
    return [r["id"] for r in plan_rows() if r["category"] == "fixed"]


# --- core: build_report's sections --------------------------------------------------------------


def test_build_report_on_a_hand_made_run_gives_the_known_numbers(stats_run):
    r = build_report(stats_run)
    ch = r["change"]
    assert (ch["n"], ch["b"], ch["c"]) == (204, 13, 105)
    assert ch["before"]["k"] == 69 and ch["after"]["k"] == 161
    assert ch["p"] == pytest.approx(4.764406071312224e-19, rel=1e-9)  # the known value of test_stats.py
    assert ch["verdict"] == "significant at 5%"
    boot = stats.paired_bootstrap(
        [r["before"] == r["gold"] for r in plan_rows()], [r["after"] == r["gold"] for r in plan_rows()]
    )
    assert ch["ci95"] == boot["ci95"] and ch["mdc"] == stats.minimum_detectable_change(204, 69 / 204)
    lo_b, hi_b = stats.wilson(69, 204)
    lo_a, hi_a = stats.wilson(161, 204)
    assert r["headline"] == (
        f"Fine-tuning raised test accuracy from 33.8% [{100 * lo_b:.1f}, {100 * hi_b:.1f}] to 78.9% "
        f"[{100 * lo_a:.1f}, {100 * hi_a:.1f}] (n = 204): +45.1 points, 95% CI [{100 * boot['ci95'][0]:+.1f}, "
        f"{100 * boot['ci95'][1]:+.1f}]; McNemar p = 5e-19: significant at 5%."
    )
    assert "smallest gain this test set detects" in ch["note"]

    # two baselines, same rows
    base = r["baselines"]
    assert base["random_head"]["accuracy"] == 69 / 204 and base["random_head"]["ci95"] == [lo_b, hi_b]
    assert "reference script" in base["random_head"]["what"]
    z = base["zero_shot"]
    assert (z["n"], z["k"]) == (204, 102 + sum(1 for i, x in enumerate(plan_rows()) if i % 2 == 0 and x["gold"] == E))
    assert z["prompt"] == PROMPT and z["words"] == WORDS and z["change"]["n"] == 204
    assert base["fine_tuned"]["k"] == 161

    # transitions: the 2x2 table and the label moves
    t = r["transitions"]
    assert t["table"] == [[56, 13], [105, 30]]
    assert t["cells"] == {"still right": 56, "regressed": 13, "fixed": 105, "still failing": 30}
    assert t["counts"] == [[30, 0, 35], [68, 18, 0], [0, 35, 18]]
    assert t["moves"][0] == {"from": N, "to": E, "count": 68}
    assert {(m["from"], m["to"], m["count"]) for m in t["moves"][1:]} == {(E, C, 35), (C, N, 35)}

    # calibration: every before row at confidence 0.5; after: 161 right at 0.9, 33 wrong at 0.6, 10 wrong at 0.95
    cal = r["calibration"]
    assert cal["before"]["ece"] == pytest.approx(abs(0.5 - 69 / 204))
    assert cal["after"]["ece"] == pytest.approx((161 * 0.1 + 33 * 0.6 + 10 * 0.95) / 204)
    assert cal["zero_shot"]["ece"] is not None

    # slices: three kinds of hypothesis, 68 rows each
    by_name = {s["slice"]: s for s in r["slices"]}
    assert by_name["negation: yes"]["n"] == 68 and by_name["negation: no"]["n"] == 136
    for name in (
        "overlap: <0.34",
        "overlap: 0.34-0.67",
        "overlap: >=0.67",
        "length: short (<=5 words)",
        "length: medium (6-8 words)",
        "length: long (>=9 words)",
        "tag: lexical",
        "tag: negation",
    ):
        assert by_name[name]["n"] == 68, name
    assert by_name["tag: negation"]["group"] == "tag"
    assert by_name["negation: yes"]["ci95_after"] == pytest.approx(
        list(stats.wilson(round(68 * by_name["negation: yes"]["accuracy_after"]), 68))
    )

    # per-class F1 change: stats.per_class_f1_change on the same rows
    before, after = (
        rundir.read_predictions(stats_run / "predictions" / f"test_{s}.jsonl")[0] for s in ("before", "after")
    )
    assert r["per_class_change"] == stats.per_class_f1_change(before, after, LABELS)

    # label-noise hints: 10 still-failing rows at p = 0.95, 5 of them contradicted at epoch 1 too
    hints = r["noise_hints"]
    assert len(hints) == 5 and all(h["given"] == C and h["model_label"] == E for h in hints)
    assert all(h["consistent_epochs"] == 2 and h["confidence"] == 0.95 for h in hints)
    assert hints[0]["hypothesis"] in [k[1] for k in KINDS]

    # dynamics: epoch 1 is the last record of it (a resumed run wrote it twice)
    d = r["dynamics"]
    assert d["epochs"] == [0, 1, 2] and d["n"] == 204
    assert (d["never_learned"], d["forgotten"], d["unforgettable"]) == (30, 13 + 6, 204 - 30 - 19)
    assert d["learned_at"] == {"0": 69, "1": 105, "2": 0, "never": 30}
    assert r["group"] is None
    json.dumps(rundir.json_safe(r), allow_nan=False)
    assert sections.sections_problem(json.loads(json.dumps(r))) is None


def test_exported_markdown_and_html_carry_the_intervals_p_value_and_ece(stats_run):
    r = build_report(stats_run)
    md = render_markdown(r)
    assert f"**{r['headline']}**" in md
    lo, hi = stats.wilson(69, 204)
    assert f"| random-head baseline | 33.8% | [{100 * lo:.1f}, {100 * hi:.1f}] | 69 / 204 |" in md
    assert "| McNemar exact p (two-sided) | 5e-19 |" in md and "| verdict | significant at 5% |" in md
    assert f"{100 * r['change']['ci95'][0]:+.1f}" in md
    assert f"| before | {r['calibration']['before']['ece']:.3f} | 204 |" in md
    assert f"| after | {r['calibration']['after']['ece']:.3f} | 204 |" in md
    assert "| negation | yes | 68 |" in md and "## Transitions" in md and "| wrong | 105 | 30 |" in md
    assert "Zero-shot prompt: `{premise}\\nQuestion:" in md
    assert "## Label-noise hints (hints, not facts)" in md and "## Per-class F1 change" in md
    html = render_html(r)
    assert "5e-19" in html and "<h2>Calibration</h2>" in html and "<script" not in html


def test_a_model_without_zero_shot_says_why_and_old_reports_get_the_sections(stats_run):
    (stats_run / "predictions" / "test_zero_shot.jsonl").unlink()
    rundir.append_jsonl(
        stats_run / "metrics.jsonl",
        {"t": 1.0, "kind": "baseline", "name": "zero-shot", "why_not": "bert is an encoder: no next word"},
    )
    r = build_report(stats_run)
    assert r["baselines"]["zero_shot"]["why_not"] == "bert is an encoder: no next word"
    assert "zero_shot" not in r["calibration"]
    assert (
        "| zero-shot baseline | none |  |  | no such baseline: bert is an encoder: no next word |" in render_markdown(r)
    )
    # a report.json written before these sections: load_report adds them from the run's files
    old = {k: v for k, v in r.items() if k not in sections.SECTION_KEYS and k != "group"}
    rundir.atomic_write_json(stats_run / "report.json", old)
    loaded, problem = load_report(stats_run)
    assert problem is None and loaded["transitions"] == r["transitions"] and loaded["headline"] == r["headline"]


def test_damaged_dynamics_zero_shot_and_sections_never_crash(stats_run, monkeypatch):
    pred = stats_run / "predictions"
    with open(pred / "dynamics.jsonl", "ab") as f:
        f.write(
            b'garbage\n{"split": "test", "epoch": 2, "ids": ["t000"], "probs": [[0.5, "x", 0.5]]}\n'
            b'{"split": "test", "epoch": 3, "ids": ["t000", "t001"], "probs": [[1, 0, 0]]}\n\xff\xfe\n'
        )
    (pred / "test_zero_shot.jsonl").write_bytes(b'{"id": "t000", "gold": 5}\nnot json\n')
    r = build_report(stats_run)
    assert r["dynamics"]["epochs"] == [0, 1, 2] and len(r["noise_hints"]) == 5
    assert "why_not" in r["baselines"]["zero_shot"]
    assert any("dynamics.jsonl" in d for d in damaged_files(stats_run))
    # a report.json whose sections have the wrong types is rebuilt, with one line saying why
    bad = json.loads(json.dumps(rundir.json_safe(r)))
    bad["transitions"]["counts"] = [[1, 2], [3]]
    rundir.atomic_write_json(stats_run / "report.json", bad)
    loaded, problem = load_report(stats_run)
    assert problem == 'report.json: "transitions" is malformed (rebuilt from the run\'s other files)'
    assert loaded["transitions"]["counts"] == r["transitions"]["counts"]
    at = start(monkeypatch, stats_run.parent, "report")
    assert any("transitions" in w.value for w in at.warning)
    # no dynamics at all: the Failures page falls back to before and after
    (pred / "dynamics.jsonl").unlink()
    at = start(monkeypatch, stats_run.parent, "failures")
    assert "Recorded epochs: 0, 2" in text_of(at)


def test_trajectory_of_one_example():
    dyn = {
        "test": {
            0: {"ids": ["a", "b"], "probs": [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]},
            1: {"ids": ["b", "a"], "probs": [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]]},
            2: {"ids": ["a", "b"], "probs": [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]]},
        }
    }
    t = sections.example_trajectory(dyn, "a", E, LABELS)
    assert t["epochs"] == [0, 1, 2] and t["p_gold"] == [0.6, 0.2, 0.9] and t["pred"] == [E, N, E]
    assert t["first_learned"] == 0 and t["forgetting_events"] == 1 and t["forgotten_at"] == [1]
    assert sections.example_trajectory(dyn, "b", E, LABELS)["first_learned"] == 1
    assert sections.example_trajectory(dyn, "zz", E, LABELS) is None
    assert sections.format_p(4.764406071312224e-19) == "5e-19" and sections.format_p(0.0004) == "4e-4"
    assert sections.format_p(0.0312) == "0.031" and sections.format_p(1.0) == "1"


# --- seeds --------------------------------------------------------------------------------------


def test_a_group_of_seeds_shows_mean_std_agreement_and_which_seed(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    runs = [make_stats_run(root, f"g-seed{s}", seed=s, group="g") for s in (0, 1, 2)]
    for run in runs[1:]:  # seeds 1 and 2 get one more row wrong each
        rows = rundir.read_predictions(run / "predictions" / "test_after.jsonl")[0]
        rows[0] = {**rows[0], "pred": N, "correct": False, "probs": probs(N, 0.9)}
        rundir.atomic_write_jsonl(run / "predictions" / "test_after.jsonl", rows)
    for run in runs:
        rundir.atomic_write_json(run / "report.json", build_report(run))
    r = build_report(runs[0], group=group_summary(runs[0]))
    g = r["group"]
    assert g["finished"] == 3 and [x["seed"] for x in g["runs"]] == [0, 1, 2]
    assert g["accuracy_after"] == slices.seed_summary([161 / 204, 160 / 204, 160 / 204])
    assert g["agreement"] == pytest.approx(203 / 204) and g["runs"][1]["checkpoint"] == "g-seed1/checkpoints/epoch-2"
    md = render_markdown(r)
    assert "## Several seeds (group g: 3 finished)" in md and "| g-seed1 | 1 | done | 2 |" in md
    at = start(monkeypatch, root, "report", run="g-seed1")
    assert "Several seeds: group `g`" in text_of(at)
    seeds = next(d.value for d in at.dataframe if "seed" in d.value.columns)
    assert list(seeds["seed"]) == [0, 1, 2]


# --- the bundle ---------------------------------------------------------------------------------


def test_the_bundle_holds_config_environment_hashes_predictions_and_methods(stats_run, tmp_path):
    z = zipfile.ZipFile(io.BytesIO(build_bundle(stats_run)))
    assert z.namelist() == [f"{RUN_ID}/{m}" for m in MEMBERS]

    def read(m: str) -> str:
        return z.read(f"{RUN_ID}/{m}").decode()

    assert json.loads(read("config.json")) == json.loads((stats_run / "config.json").read_text())
    env = json.loads(read("environment.json"))
    assert list(env["packages"]) == list(PACKAGES) and env["packages"]["numpy"]
    assert env["seeds"]["train.seed"] == 0 and env["hardware"]["cpu_cores"] == 2
    data = json.loads(read("data.json"))
    import hashlib

    sample = ROOT / "assets" / "nli_sample" / "test.jsonl"
    assert data["splits"]["test"]["sha256"] == hashlib.sha256(sample.read_bytes()).hexdigest()
    assert data["test_rows"] == 204
    table = list(csv.DictReader(io.StringIO(read("predictions.csv"))))
    assert list(table[0]) == (
        ["id", "premise", "hypothesis", "tag", "gold", "pred_before", "pred_after", "correct_before", "correct_after"]
        + [f"p_before_{l}" for l in LABELS]
        + [f"p_after_{l}" for l in LABELS]
        + ["pred_zero_shot"]
        + [f"p_zero_shot_{l}" for l in LABELS]
    )
    assert len(table) == 204 and table[0]["id"] == "t000" and table[0]["p_after_entailment"] == "0.9"
    methods = read("methods.md")
    assert "# Methods" in methods and "Wilson 95% intervals" in methods and "McNemar" in methods
    assert "| random-head baseline | 33.8% |" in methods and "5e-19" in methods
    assert build_report(stats_run)["headline"] in read("report.md")
    # the same from the command line
    from core.__main__ import main

    assert main(["report", str(stats_run), "--bundle", str(tmp_path / "b.zip")]) == 0
    assert zipfile.ZipFile(tmp_path / "b.zip").namelist() == z.namelist()


# --- the pages ----------------------------------------------------------------------------------


def start(monkeypatch, root: Path, page: str, run: str = RUN_ID, **params) -> AppTest:
    return start_app(root, monkeypatch, page=page, run=run, params=params)


def test_report_page_shows_the_statistics_sections(stats_run, monkeypatch):
    r = build_report(stats_run)
    rundir.atomic_write_json(stats_run / "report.json", r)
    at = start(monkeypatch, stats_run.parent, "report")
    text = text_of(at)
    assert f"**{r['headline']}**" in text
    for title in (
        "Baselines on the same test rows",
        "The change and its uncertainty",
        "Transitions: where the test",
        "Calibration",
        "Slices: accuracy by phenomenon",
        "Learning dynamics and label-noise hints",
    ):
        assert title in text, title
    m = {x.label: x.value for x in at.metric}
    assert m["McNemar p"] == "5e-19" and m["Change"] == "+45.1 points"
    assert m["ECE before"] == f"{r['calibration']['before']['ece']:.3f}"
    assert m["ECE after"] == f"{r['calibration']['after']['ece']:.3f}"
    frames = [d.value for d in at.dataframe]
    base = next(f for f in frames if "what" in f.columns)
    assert list(base["model"]) == ["random-head baseline", "zero-shot baseline", "fine-tuned (best epoch 2)"]
    assert "{premise}" in "\n".join(c.value for c in at.code)
    slice_table = next(f for f in frames if "slice" in f.columns)
    assert sum(slice_table[slice_table["group"] == "tag"]["n"]) == 204
    assert len(next(f for f in frames if "model says" in f.columns)) == 5
    links = {p.proto.label: p.proto for p in at.get("page_link")}
    assert "105 fixed" in links and "13 regressed" in links and "neutral → entailment: 68" in links
    assert "cell=fixed" in links["105 fixed"].query_string
    titles = [json.loads(s.proto.spec)["layout"]["title"]["text"] for s in at.get("plotly_chart")]
    assert "Reliability diagram (accuracy per confidence bin)" in titles
    assert [d.proto.label for d in at.get("download_button")][-1] == "Download reproducibility bundle"


def test_failures_page_follows_the_report_links(stats_run, monkeypatch):
    at = start(monkeypatch, stats_run.parent, "failures", cell="fixed")
    table = at.dataframe[0].value
    assert sorted(table["id"]) == sorted(fixed_ids()) and set(table["category"]) == {"fixed"}
    assert "cell" not in at.query_params  # applied once: the filters are the user's again
    at.radio(key="fail_category").set_value("all").run()
    assert len(at.dataframe[0].value) == 204

    at = start(monkeypatch, stats_run.parent, "failures", move="neutral->entailment")
    table = at.dataframe[0].value
    assert len(table) == 68 and set(table["before"]) == {N} and set(table["after"]) == {E}

    at = start(monkeypatch, stats_run.parent, "failures", hints="1")
    table = at.dataframe[0].value
    assert len(table) == 5 and set(table["category"]) == {"still failing"}
    assert "Label-noise hint, not a fact" in text_of(at)


def test_failures_page_shows_when_an_example_was_learned_or_forgotten(stats_run, monkeypatch):
    forgotten = next(r for r in plan_rows() if r["category"] == "still right" and r["epoch1"] != r["gold"])
    at = start(monkeypatch, stats_run.parent, "failures")
    at.text_input(key="fail_search").set_value(forgotten["id"]).run()
    text = text_of(at)
    assert "Already right before training." in text and "Forgotten at epoch 1" in text
    traj = next(
        json.loads(s.proto.spec)
        for s in at.get("plotly_chart")
        if json.loads(s.proto.spec)["layout"]["title"]["text"].startswith("p(gold) per epoch")
    )
    assert traj["data"][0]["x"] == [0, 1, 2] and traj["data"][0]["y"][0] == 0.5
    fixed = fixed_ids()[0]
    at.text_input(key="fail_search").set_value(fixed).run()
    assert "Learned at epoch 1." in text_of(at) and "Never forgotten." in text_of(at)


# --- the real tiny run --------------------------------------------------------------------------


def test_the_tiny_run_report_has_the_new_sections(tiny_run, tmp_path):
    stored = json.loads((tiny_run / "report.json").read_text())
    r = build_report(tiny_run)
    for key in sections.SECTION_KEYS + ("group",):
        assert key in r and key in stored, key
    assert r["headline"].startswith("Fine-tuning ") and "(n = 48)" in r["headline"]
    assert r["transitions"]["n"] == 48 and sum(sum(row) for row in r["transitions"]["counts"]) == 48
    assert r["baselines"]["zero_shot"]["why_not"].startswith("bert is an encoder")  # the embedded model
    assert r["dynamics"]["epochs"] == [0, 1, 2]
    assert sections.sections_problem(stored) is None and load_report(tiny_run)[1] is None
    names = zipfile.ZipFile(io.BytesIO(build_bundle(tiny_run))).namelist()
    assert names == [f"{tiny_run.name}/{m}" for m in MEMBERS]
    print("tiny_run headline:", r["headline"])


def test_the_results_modules_never_import_streamlit():
    for name in ("sections", "bundle", "render", "report", "seeds", "slices", "stats", "compare"):
        src = (ROOT / "core" / "results" / f"{name}.py").read_text()
        assert "import streamlit" not in src and "from streamlit" not in src, name
