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
from typing import Any

import torch

from .config import BUILTIN_DATA, BUILTIN_DIR, DataConfig
from .tables import iter_hub_split, iter_table
from .text import terminal_text

PREMISE_ALIASES = ("premise", "sentence1")
HYPOTHESIS_ALIASES = ("hypothesis", "sentence2")
LABEL_ALIASES = ("label", "gold_label")
TEXT_ALIASES = ("text", "sentence")
UNLABELLED = {"", "-", "-1", "none", "null"}
DEFAULT_TEMPLATE = "Premise: {premise}\nHypothesis: {hypothesis}\nRelation:"
# The zero-shot prompt of causal LMs, and so their input template (see prompt_for): for NLI the
# classic question with one answer word per class; a chat model gets the question as a user turn.
NLI_QUESTION = "{premise}\nQuestion: {hypothesis} Yes, Maybe, or No?"
NLI_PROMPT = NLI_QUESTION + "\nAnswer:"
NLI_WORDS = {"entailment": "Yes", "neutral": "Maybe", "contradiction": "No"}
TEXT_PROMPT = "{text}\nAnswer:"
PLACEHOLDERS = ("{premise}", "{hypothesis}", "{text}")
NO_LABEL = -1  # Example.label of a row predicted without a gold label (iter_examples, need_labels=False)


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
    row: int = 0
    """Its row number in its file (1-based, header not counted), for messages; 0 if unknown."""

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
    if isinstance(value, (dict, list, tuple)):  # a nested JSON or Parquet value is not a text: never str() it
        kind = "an object" if isinstance(value, dict) else "a list"
        raise ValueError(f"holds {kind} where a text is expected (flatten the column, or map another one)")
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def to_examples(
    rows: Iterable[dict], cfg: DataConfig, split: str, source: str | None = None
) -> tuple[list[Example], SplitStats]:
    """Map raw rows to Examples with the configured columns and labels, one row at a time (`rows`
    may be a stream: only the Examples are kept). Rows without a label and rows whose premise,
    hypothesis or text is empty are dropped and counted; an unknown label raises, naming the
    split, its `source` (a file) and the row."""
    stats = SplitStats()
    examples = list(iter_examples(rows, cfg, split, source, stats))
    stats.kept = len(examples)
    return examples, stats


def iter_examples(
    rows: Iterable[dict],
    cfg: DataConfig,
    split: str,
    source: str | None = None,
    stats: SplitStats | None = None,
    need_labels: bool = True,
) -> Iterator[Example]:
    """to_examples one Example at a time, counting into `stats`. With `need_labels` False (new rows
    to predict, core/predict.py) the label column may be missing and a row without a gold label
    is kept with label NO_LABEL; an unknown label still raises, as in training."""
    stats = stats if stats is not None else SplitStats()
    where = f"{split} ({source})" if source else split
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return
    columns = list(first.keys())
    try:
        if not need_labels and cfg.label_column and cfg.label_column not in columns:
            label_col = None  # the run's label column is not in these rows to predict: none has a gold label
        else:
            label_col = _pick_column(columns, cfg.label_column, LABEL_ALIASES, "label", required=need_labels)
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
    for n, row in enumerate(itertools.chain([first], rows)):
        stats.rows_read += 1
        try:
            label = map_label(row.get(label_col), cfg.labels, cfg.label_map) if label_col else None
        except ValueError as e:
            raise ValueError(f"{where} row {n + 1}: {e}") from None
        if label is None and need_labels:
            stats.dropped_unlabelled += 1
            continue
        if label is None:
            label = NO_LABEL
        try:
            if single:
                text = _text(row.get(text_col))
                empty = not text.strip()
            else:
                premise, hypothesis = _text(row.get(prem_col)), _text(row.get(hyp_col))
                empty = not premise.strip() or not hypothesis.strip()
        except ValueError as e:
            raise ValueError(f"{where} row {n + 1}: a text column {e}") from None
        if empty:
            stats.dropped_empty += 1
            if len(stats.empty_rows) < 5:
                stats.empty_rows.append(n + 1)
            continue
        ex_id = str(row[id_col]) if id_col and row.get(id_col) not in (None, "") else f"{split}-{n}"
        tag = _text(row.get(tag_col)) if tag_col else ""
        if single:
            yield Example(id=ex_id, label=label, text=text, tag=tag, row=n + 1)
        else:
            yield Example(id=ex_id, label=label, premise=premise, hypothesis=hypothesis, tag=tag, row=n + 1)


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
    print(f"warning: {terminal_text(message)}", file=sys.stderr, flush=True)


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


# --- prompts and tokenising ---------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """How a row becomes the model's input, and the words that answer it."""

    template: str | None
    """The text with {premise}/{hypothesis} (or {text}) placeholders; None: the tokenizer's own
    pair encoding (encoders with a separator token)."""
    chat: bool = False
    """Rendered by the tokenizer's chat template, special tokens included: tokenised without
    adding them again (no second BOS)."""
    words: tuple[str, ...] = ()
    """One answer word per class (the zero-shot baseline asks the LM head for the next one; the
    label-word head starts from their rows); empty for the pair encoding."""

    def texts(self, examples: Sequence[Example]) -> list[str]:
        return [
            self.template.format(text=e.text)
            if e.text
            else self.template.format(premise=e.premise, hypothesis=e.hypothesis)
            for e in examples
        ]


def prompt_for(cfg: DataConfig, tokenizer, text: bool = False) -> Prompt:
    """The input of a run (`text`: single-text rows): the tokenizer's own pair encoding when it
    has a separator token (encoders) and data.template is not set; otherwise causal_prompt."""
    if cfg.template is None and tokenizer.sep_token is not None:
        return Prompt("{text}" if text else None)
    return causal_prompt(cfg.labels, tokenizer, text, cfg.template)


def causal_prompt(labels: Sequence[str], tokenizer, text: bool = False, template: str | None = None) -> Prompt:
    """The prompt that asks a causal LM for one word per class, the same for the zero-shot
    baseline and for the run's input (so that with a label-word head, core/model.py, the run's
    "before" model IS the zero-shot baseline). `template` when given, answered by the label words
    with a leading space. Otherwise, for NLI labels the question "{premise}\nQuestion: {hypothesis}
    Yes, Maybe, or No?" answered by Yes / Maybe / No, for other labels a plain prompt answered by
    the label names; with a chat template (instruct models) the question is a user turn and the
    answer starts the assistant's (tokenizer.apply_chat_template), else it ends in "\nAnswer:"."""
    nli = all(label in NLI_WORDS for label in labels)
    words = [NLI_WORDS[label] for label in labels] if nli else list(labels)
    if template is not None:
        return Prompt(template, words=tuple(" " + w for w in words))
    question = NLI_QUESTION if nli else ("{text}" if text else "{premise}\n{hypothesis}")
    if getattr(tokenizer, "chat_template", None):
        if not nli:
            question += "\nAnswer with one of: " + ", ".join(labels) + "."
        return Prompt(chat_template(tokenizer, question), chat=True, words=tuple(words))
    prompt = NLI_PROMPT if nli else (TEXT_PROMPT if text else DEFAULT_TEMPLATE)
    return Prompt(prompt, words=tuple(" " + w for w in words))


def chat_template(tokenizer, question: str) -> str:
    """`question` as the user turn of the tokenizer's chat template, followed by the start of the
    assistant's answer, as a template: the {premise}/{hypothesis}/{text} placeholders stay, any
    other brace the chat template writes is escaped."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    escaped = rendered.replace("{", "{{").replace("}", "}}")
    for placeholder in PLACEHOLDERS:
        escaped = escaped.replace("{" + placeholder + "}", placeholder)
    return escaped


def tokenize(prompt: Prompt, examples: Sequence[Example], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of `examples` through `prompt` (no padding, truncated at max_length)."""
    if prompt.template is None:
        enc = tokenizer(
            [e.premise for e in examples], [e.hypothesis for e in examples], truncation=True, max_length=max_length
        )
    else:
        enc = tokenizer(
            prompt.texts(examples), truncation=True, max_length=max_length, add_special_tokens=not prompt.chat
        )
    return enc


def encode(examples: list[Example], tokenizer, cfg: DataConfig, split: str = "") -> list[dict]:
    """Token ids per example (no padding), through the run's input (prompt_for). A row that the
    tokenizer turns into no tokens at all is refused, naming the split and the row."""
    if not examples:
        return []
    enc = tokenize(prompt_for(cfg, tokenizer, text=bool(examples[0].text)), examples, tokenizer, cfg.max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    for ex, ids in zip(examples, enc["input_ids"]):
        if not ids:
            where = f"{split or 'data'} row {ex.row}" if ex.row else f"{split or 'data'} row id {ex.id}"
            raise ValueError(
                f"{where}: the tokenizer of the model turns its text into no "
                "tokens at all, so the model has nothing to read: check that the tokenizer belongs to the model "
                "(transformers may have loaded another tokenizer class than the folder's)"
            )
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
