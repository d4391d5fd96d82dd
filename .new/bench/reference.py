"""The reference to beat: a typical QLoRA fine-tuning script (HF Trainer), kept plain on purpose.

    python -m bench.reference /tmp/qlora-bench [--train-rows 1000] [--epochs 1] [--out ref.json]

NF4 + double quantisation, fp16, LoRA r=16/alpha 32/dropout 0.05 on q_proj, v_proj, fc1, fc2, a
3-class head, inputs padded to 128 tokens, batch 8, gradient checkpointing, paged 8-bit AdamW.
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
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

LABELS = ["entailment", "neutral", "contradiction"]


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
    ap.add_argument("--train-rows", type=int, default=1000)
    ap.add_argument("--eval-rows", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t_start = time.time()

    tokenizer = AutoTokenizer.from_pretrained(f"{a.root}/model", trust_remote_code=False)
    tokenizer.pad_token = tokenizer.eos_token

    def tokenize(rows):  # a list of dicts is a valid torch Dataset for the Trainer
        text = [f"Premise: {r['premise']}\nHypothesis: {r['hypothesis']}\nRelation:" for r in rows]
        enc = tokenizer(text, padding="max_length", truncation=True, max_length=128)
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
        bnb_4bit_compute_dtype=torch.float16,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        f"{a.root}/model",
        num_labels=3,
        quantization_config=bnb,
        dtype=torch.float16,
        device_map={"": 0},
        trust_remote_code=False,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj", "fc1", "fc2"],
        task_type="SEQ_CLS",
        bias="none",
    )
    model = get_peft_model(model, lora)
    load_s = time.time() - t_load

    args = TrainingArguments(
        output_dir="/tmp/ref-out",
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=a.epochs,
        learning_rate=2e-4,
        fp16=True,
        gradient_checkpointing=True,
        optim="paged_adamw_8bit",
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        lr_scheduler_type="linear",
        warmup_steps=round(0.06 * a.epochs * -(-len(train_ds) // 8)),
    )
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, callbacks=[timer])
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    steady_pairs_s = timer.steps * 8 / (timer.t1 - timer.t0)
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
        "name": "reference (HF Trainer)",
        "pairs_per_s": steady_pairs_s,
        "pairs_per_s_incl_warmup": len(train_ds) * a.epochs / train_s,
        "real_tokens_per_s": steady_pairs_s * real_tokens / len(train_ds),
        "padded_tokens_per_s": steady_pairs_s * 128,
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
