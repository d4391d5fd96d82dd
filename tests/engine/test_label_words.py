"""The label-word head on tiny random causal LMs (core/model.py, init_head): its rows are the LM head's
rows of the label words (the embedding's when tied), so the untrained classifier on the zero-shot
prompt gives the zero-shot baseline's probabilities; a chat template makes the prompt; and the two
tokenizer faults seen in the wild are refused before training (no tokens at all; a special token
the embedding has no row for)."""

from __future__ import annotations

import json

import pytest
import torch

from core.baseline import zero_shot
from core.config import DataConfig, LoraSettings, ModelConfig
from core.data import NLI_PROMPT, Example, encode, prompt_for
from core.evaluate import predict
from core.model import add_lora, init_head, load_model, load_tokenizer
from tests.helpers import CPU, SNLI, save_tiny_model, save_word_tokenizer

LABELS = ["entailment", "neutral", "contradiction"]
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def examples(n=12):
    rows = [json.loads(l) for l in (SNLI / "test.jsonl").read_text().splitlines()[:n]]
    return [
        Example(
            id=f"t-{i}", premise=r["premise"], hypothesis=r["hypothesis"], label=LABELS.index(r["label"]), row=i + 1
        )
        for i, r in enumerate(rows)
    ]


def vocabulary():
    rows = [json.loads(l) for l in (SNLI / "test.jsonl").read_text().splitlines()[:40]]
    words = [w for r in rows for w in (r["premise"] + " " + r["hypothesis"]).replace(".", " . ").split()]
    return ["Question", ":", "Yes", ",", "Maybe", "or", "No", "?", "Answer", "<|im_start|>", "<|im_end|>"] + words


def causal_lm(folder, arch: str, tied: bool):
    """A tiny causal LM saved with its LM head (as a pretrained checkpoint is), and its tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig

    torch.manual_seed(0)
    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=tied,
    )
    config = LlamaConfig(**common) if arch == "llama" else PhiConfig(partial_rotary_factor=0.5, **common)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    save_word_tokenizer(folder, vocabulary(), causal=True)
    return folder


def untrained(folder, head_init="auto", chat=False):
    cfg = ModelConfig(name=str(folder), head_init=head_init)
    tok = load_tokenizer(cfg)
    if chat:
        tok.chat_template = CHAT
    model = load_model(cfg, 3, tok.pad_token_id, CPU, torch.float32)
    record = init_head(model, cfg, prompt_for(DataConfig(), tok), tok)
    return cfg, tok, add_lora(model, LoraSettings(r=4, alpha=8)), record


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("phi", False)])
def test_the_label_word_head_makes_the_untrained_classifier_the_zero_shot_baseline(tmp_path, arch, tied):
    from safetensors.torch import load_file

    folder = causal_lm(tmp_path / arch, arch, tied)
    cfg, tok, model, record = untrained(folder)
    assert record["head_init"] == "label-words" and record["words"] == [" Yes", " Maybe", " No"]
    weights = load_file(str(folder / "model.safetensors"))
    rows = weights["model.embed_tokens.weight" if tied else "lm_head.weight"][record["token_ids"]]
    head = model.base_model.model.score.modules_to_save["default"]
    torch.testing.assert_close(head.weight.detach(), rows, rtol=0, atol=0)

    ex = examples()
    encoded = encode(ex, tok, DataConfig(), split="test")
    text = NLI_PROMPT.format(premise=ex[0].premise, hypothesis=ex[0].hypothesis)
    assert encoded[0]["input_ids"] == tok(text)["input_ids"]  # the zero-shot prompt is the run's input
    before, _ = predict(model, encoded, 8, tok.pad_token_id, CPU, torch.float32)
    zs = zero_shot(model, tok, cfg, ex, LABELS, CPU, torch.float32, max_length=128)
    assert zs["prompt"] == NLI_PROMPT
    torch.testing.assert_close(torch.from_numpy(before), torch.from_numpy(zs["probs"]), rtol=0, atol=1e-5)
    assert not torch.allclose(torch.from_numpy(before[0]), torch.full((3,), 1 / 3), atol=1e-3)

    _, _, model, record = untrained(folder, head_init="random")  # the other recipe stays available
    assert record == {"head_init": "random"}
    head = model.base_model.model.score.modules_to_save["default"]
    assert not torch.allclose(head.weight.detach(), rows)


def test_a_chat_template_makes_the_prompt_and_the_answer_words_lose_their_space(tmp_path):
    folder = causal_lm(tmp_path / "llama", "llama", tied=False)
    cfg, tok, model, record = untrained(folder, chat=True)
    prompt = prompt_for(DataConfig(), tok)
    assert prompt.chat and prompt.words == ("Yes", "Maybe", "No")
    assert prompt.template == (
        "<|im_start|>user\n{premise}\nQuestion: {hypothesis} Yes, Maybe, or No?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert record["words"] == ["Yes", "Maybe", "No"]
    ex = examples(6)
    encoded = encode(ex, tok, DataConfig())
    before, _ = predict(model, encoded, 8, tok.pad_token_id, CPU, torch.float32)
    zs = zero_shot(model, tok, cfg, ex, LABELS, CPU, torch.float32, max_length=128)
    assert zs["prompt"] == prompt.template
    torch.testing.assert_close(torch.from_numpy(before), torch.from_numpy(zs["probs"]), rtol=0, atol=1e-5)


def test_label_words_are_refused_where_they_cannot_be_and_auto_falls_back(tmp_path):
    bert = save_tiny_model("bert", tmp_path / "bert")
    save_word_tokenizer(bert, vocabulary(), causal=False)
    with pytest.raises(ValueError, match="head_init is label-words, but bert is an encoder"):
        untrained(bert, head_init="label-words")
    assert untrained(bert)[3]["head_init"] == "random"
    llama = save_tiny_model("llama", tmp_path / "llama")  # saved for classification: no LM head to start from
    save_word_tokenizer(llama, vocabulary(), causal=True)
    record = untrained(llama)[3]
    assert record["head_init"] == "random" and "no language-model head" in record["why_not_label_words"]
    with pytest.raises(ValueError, match="model.head_init must be auto, label-words or random"):
        ModelConfig(head_init="words")


def test_text_the_tokenizer_turns_into_no_tokens_is_refused_naming_split_and_row(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # a BPE tokenizer without an unknown token drops every word it does not know: nothing is left
    bpe = Tokenizer(models.BPE(vocab={"</s>": 0, "§": 1}, merges=[], unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="</s>")
    rows = [Example(id="x", label=0, premise="§", hypothesis="§", row=1)] + examples(3)
    rows[1].row = 5
    with pytest.raises(ValueError) as e:
        encode(rows, tok, DataConfig(template="{premise} {hypothesis}"), split="train")
    assert str(e.value).startswith("train row 5: the tokenizer of the model turns its text into no tokens at all")
    with pytest.raises(ValueError, match="^validation row 5: "):
        encode(rows, tok, DataConfig(), split="validation")  # the zero-shot prompt: its words are unknown too


def test_a_special_token_beyond_the_embedding_is_refused_before_the_weights_load(tmp_path):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    folder = tmp_path / "qwen2"
    save_word_tokenizer(folder, vocabulary(), causal=True)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"pad_token": "<|endoftext|>"})  # as transformers' Qwen2 tokenizer class did
    tok.save_pretrained(folder)
    rows = len(tok) - 1  # the embedding ends just before the pad token's id
    Qwen2ForSequenceClassification(
        Qwen2Config(
            vocab_size=rows,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_labels=3,
        )
    ).save_pretrained(folder)
    with pytest.raises(ValueError) as e:
        load_tokenizer(ModelConfig(name=str(folder)))
    assert f"gives the token '<|endoftext|>' the id {rows}, but the model's embedding has {rows} rows" in str(e.value)
