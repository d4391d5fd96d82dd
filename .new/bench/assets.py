"""What both benchmark scripts train on, built offline (no Hub access on the GPU machine).

    python -m bench.assets /tmp/qlora-bench      # model/, data/{train,validation,test}.jsonl

- model/: a Phi-2-shaped PhiForCausalLM (hidden 2560, 32 layers, intermediate 10240, 32 heads,
  partial rotary 0.4, vocab 51200) with random weights (from_config init), saved in bf16, plus a
  word-level tokenizer whose vocabulary is the synthetic words below (no Phi tokenizer offline).
- data/: SNLI-like pairs: premise and hypothesis lengths drawn from bench/snli_lengths.json (the
  joint length histogram of the shared SNLI sample under a WordPiece tokenizer), words drawn at
  random, labels at random. With the 3-token prompt a pair is about 26 tokens, like SNLI.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHI2 = dict(
    hidden_size=2560,
    num_hidden_layers=32,
    intermediate_size=10240,
    num_attention_heads=32,
    partial_rotary_factor=0.4,
    vocab_size=51200,
)
N_WORDS = 20000
TEMPLATE = "Premise: {premise}\nHypothesis: {hypothesis}\nRelation:"
LABELS = ["entailment", "neutral", "contradiction"]
SPLITS = {"train": int(os.environ.get("BENCH_TRAIN_ROWS", 1000)), "validation": 500, "test": 1000}  # bench.ddp: more


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, "Premise:": 2, "Hypothesis:": 3, "Relation:": 4}
    for i in range(N_WORDS):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(path)
    return fast


def build_data(path: Path, seed: int = 0) -> dict:
    hist = json.loads((HERE / "snli_lengths.json").read_text())
    pairs = [(p, h) for p, h, n in hist["pairs"] for _ in range(n)]
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    lengths = []

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(max(1, k)))

    for split, n in SPLITS.items():
        with open(path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                p, h = rng.choice(pairs)
                row = {
                    "id": f"{split}-{i}",
                    "premise": words(p),
                    "hypothesis": words(h),
                    "label": LABELS[rng.randrange(3)],
                }
                f.write(json.dumps(row) + "\n")
                lengths.append(max(1, p) + max(1, h) + 3)
    return {"pairs": len(lengths), "mean_tokens": round(sum(lengths) / len(lengths), 2)}


def build_model(path: Path, seed: int = 0) -> float:
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    shape = dict(PHI2)
    if os.environ.get("BENCH_TINY") == "1":  # a small model of the same family, for CPU smoke tests
        shape.update(hidden_size=64, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4)
    cfg = PhiConfig(**shape, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    t0 = time.time()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = PhiForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return time.time() - t0


def build(root: Path) -> dict:
    root = Path(root)
    info = {}
    if not (root / "model" / "config.json").is_file():
        info["model_build_s"] = round(build_model(root / "model"), 1)
    build_tokenizer(root / "model")
    info["data"] = build_data(root / "data")
    return info


if __name__ == "__main__":
    print(json.dumps(build(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qlora-bench"))))
