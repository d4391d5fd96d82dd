"""On a GPU, per decoder family: packed rows (FlashAttention varlen), the Triton rotary and CUDA
graphs against the plain padded path (peft + bitsandbytes + transformers as they are), in NF4.

    python -m bench.gpu_families [--families llama,qwen2] [--out gpu_families.json]

Small random models of each family (hidden 256, 2 layers, grouped key/value heads; Gemma 3 with
its real head size 256 and one key/value head; sliding windows of 16 tokens, shorter than most
rows), LoRA on every linear layer, rows of 5 to 60 tokens. bf16: the tuned model's packed
TrainStep (captured, then replayed) gives the plain model's gradients, packed evaluation its
probabilities (eager and through graphs). fp16 as on a T4 (padded, no Triton rotary, GradScaler):
finite losses and the same gradients. Prints the largest relative differences per family and OK,
or MISMATCH (exit 1). First the Triton kernels alone on the GPU (rmsnorm.py and glu.py against
their torch formulas). The CPU tests (tests/speed/test_packing_families.py) check the same maths
in float32; this checks the 16-bit GPU kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch

COMMON = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
    tie_word_embeddings=False,
)
FAMILIES = {
    "phi": ("PhiConfig", dict(partial_rotary_factor=0.4, num_key_value_heads=8)),
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=16)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "gemma": ("GemmaConfig", dict(head_dim=32)),
    "gemma2": ("Gemma2Config", dict(head_dim=32, sliding_window=16, query_pre_attn_scalar=32)),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.5)),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def grads(model, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {n: p.grad.float() * scale for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def check(family: str, dev: torch.device) -> tuple[dict, bool]:
    import transformers

    from core.config import LoraSettings, ModelConfig, SpeedConfig, speed_from_env
    from core.data import collate
    from core.evaluate import predict
    from core.model import add_lora, load_model
    from core.speed import packing, rope
    from core.speed.graphs import EvalGraphs
    from core.speed.step import TrainStep
    from core.speed.tune import tune_model

    name, extra = FAMILIES[family]
    path = tempfile.mkdtemp()
    torch.manual_seed(0)
    cfg = getattr(transformers, name)(**{**COMMON, **extra})
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    lora = LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(24):
        n = int(torch.randint(5, 61, (1,), generator=g))
        rows.append({"input_ids": torch.randint(2, 1000, (n,), generator=g).tolist(), "label": i % 3})
    batch = collate(rows, list(range(len(rows))), 0)
    report, ok = {}, True
    for dtype in (torch.bfloat16, torch.float16):

        def make(dtype=dtype):
            torch.manual_seed(1)
            m = add_lora(load_model(ModelConfig(name=path), 3, 0, dev, dtype), lora)
            for n, p in m.named_parameters():  # non-zero LoRA B, so that every gradient is non-trivial
                if "lora_B" in n:
                    p.data.normal_(0, 0.02)
            return m

        plain, tuned = make(), make()
        t4 = dtype == torch.float16  # the T4 path: padded batches, the rotary in torch, a GradScaler
        # the QLORA_* variants of the environment apply (bench/ab_gpu.sh, families_gpu.sh)
        speed = speed_from_env(SpeedConfig(pack="off", triton_rotary=False) if t4 else SpeedConfig())
        changes = tune_model(tuned, dtype, speed)
        plain.train()
        with torch.autocast("cuda", dtype=dtype):
            logits = plain(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
        torch.nn.functional.cross_entropy(logits.float(), batch["labels"].to(dev)).backward()
        want = grads(plain)
        calls = []
        kept = rope.rope_heads, rope.rope

        def counting(f, calls=calls):
            def counted(*a):
                calls.append(1)
                return f(*a)

            return counted

        rope.rope_heads, rope.rope = counting(rope.rope_heads), counting(rope.rope)
        scaler = torch.amp.GradScaler("cuda") if t4 else None
        step = TrainStep(tuned, dev, dtype, 0, speed, scaler=scaler, data=rows, micro=len(rows))
        tuned.train()
        for _ in range(2):  # the first call captures the graphs (its gradient does not count), the second replays
            step.zero_grad()
            step.forward_backward(rows)
        loss = step.take_loss()
        got = grads(tuned, 1.0 / scaler.get_scale() if scaler else 1.0)
        rope.rope_heads, rope.rope = kept
        r = {
            "changes": changes,
            "packed": step.packed,
            "cuda_graphs": step.graphs,
            "graph_error": step.graph_error,
            "triton_rotary_ran": bool(calls),
            "loss_finite": bool(torch.isfinite(torch.tensor(loss))),
            "max_grad_rel_err": max(rel(got[n], w) for n, w in want.items()),
            "grads": len(want),
        }
        ok &= r["loss_finite"] and r["max_grad_rel_err"] < 0.05 and len(got) == len(want) and r["cuda_graphs"]
        plain.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            ref = plain(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
        ref_probs = torch.softmax(ref.float(), -1).cpu().numpy()
        eager, _ = predict(tuned, rows, 8, 0, dev, dtype, speed=speed)
        graphs = EvalGraphs(dev)
        predict(tuned, rows, 8, 0, dev, dtype, graphs=graphs, speed=speed)  # capture
        replayed, _ = predict(tuned, rows, 8, 0, dev, dtype, graphs=graphs, speed=speed)
        r.update(
            eval_probs_max_abs_err=float(abs(eager - ref_probs).max()),
            eval_graphs_probs_max_abs_err=float(abs(replayed - ref_probs).max()),
            eval_graph_error=graphs.error,
        )
        ok &= r["eval_probs_max_abs_err"] < 2e-2 and r["eval_graphs_probs_max_abs_err"] < 2e-2
        if not t4:
            expect_packed = packing.why_not(tuned) is None
            r["why_not_packed"] = packing.why_not(tuned)
            ok &= r["packed"] == expect_packed and (r["triton_rotary_ran"] or family == "gemma2")
        report[str(dtype).replace("torch.", "")] = r
        del plain, tuned, step, graphs
        torch.cuda.empty_cache()
    return report, ok


def kernels(dev: torch.device) -> tuple[dict, bool]:
    """The RMSNorm and gated-MLP Triton kernels on the GPU against their torch formulas: the
    largest relative differences, bf16 and fp16."""
    from core.speed import glu, qlinear, rmsnorm

    torch.manual_seed(0)
    out, ok = {}, True
    for dt in (torch.bfloat16, torch.float16):
        r = {}
        for formula in rmsnorm.FORMULAS:
            x = (torch.randn(700, 1536, device=dev) * 3).to(dt).requires_grad_(True)
            w = torch.randn(1536, device=dev).to(dt)
            y = rmsnorm.rms_norm(x, w, 1e-6, formula)
            ref, _ = rmsnorm.reference(x, w, 1e-6, formula)
            g = torch.randn_like(y)
            (gx,) = torch.autograd.grad(y, x, g)
            (want,) = torch.autograd.grad(ref, x, g)
            r[f"rmsnorm_{formula}"] = [rel(y, ref), rel(gx, want)]
        for act in qlinear.GLU:
            x = torch.randn(700, 2 * 4480, device=dev).to(dt)
            gate, up = x.float().chunk(2, -1)
            h = qlinear._gate(gate, act) * up
            r[act] = rel(glu.forward(x, act), h)
        ok &= all(max(r[f"rmsnorm_{f}"]) < 1e-2 for f in rmsnorm.FORMULAS)
        ok &= all(r[act] < 1e-2 for act in qlinear.GLU)
        out[str(dt).replace("torch.", "")] = r
    return out, ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda", 0)
    report, ok = {}, True
    try:
        report["kernels"], ok = kernels(dev)
    except Exception as e:  # noqa: BLE001 - reported, and the families still run
        report["kernels"], ok = {"error": f"{type(e).__name__}: {e}"[:2000]}, False
    print("kernels", "OK" if ok else "MISMATCH", json.dumps(report["kernels"]), flush=True)
    for family in filter(None, a.families.split(",")):
        try:
            report[family], fine = check(family, dev)
        except Exception as e:  # one family's failure must not hide the others'
            report[family], fine = {"error": f"{type(e).__name__}: {e}"[:2000]}, False
        ok &= fine
        print(family, "OK" if fine else "MISMATCH", json.dumps(report[family])[:1500], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
