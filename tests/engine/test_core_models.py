"""4-bit QLoRA on CPU with tiny randomly initialised Phi, Llama and BERT models built from a config
(no download), as transformers and peft test themselves."""

import json
import math

import pytest
import torch

from core.checkpoint import Checkpointer, load_adapter_weights, save_adapter
from core.config import DataConfig, LoraSettings, ModelConfig, RunConfig, TrainConfig
from core.model import add_lora, classification_head, count_parameters, load_model, load_tokenizer
from tests.helpers import CPU, SNLI, save_tiny_model, save_word_tokenizer


def fixed_batch(pad_id: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 256, (12, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[:4, 7:] = pad_id  # some right padding
    mask[:4, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.arange(12) % 3


@pytest.mark.parametrize("arch", ["phi", "llama", "bert"])
def test_qlora_on_tiny_models(arch, tmp_path):
    import bitsandbytes as bnb

    folder = save_tiny_model(arch, tmp_path / arch)
    pad_id = 0 if arch == "bert" else 1  # causal LMs pad with EOS
    cfg = ModelConfig(name=str(folder))
    torch.manual_seed(0)
    model = load_model(cfg, 3, pad_id, CPU, torch.float32)
    assert model.config.pad_token_id == pad_id
    head = classification_head(model)
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32  # not quantised
    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) >= 2 * 4 and not any(n.split(".")[-1] in ("score", "classifier") for n in quantised)

    model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("modules_to_save" in n for n in trainable) and any("lora_A" in n for n in trainable)
    counts = count_parameters(model)
    assert counts["packed"] < counts["total"] and counts["trainable"] == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )

    batch, labels = fixed_batch(pad_id)

    def loss_now():
        model.eval()
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(**batch).logits, labels).item()

    before = loss_now()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.nn.functional.cross_entropy(model(**batch).logits, labels).backward()
    opt.step()
    after = loss_now()
    assert after < before, (before, after)

    # a saved adapter reloads into a freshly loaded base model to the same logits
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    torch.manual_seed(123)  # a different random head, to be overwritten by the saved one
    fresh = add_lora(load_model(cfg, 3, pad_id, CPU, torch.float32), LoraSettings(r=4, alpha=8, dropout=0.0))
    load_adapter_weights(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, logits, atol=1e-5)


@pytest.mark.parametrize("arch", ["phi", "bert"])
def test_threaded_checkpoints_match_peft_saves(arch, tmp_path):
    """Checkpointer's later adapters (tensor copies written on a thread) hold the same keys,
    values and config as peft's save_pretrained of the same moment, although the parameters
    change right after save() returns; a failed write is raised by wait()."""
    from safetensors.torch import load_file

    folder = save_tiny_model(arch, tmp_path / arch)
    torch.manual_seed(0)
    model = add_lora(
        load_model(ModelConfig(name=str(folder)), 3, 0, CPU, torch.float32), LoraSettings(r=4, alpha=8, dropout=0.0)
    )
    saver = Checkpointer(model, tmp_path)
    saver.save_adapter("epoch-0")  # through peft
    assert saver.keys  # every key maps to a parameter: later saves take the fast path
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn_like(p))
    save_adapter(model, tmp_path / "peft-1")
    saver.save_adapter("epoch-1")
    with torch.no_grad():  # changed while (or before) the thread writes: not in the checkpoint
        for p in trainable:
            p.mul_(-3.0)
    saver.wait()
    ours, peft = (
        load_file(tmp_path / "epoch-1" / "adapter_model.safetensors"),
        load_file(tmp_path / "peft-1" / "adapter_model.safetensors"),
    )
    assert ours.keys() == peft.keys() and len(ours) >= 3
    for k in ours:
        assert torch.equal(ours[k], peft[k]), k
    assert json.loads((tmp_path / "epoch-1" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "peft-1" / "adapter_config.json").read_text()
    )
    assert not list(tmp_path.glob(".*.tmp-*")) and not list(tmp_path.glob(".*.old-*"))  # aside, then renamed

    (tmp_path / "blocker").write_text("a file where a folder must go")  # the next write cannot make its folder
    saver.save_adapter("blocker/epoch-2")
    with pytest.raises(RuntimeError, match="writing a checkpoint failed"):
        saver.wait()
    assert (tmp_path / "blocker").read_text() == "a file where a folder must go"


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_full_run_of_a_tiny_causal_lm_without_pad_token(arch, tmp_path):
    """The whole train() path on a causal LM whose tokenizer has no pad token: EOS pads, the
    template turns pairs into text, and the `score` head is trained and saved."""
    from core.train import train

    rows = [json.loads(l) for l in (SNLI / "train.jsonl").read_text().splitlines()[:200]]
    words = [w for r in rows for w in (r["premise"] + " " + r["hypothesis"]).replace(".", " . ").split()]
    words += ["Premise", "Hypothesis", "Relation", ":"]
    folder = save_tiny_model(arch, tmp_path / "model")
    save_word_tokenizer(folder, words, causal=True)
    tok = load_tokenizer(ModelConfig(name=str(folder)))
    assert tok.pad_token == "</s>" and tok.sep_token is None
    cfg = RunConfig(
        model=ModelConfig(name=str(folder)),
        data=DataConfig(
            source="files",
            train=str(SNLI / "train.jsonl"),
            test=str(SNLI / "test.jsonl"),
            max_train_rows=48,
            max_validation_rows=16,
            max_test_rows=24,
            max_length=64,
        ),
        lora=LoraSettings(r=4, alpha=8),
        train=TrainConfig(epochs=1, batch_size=16, micro_batch_size=8, lr=1e-3),
    )
    report = train(cfg, tmp_path / "run")
    assert report["state"] == "done"
    assert report["test_before"]["n"] == 24 and report["test_after"]["n"] == 24
    setup = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["kind"] == "setup" and setup["data"]["validation"]["used"] == 16
    assert setup["data"]["validation"]["carved_from_train"]  # no validation file: 10% of train
    saved = tmp_path / "run" / "checkpoints" / "epoch-1" / "adapter_model.safetensors"
    from safetensors import safe_open

    keys = list(safe_open(str(saved), "pt").keys())
    assert any("score" in k for k in keys) and any("lora_A" in k for k in keys)


def test_mean_pooling_ignores_padding_and_auto_follows_the_model_folder(tmp_path):
    from core.config import EMBEDDED_MODEL
    from core.model import MaskedMeanPooler, resolve_pooling

    folder = save_tiny_model("bert", tmp_path / "bert")
    assert resolve_pooling(ModelConfig(name=str(folder))) == "model"  # no sentence-transformers config
    assert resolve_pooling(ModelConfig(name=EMBEDDED_MODEL)) == "mean"  # all-MiniLM-L6-v2: 1_Pooling, mean
    with pytest.raises(ValueError, match="pooling"):
        ModelConfig(pooling="max")
    torch.manual_seed(0)
    model = load_model(ModelConfig(name=str(folder), pooling="mean"), 3, 0, CPU, torch.float32)
    assert isinstance(model.bert.pooler, MaskedMeanPooler)
    model.eval()
    ids = torch.randint(5, 256, (1, 6))
    padded = torch.cat([ids, torch.zeros((1, 4), dtype=torch.long)], 1)
    other = torch.randint(5, 256, (1, 10))
    with torch.no_grad():
        alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        mask = torch.tensor([[1] * 6 + [0] * 4, [1] * 10])
        batch = model(input_ids=torch.cat([padded, other]), attention_mask=mask).logits
    assert torch.allclose(alone[0], batch[0], atol=1e-5)
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)


def test_cpu_bf16_computes_in_bf16_where_the_cpu_has_it_and_float16_needs_a_gpu(tmp_path):
    """speed.cpu_bf16 (the llm-demo preset's): with compute_dtype auto, a CPU that multiplies bf16
    natively trains and evaluates under bf16 autocast (attention in fp32), others stay fp32; the
    run's probabilities are those of the same checkpoint scored in fp32, to bf16's rounding."""
    from core.config import SpeedConfig
    from core.data import encode, load_splits
    from core.evaluate import load_run_model, predict
    from core.model import cpu_has_native_bf16, pick_compute_dtype
    from tests.helpers import train_tiny

    want = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert pick_compute_dtype(CPU, "auto", cpu_bf16=True) == want
    assert pick_compute_dtype(CPU, "auto") == torch.float32
    assert pick_compute_dtype(CPU, "bfloat16") == torch.bfloat16
    with pytest.raises(RuntimeError, match="float16 compute needs a GPU"):
        pick_compute_dtype(CPU, "float16")

    run = train_tiny("llama", tmp_path, speed={"cpu_bf16": True})
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["compute_dtype"] == str(want).replace("torch.", "")
    steps = [r["loss"] for r in records if r["kind"] == "step"]
    assert steps and all(math.isfinite(x) for x in steps)
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert cfg.speed == SpeedConfig(cpu_bf16=True)
    fp32 = RunConfig.from_dict({**cfg.to_dict(), "speed": {**cfg.to_dict()["speed"], "cpu_bf16": False}})
    model, tokenizer, device, dtype, _ = load_run_model(fp32)
    assert dtype == torch.float32
    load_adapter_weights(model, run / "checkpoints" / "epoch-2")
    after = [json.loads(line) for line in (run / "predictions" / "test_after.jsonl").read_text().splitlines()]
    splits, _ = load_splits(cfg.data, cfg.train.seed)
    probs, _ = predict(model, encode(splits["test"], tokenizer, cfg.data), 8, tokenizer.pad_token_id, device, dtype)
    got = torch.tensor([r["probs"] for r in after])
    torch.testing.assert_close(torch.from_numpy(probs), got, rtol=0, atol=0.03 if want == torch.bfloat16 else 1e-4)
