"""CPU speed, side by side: a plain QLoRA loop vs our training step, on the embedded model.

    .venv/bin/python -m bench.cpu --data PATH/TO/snli_sample [--steps 8] [--rounds 2]

Both use all-MiniLM-L6-v2 in NF4 with LoRA r=16 on all linear layers, batch 32 of genuine SNLI
pairs (--data: a folder whose train.jsonl is read, such as the SNLI 1.0 sample of 3,000 train rows,
or a JSONL file of premise/hypothesis/label rows), float32 compute, the same seed. "plain" is the
usual script: tokenizer(padding="max_length", max_length=128) (or padding to the batch's longest
row), random batches, LoRA dropout 0.05.
"ours" is core's path: dynamic padding with length bucketing (core.data) and the demo preset's
LoRA settings. Rounds alternate plain/ours so a noisy, shared machine hurts both alike; the
ratio is what to read. Prints seconds per step and the ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from core.config import LoraSettings, get_preset
from core.data import batch_indices, collate, encode, to_examples
from core.model import add_lora, load_model, load_tokenizer
from core.tables import read_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", type=Path, required=True, help="JSONL file of SNLI pairs to train on (a folder: its train.jsonl)"
    )
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    data = args.data / "train.jsonl" if args.data.is_dir() else args.data
    if not data.is_file():
        ap.error(f"--data: {data} not found")
    cfg = get_preset("demo")
    tok = load_tokenizer(cfg.model)
    examples, _ = to_examples(read_table(data), cfg.data, "train")
    cpu = torch.device("cpu")

    def model_with(lora: LoraSettings):
        torch.manual_seed(0)
        m = add_lora(load_model(cfg.model, 3, tok.pad_token_id, cpu, torch.float32), lora)
        m.train()
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-4)

    plain_model, plain_opt = model_with(LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear"))
    ours_model, ours_opt = model_with(cfg.lora)
    rng = random.Random(0)

    def plain_batches(padding):
        while True:
            rows = rng.sample(examples, 32)
            enc = tok(
                [e.premise for e in rows],
                [e.hypothesis for e in rows],
                padding=padding,
                max_length=128,
                truncation=True,
                return_tensors="pt",
            )
            enc["labels"] = torch.tensor([e.label for e in rows])
            yield enc

    encoded = encode(examples, tok, cfg.data)
    ours_idx = batch_indices(encoded, 32, shuffle=True, seed=0, bucket=True)

    def ours_batches():
        for idx in ours_idx * 10:
            yield collate(encoded, idx, tok.pad_token_id)

    def run(model, opt, batches, n):
        times = []
        for _ in range(n):
            b = dict(next(batches))
            t = time.perf_counter()
            labels = b.pop("labels")
            loss = torch.nn.functional.cross_entropy(model(**b).logits, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
        return times

    pb, lb, ob = plain_batches("max_length"), plain_batches("longest"), ours_batches()
    for model, opt, batches in ((plain_model, plain_opt, pb), (plain_model, plain_opt, lb), (ours_model, ours_opt, ob)):
        run(model, opt, batches, 1)  # warm-up
    plain, longest, ours = [], [], []
    for _ in range(args.rounds):
        plain += run(plain_model, plain_opt, pb, args.steps)
        longest += run(plain_model, plain_opt, lb, args.steps)
        ours += run(ours_model, ours_opt, ob, args.steps)
    p, l, o = statistics.median(plain), statistics.median(longest), statistics.median(ours)
    print(f"torch threads {torch.get_num_threads()}, {len(plain)} steps each, batch 32, median seconds per step")
    print(
        f"| path | s/step | pairs/s | ours is |\n|---|---|---|---|\n"
        f"| plain, padded to 128 | {p:.3f} | {32 / p:.1f} | {p / o:.2f}x faster |\n"
        f"| plain, padded to the batch's longest | {l:.3f} | {32 / l:.1f} | {l / o:.2f}x faster |\n"
        f"| ours: bucketed dynamic padding, no LoRA dropout, mean pooling | {o:.3f} | {32 / o:.1f} | |"
    )


if __name__ == "__main__":
    main()
