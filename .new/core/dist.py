"""Data-parallel training over several processes with torch.distributed (one per GPU).

    python -m core train --preset phi2-snli --nproc 2          # starts torchrun itself
    torchrun --nproc-per-node 2 -m core train --preset ...     # or under torchrun / accelerate launch
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 -m core train ... --run-dir /shared/runs/x   # several machines

What each process does (train() reads the same with one process, where every method below is a
no-op or the identity):

- it loads its own 4-bit copy of the model; the trainable weights (LoRA and the head) are then
  broadcast from rank 0, as DistributedDataParallel does at construction;
- each optimiser step's global batch (the same list of rows in every process: the batch order is
  seeded) is split by rank, `shard`; after backward, `reduce_gradients` all-reduces the LoRA and
  head gradients (weighted by rows, so the step is the gradient of the mean loss over the global
  batch, as with one process) together with the loss and token counts, in one collective. The
  4-bit weights are never communicated. Every process then takes the same optimiser step;
- evaluation is sharded the same way and the probabilities gathered (`gather`);
- a stop (STOP file, SIGTERM) is agreed at every check (`agree`), so all processes stop at the
  same step; a failed process leaves `rank-K.error` in the run folder, which rank 0 reports;
- rank 0 alone writes metrics, status, predictions, checkpoints and the report.

Why not torch.nn.parallel.DistributedDataParallel: its value is overlapping the all-reduce of
many large gradient buckets with backward; here the gradients are the LoRA and head weights only
(18M numbers for Phi-2 r=16, one all-reduce of 73 MB), and the training step runs as captured
CUDA graphs over micro-batches, which DDP's autograd hooks would have to be fitted into (no_sync
for the micro-batches, static_graph for the capture). One explicit all-reduce after the last
micro-batch does the same reduction in the same place for every path (padded, packed, graphs).

Collectives time out after QLORA_STUDIO_DIST_TIMEOUT seconds (default 900): a process that died
is noticed at once (its connections close), one that hangs within that time.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .model import pick_device
from .runs import rundir
from .runs.state import update_status

TIMEOUT_ENV = "QLORA_STUDIO_DIST_TIMEOUT"
FAIL_ENV = "QLORA_STUDIO_FAIL_RANK"  # tests: this rank fails at its first gradient reduction
# gloo instead of NCCL between GPU processes: lets several processes share one GPU (NCCL refuses),
# to check the data-parallel path on a one-GPU machine; slow, never for speed
BACKEND_ENV = "QLORA_STUDIO_DIST_BACKEND"


def gpu_backend() -> str:
    value = os.environ.get(BACKEND_ENV, "nccl")
    if value not in ("nccl", "gloo"):
        raise ValueError(f"{BACKEND_ENV} must be nccl or gloo, not {value!r}")
    return value


ERROR_SUFFIX = ".error"  # rank-K.error in the run folder: a non-main process's failure


def launched() -> bool:
    """True inside a process started by torchrun (or accelerate launch) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "900")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, not {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, not {raw!r}")
    return value


class Ranks:
    """This process's place among the training processes (rank 0 of 1 without torch.distributed)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, control=None):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.control = control  # a gloo group: CPU-side agreement and gathers, no GPU sync

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this process: cuda:<local rank> on a GPU machine (shared GPUs under gloo)."""
        if device.type != "cuda" or self.world == 1:
            return device
        return torch.device("cuda", self.local_rank % torch.cuda.device_count())

    def shard(self, idx: list[int]) -> list[int]:
        """This process's rows of a global batch (or of an evaluation split): every world-th one."""
        return idx[self.rank :: self.world] if self.world > 1 else idx

    def reduce_gradients(
        self, params: list[torch.Tensor], loss: torch.Tensor, tokens: tuple, rows: int, total_rows: int
    ):
        """After this process's backward over `rows` of the step's `total_rows`: .grad of
        `params` becomes the gradient of the mean loss over all rows of all processes; returns
        (mean loss, (real tokens, processed tokens)) over all processes, as device scalars. One
        all-reduce, queued on the device stream (no wait here)."""
        if self.world == 1:
            return loss, tokens
        if os.environ.get(FAIL_ENV) == str(self.rank):
            raise RuntimeError(f"{FAIL_ENV}={self.rank}: this process was told to fail (a test of failure handling)")
        grads = [p.grad for p in params]
        weight = rows / total_rows
        counts = torch.zeros(2, device=loss.device)
        counts[0], counts[1] = float(tokens[0]), float(tokens[1])  # fill kernels: no host-to-device copy, no wait
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [(loss.float() * weight).reshape(1), counts])
        flat[:-3].mul_(weight)
        dist.all_reduce(flat)
        sizes = [g.numel() for g in grads]
        parts = flat[:-3].split(sizes)
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(parts, grads)])
        return flat[-3], (flat[-2], flat[-1])

    def agree(self, flag: bool) -> bool:
        """True in every process when `flag` is true in any (a stop, a failure to report)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, in every process."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def unshard(self, parts: list, n: int):
        """The inverse of shard for `n` rows: the processes' arrays (rows first), in rank order."""
        if self.world == 1:
            return parts[0]
        like = next(p for p in parts if len(p))
        out = np.empty((n, *like.shape[1:]), dtype=like.dtype)
        for r, part in enumerate(parts):
            if len(part):
                out[r :: self.world] = part
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` in every process."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def broadcast_params(self, params: list[torch.Tensor]) -> None:
        """Rank 0's values of `params` (the trainable weights) in every process."""
        if self.world == 1:
            return
        for p in params:
            dist.broadcast(p.data, src=0)

    def identical(self, params: list[torch.Tensor]) -> bool:
        """Whether every process holds bit-identical `params` (a digest each, compared)."""
        if self.world == 1:
            return True
        h = hashlib.sha256()
        for p in params:
            h.update(p.detach().float().cpu().numpy().tobytes())
        return len(set(self.gather(h.hexdigest()))) == 1

    def main_first(self, fn):
        """fn() in rank 0, its result (or its error, as a ValueError) in every process."""
        if self.world == 1:
            return fn()
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others know
                error = e
        box = self.broadcast_object((result, None if error is None else str(error)))
        if error is not None:
            raise error
        if box[1] is not None:
            raise ValueError(box[1])
        return box[0]


_RANKS: Ranks | None = None


def setup(device_type: str = "cpu") -> Ranks:
    """This process's Ranks, joining the process group the first time when started by torchrun
    (NCCL between GPUs, gloo between CPU processes; a gloo group beside NCCL for agreement)."""
    global _RANKS
    if _RANKS is not None:
        return _RANKS
    if not launched():
        _RANKS = Ranks()
        return _RANKS
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=timeout_s())
    if device_type == "cuda" and gpu_backend() == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"process {rank} has local rank {local_rank} but this machine has "
                f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU"
            )
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
        control = dist.new_group(backend="gloo", timeout=timeout)
    elif device_type == "cuda":  # gloo between GPU processes, several on one GPU allowed
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group("gloo", timeout=timeout)
        control = None
    else:
        dist.init_process_group("gloo", timeout=timeout)
        control = None  # the default group is gloo already
    _RANKS = Ranks(rank, world, local_rank, control)
    return _RANKS


def shutdown() -> None:
    global _RANKS
    if _RANKS is not None and _RANKS.world > 1:
        if dist.is_initialized():
            dist.destroy_process_group()
    _RANKS = None


def write_error(run_dir: Path, ranks: Ranks, error: BaseException) -> None:
    """A non-main process's failure, for rank 0 (and the launcher) to report: rank-K.error."""
    text = f"{type(error).__name__}: {error}\n\n{traceback.format_exc(limit=20)}"
    try:
        rundir.atomic_write_text(Path(run_dir) / f"rank-{ranks.rank}{ERROR_SUFFIX}", text)
    except OSError:
        pass  # the run folder may be on another machine: rank 0 reports the broken collective


def rank_errors(run_dir: Path) -> str | None:
    """The first line of each rank-K.error in the run folder, joined; None when there are none."""
    found = sorted(Path(run_dir).glob(f"rank-*{ERROR_SUFFIX}"))
    lines = []
    for f in found:
        try:
            first = f.read_text(errors="replace").splitlines()[0]
        except (OSError, IndexError):
            first = "(unreadable error file)"
        lines.append(f"process {f.name[: -len(ERROR_SUFFIX)].replace('rank-', 'rank ')} failed: {first}")
    return "; ".join(lines) or None


def clear_errors(run_dir: Path) -> list[str]:
    """Remove the rank-K.error files of a previous attempt; returns their names."""
    found = sorted(Path(run_dir).glob(f"rank-*{ERROR_SUFFIX}"))
    for f in found:
        f.unlink(missing_ok=True)
    return [f.name for f in found]


def ranks_for(cfg) -> Ranks | None:
    """This process's Ranks when torchrun started it (joining the process group), else None."""
    if not launched():
        return None
    return setup(pick_device(cfg.model.device).type)


def with_world_size(cfg, ranks: Ranks | None):
    """The config as this process runs it: under torchrun, train.processes is the world size
    (config.json then says how many processes a resume starts)."""
    if ranks is None or cfg.train.processes == ranks.world:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, processes=ranks.world))


def without_nproc(argv: list[str]) -> list[str]:
    """argv less `--nproc N`: torchrun would take --nproc for its own --nproc-per-node."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def run_processes(args, cfg, run_dir: Path) -> int:
    """`python -m core train ... --nproc N` outside torchrun: the same command as N processes
    under torchrun, waited for; the run folder then says how it ended (failed with the reason if
    rank 0 was killed before it could). Returns the CLI's exit code (0 done, 3 stopped, 2 else)."""
    n = cfg.train.processes
    device = pick_device(cfg.model.device)
    if device.type == "cuda":
        if n > torch.cuda.device_count() and gpu_backend() == "nccl":
            raise ValueError(
                f"--nproc {n} asks for {n} GPUs but this machine has {torch.cuda.device_count()}: "
                "start at most one process per GPU"
            )
    elif cfg.model.device != "cpu":
        raise ValueError(
            f"--nproc {n}: data-parallel training needs GPUs and this machine has none "
            "(to run several CPU processes anyway, as the tests do, add --device cpu)"
        )
    argv = without_nproc(args.argv)
    if not args.resume and not args.run_dir:
        argv += ["--run-dir", str(run_dir)]  # every process writes (rank 0) into the same folder
    print(
        f"{n} processes ({device.type}): torchrun --standalone --nproc-per-node={n} -m core {' '.join(argv)}",
        flush=True,
    )
    proc = subprocess.Popen(torchrun_command(n, argv), env=os.environ.copy())  # a claim token goes to rank 0

    def forward(signum, frame) -> None:  # Stop / kill: torchrun stops every process
        proc.send_signal(signum)

    previous_term = signal.signal(signal.SIGTERM, forward)
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches torchrun from the terminal
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
    status = rundir.read_json(run_dir / rundir.STATUS, {}) or {}
    if status.get("state") in rundir.ACTIVE_STATES:  # rank 0 was killed before it could say so
        error = rank_errors(run_dir) or (
            f"the training processes ended (torchrun exit code {code}) before the run did; see {rundir.LOG} for why"
        )
        status = update_status(
            run_dir, {"state": "failed", "phase": "failed", "error": error, "finished_at": rundir.now_iso()}
        ) or {"state": "failed", "error": error}
    if status.get("state") == "failed":  # the run's own words, after torchrun's report
        print(f"error: {status.get('error')}", file=sys.stderr)
    return {"done": 0, "stopped": 3}.get(status.get("state"), 2)


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The command that runs `python -m core <args>` as `nproc` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "core",
        *args,
    ]
