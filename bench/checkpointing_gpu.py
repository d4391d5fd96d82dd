"""Gradient checkpointing on a GPU: peak memory and time of one training step with and without it,
the gradients of both, and what core/estimate.py predicts for each (a Phi-shaped random model in NF4).

    python -m bench.checkpointing_gpu --out OUT.json [--layers 16 --hidden 2048 --rows 32 --length 256]

Each case: a fresh model (same seed), TrainStep (CUDA graphs on or off, no token budget: one
micro-batch of rows x length tokens), two warm-up steps, then three timed steps; the peak is
torch.cuda.max_memory_allocated over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from core.config import DataConfig, LoraSettings, ModelConfig, RunConfig, SpeedConfig, TrainConfig
from core.estimate import estimate_parameters_from_config, gpu_memory_gb
from core.model import add_lora, load_model
from core.speed.step import TrainStep
from core.speed.tune import checkpoint_layers, tune_model

LORA = LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj", "fc1", "fc2"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    from transformers import PhiConfig, PhiForCausalLM

    shape = dict(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=4 * args.hidden,
        num_attention_heads=args.hidden // 64,
        partial_rotary_factor=0.4,
        vocab_size=51200,
        pad_token_id=0,
    )
    folder = Path(tempfile.mkdtemp()) / "phi"
    torch.manual_seed(0)
    with torch.device("cuda"):
        PhiForCausalLM(PhiConfig(**shape)).to(torch.bfloat16).save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    rows = [
        {"input_ids": torch.randint(1, 51200, (args.length,), generator=g).tolist(), "label": i % 3}
        for i in range(args.rows)
    ]
    cuda = torch.device("cuda")
    results, grads = {}, {}
    for graphs in (False, True):
        for checkpointing in (False, True):
            torch.manual_seed(1)
            model = add_lora(load_model(ModelConfig(name=str(folder)), 3, 0, cuda, torch.bfloat16), LORA)
            tune_model(model, torch.bfloat16, SpeedConfig(pack="off"))
            if checkpointing:
                checkpoint_layers(model)
            model.train()
            speed = SpeedConfig(pack="off", micro_tokens=0, cuda_graphs=graphs)
            step = TrainStep(model, cuda, torch.bfloat16, 0, speed, class_weights=[1.0, 2.0, 0.5])
            for _ in range(2):
                step.zero_grad()
                step.forward_backward(rows, micro=args.rows)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(3):
                step.zero_grad()
                step.forward_backward(rows, micro=args.rows)
                loss = step.take_loss()
            torch.cuda.synchronize()
            name = f"graphs={graphs} checkpointing={checkpointing}"
            results[name] = {
                "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "step_s": round((time.perf_counter() - t0) / 3, 4),
                "loss": loss,
                "graph_captures": step.captures,
                "graph_error": step.graph_error,
            }
            grads[name] = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
            del model, step
            torch.cuda.empty_cache()
    ref = grads["graphs=False checkpointing=False"]
    for name, g in grads.items():
        results[name]["max_rel_grad_diff"] = max(
            float((g[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)) for k in ref
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, num_labels=3)
    params = estimate_parameters_from_config(config, LORA, quantize=True)
    est_shape = {"hidden": args.hidden, "layers": args.layers}
    for checkpointing in (False, True):
        cfg = RunConfig(
            data=DataConfig(max_length=args.length),
            lora=LORA,
            train=TrainConfig(batch_size=args.rows, gradient_checkpointing=checkpointing),
            speed=SpeedConfig(micro_tokens=0),
        )
        results[f"estimate checkpointing={checkpointing}"] = gpu_memory_gb(params, est_shape, cfg, "bfloat16")
    results["shape"] = {**shape, "rows": args.rows, "length": args.length, "gpu": torch.cuda.get_device_name()}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
