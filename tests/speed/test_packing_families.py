"""Packed rows and the fused rotary embedding on every decoder family, against the padded path, on CPU.

For each family of core/speed/packing.FAMILIES a tiny random model (tests.helpers.tiny_decoder_config:
2 layers, hidden 64, and the family's own features: grouped key/value heads, sliding windows of 8
tokens, shorter than most rows, q/k norms, Phi-3's fused qkv projection, partial rotary) in NF4
with LoRA on every linear layer, loaded through core.model as the app loads it. Packed rows (the
CPU's masked SDPA) give the padded path's logits, probabilities and LoRA/head gradients. The
rotary kernel (rope.py) runs through Triton's interpreter in a subprocess, per family, against
each family's own apply_rotary_pos_emb. Gemma 2 (soft-capped attention logits) and encoders stay
padded and say why.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types

import pytest
import torch

from core.config import LoraSettings, ModelConfig, SpeedConfig
from core.data import collate
from core.evaluate import predict
from core.speed import attention, packing, rmsnorm, rope, tune
from core.speed.patch import is_patched
from core.speed.step import TrainStep
from tests.helpers import CPU, ROOT, tiny_config, tiny_decoder_config

PACKED = ("phi", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3")
LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")


def make_tiny(family: str, folder, lora: LoraSettings = LORA, **overrides):
    """make() -> a fresh NF4 + LoRA classifier of `family`, saved once to `folder` (the same base
    weights and, seeded, the same head and LoRA weights every call); B is random, not zero, so
    that every LoRA matrix gets a gradient."""
    from transformers import AutoModelForCausalLM

    from core.model import add_lora, load_model

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_decoder_config(family, **overrides)).save_pretrained(folder)

    def make():
        torch.manual_seed(1)
        model = load_model(
            ModelConfig(name=str(folder), compute_dtype="float32", device="cpu"), 3, 0, CPU, torch.float32
        )
        model = add_lora(model, lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        return model

    return make


def rows(n=12, seed=3):
    """Rows of 4-29 tokens (pad id 0 never inside), the last one ending in the pad token, as a
    row does where the tokenizer appends EOS and EOS is the pad token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 30, (1,), generator=g))
        out.append({"input_ids": torch.randint(2, 300, (length,), generator=g).tolist(), "label": i % 3})
    out[-1]["input_ids"].append(0)
    return out


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_diff(got: dict, want: dict) -> float:
    return max(float((got[n] - g).abs().max()) for n, g in want.items())


@pytest.mark.parametrize("family", PACKED)
def test_packed_rows_match_the_padded_path(family, tmp_path):
    make = make_tiny(family, tmp_path / family)
    plain, fast = make(), make()
    changes = tune.tune_model(fast, torch.float32, SpeedConfig(pack="on"))
    assert "attention per packed row (padded batches: SDPA)" in changes, changes
    assert (attention.PHI_CHANGE if family == "phi" else attention.ROTARY_CHANGE) in changes, changes
    assert packing.why_not(fast) is None and packing.enabled(fast, CPU, torch.float32, "on")
    mlps = [m for name, m in fast.named_modules() if name.endswith(".mlp")]
    assert len(mlps) == 2 and all(is_patched(m) for m in mlps)  # Phi's GELU or the gated MLP, fused
    glu = "gated MLP: act(gate) * up inside down_proj's function, recomputed in backward"
    assert (glu in changes) == (family != "phi"), changes
    assert not any("stacked" in c for c in changes), changes  # a CPU runs each layer alone (STACK_DEVICES)
    norms = [m for m in fast.modules() if type(m).__name__.endswith("RMSNorm")]
    assert (rmsnorm.CHANGE in changes) == (family != "phi") == bool(norms), changes
    assert all(is_patched(m) for m in norms)  # every RMSNorm (q/k norms too) keeps only x and rstd
    assert not packing.supported(plain)  # untuned: transformers' own attention
    assert not packing.enabled(fast, CPU, torch.float32, "auto")  # CPU: padded by default
    enc = rows()
    batch = collate(enc, list(range(len(enc))), 0)

    plain.eval()
    fast.eval()
    with torch.no_grad():
        ref = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        padded = fast(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = packing.packed_logits(fast, packing.pack(enc, 0, slots=15), packing.max_len(enc))
    assert got.shape == (15, 3)
    torch.testing.assert_close(padded, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[: len(enc)], ref, rtol=1e-4, atol=1e-4)
    probs, loss = predict(fast, enc, 5, 0, CPU, torch.float32, speed=SpeedConfig(pack="on", eval_tokens=128))
    torch.testing.assert_close(torch.from_numpy(probs), torch.softmax(ref, -1), rtol=1e-4, atol=1e-4)
    assert math.isclose(loss, torch.nn.functional.cross_entropy(ref, batch["labels"]).item(), rel_tol=1e-4)
    # padded without a mask, as TrainStep and predict run a causal model (the sliding window then
    # comes from packing.packed_attention, not from a mask)
    padded_probs, _ = predict(fast, enc, 5, 0, CPU, torch.float32, speed=SpeedConfig(pack="off"))
    torch.testing.assert_close(torch.from_numpy(padded_probs), torch.softmax(ref, -1), rtol=1e-4, atol=1e-4)

    plain.train()
    logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    want = grads(plain)
    assert len(want) > 2 * 7 and all(float(g.abs().max()) > 0 for g in want.values())
    for budget in (0, 128):  # one packed micro-batch, then several
        fast.train()
        step = TrainStep(fast, CPU, torch.float32, 0, SpeedConfig(pack="on", micro_tokens=budget))
        assert step.packed
        step.zero_grad()
        real, processed = step.run_packed(enc, step_rows=len(enc), max_rows=8, max_len=packing.max_len(enc))
        assert real == sum(len(r["input_ids"]) for r in enc) <= processed
        assert math.isclose(
            step.take_loss(), torch.nn.functional.cross_entropy(logits, batch["labels"]).item(), rel_tol=1e-4
        )
        got_grads = grads(fast)
        assert got_grads.keys() == want.keys()
        for name, g in want.items():
            torch.testing.assert_close(got_grads[name], g, rtol=1e-3, atol=1e-5, msg=f"{family} {name} ({budget})")
    print(
        f"{family}: max |packed - padded| logits {float((got[: len(enc)] - ref).abs().max()):.2e}, "
        f"gradients {max_diff(got_grads, want):.2e}"
    )


@pytest.mark.parametrize("family", ("phi", "llama", "gemma3_text", "phi3"))
@pytest.mark.parametrize(
    "stack, side", [(True, False), (True, True), (False, True)], ids=["stack", "stack-side", "side"]
)
def test_stacked_projections_under_dropout_compute_what_peft_computes(family, stack, side, tmp_path, monkeypatch):
    """q_proj, k_proj and v_proj, and a gated MLP's gate_proj and up_proj, each as one
    QLoRAStackFn (one GEMM each way; Phi-3's qkv_proj and gate_up_proj are one layer each
    already), the scales kept dequantised: peft's logits and LoRA gradients in training mode with
    dropout 0.3, the same masks drawn (seeded) in the same order. `side`: speed.lora_stream's
    order of work (the LoRA path before the base GEMM, its input gradient added after; on a CPU
    without the second stream), stacked or layer by layer."""
    from dataclasses import replace

    from core.speed import qlinear

    if stack:
        monkeypatch.setattr(qlinear, "STACK_DEVICES", {"cuda", "cpu"})  # by default only on a GPU
    make = make_tiny(family, tmp_path / family, lora=replace(LORA, dropout=0.3))
    plain, fast = make(), make()
    changes = tune.tune_model(fast, torch.float32, SpeedConfig(lora_stream=side))
    assert "double-quantised scales dequantised once (0.5 bit a weight; one kernel a dequantisation)" in changes
    groups = (
        {"phi": "q/k/v", "phi3": None}.get(family, "q/k/v and gate/up") if stack else None
    )  # Phi-3's: one layer each
    stacked_change = [c for c in changes if c.endswith(" stacked: one dequantised buffer, one GEMM each way")]
    assert stacked_change == ([f"{groups} stacked: one dequantised buffer, one GEMM each way"] if groups else [])
    assert not any("second CUDA stream" in c for c in changes)  # no such stream on a CPU: not claimed
    fused = [m for m in fast.modules() if hasattr(m, "base_layer") and is_patched(m)]
    assert len(fused) == 2 * {"phi3": 4, "phi": 6}.get(family, 7) and all(qlinear.kept_absmax(m) for m in fused)
    assert all(qlinear._side_of(m) is side for m in fused)
    stacked = []
    forward = qlinear.QLoRAStackFn.forward
    monkeypatch.setattr(
        qlinear.QLoRAStackFn,
        "forward",
        staticmethod(
            lambda ctx, x, layers, *loras: stacked.append([p for *_, p in layers]) or forward(ctx, x, layers, *loras)
        ),
    )
    enc = rows()
    batch = collate(enc, list(range(len(enc))), 0)
    out = {}
    for name, model in (("plain", plain), ("fast", fast)):
        model.train()
        torch.manual_seed(5)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        out[name] = (logits.detach(), grads(model))
    per_layer = (
        {"phi": [[0.3] * 3], "phi3": []}.get(family, [[0.3] * 3, [0.3] * 2]) if stack else []
    )  # q, k, v; gate, up
    assert stacked == per_layer * 2  # both layers, every adapter with its dropout
    assert not any("_qlora_next" in m.__dict__ for m in fast.modules())  # every kept output was taken
    torch.testing.assert_close(out["fast"][0], out["plain"][0], rtol=1e-5, atol=1e-5)
    for name, g in out["plain"][1].items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(out["fast"][1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    torch.manual_seed(6)  # other masks: other logits (dropout is on)
    assert not torch.allclose(fast(input_ids=batch["input_ids"]).logits, out["fast"][0])
    fast.eval()
    plain.eval()
    with torch.no_grad():  # no gradient, more rows than inputs: s B A added into the weight copy
        torch.testing.assert_close(fast(**batch_inputs(batch)).logits, plain(**batch_inputs(batch)).logits)
    kept = make()
    tune.tune_model(kept, torch.float32, SpeedConfig(keep_absmax=False))
    assert not any(qlinear.kept_absmax(m) for m in kept.modules())
    monkeypatch.setattr(qlinear, "STACK_DEVICES", {"cuda"})  # the CPU default: each layer its own call
    stacked.clear()
    with torch.no_grad():
        torch.testing.assert_close(fast(**batch_inputs(batch)).logits, plain(**batch_inputs(batch)).logits)
    assert stacked == [] and not any("_qlora_next" in m.__dict__ for m in fast.modules())


@pytest.mark.parametrize("family", ("llama", "phi"))
def test_lora_copies_made_once_a_micro_batch_give_the_per_call_numbers(family, tmp_path, monkeypatch):
    """TrainStep's LoraCopies: every adapter's s A and B made once per micro-batch (a few
    multi-tensor kernels) instead of at every call give the per-call copies' loss and gradients
    bit for bit, stacked and not, under dropout; afresh after the weights change; and no layer
    reads them outside a forward and backward."""
    from dataclasses import replace

    from core.speed import qlinear

    monkeypatch.setattr(qlinear, "STACK_DEVICES", {"cuda", "cpu"})  # stacked as on a GPU
    model = make_tiny(family, tmp_path / family, lora=replace(LORA, dropout=0.3))()
    tune.tune_model(model, torch.float32, SpeedConfig())
    model.train()
    step = TrainStep(model, CPU, torch.float32, 0, SpeedConfig())
    assert step.copies and len(step.copies.modules) == 2 * {"phi": 6}.get(family, 7)
    copies = step.copies
    refreshed = []
    refresh = qlinear.LoraCopies.refresh
    monkeypatch.setattr(qlinear.LoraCopies, "refresh", lambda self: refreshed.append(1) or refresh(self))
    enc = rows()

    def run(armed: bool):
        step.copies = copies if armed else None  # None: the layers copy at every call
        step.zero_grad()
        torch.manual_seed(5)
        step.forward_backward(enc, micro=6)
        return step.take_loss(), grads(model)

    for change in (False, True):
        if change:  # the optimiser moved the weights: the next micro-batch copies the new ones
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_" in name:
                        param.mul_(1.5).add_(0.01)
        refreshed.clear()
        (loss, got), (want_loss, want) = run(True), run(False)
        assert len(refreshed) == 2  # 12 rows in micro-batches of 6: once each
        assert loss == want_loss and got.keys() == want.keys()
        for name, g in want.items():
            assert torch.equal(got[name], g), name
        assert any(float(g.abs().max()) > 0 for name, g in want.items() if "lora_A" in name)
    assert not any(qlinear._COPIES in m.__dict__ for m in model.modules())  # unarmed after the step


def batch_inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_kept_scales_dequantise_to_bitsandbytes_own_numbers():
    """qlinear.dequantize from kept scales (and dequantize_into a buffer's rows) = bitsandbytes'
    dequantize_4bit, bit for bit; a single-quantised weight keeps nothing."""
    import bitsandbytes.functional as bnbF

    from core.speed import qlinear

    w = torch.randn(192, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for nested in (True, False):
        packed, state = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
        want = bnbF.dequantize_4bit(packed, state)
        assert qlinear.keep_absmax(state) == nested
        assert torch.equal(qlinear.dequantize(packed, state), want)
        buffer = torch.zeros(256, 128, dtype=torch.bfloat16)
        qlinear.dequantize_into(packed, state, buffer[64:])
        assert torch.equal(buffer[64:], want) and not buffer[:64].any()


def test_fused_norm_off_keeps_every_familys_own_norm(tmp_path):
    """speed.fused_norm = false (QLORA_FUSED_NORM=0, the benchmarks' switch) leaves each RMSNorm to
    its family's forward and says nothing of it; on, the same model's norms give the same numbers."""
    from core.config import speed_from_env

    speed = speed_from_env(SpeedConfig(pack="on"), {"QLORA_FUSED_NORM": "0"})
    assert speed.fused_norm is False
    make = make_tiny("qwen3", tmp_path / "qwen3")
    off, on = make(), make()
    assert rmsnorm.CHANGE not in tune.tune_model(off, torch.float32, speed)
    assert rmsnorm.CHANGE in tune.tune_model(on, torch.float32, SpeedConfig(pack="on"))
    norms = [m for m in off.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) >= 4 and not any(is_patched(m) for m in norms)  # layer norms and q/k norms
    enc = rows()
    batch = collate(enc, list(range(len(enc))), 0)
    with torch.no_grad():
        want = off(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = on(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_rmsnorm_that_computes_something_else_keeps_its_own_forward():
    """rmsnorm.install takes a class only where its own forward gives one of the two formulas on a
    probe: a norm that divides by the mean of |x| instead is left alone, a copy of Llama's formula
    under another name is taken."""

    class OtherRMSNorm(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(d))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            x32 = x.float()
            return self.weight * (x32 / (x32.abs().mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)

    class CopiedRMSNorm(OtherRMSNorm):
        def forward(self, x):
            x32 = x.float()
            x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self.weight * x32.to(x.dtype)

    model = torch.nn.Sequential(OtherRMSNorm(8), CopiedRMSNorm(8)).requires_grad_(False)
    assert rmsnorm.install(model) == [rmsnorm.CHANGE]
    assert not is_patched(model[0]) and is_patched(model[1])
    x = torch.randn(3, 8)
    torch.testing.assert_close(model[1](x), CopiedRMSNorm.forward(model[1], x), rtol=1e-6, atol=1e-6)


def test_gemma2_soft_capping_and_encoders_stay_padded_and_say_why(tmp_path):
    """Gemma 2 caps its attention logits (50.0 in every Gemma 2 checkpoint): torch's FlashAttention
    kernel cannot, so its rows stay padded, with the reason in tune_model's list (the setup
    record's speedups), and the padded path is unchanged. An encoder says it is one."""
    from transformers import AutoModelForSequenceClassification

    make = make_tiny("gemma2", tmp_path / "gemma2")
    plain, fast = make(), make()
    changes = tune.tune_model(fast, torch.float32, SpeedConfig(pack="on"))
    why = packing.why_not(fast)
    assert "soft-caps its attention logits (attn_logit_softcapping=50.0)" in why
    assert f"rows not packed: {why}" in changes
    assert not packing.enabled(fast, CPU, torch.float32, "on")
    enc = rows()
    batch = collate(enc, list(range(len(enc))), 0)
    with torch.no_grad():
        ref = plain.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    probs, _ = predict(fast, enc, 5, 0, CPU, torch.float32, speed=SpeedConfig(pack="on"))
    torch.testing.assert_close(torch.from_numpy(probs), torch.softmax(ref, -1), rtol=1e-4, atol=1e-4)

    bert = AutoModelForSequenceClassification.from_config(tiny_config("bert"))
    assert "rows not packed: bert is an encoder" in " ".join(tune.tune_model(bert, torch.float32))
    assert bert.config._attn_implementation != packing.IMPLEMENTATION


def test_packed_attention_sliding_window_on_cpu():
    """The CPU attention's mask: causal within each segment, and within `window` tokens (the token
    itself included, as transformers' sliding-window mask has it), grouped key heads."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 12, 12, 16], dtype=torch.int32)
    q = torch.randn(16, 4, 8)
    k = torch.randn(16, 2, 8)
    v = torch.randn(16, 2, 8)
    for window in (None, 3):
        out = packing.attention(q, k, v, cu, 8, 0.5, window)
        for a, b in ((0, 5), (5, 12), (12, 16)):
            for t in range(a, b):
                lo = a if window is None else max(a, t - window + 1)
                keys = k[lo : t + 1].repeat_interleave(2, dim=1)
                vals = v[lo : t + 1].repeat_interleave(2, dim=1)
                w = torch.softmax(torch.einsum("hd,khd->hk", q[t], keys) * 0.5, -1)
                torch.testing.assert_close(out[t], torch.einsum("hk,khd->hd", w, vals), rtol=1e-5, atol=1e-5)


def test_a_rotary_that_is_not_transformers_formula_is_left_alone():
    """attention.py binds the kernel only where a family's apply_rotary_pos_emb computes the
    rotate_half formula: an interleaved (GPT-J style) one keeps its own, and says why."""
    scope = types.ModuleType("interleaved_family")
    exec(
        "import torch\n"
        "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):\n"
        "    def rot(x):\n"
        "        return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)\n"
        "    c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)\n"
        "    return q * c + rot(q) * s, k * c + rot(k) * s\n"
        "class InterleavedAttention(torch.nn.Module):\n"
        "    def forward(self, q, k, cos, sin):\n"
        "        return apply_rotary_pos_emb(q, k, cos, sin)\n",
        scope.__dict__,
    )
    forward, why = attention.fused_rotary_forward(scope.InterleavedAttention)
    assert forward is None and "not the rotate_half formula" in why
    changes = attention.patch_attention(torch.nn.Sequential(scope.InterleavedAttention()), triton=True)
    assert changes == [f"rotary embedding not fused: {why}"]

    from transformers.models.llama import modeling_llama

    assert attention.why_not_standard(modeling_llama.apply_rotary_pos_emb) is None
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    cos, sin = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    got = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(got[0], rope.reference_heads(q, cos, sin))


ROTARY_CHECK = r"""
import copy, sys, torch
from transformers import AutoModelForSequenceClassification
from core.speed import attention, packing, rmsnorm, rope, tune
from core.config import SpeedConfig
from core.data import collate
from tests.helpers import tiny_decoder_config
assert rope.available(torch.zeros(1))  # the interpreter stands in for a GPU

# the kernel itself: the [B, heads, S, D] layout of transformers' attention, a slice of a fused qkv
# projection (not dense), grouped key heads, full and partial rotary; forward and backward
torch.manual_seed(0)
B, S, H, D = 2, 5, 3, 16
for rot in (D, 8):
    angles = torch.randn(B, S, rot // 2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    qkv = torch.randn(B, S, (H + 2) * D + 7, requires_grad=True)
    for x in (qkv[..., : H * D].view(B, S, H, D).transpose(1, 2), torch.randn(B, H, S, D).requires_grad_()):
        out, ref = rope.rope_heads(x, cos, sin), rope.reference_heads(x, cos, sin)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        g = torch.randn_like(out)
        leaf = qkv if x.grad_fn is not None else x
        got, = torch.autograd.grad(out, leaf, g)
        want, = torch.autograd.grad(ref, leaf, g)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
print("kernel ok")

# each family: the bound kernel gives transformers' logits and gradients
g = torch.Generator().manual_seed(3)
enc = [{"input_ids": torch.randint(2, 300, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist(),
        "label": i % 3} for i in range(3)]
batch = collate(enc, list(range(3)), 0)
for family in sys.argv[1:]:
    cfg = tiny_decoder_config(family, num_labels=3, use_cache=False)  # as core.model.load_model sets it
    torch.manual_seed(0)
    plain = AutoModelForSequenceClassification.from_config(copy.deepcopy(cfg))
    fast = AutoModelForSequenceClassification.from_config(copy.deepcopy(cfg))
    fast.load_state_dict(plain.state_dict())
    changes = tune.tune_model(fast, torch.float32, SpeedConfig(pack="on"))
    assert any(c in changes for c in (attention.ROTARY_CHANGE, attention.PHI_CHANGE)), changes
    calls, kept = [], (rope.rope, rope.rope_heads)
    def counting(f):
        def counted(*a):
            calls.append(1)
            return f(*a)
        return counted
    rope.rope, rope.rope_heads = counting(rope.rope), counting(rope.rope_heads)
    out = {}
    for label, model in (("plain", plain), ("fast", fast)):
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        out[label] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls, family  # the kernel ran
    torch.testing.assert_close(out["fast"][0], out["plain"][0], rtol=1e-5, atol=1e-5)
    grad_diff = max(float((out["fast"][1][n] - w).abs().max()) for n, w in out["plain"][1].items())
    for n, w in out["plain"][1].items():
        torch.testing.assert_close(out["fast"][1][n], w, rtol=1e-4, atol=1e-5, msg=f"{family} {n}")
    print(f"{family} ok: logits {float((out['fast'][0] - out['plain'][0]).abs().max()):.1e}, gradients {grad_diff:.1e}")
    rope.rope, rope.rope_heads = kept
"""


# one family per layout the kernel meets (the rest run Llama's attention code): Phi's own forward,
# Llama, q/k norms (Qwen3), q/k norms with local and global rotary tables (Gemma 3), a fused qkv
# projection with partial rotary (Phi-3). The interpreter takes ~10 s a family on a loaded CPU.
TRITON_FAMILIES = ("phi", "llama", "qwen3", "gemma3_text", "phi3")

KERNEL_CHECK = r"""
import sys, torch
from core.speed import glu, qlinear, rmsnorm
assert rmsnorm.available(torch.zeros(1)) and glu.available(torch.zeros(1))  # the interpreter stands in for a GPU
torch.manual_seed(0)
# RMSNorm: both formulas, fp32 and bf16 inputs and weights, widths that are no power of two (a head's
# 40, a hidden 200), rows that fill no block; forward and the input's gradient against torch's ops
for formula in rmsnorm.FORMULAS:
    for wd in (torch.float32, torch.bfloat16):
        for xd in (torch.float32, torch.bfloat16):
            for shape in ((3, 7, 200), (2, 5, 3, 40), (1, 1, 200)):
                w = torch.randn(shape[-1]).to(wd)
                x = (torch.randn(shape) * 3).to(xd).requires_grad_(True)
                y = rmsnorm.rms_norm(x, w, 1e-6, formula)
                ref, _ = rmsnorm.reference(x, w, 1e-6, formula)
                tol = dict(rtol=1e-5, atol=1e-5) if xd == torch.float32 else dict(rtol=2e-2, atol=0.13)
                assert y.dtype == ref.dtype and y.shape == ref.shape, (y.dtype, ref.dtype)
                torch.testing.assert_close(y.float(), ref.float(), **tol)
                g = torch.randn_like(y)
                got, = torch.autograd.grad(y, x, g)
                want, = torch.autograd.grad(ref, x, g)
                torch.testing.assert_close(got.float(), want.float(), **tol)
print("rmsnorm ok")
# the gated MLP's act(gate) * up: forward and both halves' gradients against torch's formula
for act in qlinear.GLU:
    x = (torch.randn(5, 2 * 1500) * 2).double().float().requires_grad_(True)
    gate, up = x.chunk(2, -1)
    ref = qlinear._gate(gate, act) * up
    g = torch.randn_like(ref)
    want, = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(glu.forward(x.detach(), act), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(glu.backward(g, x.detach(), act), want, rtol=1e-5, atol=1e-5)
print("glu ok")
# whole tiny NF4 + LoRA models with every kernel bound (norms, the gated MLP, the rotary) against
# the plain path: logits and every LoRA and head gradient
import tempfile
from core.data import collate
from tests.speed.test_packing_families import grads, make_tiny, max_diff, rows
from core.config import SpeedConfig
from core.speed import tune
enc = rows()
batch = collate(enc, list(range(len(enc))), 0)
for family in sys.argv[1:]:
    make = make_tiny(family, tempfile.mkdtemp())
    plain, fast = make(), make()
    changes = tune.tune_model(fast, torch.float32, SpeedConfig(pack="off"))
    assert rmsnorm.CHANGE in changes, changes
    out = {}
    for label, model in (("plain", plain), ("fast", fast)):
        model.train()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        out[label] = (logits.detach(), grads(model))
    torch.testing.assert_close(out["fast"][0], out["plain"][0], rtol=1e-4, atol=1e-4)
    for n, w in out["plain"][1].items():
        torch.testing.assert_close(out["fast"][1][n], w, rtol=1e-3, atol=1e-4, msg=f"{family} {n}")
    print(f"{family} ok: gradients {max_diff(out['fast'][1], out['plain'][1]):.1e}")
"""


DROPOUT_CHECK = r"""
import sys, tempfile, torch
from dataclasses import replace
from core.config import SpeedConfig
from core.data import collate
from core.speed import glu, tune
from tests.speed.test_packing_families import LORA, grads, make_tiny, max_diff, rows

P = 0.3
CHANGE = "gated MLP: down_proj's LoRA dropout drawn inside the act(gate) * up kernel, no mask kept"


def counted(calls, name, f, when=lambda *a, **k: True):
    def call(*a, **k):
        calls[name] += bool(when(*a, **k))
        return f(*a, **k)

    return call


class SeededDropout(torch.nn.Module):
    # peft's dropout on down_proj's input with glu's mask for the seed the fused path draws (drawn
    # from torch's generator at the same point: both models then draw every other mask alike)
    def __init__(self, act):
        super().__init__()
        self.act = act
        self.kept = []

    def forward(self, h):
        seed = glu.new_seed(h.device)
        flat = h.reshape(-1, h.shape[-1])
        keep = glu.dropped(torch.ones(flat.shape[0], 2 * flat.shape[1]), self.act, P, seed) != 0
        self.kept.append(keep.float().mean().item())
        return (flat * keep / (1 - P)).view(h.shape)


enc = rows()
batch = collate(enc, list(range(len(enc))), 0)
inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
for family in sys.argv[1:]:
    make = make_tiny(family, tempfile.mkdtemp(), lora=replace(LORA, dropout=P))
    plain, fast = make(), make()
    changes = tune.tune_model(fast, torch.float32, SpeedConfig(pack="off", fused_dropout=True))
    assert CHANGE in changes, changes
    act = next(m._qlora_glu for m in fast.modules() if getattr(m, "_qlora_glu", None))
    swapped = [SeededDropout(act) for name, _ in plain.named_modules() if name.endswith("mlp.down_proj")]
    downs = [m for name, m in plain.named_modules() if name.endswith("mlp.down_proj")]
    for m, d in zip(downs, swapped):
        m.lora_dropout["default"] = d
    calls = {"forward_dropout": 0, "dropped": 0, "backward_t": 0}
    fd, dr, bw = glu.forward_dropout, glu.dropped, glu.backward
    out = {}
    for label, model in (("plain", plain), ("fast", fast)):
        if label == "fast":  # count what the fused path calls
            glu.forward_dropout = counted(calls, "forward_dropout", fd)
            glu.dropped = counted(calls, "dropped", dr)
            glu.backward = counted(calls, "backward_t", bw, when=lambda g, x, act, t=None, *rest: t is not None)
        model.train()
        torch.manual_seed(5)
        logits = model(**inputs).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        out[label] = (logits.detach(), grads(model))
    glu.forward_dropout, glu.dropped, glu.backward = fd, dr, bw
    assert calls == {"forward_dropout": 2, "dropped": 2, "backward_t": 2}, calls  # both layers, each way
    kept = [k for d in swapped for k in d.kept]
    assert len(kept) == 2 and all(0.6 < k < 0.8 for k in kept), kept  # 1 - p of the elements kept
    torch.testing.assert_close(out["fast"][0], out["plain"][0], rtol=1e-4, atol=1e-5)
    for n, w in out["plain"][1].items():
        assert float(w.abs().max()) > 0, n
        torch.testing.assert_close(out["fast"][1][n], w, rtol=1e-3, atol=1e-5, msg=f"{family} {n}")
    torch.manual_seed(6)  # other seeds: other masks, other logits
    assert not torch.allclose(fast(**inputs).logits, out["fast"][0])
    print(f"{family} ok: gradients {max_diff(out['fast'][1], out['plain'][1]):.1e}, kept {kept}")
"""


def interpreted(script: str, *args: str) -> subprocess.CompletedProcess:
    """`script` run in a fresh Python under Triton's interpreter (TRITON_INTERPRET is read when a
    kernel is first defined: a process of its own), which stands in for a GPU on CPU."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600
    )


def test_gated_mlp_lora_dropout_drawn_in_the_kernel_computes_what_peft_computes():
    """speed.fused_dropout: down_proj's LoRA dropout drawn inside glu.py's kernel from a seed
    (through Triton's interpreter on CPU), against peft with a dropout module that keeps the same
    elements (the mask read back from the kernel for the same seed): logits and every gradient, the
    kernel's own recomputation in backward and its input-gradient sum included."""
    out = interpreted(DROPOUT_CHECK, "llama", "gemma3_text")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for family in ("llama", "gemma3_text"):
        assert f"{family} ok" in out.stdout, out.stdout
    print(out.stdout)


def test_rmsnorm_and_gated_mlp_kernels_match_torch():
    """rmsnorm.py's and glu.py's Triton kernels (the GPU path) through Triton's interpreter on CPU,
    against the torch formulas that transformers' own norms and MLPs compute (the families' own
    forwards are compared with those formulas in test_packed_rows_match_the_padded_path); then whole
    tiny NF4 + LoRA models with every kernel bound against the plain path."""
    out = interpreted(KERNEL_CHECK, "llama", "gemma3_text")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for part in ("rmsnorm ok", "glu ok", "llama ok", "gemma3_text ok"):
        assert part in out.stdout, out.stdout
    print(out.stdout)


def test_triton_rotary_matches_each_familys_own_formula():
    """rope.py's kernel (the GPU path) through Triton's interpreter on CPU: rope_heads on
    transformers' layouts, and attention with the kernel bound (Phi's own forward) against
    transformers' forward: logits and every gradient."""
    out = interpreted(ROTARY_CHECK, *TRITON_FAMILIES)
    assert out.returncode == 0 and "kernel ok" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    for family in TRITON_FAMILIES:
        assert f"{family} ok" in out.stdout, out.stdout
    print(out.stdout)
