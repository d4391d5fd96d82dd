"""The optimised path (core/speed/) computes what the plain path computes, on CPU.

A tiny Phi (same family as Phi-2: partial rotary, parallel attention + MLP, gelu_new) in NF4 with
LoRA: predictions and gradients of the plain forward/backward (attention mask, Python GELU, fixed
micro-batches) against the optimised one (tune_model, no mask for the causal model, TrainStep
with padding rows, token-budget splitting), and the FLOPs formula on Phi-2's real shape.
"""

from __future__ import annotations

import math

import pytest
import torch

from core.config import LoraSettings, SpeedConfig, speed_from_env
from core.data import collate
from core.evaluate import eval_batches, predict
from core.model import is_causal
from core.speed import accounting, tune
from core.speed.graphs import EvalGraphs
from core.speed.patch import is_patched
from core.speed.step import TrainStep, pad_batch, pad_width
from tests.helpers import ROOT

PHI2 = dict(
    hidden_size=2560,
    num_hidden_layers=32,
    intermediate_size=10240,
    num_attention_heads=32,
    partial_rotary_factor=0.4,
    vocab_size=51200,
)
LORA = LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj", "fc1", "fc2"])


def phi2_meta():
    from accelerate import init_empty_weights
    from transformers import AutoModelForSequenceClassification, PhiConfig

    from core.model import add_lora

    cfg = PhiConfig(**PHI2, num_labels=3, pad_token_id=0)
    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(cfg)
    return add_lora(model, LORA)


def test_flops_per_token_matches_formula_on_phi2():
    info = accounting.flops_info(phi2_meta())
    assert info["n_linear"] == 2_516_582_400  # the N = 2.516e9
    per_layer = 2 * 16 * (2560 + 2560) + 2 * 16 * (2560 + 10240)  # q, v, fc1, fc2
    assert info["lora"] == 32 * per_layer
    assert (info["layers"], info["hidden"]) == (32, 2560)
    s = 27.0
    expected = 4 * 2.5165824e9 + 6 * 32 * per_layer + 12 * 32 * s * 2560
    assert math.isclose(accounting.flops_per_token(info, s), expected, rel_tol=1e-12)
    assert math.isclose(accounting.mfu(expected, 1000.0, 989e12), expected * 1000 / 989e12)
    assert accounting.mfu(expected, 1000.0, None) is None
    assert accounting.peak_flops(torch.device("cpu")) is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Phi saved to disk, loaded in NF4 through core.model like the app does."""
    from transformers import PhiConfig, PhiForCausalLM

    from core.config import ModelConfig
    from core.model import add_lora, load_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-phi")
    cfg = PhiConfig(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=256,
        num_attention_heads=4,
        partial_rotary_factor=0.4,
        vocab_size=300,
        pad_token_id=0,
    )
    PhiForCausalLM(cfg).save_pretrained(path)

    def make(lora: LoraSettings = LORA):
        torch.manual_seed(1)
        m = load_model(
            ModelConfig(name=str(path), compute_dtype="float32", device="cpu"), 3, 0, torch.device("cpu"), torch.float32
        )
        return add_lora(m, lora)

    return make


def rows(n=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 30, (1,), generator=g))
        out.append({"input_ids": torch.randint(1, 300, (length,), generator=g).tolist(), "label": i % 3})
    return out


def plain_logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_tuned_model_and_maskless_forward_give_the_same_predictions(tiny):
    plain, fast = tiny(), tiny()
    changes = tune.tune_model(fast, torch.float32)
    assert "gelu_new->fused tanh gelu" in changes
    assert is_causal(fast)
    enc = rows()
    batch = collate(enc, list(range(len(enc))), 0)
    ref = plain_logits(plain.eval(), batch)
    fast.eval()
    with torch.no_grad():  # no attention mask, and padded to a multiple of 16 like the GPU path
        padded, _ = pad_batch(batch, 0, pad_width(batch["input_ids"].shape[1]))
        got = fast(input_ids=padded["input_ids"]).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    probs, _ = predict(fast, enc, 4, 0, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(torch.from_numpy(probs), torch.softmax(ref, -1), rtol=1e-4, atol=1e-4)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def plain_gradient(model, batch):
    """Logits and LoRA/head gradients of one masked forward+backward of mean CE (the plain path)."""
    model.train()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    return logits, grads(model)


def test_train_step_gradient_matches_plain_backward(tiny):
    plain, fast = tiny(), tiny()
    tune.tune_model(fast, torch.float32)
    enc = rows(12)
    idx = list(range(12))
    # plain: one batch with mask, mean CE
    batch = collate(enc, idx, 0)
    logits, ref = plain_gradient(plain, batch)
    # optimised: micro-batches of 8 padded to 8 rows, and a token budget that splits the first
    for budget in (0, 64):
        fast.train()
        step = TrainStep(fast, torch.device("cpu"), torch.float32, 0, SpeedConfig(micro_tokens=budget))
        step.zero_grad()
        real, processed = step.forward_backward(enc, micro=8)
        assert real == sum(len(r["input_ids"]) for r in enc) <= processed
        loss = step.take_loss()
        assert math.isclose(loss, torch.nn.functional.cross_entropy(logits, batch["labels"]).item(), rel_tol=1e-4)
        got = grads(fast)
        for name, g in ref.items():
            torch.testing.assert_close(got[name], g, rtol=1e-3, atol=1e-5, msg=f"{name} (budget {budget})")


def test_pad_batch_and_eval_batches():
    enc = rows(6)
    batch = collate(enc, [0, 1, 2], 0)
    padded, n = pad_batch(batch, 0, 32, 5)
    assert n == 3 and padded["input_ids"].shape == (5, 32)
    assert torch.equal(padded["input_ids"][3], padded["input_ids"][0])  # filler rows copy real rows
    assert int(padded["attention_mask"][:, batch["input_ids"].shape[1] :].sum()) == 0
    order = sorted(range(6), key=lambda i: len(enc[i]["input_ids"]))
    assert [i for b in eval_batches(enc, order, 4, torch.device("cpu")) for i in b] == order


def test_fused_qlora_rotary_and_mlp_match_peft_with_dropout(tiny, monkeypatch):
    """core.qlinear (4-bit linear + LoRA in one function, GELU inside fc2) and the three-kernel
    rotary give peft's and transformers' outputs and LoRA gradients, dropout included (the same
    random draws: the function draws its masks as torch's dropout does)."""
    from dataclasses import replace

    from core.speed import qlinear

    plain, fast = tiny(replace(LORA, dropout=0.3)), tiny(replace(LORA, dropout=0.3))
    for m in (plain, fast):
        for name, p in m.named_parameters():
            if "lora_B" in name:  # B starts at zero: give it values so that A's gradient is non-trivial
                torch.manual_seed(len(name))
                p.data.normal_(0, 0.1)
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in fast.modules()) == 2 * 4
    changes = tune.tune_model(fast, torch.float32)
    assert "4-bit linear + LoRA as one autograd function" in changes
    assert any(c.startswith("partial rotary embedding fused") for c in changes)
    fused = [m for m in fast.modules() if is_patched(m)]
    assert len(fused) >= 2 * 6 + 2  # 6 linear layers and the MLP of each of the 2 layers, + attention
    enc = rows(8)
    batch = collate(enc, list(range(8)), 0)
    out = {}
    for name, model in (("plain", plain), ("fast", fast)):
        model.train()
        torch.manual_seed(5)
        logits = model(input_ids=batch["input_ids"]).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        out[name] = (logits.detach(), grads(model))
    torch.testing.assert_close(out["fast"][0], out["plain"][0], rtol=1e-5, atol=1e-5)
    assert out["fast"][1].keys() == out["plain"][1].keys()
    for name, g in out["plain"][1].items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(out["fast"][1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    # a state the function does not cover runs peft's own forward: adapters disabled = the base model
    fast.eval()
    with torch.no_grad():
        with fast.disable_adapter():
            base_fast = fast(input_ids=batch["input_ids"]).logits
        with plain.disable_adapter():
            base_plain = plain.eval()(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(base_fast, base_plain, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("QLORA_FUSED", "0")  # the benchmarks' override, through the run's settings
    unfused = tiny()
    changes = tune.tune_model(unfused, torch.float32, speed_from_env(SpeedConfig()))
    assert "4-bit linear + LoRA as one autograd function" not in changes
    assert not any(is_patched(m) for name, m in unfused.named_modules() if "proj" in name or "fc" in name)
    assert qlinear.install(unfused) > 0  # what the switch turned off


def test_eval_batches_are_the_cheapest_split():
    """The dynamic programme against every split of the distinct lengths into consecutive spans."""
    import itertools

    g = torch.Generator().manual_seed(7)
    lengths = [int(x) for x in torch.randint(5, 70, (60,), generator=g)]
    enc = [{"input_ids": [1] * n} for n in lengths]
    order = sorted(range(len(enc)), key=lambda i: lengths[i])
    device = torch.device("cuda")  # the GPU policy (token budget, batch cost); nothing runs on it
    for budget, batch_cost, batch_size in ((2048, 256, 40), (100000, 1024, 1000), (600, 64, 8)):
        batches = eval_batches(
            enc, order, batch_size, device, SpeedConfig(eval_tokens=budget, eval_batch_cost=batch_cost)
        )
        assert [i for b in batches for i in b] == order

        def cap(w, batch_size=batch_size, budget=budget):
            return max(1, min(batch_size, budget // w))

        for b in batches:
            width = max(lengths[i] for i in b)
            assert len(b) <= cap(width)

        def cost(bs, batch_cost=batch_cost):
            return sum(len(b) * max(lengths[i] for i in b) for b in bs) + len(bs) * batch_cost

        distinct = sorted(set(lengths))
        counts = [lengths.count(n) for n in distinct]
        best = None
        for cuts in itertools.chain.from_iterable(
            itertools.combinations(range(1, len(distinct)), k) for k in range(0, 4)
        ):  # up to 4 spans: enough here
            edges = [0, *cuts, len(distinct)]
            c = 0
            for a, b in zip(edges, edges[1:]):
                n, w = sum(counts[a:b]), distinct[b - 1]
                c += n * w + -(-n // cap(w)) * batch_cost
            best = c if best is None else min(best, c)
        assert cost(batches) <= best  # the DP considers every split, not only these


def test_fetch_later_and_eval_graphs_on_cpu(tiny):
    get = accounting.fetch_later(torch.tensor(1.5), None, torch.tensor([2.0]))
    assert get() == [1.5, None, 2.0]
    model = tiny()
    tune.tune_model(model, torch.float32)
    graphs = EvalGraphs(torch.device("cpu"))
    assert not graphs.enabled  # CUDA only; on CPU predict runs eagerly with the same result
    enc = rows(9)
    p1, l1 = predict(model, enc, 4, 0, torch.device("cpu"), torch.float32)
    p2, l2 = predict(model, enc, 4, 0, torch.device("cpu"), torch.float32, graphs=graphs)
    assert (p1 == p2).all() and l1 == l2


def test_a_classifier_builds_no_key_value_cache(tiny):
    model = tiny()
    assert model.config.use_cache is False
    out = model(input_ids=torch.randint(1, 300, (2, 9)))
    assert out.past_key_values is None


ROPE_CHECK = r"""
import torch
from core.speed import rope
assert rope.available(torch.zeros(1))  # the interpreter stands in for a GPU
torch.manual_seed(0)
B, S, H, D, ROT = 3, 7, 5, 20, 8
x = torch.randn(B, S, H * D, requires_grad=True)
g = torch.randn(B, S, H * D)
angles = torch.randn(B, S, ROT // 2)
tables = [(torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()),  # transformers' layout
          (torch.randn(1, S, ROT), torch.randn(1, S, ROT))]  # one row for every batch row, halves differ
for cos, sin in tables:
    out, ref = rope.rope(x, cos, sin, D), rope.reference(x, cos, sin, D)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert not torch.equal(out, x)
    torch.testing.assert_close(out[..., ROT:D], x[..., ROT:D])  # the rest of a head passes through
    grad, = torch.autograd.grad(out, x, g)
    ref_grad, = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
xb, (cos, sin) = x.detach().bfloat16(), tables[0]
out = rope.rope(xb, cos.bfloat16(), sin.bfloat16(), D)
assert out.dtype == torch.bfloat16
torch.testing.assert_close(out.float(), rope.reference(xb.float(), cos.bfloat16().float(), sin.bfloat16().float(), D),
                           rtol=1e-2, atol=1e-2)
print("rope ok")
"""


def test_triton_rope_kernel_matches_transformers_formula():
    """core/rope.py's kernel (the GPU path) run by Triton's interpreter on CPU: forward and
    backward equal transformers' rotate_half formula, with per-row and shared tables."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    from core.speed import rope

    assert not rope.available(torch.zeros(1))  # a CPU tensor, no interpreter: the torch path
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", ROPE_CHECK],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0 and "rope ok" in out.stdout, out.stderr[-3000:]


def test_pack_and_split_rows():
    from core.speed import packing

    enc = rows(10)
    lengths = [len(r["input_ids"]) for r in enc]
    b = packing.pack(enc[:3], pad_id=0, slots=5, weight=0.25)
    total = sum(lengths[:3])
    assert b["input_ids"].shape == (packing.round_up(total),)
    assert b["cu_seqlens"].tolist() == [
        0,
        lengths[0],
        lengths[0] + lengths[1],
        total,
        total,
        total,
        packing.round_up(total),
    ]
    assert b["last"].tolist() == [lengths[0] - 1, lengths[0] + lengths[1] - 1, total - 1, 0, 0]
    assert b["weight"].tolist() == [0.25] * 3 + [0.0] * 2 and b["labels"].tolist() == [0, 1, 2, 0, 0]
    assert b["position_ids"][lengths[0] : lengths[0] + 3].tolist() == [0, 1, 2]
    assert b["input_ids"][: lengths[0]].tolist() == enc[0]["input_ids"]
    with pytest.raises(ValueError, match="do not fit"):
        packing.pack(enc[:3], 0, slots=2)
    for budget, max_rows in ((None, 4), (128, 32), (64, 3), (1, 32)):
        parts = packing.split_rows(enc, budget, max_rows)
        assert [r for p in parts for r in p] == enc  # every row once, in order
        for p in parts:
            assert len(p) <= max_rows
            assert not budget or len(p) == 1 or packing.round_up(sum(len(r["input_ids"]) for r in p)) <= budget
    assert len(packing.split_rows(enc, None, 4)) == 3  # the fewest parts that fit
    assert len(packing.split_rows(enc, 1, 32)) == len(enc)  # a budget below one row: a row each


def test_packed_forward_and_gradients_match_padded(tiny):
    """Rows laid end to end (core/speed/packing.py, here with the CPU attention) give the padded path's
    predictions, empty slots change nothing, and TrainStep.run_packed the plain gradient."""
    from core.speed import packing

    plain, fast = tiny(), tiny()
    tune.tune_model(fast, torch.float32)
    assert packing.enabled(fast, torch.device("cpu"), torch.float32, "on") and not packing.supported(plain)
    assert not packing.enabled(fast, torch.device("cpu"), torch.float32, "auto")  # CPU: padded by default
    assert packing.flash_ok((9, 0), torch.bfloat16, 80) and packing.flash_ok((8, 0), torch.float16, 64)
    assert not packing.flash_ok((7, 5), torch.float16, 80)  # a T4: padded batches
    assert not packing.flash_ok((9, 0), torch.float32, 80) and not packing.flash_ok((9, 0), torch.bfloat16, 84)
    enc = rows(12)
    batch = collate(enc, list(range(12)), 0)
    ref = plain_logits(plain.eval(), batch)
    fast.eval()
    with torch.no_grad():
        got = packing.packed_logits(fast, packing.pack(enc, 0, slots=15), 64)
    assert got.shape == (15, 3)
    torch.testing.assert_close(got[:12], ref, rtol=1e-4, atol=1e-4)
    probs, loss = predict(
        fast,
        enc,
        5,
        0,
        torch.device("cpu"),
        torch.float32,  # several packed batches
        speed=SpeedConfig(pack="on", eval_tokens=128),
    )
    torch.testing.assert_close(torch.from_numpy(probs), torch.softmax(ref, -1), rtol=1e-4, atol=1e-4)
    assert math.isclose(loss, torch.nn.functional.cross_entropy(ref, batch["labels"]).item(), rel_tol=1e-4)

    logits, want = plain_gradient(plain, batch)
    for budget in (0, 128):
        fast.train()
        step = TrainStep(fast, torch.device("cpu"), torch.float32, 0, SpeedConfig(pack="on", micro_tokens=budget))
        assert step.packed
        step.zero_grad()
        real, processed = step.run_packed(enc, step_rows=12, max_rows=8, max_len=64)
        assert real == sum(len(r["input_ids"]) for r in enc) <= processed
        assert math.isclose(
            step.take_loss(), torch.nn.functional.cross_entropy(logits, batch["labels"]).item(), rel_tol=1e-4
        )
        got = grads(fast)
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, rtol=1e-3, atol=1e-5, msg=f"{name} (budget {budget})")


def test_speed_settings_come_from_the_config_and_the_environment_overrides_them():
    """Every QLORA_* switch maps to one SpeedConfig field; values parse by the field's type."""
    from core.config import SPEED_ENV

    assert set(SPEED_ENV.values()) == set(SpeedConfig.__dataclass_fields__)
    env = {
        "QLORA_CUDA_GRAPHS": "0",
        "QLORA_PACK": "1",
        "QLORA_MICRO_TOKENS": "1024",
        "QLORA_EVAL_BATCH_COST": "8",
        "QLORA_GRAPH_WARMUP": "each",
    }
    got = speed_from_env(SpeedConfig(), env)
    assert (got.cuda_graphs, got.pack, got.micro_tokens, got.eval_batch_cost, got.graph_warmup) == (
        False,
        "on",
        1024,
        8,
        "each",
    )
    assert got.eval_graphs and got.fused_linear and got.eval_tokens == 16384  # untouched
    assert speed_from_env(SpeedConfig(pack="off"), {}) == SpeedConfig(pack="off")
    assert speed_from_env(SpeedConfig(), {"QLORA_PACK": "0"}).pack == "off"
    with pytest.raises(ValueError, match="QLORA_MICRO_TOKENS must be an integer"):
        speed_from_env(SpeedConfig(), {"QLORA_MICRO_TOKENS": "lots"})
    with pytest.raises(ValueError, match="speed.pack"):
        speed_from_env(SpeedConfig(), {"QLORA_PACK": "maybe"})
