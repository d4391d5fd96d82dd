"""What the benchmark scripts train on, built offline (no Hub access on the GPU machine).

    python -m bench.assets /tmp/qlora-bench                  # model/ (Phi-2 shape), data/
    python -m bench.assets /tmp/qlora-bench --arch llama3b   # model-llama3b/, data/
    python -m bench.assets /tmp/qlora-bench --arch qwen1p5b --config-only   # no weights written

- model dirs (ARCHS: the real shapes of Phi-2, Llama-3.2-3B, Qwen2.5-1.5B, Gemma 3 1B): a causal
  LM of that shape with random weights (from_config init, on the GPU when there is one), saved in
  bf16 (2 to 6 GB; `--config-only` writes its config.json alone), plus one tokenizer for all.
- the tokenizer: a byte-level BPE in Qwen2's format (tokenizer_class Qwen2Tokenizer), so that
  AutoTokenizer keeps it under every architecture: transformers rebuilds some families' tokenizers
  from the vocabulary and merges whatever the folder says (Qwen2 among them, which turned the old
  word-level tokenizer's rows into no tokens at all), and this one survives that rebuild. Each
  synthetic word is one token, and so is each of the prompt's three markers (added tokens), so a
  pair is 3 + premise + hypothesis tokens under every architecture, as with the word-level one.
- data/: SNLI-like pairs: premise and hypothesis lengths drawn from bench/snli_lengths.json (the
  joint length histogram of the shared SNLI sample under a WordPiece tokenizer), words drawn at
  random, labels at random: the same rows for every architecture. With the 3-token prompt a pair
  is about 26 tokens, like SNLI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the benchmark's architectures: transformers' config class, the real model's shape, LoRA targets
ARCHS = {
    "phi2": {
        "config": "PhiConfig",
        "shape": PHI2,
        "targets": ["q_proj", "v_proj", "fc1", "fc2"],
        "name": "Phi-2 (2.7B)",
    },
    "llama3b": {
        "config": "LlamaConfig",
        "shape": dict(
            hidden_size=3072,
            num_hidden_layers=28,
            intermediate_size=8192,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=128256,
            tie_word_embeddings=True,
        ),
        "targets": ALL_LINEAR,
        "name": "Llama-3.2-3B (GQA 24/8, SwiGLU)",
    },
    "qwen1p5b": {
        "config": "Qwen2Config",
        "shape": dict(
            hidden_size=1536,
            num_hidden_layers=28,
            intermediate_size=8960,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
        "targets": ALL_LINEAR,
        "name": "Qwen2.5-1.5B (GQA 12/2)",
    },
    "gemma3-1b": {
        "config": "Gemma3TextConfig",
        "shape": dict(
            hidden_size=1152,
            num_hidden_layers=26,
            intermediate_size=6912,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=512,
            vocab_size=262144,
            tie_word_embeddings=True,
        ),
        "targets": ALL_LINEAR,
        "name": "Gemma 3 1B (MQA 4/1, head dim 256, sliding window 512)",
    },
}
TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4)  # BENCH_TINY=1
N_WORDS = 20000
TEMPLATE = "Premise: {premise}\nHypothesis: {hypothesis}\nRelation:"
MARKERS = ["Premise:", "\nHypothesis:", "\nRelation:"]  # the template's text outside its fields
LABELS = ["entailment", "neutral", "contradiction"]
SPLITS = {"train": int(os.environ.get("BENCH_TRAIN_ROWS", 1000)), "validation": 500, "test": 1000}  # bench.ddp: more


def model_dir(root: Path, arch: str = "phi2") -> Path:
    """Where an architecture's model lives under the benchmark root (Phi-2: model/, as before)."""
    return Path(root) / ("model" if arch == "phi2" else f"model-{arch}")


def word(i: int) -> str:
    """The i-th synthetic word: four lowercase letters (a letter-only word is one pre-token under
    byte-level regexes, where digits would be split off)."""
    return "".join(chr(97 + (i // 26**k) % 26) for k in (3, 2, 1, 0))


def build_tokenizer(path: Path):
    """The byte-level BPE of the module docstring, saved into `path`; returns it."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0}
    for ch in bytes_to_unicode().values():  # every byte: no text can vanish
        vocab.setdefault(ch, len(vocab))
    merges, seen = [], set(vocab)
    space = bytes_to_unicode()[ord(" ")]  # "Ġ": a word after a space
    words = [word(i) for i in range(N_WORDS)]
    for depth in range(1, 5):  # level by level: "Ġ a", then "Ġa b", ... (only the leftmost pair merges)
        for w in words:
            left, right, whole = space + w[: depth - 1], w[depth - 1], space + w[:depth]
            if whole not in seen:
                seen.add(whole)
                vocab[whole] = len(vocab)
                merges.append((left, right))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>")
    tok.add_tokens([AddedToken(m, normalized=False, special=False) for m in MARKERS])
    tok.save_pretrained(path)
    return tok


def build_data(path: Path, seed: int = 0) -> dict:
    hist = json.loads((HERE / "snli_lengths.json").read_text())
    pairs = [(p, h) for p, h, n in hist["pairs"] for _ in range(n)]
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    lengths = []

    def words(k: int) -> str:
        return " ".join(word(rng.randrange(N_WORDS)) for _ in range(max(1, k)))

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


def model_config(arch: str = "phi2", tiny: bool = False):
    """The transformers config of ARCHS[arch] (TINY dims with `tiny`: CPU smoke tests)."""
    import transformers

    spec = ARCHS[arch]
    shape = dict(spec["shape"])
    if tiny:
        shape.update(TINY)
        for key, small in (("num_key_value_heads", 2), ("head_dim", 16), ("query_pre_attn_scalar", 16)):
            if key in shape:
                shape[key] = min(shape[key], small)
    cfg = getattr(transformers, spec["config"])(**shape, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    cfg.use_cache = False
    return cfg


def build_model(path: Path, arch: str = "phi2", seed: int = 0, weights: bool = True) -> float:
    """A causal LM of ARCHS[arch]'s shape, random weights, saved in bf16 into `path` (only its
    config.json without `weights`); returns the seconds it took."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model_config(arch, tiny=os.environ.get("BENCH_TINY") == "1")
    t0 = time.time()
    if not weights:
        cfg.save_pretrained(path)
        return time.time() - t0
    torch.manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return time.time() - t0


def _built(path: Path, arch: str) -> bool:
    """Whether `path` already holds weights of this architecture's shape (kept across calls)."""
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    want = model_config(arch, tiny=os.environ.get("BENCH_TINY") == "1").to_dict()
    same = all(saved.get(k) == want.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"))
    return same and any(path.glob("*.safetensors"))


def build(root: Path, arch: str = "phi2", weights: bool = True) -> dict:
    root = Path(root)
    path = model_dir(root, arch)
    info = {"arch": arch, "model": str(path)}
    if not weights or not _built(path, arch):
        info["model_build_s"] = round(build_model(path, arch, weights=weights), 1)
    build_tokenizer(path)
    info["data"] = build_data(root / "data")
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="/tmp/qlora-bench")
    ap.add_argument("--arch", default="phi2", choices=sorted(ARCHS))
    ap.add_argument("--config-only", action="store_true", help="write the model's config.json, not its weights")
    a = ap.parse_args()
    print(json.dumps(build(Path(a.root), a.arch, weights=not a.config_only)))


if __name__ == "__main__":
    main()
