"""On a GPU: the tuned path (core.speed.tune.tune_model: fused 4-bit linear + LoRA function, three-kernel
partial rotary, fused GELU, 16-bit LayerNorm; TrainStep with CUDA graphs) against the plain path
(peft + bitsandbytes + transformers as they are), on a small random Phi in NF4, bf16 and fp16.

    python -m bench.gpu_check        # prints the largest differences; exits 1 if one is too large

The CPU tests (tests/speed/test_perf.py) check the same in float32; this checks the 16-bit GPU kernels.
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch


def main() -> int:
    from transformers import PhiConfig, PhiForCausalLM

    from core.config import LoraSettings, ModelConfig, SpeedConfig
    from core.model import add_lora, load_model
    from core.speed import packing
    from core.speed.graphs import EvalGraphs
    from core.speed.step import TrainStep
    from core.speed.tune import tune_model

    dev = torch.device("cuda", 0)
    path = tempfile.mkdtemp()
    torch.manual_seed(0)
    cfg = PhiConfig(
        hidden_size=640,
        num_hidden_layers=4,
        intermediate_size=2560,
        num_attention_heads=8,
        partial_rotary_factor=0.4,
        vocab_size=1000,
        pad_token_id=0,
    )
    PhiForCausalLM(cfg).save_pretrained(path)
    lora = LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj", "fc1", "fc2"])
    ok = True
    report = {}
    for dtype in (torch.bfloat16, torch.float16):

        def make(dtype=dtype):
            torch.manual_seed(1)
            m = add_lora(load_model(ModelConfig(name=path), 3, 0, dev, dtype), lora)
            for n, p in m.named_parameters():  # non-zero LoRA B, so that every gradient is non-trivial
                if "lora_B" in n:
                    p.data.normal_(0, 0.02)
            return m

        plain, tuned = make(), make()
        changes = tune_model(tuned, dtype, SpeedConfig())
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(1, 1000, (16, 48), generator=g)
        labels = torch.randint(0, 3, (16,), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        out = {}
        for name, model in (("plain", plain), ("tuned", tuned)):
            model.train()
            if name == "plain":
                with torch.autocast("cuda", dtype=dtype):
                    logits = model(input_ids=ids.to(dev)).logits.float()
                torch.nn.functional.cross_entropy(logits, labels.to(dev), reduction="sum").div(16).backward()
            else:  # through TrainStep's CUDA graphs; fp16 with a GradScaler, as core.train runs it
                scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

                def unscale(scaler=scaler) -> float:
                    return 1.0 / scaler.get_scale() if scaler else 1.0

                step = TrainStep(model, dev, dtype, 0, SpeedConfig(), scaler=scaler)
                step.zero_grad()
                step.run(batch, step_rows=16, rows=16)
                step.zero_grad()  # the first run captured the graph (its gradient does not count)
                step.run(batch, step_rows=16, rows=16)
                model.eval()
                with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                    logits = model(input_ids=ids.to(dev)).logits.float()
                out["graphs"] = step.graphs
                # packed (core/speed/packing.py): the same rows end to end, FlashAttention's varlen kernel
                grads = {
                    n: p.grad.float() * unscale()
                    for n, p in model.named_parameters()
                    if p.requires_grad and p.grad is not None
                }
                model.train()
                rows = [{"input_ids": ids[i].tolist(), "label": int(labels[i])} for i in range(16)]
                pstep = TrainStep(model, dev, dtype, 0, SpeedConfig(), scaler=scaler)
                out["packed_enabled"] = pstep.packed
                pstep.zero_grad()
                pstep.run_packed(rows, step_rows=16, max_rows=16, max_len=64)
                pstep.zero_grad()
                pstep.run_packed(rows, step_rows=16, max_rows=16, max_len=64)
                out["packed_graphs"] = pstep.graphs
                model.eval()
                with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                    plogits = packing.packed_logits(
                        model, {k: v.to(dev) for k, v in packing.pack(rows, 0).items()}, 64
                    ).float()
                out["packed"] = (
                    plogits,
                    {
                        n: p.grad.float() * unscale()
                        for n, p in model.named_parameters()
                        if p.requires_grad and p.grad is not None
                    },
                )
                out[name] = (logits.detach(), grads)
                continue
            out[name] = (
                logits.detach(),
                {
                    n: p.grad.float().clone()
                    for n, p in model.named_parameters()
                    if p.requires_grad and p.grad is not None
                },
            )

        def rel(a, b) -> float:
            return float((a - b).norm() / b.norm().clamp_min(1e-12))

        logit_err = rel(out["tuned"][0], out["plain"][0])
        grad_err = max(rel(out["tuned"][1][n], gp) for n, gp in out["plain"][1].items())
        same_pred = float((out["tuned"][0].argmax(-1) == out["plain"][0].argmax(-1)).float().mean())
        report[str(dtype)] = {
            "changes": changes,
            "cuda_graphs": out.get("graphs"),
            "logits_rel_err": logit_err,
            "max_grad_rel_err": grad_err,
            "same_predictions": same_pred,
            "grads": len(out["plain"][1]),
        }
        ok &= logit_err < 0.02 and grad_err < 0.05 and len(out["tuned"][1]) == len(out["plain"][1])
        p_logit_err = rel(out["packed"][0], out["plain"][0])
        p_grad_err = max(rel(out["packed"][1][n], gp) for n, gp in out["plain"][1].items())
        report[str(dtype)].update(
            packed_enabled=out["packed_enabled"],
            packed_graphs=out["packed_graphs"],
            packed_logits_rel_err=p_logit_err,
            packed_max_grad_rel_err=p_grad_err,
        )
        ok &= out["packed_enabled"] and p_logit_err < 0.02 and p_grad_err < 0.05
        # evaluation through captured graphs (capture, then replay) against eager evaluation
        from core.evaluate import predict

        enc = [{"input_ids": ids[i, : 8 + 2 * i].tolist(), "label": int(labels[i])} for i in range(16)]
        eager, _ = predict(tuned, enc, 8, 0, dev, dtype)  # packed (the default on a GPU)
        padded, _ = predict(tuned, enc, 8, 0, dev, dtype, speed=SpeedConfig(pack="off"))
        report[str(dtype)]["packed_vs_padded_probs_max_abs_err"] = float(abs(eager - padded).max())
        ok &= float(abs(eager - padded).max()) < 1e-2
        graphs = EvalGraphs(dev)
        first, _ = predict(tuned, enc, 8, 0, dev, dtype, graphs=graphs)  # packed, through captured graphs
        again, _ = predict(tuned, enc, 8, 0, dev, dtype, graphs=graphs)
        eval_err = float(max(abs(first - eager).max(), abs(again - eager).max()))
        report[str(dtype)].update(
            eval_graphs=graphs.enabled,
            eval_graph_shapes=len(graphs.cache),
            eval_graph_error=graphs.error,
            eval_probs_max_abs_err=eval_err,
        )
        ok &= eval_err < 1e-2 and graphs.enabled
    print(json.dumps(report, indent=1))
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
