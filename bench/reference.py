"""The references to beat, both through the HF Trainer on the same rows and prompt as ours.

    python -m bench.reference /tmp/qlora-bench [--arch phi2] [--train-rows 1000] [--epochs 1] [--out ref.json]
    python -m bench.reference /tmp/qlora-bench --tuned [--arch llama3b] ...   # the tuned Trainer

The seed-like script (default), a typical QLoRA fine-tuning script kept plain on purpose: NF4 +
double quantisation, fp16, LoRA r=16/alpha 32/dropout 0.05 on the architecture's targets
(bench/assets.py: q_proj, v_proj, fc1, fc2 for Phi-2; all seven linear layers for the others), a
3-class head, inputs padded to 128 tokens, batch 8, gradient checkpointing, paged 8-bit AdamW.
`--tuned`: what a careful user gets from the Trainer alone: bf16, dynamic padding (to a multiple
of 8), length-grouped batches, fused AdamW, batch 32, no checkpointing, SDPA attention.
Prints and writes the measured rates; with fewer rows/epochs than the full experiment (5 epochs
of 1000 + validation each + test before and after) it also extrapolates the full experiment.
"""

import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from bench.assets import ARCHS, LABELS, TEMPLATE, model_dir


def load_split(path, n=None):
    rows = [json.loads(line) for line in open(path)]
    return rows[:n] if n else rows


class StepTimer(TrainerCallback):
    """Wall time of the training steps after the first few (warm-up excluded)."""

    def __init__(self, skip=3):
        self.skip, self.t0, self.steps = skip, None, 0

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        if state.global_step == self.skip:
            self.t0 = time.time()
        elif state.global_step > self.skip:
            self.steps = state.global_step - self.skip
            self.t1 = time.time()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--arch", default="phi2", choices=sorted(ARCHS))
    ap.add_argument("--tuned", action="store_true", help="bf16, dynamic padding, length groups, fused AdamW, batch 32")
    ap.add_argument("--train-rows", type=int, default=1000)
    ap.add_argument("--eval-rows", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t_start = time.time()
    path = str(model_dir(a.root, a.arch))
    batch = 32 if a.tuned else 8
    dtype = torch.bfloat16 if a.tuned else torch.float16

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    tokenizer.pad_token = tokenizer.eos_token

    def tokenize(rows):  # a list of dicts is a valid torch Dataset for the Trainer
        text = [TEMPLATE.format(premise=r["premise"], hypothesis=r["hypothesis"]) for r in rows]
        padding = {} if a.tuned else {"padding": "max_length"}  # tuned: the collator pads each batch
        enc = tokenizer(text, truncation=True, max_length=128, **padding)
        if not all(sum(m) for m in enc["attention_mask"]):
            raise SystemExit(f"the tokenizer of {path} turns some rows into no tokens at all")
        return [
            {
                "input_ids": enc["input_ids"][i],
                "attention_mask": enc["attention_mask"][i],
                "labels": LABELS.index(r["label"]),
            }
            for i, r in enumerate(rows)
        ]

    train_ds = tokenize(load_split(f"{a.root}/data/train.jsonl", a.train_rows))
    val_ds = tokenize(load_split(f"{a.root}/data/validation.jsonl", a.eval_rows))

    t_load = time.time()
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=3,
        quantization_config=bnb,
        dtype=dtype,
        device_map={"": 0},
        trust_remote_code=False,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=not a.tuned)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=ARCHS[a.arch]["targets"],
        task_type="SEQ_CLS",
        bias="none",
    )
    model = get_peft_model(model, lora)
    load_s = time.time() - t_load

    args = TrainingArguments(
        output_dir="/tmp/ref-out",
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        num_train_epochs=a.epochs,
        learning_rate=2e-4,
        fp16=not a.tuned,
        bf16=a.tuned,
        gradient_checkpointing=not a.tuned,
        train_sampling_strategy="group_by_length" if a.tuned else "random",
        optim="adamw_torch_fused" if a.tuned else "paged_adamw_8bit",
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        lr_scheduler_type="linear",
        warmup_steps=round(0.06 * a.epochs * -(-len(train_ds) // batch)),
    )
    timer = StepTimer()
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8) if a.tuned else None
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, data_collator=collator, callbacks=[timer]
    )
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    if not timer.steps:
        raise SystemExit(f"too few steps to time ({timer.skip} warm-up steps skipped): give more --train-rows")
    steady_pairs_s = timer.steps * batch / (timer.t1 - timer.t0)
    real_tokens = sum(sum(r["attention_mask"]) for r in train_ds)
    t0 = time.time()
    metrics = trainer.evaluate()
    eval_s = time.time() - t0
    eval_pairs_s = len(val_ds) / eval_s
    peak = torch.cuda.max_memory_allocated() / 2**30
    measured_total = time.time() - t_start
    # the full reference experiment: eval val(500)+test(1000) before, 5 x (1000 train + 500 val), test(1000)
    full = load_s + 5 * 1000 / steady_pairs_s + (500 + 1000 + 5 * 500 + 1000) / eval_pairs_s
    out = {
        "name": "HF Trainer tuned (bf16, dynamic pad, length groups, fused AdamW, bs 32)"
        if a.tuned
        else "seed-like script (fp16, pad 128, bs 8, checkpointing, paged 8-bit AdamW)",
        "arch": a.arch,
        "tuned": a.tuned,
        "pairs_per_s": steady_pairs_s,
        "pairs_per_s_incl_warmup": len(train_ds) * a.epochs / train_s,
        "real_tokens_per_s": steady_pairs_s * real_tokens / len(train_ds),
        "padded_tokens_per_s": None if a.tuned else steady_pairs_s * 128,
        "mean_real_tokens": real_tokens / len(train_ds),
        "eval_pairs_per_s": eval_pairs_s,
        "peak_gib": peak,
        "load_s": load_s,
        "measured_s": measured_total,
        "total_s": full,
        "total_s_is_extrapolated": True,
        "train_rows": len(train_ds),
        "epochs": a.epochs,
        "eval_loss": metrics.get("eval_loss"),
    }
    print(json.dumps(out))
    if a.out:
        json.dump(out, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
