"""Resource sampling: a background thread that appends CPU, RAM and GPU readings once a second
to resources.jsonl, and the hardware description shown in the report and the app."""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path

import psutil

from .liveness import beat
from .rundir import HEARTBEAT_EVERY_S, append_jsonl

# pynvml and torch are imported where they are used: pynvml may be missing (no NVIDIA driver), and the
# app imports this file for describe_hardware without needing torch.


def _nvml():
    """pynvml, initialised, or None when there is no NVIDIA driver (CPU machines, CI)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def hardware_info() -> dict:
    """What this machine has: CPU cores, RAM, and each CUDA GPU's name, memory and capability."""
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": psutil.cpu_count(logical=True),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": [],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                info["gpus"].append(
                    {
                        "name": p.name,
                        "memory_gb": round(p.total_memory / 2**30, 1),
                        "capability": f"{p.major}.{p.minor}",
                    }
                )
    except ImportError:
        pass
    return info


def describe_hardware(info: dict) -> str:
    if info.get("gpus"):
        g = info["gpus"][0]
        more = f" (+{len(info['gpus']) - 1} more)" if len(info["gpus"]) > 1 else ""
        return f"{g['name']}, {g['memory_gb']} GiB{more}"
    return f"CPU only: {info.get('cpu_cores')} cores, {info.get('ram_gb')} GiB RAM"


class ResourceSampler:
    """Samples this process (and its children) every `interval` seconds until stopped, and
    rewrites the run's heartbeat file (liveness.beat, in the folder of `path`) every
    HEARTBEAT_EVERY_S seconds: the app reads a run whose heartbeat is stale as failed.

    Each sample: t (unix time), cpu_percent (of one core, summed over threads), rss_gb, ram_used_gb
    (whole machine), and per GPU: gpu_mem_gb (device-wide, from NVML), gpu_util (%), plus
    torch_peak_gb (torch's own peak allocation in this process)."""

    def __init__(self, path: Path, interval: float = 1.0, enabled: bool = True):
        """`enabled` False (the other processes of a data-parallel run): start and stop do nothing."""
        self.path = Path(path)
        self.enabled = enabled
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self.peaks: dict[str, float] = {}

    def start(self) -> ResourceSampler:
        if self.enabled:
            self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        return self.peaks

    def sample(self) -> dict:
        proc = self._proc
        procs = [proc] + proc.children(recursive=True)
        cpu = 0.0
        rss = 0
        for p in procs:
            try:
                cpu += p.cpu_percent(None)
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        rec = {
            "t": round(time.time(), 3),
            "cpu_percent": round(cpu, 1),
            "rss_gb": round(rss / 2**30, 3),
            "ram_used_gb": round(psutil.virtual_memory().used / 2**30, 3),
        }
        if self._nvml is not None:
            try:
                h = self._nvml.nvmlDeviceGetHandleByIndex(self._gpu_index)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
                util = self._nvml.nvmlDeviceGetUtilizationRates(h)
                rec["gpu_mem_gb"] = round(mem.used / 2**30, 3)
                rec["gpu_util"] = float(util.gpu)
            except Exception:
                pass
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                rec["torch_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        except Exception:
            pass
        for k, v in rec.items():
            if k != "t":
                self.peaks[k] = max(self.peaks.get(k, 0.0), v)
        return rec

    def _run(self):
        self._proc = psutil.Process(os.getpid())
        self._proc.cpu_percent(None)
        self._nvml = _nvml()
        self._gpu_index = 0  # NVML numbers GPUs physically; the trainer uses the first one
        last_beat = 0.0
        while not self._stop.wait(self.interval):
            try:
                append_jsonl(self.path, self.sample())
            except Exception:
                pass  # sampling must never break training
            if time.monotonic() - last_beat >= HEARTBEAT_EVERY_S:
                last_beat = time.monotonic()
                try:
                    beat(self.path.parent)
                except OSError:
                    pass
        try:
            append_jsonl(self.path, self.sample())
        except Exception:
            pass
