"""Text from the data, the config and the run folder stays inert in every export: the Markdown
report (`core report`, Download Markdown, the bundle's report.md and methods.md), the model card,
the HTML report, predictions.csv and the CLI's terminal lines (core/text.py).

Markdown is checked by rendering it with a real CommonMark renderer (markdown-it-py, raw HTML on,
GitHub's tables and strikethrough) and finding no live element: no link, image, raw HTML,
emphasis or strikethrough that the file itself did not write, and no autolink literal (http://,
www., a@b) left for GitHub's renderer to find."""

import csv
import html.parser
import io
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from core.classifier import model_card
from core.config import get_preset
from core.results.bundle import build_bundle, methods_markdown, predictions_csv
from core.results.render import render_html, render_markdown
from core.results.report import build_report, load_report
from core.runs import rundir
from core.runs.state import write_status
from core.text import WORD_JOINER, code_span, csv_cell, markdown_text, terminal_text
from tests.helpers import ROOT

ESCAPES = "\x1b]8;;http://evil.example\x07link\x1b]8;;\x07 \x1b[2J\u202eabc\u2066"
EVIL = [
    "<script>alert(1)</script>",
    "[click](http://evil.example/x)",
    "![img](http://evil.example/a.png)",
    '<img src=x onerror="alert(1)">',
    "a`b`` <b>c</b>",
    "http://evil.example/bare www.evil.example a@evil.example",
    "**bold** _em_ ~~gone~~",
    "# heading",
    "[ref]: http://evil.example/ref",
    "&lt;b&gt; &#x3C;i>",
    "<http://evil.example/auto>",
    "| cell | break |",
    '=HYPERLINK("http://evil.example","x")',
    "line one\n\n# line two",
    ESCAPES,
]
LABELS = ["<b>ent</b>", "[neu](http://evil.example/n)", "=1+2`x"]


def markdown_live(md: str) -> dict:
    """What a CommonMark + GFM renderer makes of `md`: the inline and block token types, the code
    spans' contents, the headings, and the text a reader sees."""
    tokens = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).parse(md)
    kinds, codes, headings, text = set(), [], [], []
    for t in tokens:
        kinds.add(t.type)
        if t.type == "heading_open":
            headings.append(t.tag)
        for c in t.children or []:
            kinds.add(c.type)
            if c.type == "code_inline":
                codes.append(c.content)
            if c.type in ("text", "code_inline"):
                text.append(c.content)
    return {"kinds": kinds, "codes": codes, "headings": headings, "text": " ".join(text).replace(WORD_JOINER, "")}


LIVE = {"link_open", "image", "html_inline", "html_block", "em_open", "s_open", "autolink"}
AUTOLINK_LITERAL = re.compile(r"https?://|www\.|\w@\w", re.IGNORECASE)


def table_widths(md: str) -> set[int]:
    """How many different numbers of cell borders (pipes not escaped by an odd run of backslashes)
    the rows of each table have: {1} when no cell broke out of its row."""
    widths, current = set(), None
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            current = current or set()
            current.add(len(re.findall(r"(?<!\\)(?:\\\\)*\|", line)))
        elif current is not None:
            widths.add(len(current))
            current = None
    return widths


def assert_inert(md: str) -> dict:
    assert table_widths(md) <= {1}, "a cell broke out of its table row"
    got = markdown_live(md)
    assert not got["kinds"] & LIVE, got["kinds"] & LIVE
    assert not AUTOLINK_LITERAL.search(md), "an autolink literal GitHub would link"
    assert "\x1b" not in md and "\u202e" not in md and "\x07" not in md
    return got


def make_hostile_run(root: Path) -> Path:
    """A finished run whose config, metrics and predictions carry markup, links, formulas and escapes."""
    run = root / "20990101-000000-hostile"
    run.mkdir(parents=True)
    cfg = get_preset("demo").to_dict()
    cfg["data"]["labels"] = LABELS
    cfg["model"]["name"] = EVIL[0] + " " + EVIL[1]
    cfg["preset"] = EVIL[4]
    cfg["group"] = EVIL[2]
    rundir.atomic_write_json(run / "config.json", cfg)
    write_status(
        run,
        state="done",
        pid=None,
        created_at="2099-01-01T00:00:00+00:00",
        finished_at="2099-01-01T00:01:00+00:00",
        error=EVIL[3] + ESCAPES,
    )
    hardware = {"cpu": EVIL[5], "cpu_cores": 2, "ram_gb": 8.0, "gpus": [], "torch": EVIL[0]}
    m = run / "metrics.jsonl"
    rundir.append_jsonl(
        m,
        {
            "t": 1.0,
            "kind": "setup",
            "device": EVIL[6],
            "compute_dtype": EVIL[7],
            "labels": LABELS,
            "hardware": hardware,
            "epochs": 1,
        },
    )
    rows_before, rows_after = [], []
    for i, text in enumerate(EVIL * 2):
        gold = LABELS[i % 3]
        common = {
            "id": f"t{i}",
            "premise": text,
            "hypothesis": EVIL[-1 - i % len(EVIL)],
            "tag": EVIL[i % 4],
            "gold": gold,
        }
        before, after = LABELS[(i + 1) % 3], gold if i % 4 else LABELS[(i + 2) % 3]
        rows_before.append({**common, "pred": before, "probs": [0.2, 0.3, 0.5], "correct": before == gold})
        rows_after.append({**common, "pred": after, "probs": [0.7, 0.2, 0.1], "correct": after == gold})
    rundir.atomic_write_jsonl(rundir.predictions_file(run, "test", "before"), rows_before)
    rundir.atomic_write_jsonl(rundir.predictions_file(run, "test", "after"), rows_after)
    for stage, rows in (("before", rows_before), ("after", rows_after)):
        acc = sum(r["correct"] for r in rows) / len(rows)
        rundir.append_jsonl(
            m, {"t": 2.0, "kind": "eval", "split": "test", "stage": stage, "n": len(rows), "accuracy": acc}
        )
    rundir.append_jsonl(m, {"t": 3.0, "kind": "epoch", "epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5})
    rundir.append_jsonl(m, {"t": 4.0, "kind": "end", "state": "done", "total_s": 3.0, "best_epoch": 1})
    return run


@pytest.fixture
def hostile(tmp_path) -> Path:
    return make_hostile_run(tmp_path / "runs")


def test_the_text_helpers_make_every_hostile_text_inert():
    for text in EVIL + LABELS:
        md = f"**x** {markdown_text(text)} | {markdown_text(text, line_start=True)}\n\n{markdown_text(text, True)}\n"
        got = assert_inert(md)
        shown = " ".join(text.replace("\n", " ").split())
        assert " ".join(terminal_text(shown).split()) in " ".join(got["text"].split()), (text, got["text"])
        span = code_span(text)
        assert markdown_live(span)["codes"] == [terminal_text(text.replace("\n", " "))], (text, span)
    assert markdown_text("[27.6, 40.5] 3.1% +2.0 points") == "[27.6, 40.5] 3.1% +2.0 points"  # numbers stay readable
    assert markdown_text("1. x", line_start=True) == "1\\. x" and markdown_text("- x", line_start=True) == "\\- x"
    assert terminal_text("ok\x1b[31m red\u202e\n\tnext") == "ok\\x1b[31m red\\u202e\n\tnext"
    # OWASP: a cell that starts a formula gets a quote; numbers and other texts are left alone
    assert [csv_cell(v) for v in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "plain", 0.5, -2, True)] == [
        "'=1+1",
        "'+1",
        "'-1",
        "'@SUM(A1)",
        "'\tx",
        "'\rx",
        "plain",
        0.5,
        -2,
        True,
    ]


def test_the_markdown_report_renders_no_live_element(hostile):
    r = build_report(hostile)
    md = render_markdown(r)
    got = assert_inert(md)
    assert EVIL[4] in got["codes"]  # the preset with backticks stays one code span: no breaking out
    assert got["headings"].count("h1") == 1  # the report's own title only: "# heading" in the data is text
    for text in ("<script>alert(1)</script>", "[click](http://evil.example/x)", "<b>ent</b>", "=1+2`x"):
        assert text.replace("://", ":" + WORD_JOINER + "//") in markdown_live(md)["text"] or text in got["text"], text
    # the Download Markdown of the app reads report.json: the same, and its run id is the folder's
    rundir.atomic_write_json(hostile / "report.json", {**r, "run_id": "20990101-000000-original"})
    loaded, problem = load_report(hostile)
    assert problem is None and loaded["run_id"] == hostile.name
    assert_inert(render_markdown(loaded))


def test_the_methods_and_the_bundle_are_inert_and_predictions_csv_starts_no_formula(hostile):
    r = build_report(hostile)
    assert_inert(methods_markdown(r))
    z = zipfile.ZipFile(io.BytesIO(build_bundle(hostile)))
    for name in ("report.md", "methods.md", "README.md"):
        assert_inert(z.read(f"{hostile.name}/{name}").decode())
    text = z.read(f"{hostile.name}/predictions.csv").decode()
    assert text == predictions_csv(hostile, LABELS)[0]
    rows = list(csv.reader(io.StringIO(text)))
    assert "p_before_=1+2`x" in rows[0]  # headers built from labels: neutralised too (this one starts with p)
    cells = [c for row in rows for c in row]
    assert "'=1+2`x" in cells and '\'=HYPERLINK("http://evil.example","x")' in cells
    numbers = re.compile(r"-?\d+(\.\d+)?(e-?\d+)?")
    for cell in cells:
        assert not cell.startswith(("=", "+", "@", "\t", "\r")), cell
        assert not cell.startswith("-") or numbers.fullmatch(cell), cell  # only a negative number may


def test_the_html_report_holds_only_its_own_elements(hostile):
    class Tags(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.attrs, self.text = [], [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.attrs += [a for a in attrs if tag != "meta"]

        def handle_data(self, data):
            self.text.append(data)

    page = render_html(build_report(hostile))
    parsed = Tags()
    parsed.feed(page)
    assert set(parsed.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p"} | {
        "table",
        "tr",
        "th",
        "td",
        "b",
        "code",
    }, set(parsed.tags)
    assert not parsed.attrs
    shown = "".join(parsed.text).replace(WORD_JOINER, "")
    assert "<script>alert(1)</script>" in shown and "[click](http://evil.example/x)" in shown
    assert EVIL[4] in shown  # the code span's text, whole
    assert "\\<" not in shown  # the Markdown escapes are resolved, not shown


def test_the_model_card_renders_no_live_element():
    info = {
        "labels": LABELS,
        "base_model": EVIL[1] + " " + EVIL[4],
        "base_model_as_named": EVIL[2],
        "pooling": "cls",
        "max_length": 128,
        "input": {"template": EVIL[0] + " {premise} " + EVIL[3], "kind": "pair"},
        "head_init": {"head_init": "label-words", "words": [EVIL[5], EVIL[6]]},
        "base_weights_note": EVIL[7] + ESCAPES,
        "double_quant": True,
        "pad_token_id": 0,
    }
    card = model_card(info, epoch=1, validation=(0.8, 100), run_id="20990101-000000-hostile", test=(0.7, 100))
    got = markdown_live(card)
    assert not got["kinds"] & LIVE, got["kinds"] & LIVE
    assert "\x1b" not in card and "\u202e" not in card
    assert got["headings"].count("h1") == 1
    assert EVIL[1] + " " + EVIL[4] in got["codes"] and "=1+2`x" in got["codes"]  # whole code spans


@pytest.mark.e2e
def test_the_cli_prints_no_escape_sequence_from_the_data(hostile, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "core", "report", str(hostile)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\u202e" not in proc.stdout and "\x07" not in proc.stdout
    assert "\\x1b]8;;" in proc.stdout  # shown, written out
    missing = tmp_path / f"run{ESCAPES}"
    for cmd in (["report", str(missing)], ["evaluate", str(missing), "--data", str(missing / "x.jsonl")]):
        proc = subprocess.run(
            [sys.executable, "-m", "core", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
        assert "\x1b" not in proc.stderr and "\u202e" not in proc.stderr and "\\x1b" in proc.stderr, proc.stderr


def test_report_json_for_the_app_keeps_the_folder_name(hostile, tmp_path):
    copy = tmp_path / "copies" / "20990101-000000-copied"
    copy.parent.mkdir()
    import shutil

    rundir.atomic_write_json(hostile / "report.json", build_report(hostile))
    shutil.copytree(hostile, copy)
    assert json.loads((copy / "report.json").read_text())["run_id"] == hostile.name
    assert load_report(copy)[0]["run_id"] == copy.name  # the links of a copied run point at the copy
