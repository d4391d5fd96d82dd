"""How much of a padded batch is padding: the most that packing rows could save (issue 20 asks
whether encoders should pack). Reads the rows as training does (a preset's tokenizer, its
encoding, core.data.batch_indices with and without length bucketing) and prints, per batch size,
the share of padded positions over a few epochs' batches.

    .venv/bin/python -m bench.padding                                   # demo and llm-demo, built-in sample
    .venv/bin/python -m bench.padding --data PATH/TO/snli_sample --preset demo --batches 8,32,128

--data: a folder with train.jsonl, validation.jsonl and test.jsonl (premise/hypothesis/label rows).
The figure is a count of positions, not a speed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from core.config import get_preset
from core.data import batch_indices
from core.train import load_everything


def pad_share(encoded: list[dict], batch_size: int, bucket: bool, epochs: int) -> float:
    """Padded positions / all positions of the batches of `epochs` shuffled epochs."""
    real = padded = 0
    for epoch in range(epochs):
        for idx in batch_indices(encoded, batch_size, shuffle=True, seed=epoch, bucket=bucket):
            lengths = [len(encoded[i]["input_ids"]) for i in idx]
            real += sum(lengths)
            padded += max(lengths) * len(lengths)
    return 1 - real / padded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", help="default: demo and llm-demo")
    ap.add_argument("--data", help="a folder of train/validation/test JSONL (default: the preset's data)")
    ap.add_argument("--batches", default=None, help="comma list (default: the preset's batch size)")
    ap.add_argument("--epochs", type=int, default=3)
    a = ap.parse_args()
    for name in a.preset or ["demo", "llm-demo"]:
        cfg = get_preset(name)
        if a.data:
            files = {split: f"{a.data}/{split}.jsonl" for split in ("train", "validation", "test")}
            cfg = replace(cfg, data=replace(cfg.data, source="files", **files))
        encoded = load_everything(cfg, time.time()).encoded["train"]
        mean = statistics.mean(len(r["input_ids"]) for r in encoded)
        sizes = [int(b) for b in a.batches.split(",")] if a.batches else [cfg.train.batch_size]
        for bs in sizes:
            shares = {bucket: pad_share(encoded, bs, bucket, a.epochs) for bucket in (True, False)}
            print(
                f"{name} ({cfg.model.name}): {len(encoded)} rows of {mean:.1f} tokens, batch {bs}: padding "
                f"{100 * shares[True]:.1f}% with length bucketing, {100 * shares[False]:.1f}% without",
                flush=True,
            )


if __name__ == "__main__":
    main()
