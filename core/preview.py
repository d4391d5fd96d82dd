"""A look at the data before training: what the trainer will see in each split, computed cheaply.

    look = preview(cfg, tokenizer)                                   # the splits cfg.data names
    look = preview(cfg, tokenizer, sources={"train": rows, ...})     # rows already in memory (uploads)
    look["splits"]["train"]["label_counts"], look["duplicates"], look["imbalanced"], look["notes"]

Per split: the rows read and those kept after dropping (no gold label, an empty text), the class
balance, a histogram of token lengths and how many rows data.max_length would cut, and a few
example rows; between splits, the pairs (premise + hypothesis, or the text) that appear in two of
them, a test row seen in training being the usual leak. Everything goes through the trainer's own
mapping (core.data: the split's source, iter_examples, the validation carve, prompt_for,
tokenize), so what the preview shows is what a run gets.

Cheap on a large split: at most `scan` rows of a split are read (the first ones: a stream is never
read whole, so the 550k rows of SNLI's train file cost the first 20,000), and `sample` of the kept
rows, chosen by seed, are tokenised. Each split says what was read ("complete", "rows_read", and
"total_rows" where a local JSONL file is cheap to count by lines); counts and duplicates over a
partial scan are of the rows read. No streamlit here: app_pages/preview.py draws it.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .config import RunConfig
from .data import Example, SplitStats, _split_source, carve_validation, iter_examples, prompt_for, tokenize

SPLITS = ("train", "validation", "test")
SCAN = 20_000  # rows read per split, at most
SAMPLE = 2_000  # rows tokenised per split, at most
EXAMPLES = 3  # example rows shown per split
BINS = 20  # bars of the token-length histogram
IMBALANCE = 2.0  # largest class over the smallest above this: the Train page offers balanced class weights


def _key(e: Example) -> str:
    """A row's text for finding duplicates: case and runs of spaces ignored."""
    text = e.text if e.text else f"{e.premise}\t{e.hypothesis}"
    return re.sub(r"\s+", " ", text).strip().casefold()


def _total_rows(cfg: RunConfig, split: str) -> int | None:
    """Rows of the split's file when that is cheap (a local JSONL: its lines, counted a megabyte at
    a time), else None."""
    path = getattr(cfg.data, split)
    if not path or Path(path).suffix.lower() not in (".jsonl", ".ndjson"):
        return None
    lines, last = 0, b""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                lines += chunk.count(b"\n")
                last = chunk
    except OSError:
        return None
    return lines + (1 if last and not last.endswith(b"\n") else 0)  # a last line without its newline


def _read(
    rows: Iterable[dict], cfg: RunConfig, split: str, where: str | None, scan: int
) -> tuple[list, SplitStats, bool]:
    """(the kept Examples of the first `scan` raw rows, their SplitStats, whether that was every row)."""
    stats = SplitStats()
    rows = iter(rows)
    head = itertools.islice(rows, scan)
    examples = list(iter_examples(head, cfg.data, split, where, stats))
    complete = next(rows, None) is None
    stats.kept = len(examples)
    return examples, stats, complete


def _lengths(examples: list[Example], cfg: RunConfig, tokenizer, sample: int, seed: int) -> dict:
    """Token lengths of up to `sample` seeded rows through the run's input, untruncated: the
    histogram (BINS bars from 0 to the longest row or max_length) and how many max_length cuts."""
    chosen = examples if len(examples) <= sample else random.Random(seed).sample(examples, sample)
    prompt = prompt_for(cfg.data, tokenizer, text=bool(chosen[0].text))
    lengths = np.array([len(ids) for ids in tokenize(prompt, chosen, tokenizer, 1_000_000)["input_ids"]])
    top = max(int(lengths.max()), cfg.data.max_length)
    counts, edges = np.histogram(lengths, bins=BINS, range=(0, top))
    over = int((lengths > cfg.data.max_length).sum())
    return {
        "sampled": len(chosen),
        "of": len(examples),
        "max_length": cfg.data.max_length,
        "over_max_length": over,
        "share_over": over / len(chosen),
        "mean": round(float(lengths.mean()), 1),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "longest": int(lengths.max()),
        "histogram": [
            {"lo": round(float(lo), 1), "hi": round(float(hi), 1), "n": int(n)}
            for lo, hi, n in zip(edges[:-1], edges[1:], counts)
        ],
    }


def _example_rows(examples: list[Example], labels: list[str], seed: int) -> list[dict]:
    chosen = random.Random(seed).sample(examples, min(EXAMPLES, len(examples)))
    out = []
    for e in chosen:
        row = {"premise": e.premise, "hypothesis": e.hypothesis} if not e.text else {"text": e.text}
        out.append({**row, "label": labels[e.label]})
    return out


def preview(
    cfg: RunConfig,
    tokenizer=None,
    sources: dict[str, Iterable[dict]] | None = None,
    scan: int = SCAN,
    sample: int = SAMPLE,
) -> dict:
    """What the run's data looks like (see the module docstring). `sources`: the rows of some
    splits already in hand ({"train": [...], "test": [...]}, as the Train page's uploads); the
    others come from cfg.data as the trainer opens them. Without a `tokenizer` there are no
    token lengths. A split that cannot be read or mapped has its "error" and nothing else.

    Returns {"splits": {split: {"source", "rows_read", "complete", "total_rows", "dropped_unlabelled",
    "dropped_empty", "kept", "carved_from_train", "used", "label_counts", "lengths", "examples"}},
    "duplicates": [{"splits": [a, b], "n", "examples", "note"}], "imbalanced": {"ratio", "largest",
    "smallest"} or None, "notes": [what was sampled, in sentences]}."""
    labels = cfg.data.labels
    seed = cfg.train.seed if cfg.data.sample_seed is None else cfg.data.sample_seed
    read: dict[str, list[Example]] = {}
    out: dict = {"splits": {}, "duplicates": [], "imbalanced": None, "notes": []}
    for split in SPLITS:
        if sources and split in sources:
            opened = (iter(sources[split]), "the uploaded file")
        else:
            found = _split_source(cfg.data, split)
            if found is None:
                continue
            try:
                opened = (found[0](), found[1])
            except (OSError, ValueError) as e:
                out["splits"][split] = {"error": str(e)}
                continue
        try:
            examples, stats, complete = _read(opened[0], cfg, split, opened[1], scan)
        except (OSError, ValueError) as e:
            out["splits"][split] = {"error": str(e)}
            continue
        read[split] = examples
        out["splits"][split] = {
            "source": opened[1],
            "rows_read": stats.rows_read,
            "complete": complete,
            "total_rows": stats.rows_read
            if complete
            else (None if split in (sources or {}) else _total_rows(cfg, split)),
            "dropped_unlabelled": stats.dropped_unlabelled,
            "dropped_empty": stats.dropped_empty,
            "kept": stats.kept,
            "carved_from_train": False,
        }
    if "train" in read and "validation" not in out["splits"] and len(read["train"]) >= 2:
        read["train"], read["validation"] = carve_validation(read["train"], cfg.data.validation_fraction, seed)
        train = out["splits"]["train"]
        out["splits"]["validation"] = {**train, "kept": len(read["validation"]), "carved_from_train": True}
        train["kept"] = len(read["train"])
    limits = {
        "train": cfg.data.max_train_rows,
        "validation": cfg.data.max_validation_rows,
        "test": cfg.data.max_test_rows,
    }
    for split, examples in read.items():
        s = out["splits"][split]
        counts = np.bincount([e.label for e in examples], minlength=len(labels))
        s["label_counts"] = {label: int(n) for label, n in zip(labels, counts)}
        kept = (
            s["kept"] if s["complete"] or not s["total_rows"] else round(s["kept"] * s["total_rows"] / s["rows_read"])
        )
        s["used"] = kept if limits[split] is None else min(kept, limits[split])
        s["examples"] = _example_rows(examples, labels, seed)
        s["lengths"] = _lengths(examples, cfg, tokenizer, sample, seed) if tokenizer is not None and examples else None
        if not s["complete"]:
            of = f"{s['total_rows']:,}" if s["total_rows"] else "more"
            out["notes"].append(
                f"{split}: from the first {s['rows_read']:,} of {of} rows (a preview reads no more); the row count "
                "it will use is estimated from them"
            )
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        if a not in read or b not in read or out["splits"][b].get("carved_from_train"):
            continue
        seen = {_key(e) for e in read[a]}
        both = [e for e in read[b] if _key(e) in seen]
        if both:
            rows = f"{len(both):,} {b} row has" if len(both) == 1 else f"{len(both):,} {b} rows have"
            note = (
                f"{rows} the same text as a {a} row (case and spaces ignored): a {b} score on them measures "
                "memory, not understanding"
            )
            out["duplicates"].append(
                {"splits": [a, b], "n": len(both), "examples": _example_rows(both, labels, seed), "note": note}
            )
    out["splits"] = {split: out["splits"][split] for split in SPLITS if split in out["splits"]}
    counts = out["splits"].get("train", {}).get("label_counts")
    if counts and sum(counts.values()):
        largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
        ratio = counts[largest] / counts[smallest] if counts[smallest] else float("inf")
        if ratio > IMBALANCE:
            out["imbalanced"] = {"ratio": ratio, "largest": largest, "smallest": smallest}
    return out
