"""Rows in, batches out: loading, column and label mapping, sampling, tokenising, padding.

    splits, stats = load_splits(cfg.data, seed)       # {"train": [Example], "validation": ..., "test": ...}
    encoded = encode(splits["train"], tokenizer, cfg.data)
    for idx in batch_indices(encoded, 32, shuffle=True, seed=1): batch = collate(encoded, idx, pad_id)

Sources: the built-in NLI sample in assets/, local JSONL/CSV/Parquet files, or a Hub dataset
(via `datasets`, which needs the network). Files are read as streams (line by line, Parquet by
record batches) straight into Examples. Rows without a gold label and rows with an empty text
are dropped and counted; a split left with no rows is an error that names its file.
"""

from __future__ import annotations

import itertools
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import BUILTIN_DATA, DataConfig
from .tables import iter_hub_split, iter_table

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_DIR = ASSETS / "nli_sample"
PREMISE_ALIASES = ("premise", "sentence1")
HYPOTHESIS_ALIASES = ("hypothesis", "sentence2")
LABEL_ALIASES = ("label", "gold_label")
TEXT_ALIASES = ("text", "sentence")
UNLABELLED = {"", "-", "-1", "none", "null"}
DEFAULT_TEMPLATE = "Premise: {premise}\nHypothesis: {hypothesis}\nRelation:"


@dataclass
class Example:
    id: str
    """Stable id: the row's own id column if it has one, else <split>-<row number>."""
    label: int
    """Index into DataConfig.labels."""
    premise: str = ""
    hypothesis: str = ""
    text: str = ""
    """For single-text classification (premise and hypothesis empty)."""
    tag: str = ""
    """Optional phenomenon tag (the built-in sample has one per row)."""

    def as_dict(self) -> dict:
        d = {"id": self.id, "label": self.label}
        for k in ("premise", "hypothesis", "text", "tag"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        return d


@dataclass
class SplitStats:
    rows_read: int = 0
    dropped_unlabelled: int = 0
    dropped_empty: int = 0
    """Rows with a label but an empty premise, hypothesis or text."""
    empty_rows: list[int] = field(default_factory=list)
    """The first few of them, by row number (1-based, header not counted)."""
    kept: int = 0
    used: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    """Dropped rows and a max_*_rows larger than the split, one line each (also on stderr)."""


# --- mapping ------------------------------------------------------------------------------------


def _pick_column(
    columns: Sequence[str], wanted: str | None, aliases: Sequence[str], what: str, required: bool = True
) -> str | None:
    if wanted:
        if wanted not in columns:
            raise ValueError(f"{what} column {wanted!r} not found; columns are {list(columns)}")
        return wanted
    for a in aliases:
        if a in columns:
            return a
    if required:
        raise ValueError(
            f"no {what} column found (tried {', '.join(aliases)}); columns are {list(columns)}. "
            f"Name it with --{what}-column."
        )
    return None


def map_label(raw: Any, labels: Sequence[str], label_map: dict[str, str]) -> int | None:
    """The class index of a raw label value, None for an unlabelled row; ValueError if unknown."""
    if raw is None or (isinstance(raw, float) and raw != raw):
        return None
    key = str(raw).strip()
    if isinstance(raw, float) and raw.is_integer():
        key = str(int(raw))
    key = label_map.get(key, key)
    if key.lower() in UNLABELLED:
        return None
    if key in labels:
        return labels.index(key)
    lowered = [l.lower() for l in labels]
    if key.lower() in lowered:
        return lowered.index(key.lower())
    if key.lstrip("-").isdigit():
        i = int(key)
        if 0 <= i < len(labels):
            return i
        raise ValueError(f"label id {i} is out of range for labels {list(labels)}")
    raise ValueError(
        f"unknown label {raw!r}; expected one of {list(labels)} or an id 0..{len(labels) - 1} "
        "(use a label mapping to rename values)"
    )


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def to_examples(
    rows: Iterable[dict], cfg: DataConfig, split: str, source: str | None = None
) -> tuple[list[Example], SplitStats]:
    """Map raw rows to Examples with the configured columns and labels, one row at a time (`rows`
    may be a stream: only the Examples are kept). Rows without a label and rows whose premise,
    hypothesis or text is empty are dropped and counted; an unknown label raises, naming the
    split, its `source` (a file) and the row."""
    stats = SplitStats()
    where = f"{split} ({source})" if source else split
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return [], stats
    columns = list(first.keys())
    try:
        label_col = _pick_column(columns, cfg.label_column, LABEL_ALIASES, "label")
        single = bool(cfg.text_column)
        if single:
            text_col = _pick_column(columns, cfg.text_column, TEXT_ALIASES, "text")
        else:
            prem_col = _pick_column(columns, cfg.premise_column, PREMISE_ALIASES, "premise", required=False)
            hyp_col = _pick_column(columns, cfg.hypothesis_column, HYPOTHESIS_ALIASES, "hypothesis", required=False)
            if prem_col is None or hyp_col is None:
                text_col = _pick_column(columns, None, TEXT_ALIASES, "text", required=False)
                if text_col is None:
                    raise ValueError(
                        f"found no premise/hypothesis columns and no text column; columns are "
                        f"{columns}. Map them with --premise-column/--hypothesis-column or --text-column."
                    )
                single = True
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    id_col = "id" if "id" in columns else None
    tag_col = next((c for c in ("tag", "phenomenon") if c in columns), None)
    examples = []
    for n, row in enumerate(itertools.chain([first], rows)):
        stats.rows_read += 1
        try:
            label = map_label(row.get(label_col), cfg.labels, cfg.label_map)
        except ValueError as e:
            raise ValueError(f"{where} row {n + 1}: {e}") from None
        if label is None:
            stats.dropped_unlabelled += 1
            continue
        if single:
            text = _text(row.get(text_col))
            empty = not text.strip()
        else:
            premise, hypothesis = _text(row.get(prem_col)), _text(row.get(hyp_col))
            empty = not premise.strip() or not hypothesis.strip()
        if empty:
            stats.dropped_empty += 1
            if len(stats.empty_rows) < 5:
                stats.empty_rows.append(n + 1)
            continue
        ex_id = str(row[id_col]) if id_col and row.get(id_col) not in (None, "") else f"{split}-{n}"
        tag = _text(row.get(tag_col)) if tag_col else ""
        if single:
            examples.append(Example(id=ex_id, label=label, text=text, tag=tag))
        else:
            examples.append(Example(id=ex_id, label=label, premise=premise, hypothesis=hypothesis, tag=tag))
    stats.kept = len(examples)
    return examples, stats


def drop_notes(split: str, stats: SplitStats) -> list[str]:
    """One line per kind of dropped row, for the log and the setup record."""
    notes = []
    if stats.dropped_unlabelled:
        notes.append(
            f"{split}: dropped {stats.dropped_unlabelled} of {stats.rows_read} rows without a gold label "
            "(-1, '-', empty or null)"
        )
    if stats.dropped_empty:
        rows = ", ".join(map(str, stats.empty_rows)) + (" …" if stats.dropped_empty > len(stats.empty_rows) else "")
        notes.append(
            f"{split}: dropped {stats.dropped_empty} of {stats.rows_read} rows with an empty "
            f"premise, hypothesis or text (rows {rows})"
        )
    return notes


def warn(message: str) -> None:
    """A warning line on stderr (the trainer's stderr is the run's train.log)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --- sampling -----------------------------------------------------------------------------------


def stratified_sample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """`n` examples with the class proportions of `examples` (largest remainder), chosen by seed.

    Keeps the original order of the chosen rows, so the same seed always gives the same subset."""
    if n is None or n >= len(examples):
        return list(examples)
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_label[ex.label].append(i)
    total = len(examples)
    quotas = {lab: n * len(idx) / total for lab, idx in by_label.items()}
    take = {lab: int(q) for lab, q in quotas.items()}
    leftover = n - sum(take.values())
    for lab in sorted(quotas, key=lambda l: (-(quotas[l] - take[l]), l))[:leftover]:
        take[lab] += 1
    rng = random.Random(seed)
    chosen = []
    for lab in sorted(by_label):
        idx = list(by_label[lab])
        rng.shuffle(idx)
        chosen.extend(idx[: take[lab]])
    return [examples[i] for i in sorted(chosen)]


def carve_validation(train: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split train into (train, validation) with `fraction` of each class in validation."""
    n_val = max(1, round(len(train) * fraction))
    val = stratified_sample(train, n_val, seed)
    val_ids = {id(e) for e in val}
    return [e for e in train if id(e) not in val_ids], val


def _split_source(cfg: DataConfig, split: str) -> tuple[Callable[[], Iterator[dict]], str] | None:
    """(a function that opens the split's rows as a stream, words for messages), or None."""
    path = getattr(cfg, split)
    if path:
        return (lambda: iter_table(path)), f"file {path}"
    if cfg.source == BUILTIN_DATA:
        file = BUILTIN_DIR / f"{split}.jsonl"
        return (lambda: iter_table(file)), f"the built-in sample {file}"
    if cfg.source in ("files", "", None):
        return None
    name = {"train": cfg.train_split, "validation": cfg.validation_split, "test": cfg.test_split}[split]
    if not name:
        return None
    return (lambda: iter_hub_split(cfg.source, name, cfg.hub_config)), f"split {name!r} of Hub dataset {cfg.source}"


def load_splits(cfg: DataConfig, seed: int) -> tuple[dict[str, list[Example]], dict[str, dict]]:
    """The train, validation and test Examples of a run, and per-split statistics.

    Files are streamed into Examples (never held whole, never as several copies). Every split
    given must end up with usable rows; without a validation split, validation is carved from
    train. Dropped rows and a max_*_rows larger than what a split holds are not errors: each is
    a line on stderr and in the split's `warnings` (the setup record of metrics.jsonl)."""
    sources = {split: _split_source(cfg, split) for split in ("train", "validation", "test")}
    opened = {split: (src[0](), src[1]) for split, src in sources.items() if src is not None}  # missing files fail here
    if "train" not in opened:
        raise ValueError("no training rows: give --train FILE, a Hub dataset, or use the built-in sample")
    if "test" not in opened:
        raise ValueError("no test rows: give --test FILE (the test split is needed for the before/after report)")

    splits: dict[str, list[Example]] = {}
    stats: dict[str, SplitStats] = {}
    for split, (rows, where) in opened.items():
        splits[split], st = to_examples(rows, cfg, split, source=where)
        stats[split] = st
        if st.rows_read == 0:
            raise ValueError(f"{split}: {where} has no rows")
        if not splits[split]:
            raise ValueError(
                f"{split}: no usable rows in {where}: of {st.rows_read} rows, {st.dropped_unlabelled} "
                f"have no gold label and {st.dropped_empty} an empty premise, hypothesis or text"
            )
        st.warnings += drop_notes(split, st)
    if "validation" not in splits:
        if len(splits["train"]) < 2:
            raise ValueError(
                f"train: only {len(splits['train'])} usable row, too few to hold out validation rows "
                "from: give a validation file or more training rows"
            )
        splits["train"], splits["validation"] = carve_validation(splits["train"], cfg.validation_fraction, seed)
        stats["validation"] = SplitStats(rows_read=0, kept=len(splits["validation"]))
        stats["validation"].carved_from_train = True  # type: ignore[attr-defined]
    limits = {"train": cfg.max_train_rows, "validation": cfg.max_validation_rows, "test": cfg.max_test_rows}
    for split in ("train", "validation", "test"):
        st = stats[split]
        if limits[split] is not None and limits[split] > len(splits[split]):
            st.warnings.append(
                f"{split}: asked for {limits[split]} rows (data.max_{split}_rows), only "
                f"{len(splits[split])} are usable: using all {len(splits[split])}"
            )
        splits[split] = stratified_sample(splits[split], limits[split], seed)
        st.used = len(splits[split])
        st.label_counts = {cfg.labels[k]: v for k, v in sorted(Counter(e.label for e in splits[split]).items())}
        for w in st.warnings:
            warn(w)
    return splits, {k: vars(v) for k, v in stats.items()}


# --- tokenising and batching --------------------------------------------------------------------


def encode(examples: list[Example], tokenizer, cfg: DataConfig) -> list[dict]:
    """Token ids per example (no padding). Pairs use the tokenizer's own pair encoding when it
    has a separator token and no template is set; otherwise the template text."""
    use_pairs = cfg.template is None and tokenizer.sep_token is not None
    template = cfg.template or DEFAULT_TEMPLATE
    if examples and examples[0].text:
        texts = [e.text for e in examples]
        if cfg.template:
            texts = [cfg.template.format(text=t) for t in texts]
        enc = tokenizer(texts, truncation=True, max_length=cfg.max_length)
    elif use_pairs:
        enc = tokenizer(
            [e.premise for e in examples], [e.hypothesis for e in examples], truncation=True, max_length=cfg.max_length
        )
    else:
        texts = [template.format(premise=e.premise, hypothesis=e.hypothesis) for e in examples]
        enc = tokenizer(texts, truncation=True, max_length=cfg.max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "label": ex.label} for i, ex in enumerate(examples)]


def batch_indices(
    encoded: list[dict], batch_size: int, shuffle: bool, seed: int = 0, bucket: bool = True, bucket_batches: int = 64
) -> list[list[int]]:
    """Index lists of batches. With `bucket`, rows are sorted by length inside windows of
    `bucket_batches` batches, so a batch holds rows of similar length (little padding) while the
    data order stays random; batch order is shuffled again so lengths do not trend in an epoch."""
    order = list(range(len(encoded)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    if bucket:
        window = batch_size * bucket_batches
        order = [
            i
            for s in range(0, len(order), window)
            for i in sorted(order[s : s + window], key=lambda i: len(encoded[i]["input_ids"]))
        ]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle and bucket:
        rng.shuffle(batches)
    return batches


def collate(encoded: list[dict], idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad one batch to its own longest row."""
    rows = [encoded[i] for i in idx]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in rows[0]:
        out["token_type_ids"] = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[j, :n] = torch.tensor(r["input_ids"])
        mask[j, :n] = 1
        if "token_type_ids" in out:
            out["token_type_ids"][j, :n] = torch.tensor(r["token_type_ids"])
    out["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    return out
