"""The model: a Hugging Face sequence classifier in 4-bit NF4 with LoRA adapters (QLoRA).

    tokenizer = load_tokenizer(cfg.model)                    # checked against the model's embedding
    model = load_model(cfg.model, 3, tokenizer.pad_token_id, device, dtype)   # NF4, head unquantised
    init_head(model, cfg.model, prompt_for(cfg.data, tokenizer), tokenizer)  # label words' LM-head rows
    model = add_lora(model, cfg.lora)                        # only LoRA + head train
    counts = count_parameters(model)                         # true, packed 4-bit, trainable

The classification head (`classifier` for BERT-like models, `score` for causal LMs) is kept out of
quantisation and wrapped by peft's SEQ_CLS task type, so it is trained and saved with the adapter.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from .config import LoraSettings, ModelConfig
from .data import Prompt
from .embedded import EMBEDDED, embedded_folder

HEAD_NAMES = ("classifier", "score")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

REMOTE_CODE_ENV = "QLORA_STUDIO_TRUST_REMOTE_CODE"
# Learned position tables offset by padding_idx + 1: max_position_embeddings 514 holds 512 tokens.
PADDING_OFFSET_POSITIONS = {
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "data2vec-text",
    "ibert",
    "longformer",
    "markuplm",
    "roberta-prelayernorm",
    "mpnet",
}


def resolve_model_name(name: str) -> str:
    """A name from_pretrained understands: an embedded model's folder (core/embedded.py: converted
    once for a GGUF), a local folder, or a Hub id."""
    if name in EMBEDDED:
        return str(embedded_folder(name))
    if name.startswith("~"):
        return str(Path(name).expanduser())
    return name


def looks_like_path(name: str) -> bool:
    """A model name that can only mean a folder: ./x, ../x, /x, ~/x, C:\\x or a/b/c (a Hub id is
    `name` or `owner/name`)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or (len(name) > 1 and name[1] == ":")


def trust_remote_code() -> bool:
    """Whether a model's own Python code (auto_map in its config.json) may run: only when the
    environment variable QLORA_STUDIO_TRUST_REMOTE_CODE is 1."""
    import os

    return os.environ.get(REMOTE_CODE_ENV, "").strip() == "1"


def remote_code_message(name: str) -> str:
    return (
        f"model {name!r} needs its own Python code to load (auto_map in its config.json), and running a "
        f"model's code is off: if you trust that code, set the environment variable {REMOTE_CODE_ENV}=1 "
        "(for the app: before starting it); otherwise pick a model that transformers supports itself"
    )


def pretrained_source(name: str, revision: str | None = None) -> tuple[str, dict]:
    """(the name for from_pretrained, its revision/local_files_only/trust_remote_code arguments):
    a local folder, the embedded model's included, is read as it is, with no Hub lookup. Every
    from_pretrained of a model, tokenizer or config in core/ takes these arguments, so
    trust_remote_code is always passed explicitly: False unless QLORA_STUDIO_TRUST_REMOTE_CODE=1.
    A name that can only be a folder but is not one raises a RuntimeError saying what to give."""
    path = resolve_model_name(name)
    local = Path(path).is_dir()
    if not local and (looks_like_path(name) or Path(path).exists()):
        if Path(path).exists():
            raise RuntimeError(f"model {name!r} is a file: give its folder (the one holding config.json)")
        raise RuntimeError(
            f"model folder {name!r} does not exist: give a folder in Hugging Face format (one "
            "saved with save_pretrained, holding config.json) or a Hub id such as microsoft/phi-2"
        )
    if local and not (Path(path) / "config.json").is_file():
        raise RuntimeError(
            f"model folder {name!r} has no config.json: give a folder saved with save_pretrained "
            "(config.json, the weights and the tokenizer files)"
        )
    return path, {"revision": revision, "local_files_only": local, "trust_remote_code": trust_remote_code()}


def read_model_config(cfg: ModelConfig) -> dict | None:
    """The model's config.json as a dict, from its folder or the local Hugging Face cache only
    (never the network, never the model's code); None when it is not there (a Hub model not yet
    downloaded: loading it later says what went wrong)."""
    from transformers import PretrainedConfig

    name, source = pretrained_source(cfg.name, cfg.revision)
    try:
        config, _ = PretrainedConfig.get_config_dict(name, revision=cfg.revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or unreadable: the real load reports it
        return None
    return config if isinstance(config, dict) else None


def needs_remote_code(config: dict) -> bool:
    """Whether transformers cannot build this model without running the model's own code: an
    auto_map and a model_type transformers does not know. (With a known model_type, transformers
    uses its own classes and ignores the auto_map when trust_remote_code is False.)"""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return bool(config.get("auto_map")) and config.get("model_type") not in CONFIG_MAPPING_NAMES


def max_positions(config: dict) -> int | None:
    """The most tokens the model's position embeddings take (None when its config does not say)."""
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if not isinstance(limit, int) or limit <= 0:
        return None
    if config.get("model_type") in PADDING_OFFSET_POSITIONS:
        limit -= (config.get("pad_token_id") or 1) + 1
    return limit


def check_model(cfg) -> None:
    """What can be checked of a RunConfig's model from its config.json alone, before any data or
    weights load: the folder exists, the model loads without running its own code (or
    QLORA_STUDIO_TRUST_REMOTE_CODE=1 allows that), and data.max_length fits its positions.
    A Hub model that is not in the local cache is left to load_tokenizer (no network here)."""
    config = read_model_config(cfg.model)
    if config is None:
        return
    if needs_remote_code(config) and not trust_remote_code():
        raise RuntimeError(remote_code_message(cfg.model.name))
    limit = max_positions(config)
    if limit and cfg.data.max_length > limit:
        raise ValueError(
            f"data.max_length is {cfg.data.max_length} but model {cfg.model.name!r} takes at most "
            f"{limit} tokens (max_position_embeddings in its config.json): use --max-length {limit} "
            "or less"
        )


def _hub_hint(name: str, error: BaseException) -> str:
    """Why a model could not be loaded and what to do, in one sentence."""
    import os

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        why = "it is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
    else:
        why = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
    return (
        f"{why}. Without network access, download it where there is network (hf download {name}) and "
        "copy the Hugging Face cache here, or give a local folder in Hugging Face format "
        "(e.g. one saved with save_pretrained) as --model."
    )


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is cuda but no CUDA GPU is available")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def autocast(device: torch.device, dtype: torch.dtype, cache_enabled: bool = True):
    """Mixed precision (16-bit matmuls, fp32 master weights): bf16/fp16 on a GPU, bf16 on a CPU;
    nothing in fp32. The training step (speed/step.py) runs it with `cache_enabled=False`: no
    cache of cast weights kept from one call to the next."""
    if dtype == torch.bfloat16 or (device.type == "cuda" and dtype == torch.float16):
        return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)
    return contextlib.nullcontext()


def pick_compute_dtype(device: torch.device, requested: str = "auto", cpu_bf16: bool = False) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on older ones (T4: compute capability 7.5), fp32 on CPU
    (bf16 with `cpu_bf16`, speed.cpu_bf16, where the CPU multiplies bf16 natively)."""
    if requested != "auto":
        dtype = DTYPES[requested]
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise RuntimeError("this GPU does not support bfloat16: use float16 (or auto)")
        if device.type != "cuda" and dtype == torch.float16:
            raise RuntimeError("float16 compute needs a GPU: on a CPU use float32 (auto) or bfloat16")
        return dtype
    if device.type != "cuda":
        return torch.bfloat16 if cpu_bf16 and cpu_has_native_bf16() else torch.float32
    return torch.bfloat16 if gpu_supports_bf16(torch.cuda.get_device_capability(device)) else torch.float16


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def gpu_supports_bf16(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores exist from Ampere (compute capability 8.0) on; a T4 is 7.5."""
    return capability >= (8, 0)


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, with a pad token set (causal LMs have none: reuse EOS or UNK)."""
    from transformers import AutoTokenizer

    name, source = pretrained_source(cfg.name, cfg.revision)
    config = read_model_config(cfg)
    if config is not None and needs_remote_code(config) and not source["trust_remote_code"]:
        raise RuntimeError(remote_code_message(cfg.name))  # before transformers tries the custom tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name, **source)
    except OSError as e:  # not a local folder, and the Hub unreachable or the id unknown
        raise RuntimeError(f"could not load the tokenizer of model {cfg.name!r}: {_hub_hint(cfg.name, e)}") from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise RuntimeError(remote_code_message(cfg.name)) from e
        raise
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if tok.pad_token is None:
            raise ValueError(f"tokenizer of {cfg.name} has no pad, EOS or UNK token to pad with")
    tok.padding_side = "right"
    if config is not None:
        check_token_ids(tok, config, cfg.name)
    return tok


def check_token_ids(tokenizer, config: dict, name: str) -> None:
    """A ValueError, before any weight loads, when a special token of the tokenizer (pad, EOS,
    BOS ...: those put into every row) has an id the model has no embedding row for: the tokenizer
    does not belong to the model, and the first forward would fail with "index out of range"."""
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(rows, int) or rows <= 0:
        return
    special = dict(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))
    if tokenizer.pad_token is not None:
        special[tokenizer.pad_token] = tokenizer.pad_token_id
    for token, token_id in special.items():
        if token_id is not None and token_id >= rows:
            raise ValueError(
                f"the tokenizer of model {name!r} ({type(tokenizer).__name__}) gives the token {token!r} the id "
                f"{token_id}, but the model's embedding has {rows} rows (ids 0..{rows - 1}, vocab_size in its "
                "config.json): the tokenizer does not belong to the model; give the model folder the "
                "tokenizer it was trained with"
            )


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(HEAD_NAMES),  # the new head stays in full precision
    )


def load_model(
    cfg: ModelConfig,
    num_labels: int,
    pad_token_id: int | None,
    device: torch.device,
    compute_dtype: torch.dtype,
    id2label: dict[int, str] | None = None,
):
    """AutoModelForSequenceClassification, 4-bit NF4 if configured, with a float32 head.

    The new head is initialised from torch's RNG: seed before calling for a reproducible head."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {}
    if id2label:
        kwargs.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    if cfg.quantize == "bnb.nf4":
        kwargs["quantization_config"] = quantization_config(cfg, compute_dtype)
    name, source = pretrained_source(cfg.name, cfg.revision)  # trust_remote_code: False unless allowed
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name,
            **source,
            num_labels=num_labels,
            dtype=compute_dtype,
            device_map={"": device},
            **kwargs,
        )
    except OSError as e:
        raise RuntimeError(f"could not load the weights of model {cfg.name!r}: {_hub_hint(cfg.name, e)}") from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise RuntimeError(remote_code_message(cfg.name)) from e
        raise
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # causal LMs find the last real token with it
    if getattr(model.config, "use_cache", False):
        # a classifier never generates: without this, every forward of a decoder (training and
        # evaluation alike) builds a key/value cache, a copy of every layer's keys and values
        model.config.use_cache = False
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights for an AVX512-BF16 CPU kernel at the first eval
        # forward, after which training forwards fail ("a view of a leaf Variable ... in-place");
        # we alternate evaluation and training, so keep the one layout that serves both.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    set_pooling(model, resolve_pooling(cfg))
    head = classification_head(model)
    head.to(torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class MaskedMeanPooler(torch.nn.Module):
    """Mean of the last hidden states over the real (unmasked) tokens, in place of BERT's [CLS]
    pooler: how sentence-transformers models such as all-MiniLM-L6-v2 were trained to summarise a
    text. The attention mask reaches it through a forward pre-hook on the encoder."""

    def __init__(self):
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden.mean(1)
        m = self.mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def resolve_pooling(cfg: ModelConfig) -> str:
    """`model` or `mean` for cfg.pooling (auto reads a sentence-transformers pooling config)."""
    if cfg.pooling != "auto":
        return cfg.pooling
    import json

    folder = Path(resolve_model_name(cfg.name))
    try:
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError):
        return "model"
    return "mean" if pooling.get("pooling_mode_mean_tokens") else "model"


def set_pooling(model, mode: str) -> None:
    """Put a MaskedMeanPooler in place of an encoder's pooler (no-op for `model`)."""
    if mode == "model":
        return
    encoder = model.base_model
    if getattr(encoder, "pooler", None) is None:
        raise ValueError(
            f"pooling={mode!r} needs an encoder with a pooler (BERT-like); "
            f"{model.config.model_type} has none: use pooling=model"
        )
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def keep_mask(module, args, kwargs):
        pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)


def init_head(model, cfg: ModelConfig, prompt: Prompt, tokenizer) -> dict:
    """Start the classification head as cfg.head_init says (before add_lora, which copies it), and
    return what was done, for the setup record. `label-words`: each class's row is the LM head's
    row of the first token of its answer word in `prompt` (the input embedding's row when the two
    are tied), the bias zero; with the prompt as the run's input, the untrained classifier's
    logits are the zero-shot baseline's (core/baseline.py). `auto` takes it where it can, else
    keeps the random head."""
    if cfg.head_init == "random":
        return {"head_init": "random"}
    token_ids, why_not = label_word_ids(model, prompt, tokenizer)
    rows = None
    if why_not is None:
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        rows = lm_head_rows(cfg.name, cfg.revision, token_ids, tied)
        if rows is None:
            why_not = "the model's weights hold no language-model head (a checkpoint saved for classification only)"
    if why_not is not None:
        if cfg.head_init == "label-words":
            raise ValueError(f"model.head_init is label-words, but {why_not}: use --head-init random (or auto)")
        return {"head_init": "random", "why_not_label_words": why_not}
    weight, bias = rows
    head = classification_head(model)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.copy_(bias if bias is not None else torch.zeros_like(head.bias))
    return {"head_init": "label-words", "words": list(prompt.words), "token_ids": token_ids}


def label_word_ids(model, prompt: Prompt, tokenizer) -> tuple[list[int], str | None]:
    """(the first token id of each answer word of `prompt`, None), or ([], why a head cannot start
    from the label words: not a causal LM, no answer words, or words that share a first token)."""
    if not is_causal(model):
        return [], f"{model.config.model_type} is an encoder, with no language-model head over words"
    if not prompt.words:
        return [], "the run's input is the tokenizer's pair encoding, not a prompt answered by words"
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in prompt.words]
    if any(not i for i in ids) or len({i[0] for i in ids}) < len(ids):
        return [], f"the label words {list(prompt.words)} do not start with distinct tokens for this tokenizer"
    return [i[0] for i in ids], None


def _weight_files(name: str, revision: str | None) -> list[Path]:
    """The safetensors files of a model folder or of a Hub model in the local cache."""
    import json

    folder = Path(resolve_model_name(name))
    if folder.is_dir():
        return sorted(folder.glob("*.safetensors"))
    from huggingface_hub import hf_hub_download

    try:
        index = json.loads(Path(hf_hub_download(name, "model.safetensors.index.json", revision=revision)).read_text())
        shards = sorted(set(index["weight_map"].values()))
    except Exception:  # a single-file model
        shards = ["model.safetensors"]
    return [Path(hf_hub_download(name, s, revision=revision)) for s in shards]


def lm_head_rows(name: str, revision: str | None, token_ids: list[int], tied: bool):
    """(W [k, hidden], bias [k] or None) of the LM head for `token_ids`, in float32, read from the
    weight files without loading the rest (a sequence classifier has no LM head); the input
    embedding's rows when the head is tied to it. None when the weights hold neither."""
    from safetensors import safe_open

    def rows(f, key):  # only these rows are read from the file
        part = f.get_slice(key)
        return torch.cat([part[i : i + 1] for i in token_ids]).float()

    weight = bias = embedding = None
    for file in _weight_files(name, revision):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key in ("lm_head.weight", "model.lm_head.weight"):
                    weight = rows(f, key)
                elif key in ("lm_head.bias", "model.lm_head.bias"):
                    bias = rows(f, key)
                elif tied and (key.endswith("embed_tokens.weight") or key.endswith("wte.weight")):
                    embedding = rows(f, key)
    weight = weight if weight is not None else embedding
    return None if weight is None else (weight, bias)


def classification_head(model) -> torch.nn.Module:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")


def is_lora_part(name: str) -> bool:
    """Whether a module name lies inside a LoRA adapter (its A/B matrices and the like)."""
    return any(
        part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
        for part in name.split(".")
    )


def is_causal(model) -> bool:
    """True for decoder-only models (attention modules with is_causal): with right padding, real
    tokens never attend to the pads after them, so the attention mask can be left out (SDPA then
    runs its causal flash kernel, no mask is built, no host sync)."""
    return any(
        getattr(m, "is_causal", None) is True and (hasattr(m, "q_proj") or hasattr(m, "qkv_proj"))  # Phi-3: fused qkv
        for m in model.modules()
    )


def default_target_modules(model_type: str) -> list[str] | str:
    """peft's usual LoRA targets for an architecture, else every linear layer."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    return list(table.get(model_type) or []) or "all-linear"


def lora_config(model, cfg: LoraSettings):
    from peft import LoraConfig

    targets = cfg.target_modules or default_target_modules(model.config.model_type)
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        task_type="SEQ_CLS",
        bias="none",
        use_dora=cfg.variant == "dora",  # lora.variant, through peft's own flags
        use_rslora=cfg.variant == "rslora",
    )


def add_lora(model, cfg: LoraSettings):
    """Wrap `model` with LoRA adapters; only they and the classification head are trainable."""
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, lora_config(model, cfg))
    except ValueError as e:
        raise ValueError(f"could not add LoRA to {model.config.model_type}: {e}") from None
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # trainable weights are kept in fp32 (autocast does the rest)
    return peft_model


def count_parameters(model) -> dict[str, int]:
    """Parameter counts, each labelled.

    total:     every parameter as the model defines it (4-bit weights counted at full size)
    packed:    the naive sum of numel(): a 4-bit weight is stored two to a byte, so it counts
               half (what hand-made scripts print as "total parameters" for a 4-bit model)
    trainable: parameters that receive gradients (LoRA matrices and the head)
    """
    total = packed = trainable = 0
    for p in model.parameters():
        n = p.numel()
        packed += n
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else n
        if p.requires_grad:
            trainable += n
    return {"total": total, "packed": packed, "trainable": trainable}
