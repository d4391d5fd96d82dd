"""The GPU speed switches of a run: `speed` in config.json (RunConfig.speed), and the QLORA_*
environment variables that override them for benchmarks (SPEED_ENV: the only place they are read).

    speed = speed_from_env(cfg.speed)     # the settings a run actually uses
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class SpeedConfig:
    """How fast, not what: every switch keeps the maths (each is tested against the plain path in
    tests/test_perf.py) and trades speed against memory. The defaults are the fastest measured
    (bench/RESULTS.md). For side-by-side benchmarks each field can be overridden by the environment
    variable in SPEED_ENV; the run's config.json records the values it actually ran with."""

    cuda_graphs: bool = True
    """GPU: capture each training-step shape once as a CUDA graph and replay it (QLORA_CUDA_GRAPHS)."""
    eval_graphs: bool = True
    """GPU: replay padded validation batches from CUDA graphs (QLORA_EVAL_GRAPHS)."""
    pack: str = "auto"
    """Phi models: lay a batch's rows end to end with no padding (FlashAttention varlen). auto: on
    a GPU that runs FlashAttention 2 (Ampere or newer, 16-bit); on: wherever supported, CPU
    included (masked SDPA: the tests); off: padded batches (QLORA_PACK = auto, 1, 0)."""
    fused_linear: bool = True
    """Each 4-bit linear layer and its LoRA adapter as one autograd function (QLORA_FUSED)."""
    fused_rotary: bool = True
    """Phi's partial rotary embedding in one pass instead of slices and cats (QLORA_ROTARY)."""
    triton_rotary: bool = True
    """With fused_rotary, on an Ampere or newer GPU: the rotary as one Triton kernel (QLORA_TRITON)."""
    micro_tokens: int | None = None
    """Most tokens (padding included) in one forward/backward; a larger step is split into
    micro-batches with the same gradient. None: 768 on a GPU (keeps the Phi-2 reference under
    4 GiB), no limit on CPU; 0: no limit (QLORA_MICRO_TOKENS)."""
    eval_tokens: int = 16384
    """GPU: most padded tokens in one evaluation batch (QLORA_EVAL_TOKENS)."""
    eval_batch_cost: int | None = None
    """The fixed cost of one evaluation batch, in tokens, when evaluation batches are cut to the
    fewest padded tokens; None: 1024 on a GPU (about a dequantisation of Phi-2's weights), 32 on
    CPU (QLORA_EVAL_BATCH_COST)."""
    graph_warmup: str = "first"
    """Run a step eagerly before its CUDA graph capture: `first` shape only, or `each` shape
    (QLORA_GRAPH_WARMUP)."""

    def __post_init__(self):
        for name in ("cuda_graphs", "eval_graphs", "fused_linear", "fused_rotary", "triton_rotary"):
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
    "QLORA_ROTARY": "fused_rotary",
    "QLORA_TRITON": "triton_rotary",
    "QLORA_MICRO_TOKENS": "micro_tokens",
    "QLORA_EVAL_TOKENS": "eval_tokens",
    "QLORA_EVAL_BATCH_COST": "eval_batch_cost",
    "QLORA_GRAPH_WARMUP": "graph_warmup",
}


def speed_from_env(speed: SpeedConfig, environ=None) -> SpeedConfig:
    """`speed` with the SPEED_ENV variables that are set applied: booleans as 0/1 (or on/off,
    true/false), pack as auto/1/0 (or auto/on/off), integers as numbers."""
    import os

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
