"""Rows in, batches out: loading, column and label mapping, sampling, tokenising, padding.

    splits, stats = load_splits(cfg.data, seed)       # {"train": [Example], "validation": ..., "test": ...}
    encoded = encode(splits["train"], tokenizer, cfg.data)
    for idx in batch_indices(encoded, 32, shuffle=True, seed=1): batch = collate(encoded, idx, pad_id)

Sources: the built-in NLI sample in assets/, local JSONL/CSV/Parquet files, or a Hub dataset
(via `datasets`, which needs the network). Rows without a gold label are dropped and counted.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import BUILTIN_DATA, DataConfig

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
    kept: int = 0
    used: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)


# --- reading ------------------------------------------------------------------------------------

def read_table(path: str | Path) -> list[dict]:
    """Rows of a local .jsonl/.json/.csv/.tsv/.parquet file as dicts."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    suffix = suffix.lower()
    if suffix in (".jsonl", ".jsonl.gz", ".ndjson"):
        import gzip
        opener = gzip.open if suffix.endswith(".gz") else open
        rows = []
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: each line must be a JSON object")
                rows.append(row)
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: a .json file must hold a list of objects")
        return data
    import pandas as pd
    if suffix in (".csv", ".tsv"):
        try:
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False, dtype=str)
        except Exception as e:  # pandas raises several parser error types
            raise ValueError(f"{path}: could not parse as {suffix[1:].upper()}: {e}") from None
    elif suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv, .tsv or .parquet)")
    return df.to_dict(orient="records")


def read_hub_split(dataset_id: str, split: str, config_name: str | None = None) -> list[dict]:
    """Rows of one split of a Hugging Face Hub dataset (needs the network or a local HF cache)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is in requirements.txt
        raise RuntimeError("loading a Hub dataset needs the `datasets` package") from e
    try:
        ds = datasets.load_dataset(dataset_id, config_name, split=split)
    except Exception as e:
        raise RuntimeError(
            f"could not load split {split!r} of Hub dataset {dataset_id!r}: {type(e).__name__}: {e}. "
            "Without network access, download the files and pass --train/--validation/--test."
        ) from e
    return ds.to_list()


# --- mapping ------------------------------------------------------------------------------------

def _pick_column(columns: Sequence[str], wanted: str | None, aliases: Sequence[str], what: str,
                 required: bool = True) -> str | None:
    if wanted:
        if wanted not in columns:
            raise ValueError(f"{what} column {wanted!r} not found; columns are {list(columns)}")
        return wanted
    for a in aliases:
        if a in columns:
            return a
    if required:
        raise ValueError(f"no {what} column found (tried {', '.join(aliases)}); columns are {list(columns)}. "
                         f"Name it with --{what}-column.")
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
    raise ValueError(f"unknown label {raw!r}; expected one of {list(labels)} or an id 0..{len(labels) - 1} "
                     "(use a label mapping to rename values)")


def to_examples(rows: list[dict], cfg: DataConfig, split: str) -> tuple[list[Example], SplitStats]:
    """Map raw rows to Examples with the configured columns and labels; drop unlabelled rows."""
    stats = SplitStats(rows_read=len(rows))
    if not rows:
        return [], stats
    columns = list(rows[0].keys())
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
                raise ValueError(f"{split}: found no premise/hypothesis columns and no text column; columns are "
                                 f"{columns}. Map them with --premise-column/--hypothesis-column or --text-column.")
            single = True
    id_col = "id" if "id" in columns else None
    tag_col = next((c for c in ("tag", "phenomenon") if c in columns), None)
    examples = []
    for n, row in enumerate(rows):
        try:
            label = map_label(row.get(label_col), cfg.labels, cfg.label_map)
        except ValueError as e:
            raise ValueError(f"{split} row {n + 1}: {e}") from None
        if label is None:
            stats.dropped_unlabelled += 1
            continue
        ex_id = str(row[id_col]) if id_col and row.get(id_col) not in (None, "") else f"{split}-{n}"
        tag = str(row.get(tag_col) or "") if tag_col else ""
        if single:
            text = str(row.get(text_col) or "")
            examples.append(Example(id=ex_id, label=label, text=text, tag=tag))
        else:
            examples.append(Example(id=ex_id, label=label, premise=str(row.get(prem_col) or ""),
                                    hypothesis=str(row.get(hyp_col) or ""), tag=tag))
    stats.kept = len(examples)
    return examples, stats


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
        chosen.extend(idx[:take[lab]])
    return [examples[i] for i in sorted(chosen)]


def carve_validation(train: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split train into (train, validation) with `fraction` of each class in validation."""
    n_val = max(1, round(len(train) * fraction))
    val = stratified_sample(train, n_val, seed)
    val_ids = {id(e) for e in val}
    return [e for e in train if id(e) not in val_ids], val


def load_splits(cfg: DataConfig, seed: int) -> tuple[dict[str, list[Example]], dict[str, dict]]:
    """The train, validation and test Examples of a run, and per-split statistics."""
    raw: dict[str, list[dict] | None] = {}
    if cfg.source == BUILTIN_DATA:
        for split in ("train", "validation", "test"):
            raw[split] = read_table(BUILTIN_DIR / f"{split}.jsonl")
    elif cfg.source in ("files", "", None):
        raw = {"train": None, "validation": None, "test": None}
    else:
        need_hub = {s for s in ("train", "validation", "test") if not getattr(cfg, s)}
        names = {"train": cfg.train_split, "validation": cfg.validation_split, "test": cfg.test_split}
        for split in need_hub:
            raw[split] = read_hub_split(cfg.source, names[split], cfg.hub_config) if names[split] else None
    for split in ("train", "validation", "test"):
        if getattr(cfg, split):
            raw[split] = read_table(getattr(cfg, split))
    if not raw.get("train"):
        raise ValueError("no training rows: give --train FILE, a Hub dataset, or use the built-in sample")
    if not raw.get("test"):
        raise ValueError("no test rows: give --test FILE (the test split is needed for the before/after report)")

    splits: dict[str, list[Example]] = {}
    stats: dict[str, SplitStats] = {}
    for split in ("train", "validation", "test"):
        if raw.get(split):
            splits[split], stats[split] = to_examples(raw[split], cfg, split)
    if not splits["train"]:
        raise ValueError("every training row was unlabelled: nothing to train on")
    if not splits.get("validation"):
        splits["train"], splits["validation"] = carve_validation(splits["train"], cfg.validation_fraction, seed)
        stats["validation"] = SplitStats(rows_read=0, kept=len(splits["validation"]))
        stats["validation"].carved_from_train = True  # type: ignore[attr-defined]
    limits = {"train": cfg.max_train_rows, "validation": cfg.max_validation_rows, "test": cfg.max_test_rows}
    for split in splits:
        splits[split] = stratified_sample(splits[split], limits[split], seed)
        st = stats[split]
        st.used = len(splits[split])
        st.label_counts = {cfg.labels[k]: v for k, v in sorted(Counter(e.label for e in splits[split]).items())}
    if not splits["test"]:
        raise ValueError("every test row was unlabelled: nothing to evaluate on")
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
        enc = tokenizer([e.premise for e in examples], [e.hypothesis for e in examples],
                        truncation=True, max_length=cfg.max_length)
    else:
        texts = [template.format(premise=e.premise, hypothesis=e.hypothesis) for e in examples]
        enc = tokenizer(texts, truncation=True, max_length=cfg.max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "label": ex.label} for i, ex in enumerate(examples)]


def batch_indices(encoded: list[dict], batch_size: int, shuffle: bool, seed: int = 0,
                  bucket: bool = True, bucket_batches: int = 64) -> list[list[int]]:
    """Index lists of batches. With `bucket`, rows are sorted by length inside windows of
    `bucket_batches` batches, so a batch holds rows of similar length (little padding) while the
    data order stays random; batch order is shuffled again so lengths do not trend in an epoch."""
    order = list(range(len(encoded)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    if bucket:
        window = batch_size * bucket_batches
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: len(encoded[i]["input_ids"]))]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
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
