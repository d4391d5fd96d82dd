"""The training controls through every path of the training step (core/speed/), on a tiny Phi in NF4:
class weights in the loss of the padded and packed paths (and CUDA graphs, on a GPU) against a plain
weighted cross-entropy; rsLoRA through the fused 4-bit + LoRA layer and DoRA left to peft, both
against peft's own output and gradients, and reloadable; gradient checkpointing with the plain
gradients, dropout included."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from core.config import LoraSettings, ModelConfig, SpeedConfig
from core.data import collate
from core.model import add_lora, load_model
from core.speed import packing, tune
from core.speed.patch import is_patched
from core.speed.step import TrainStep

LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "fc1", "fc2"])
CPU = torch.device("cpu")
WEIGHTS = [0.5, 2.0, 1.25]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """make(lora, device) -> a tiny random Phi in NF4 with LoRA, the same weights every time."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-phi-controls")
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

    def make(lora: LoraSettings = LORA, device: torch.device = CPU):
        torch.manual_seed(1)
        model = load_model(ModelConfig(name=str(path), compute_dtype="float32"), 3, 0, device, torch.float32)
        model = add_lora(model, lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give it values so that every gradient is non-trivial
                torch.manual_seed(len(name))
                p.data.normal_(0, 0.1)
        return model

    make.path = path
    return make


def rows(n=12, seed=3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 30, (1,), generator=g))
        out.append({"input_ids": torch.randint(1, 300, (length,), generator=g).tolist(), "label": i % 3})
    return out


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def weighted_gradient(model, batch, weights=None, seed: int = 5):
    """The plain path: one masked forward over the whole batch, loss sum(w[y] CE) / n, backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    mask = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
    logits = model(input_ids=batch["input_ids"], **mask).logits
    w = None if weights is None else torch.tensor(weights, device=logits.device)
    ce = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], weight=w, reduction="none")
    loss = ce.sum() / len(ce)
    loss.backward()
    return loss.item(), grads(model)


def assert_same(got: dict, want: dict, what: str, rtol=1e-3, atol=1e-5) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(got[name], g, rtol=rtol, atol=atol, msg=f"{name} ({what})")


@pytest.mark.parametrize("pack,budget", [("off", 0), ("off", 64), ("on", 0), ("on", 128)])
def test_class_weights_enter_the_loss_of_the_padded_and_packed_paths(tiny, pack, budget):
    plain, fast = tiny(), tiny()
    tune.tune_model(fast, torch.float32)
    enc = rows()
    batch = collate(enc, list(range(len(enc))), 0)
    want_loss, want = weighted_gradient(plain, batch, WEIGHTS)
    unweighted, _ = weighted_gradient(tiny(), batch)
    assert not math.isclose(want_loss, unweighted, rel_tol=1e-3)  # the weights change the loss
    fast.train()
    step = TrainStep(fast, CPU, torch.float32, 0, SpeedConfig(pack=pack, micro_tokens=budget), class_weights=WEIGHTS)
    assert step.packed == (pack == "on")
    step.zero_grad()
    step.forward_backward(enc, micro=8)  # micro-batches of 8 (and the token budget's splits)
    assert math.isclose(step.take_loss(), want_loss, rel_tol=1e-4)
    assert_same(grads(fast), want, f"pack {pack}, budget {budget}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_class_weights_enter_the_loss_replayed_from_cuda_graphs(tiny):
    """The graph bakes the class-weight tensor in: replays of later steps (new rows, same shapes)
    give the eager weighted gradient."""
    cuda = torch.device("cuda")
    eager, graphed = tiny(device=cuda), tiny(device=cuda)
    for m in (eager, graphed):
        tune.tune_model(m, torch.float32, SpeedConfig(pack="off"))
        m.train()
    run_eager = TrainStep(
        eager, cuda, torch.float32, 0, SpeedConfig(cuda_graphs=False, pack="off"), class_weights=WEIGHTS
    )
    run_graph = TrainStep(
        graphed, cuda, torch.float32, 0, SpeedConfig(cuda_graphs=True, pack="off"), class_weights=WEIGHTS
    )
    for seed in (3, 4, 5):  # the first captures, the next ones replay
        enc = rows(seed=seed)
        for step in (run_eager, run_graph):
            step.zero_grad()
            step.forward_backward(enc, micro=8)
        assert run_graph.graphs and run_graph.captures >= 1, run_graph.graph_error
        assert math.isclose(run_graph.take_loss(), run_eager.take_loss(), rel_tol=1e-4)
        assert_same(grads(graphed), grads(eager), f"graphs, rows of seed {seed}")


def test_rslora_runs_through_the_fused_layer_with_peft_s_scale(tiny):
    lora = replace(LORA, variant="rslora", dropout=0.2)
    plain, fast = tiny(lora), tiny(lora)
    layer = next(m for m in fast.modules() if hasattr(m, "lora_A"))
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # alpha / sqrt(r), not alpha / r
    changes = tune.tune_model(fast, torch.float32)
    assert "4-bit linear + LoRA as one autograd function" in changes and not any("not fused" in c for c in changes)
    assert is_patched(layer)
    batch = collate(rows(), list(range(12)), 0)
    batch.pop("attention_mask")  # causal, right-padded: the mask changes nothing (as the trainer runs it)
    want_loss, want = weighted_gradient(plain, batch)
    got_loss, got = weighted_gradient(fast, batch)  # the same seed: the same dropout masks
    assert math.isclose(got_loss, want_loss, rel_tol=1e-5)
    assert_same(got, want, "rsLoRA, fused vs peft", rtol=1e-4, atol=1e-6)


def test_dora_is_left_to_peft_said_so_and_reloads(tiny, tmp_path):
    from peft import PeftModel

    from core.checkpoint import load_adapter_weights, save_adapter

    lora = replace(LORA, variant="dora")
    plain, fast = tiny(lora), tiny(lora)
    changes = tune.tune_model(fast, torch.float32)
    note = next(c for c in changes if c.startswith("not fused: "))
    assert "8 DoRA layers run peft's own DoRA forward" in note  # q, v, fc1, fc2 in 2 layers
    dora = [m for m in fast.modules() if hasattr(m, "lora_magnitude_vector") and m.lora_magnitude_vector]
    assert len(dora) == 8 and not any(is_patched(m) for m in dora)
    assert any(is_patched(m) for m in fast.modules())  # the layers without an adapter are still fused
    batch = collate(rows(), list(range(12)), 0)
    want_loss, want = weighted_gradient(plain, batch)
    got_loss, got = weighted_gradient(fast, batch)
    assert math.isclose(got_loss, want_loss, rel_tol=1e-5)
    assert_same(got, want, "DoRA, tuned vs peft", rtol=1e-4, atol=1e-6)
    assert any("lora_magnitude_vector" in name for name in got)  # the magnitude is trained

    # saved as peft saves it, it loads back into the project's model and into plain peft
    with torch.no_grad():
        for p in fast.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    save_adapter(fast, tmp_path / "adapter")
    fast.eval()
    with torch.no_grad():
        logits = fast(input_ids=batch["input_ids"]).logits
    fresh = tiny(lora)
    load_adapter_weights(fresh, tmp_path / "adapter")
    base = load_model(ModelConfig(name=str(tiny.path), compute_dtype="float32"), 3, 0, CPU, torch.float32)
    portable = PeftModel.from_pretrained(base, tmp_path / "adapter")
    for model in (fresh.eval(), portable.eval()):
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pack", ["off", "on"])
def test_gradient_checkpointing_gives_the_plain_gradients(tiny, pack, monkeypatch):
    """Each layer runs twice (the forward again in backward: the MLP is called twice per step),
    and the gradients are those without checkpointing, LoRA dropout included (its masks are drawn
    again from the restored RNG state), q/k/v stacked as on a GPU (qlinear.QLoRAStackFn)."""
    from core.speed import qlinear

    monkeypatch.setattr(qlinear, "STACK_DEVICES", {"cuda", "cpu"})
    lora = replace(LORA, dropout=0.3)
    plain, checkpointed = tiny(lora), tiny(lora)
    for m in (plain, checkpointed):
        tune.tune_model(m, torch.float32)
    assert tune.checkpoint_layers(checkpointed).startswith("gradient checkpointing")
    calls = []
    mlp = checkpointed.get_base_model().model.layers[0].mlp
    forward = mlp.forward  # counted by hand: torch's recompute runs the forward, not the module's hooks

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counted
    enc = rows()
    out = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.train()
        step = TrainStep(model, CPU, torch.float32, 0, SpeedConfig(pack=pack))
        step.zero_grad()
        torch.manual_seed(5)
        step.forward_backward(enc, micro=6)
        out[name] = (step.take_loss(), grads(model))
    micro_batches = 2 if pack == "off" else len(packing.split_rows(enc, None, 6))  # 12 rows, 6 a pass
    assert len(calls) == 2 * micro_batches  # forward, and forward again in backward
    assert math.isclose(out["checkpointed"][0], out["plain"][0], rel_tol=1e-6)
    assert_same(out["checkpointed"][1], out["plain"][1], f"checkpointing, pack {pack}", rtol=1e-5, atol=1e-7)
    checkpointed.eval()  # evaluation is untouched: one forward
    calls.clear()
    with torch.no_grad():
        checkpointed(input_ids=torch.tensor([enc[0]["input_ids"]]))
    assert len(calls) == 1
