"""CUDA graphs: capture a piece of GPU work once per input shape and replay it.

    graph, out = capture_graph(run, device, pool, warm_up=True)   # the primitive
    graphs = EvalGraphs(device, enabled=cfg.speed.eval_graphs)     # evaluation forwards, by shape

A replay is one launch instead of thousands of kernel launches and the Python of
peft/bitsandbytes/transformers. The training step's graphs live in step.py.
"""

from __future__ import annotations

import torch


def capture_graph(run, device: torch.device, pool, warm_up: bool):
    """(CUDA graph of run(), what run() returned inside it), in memory pool `pool`. With warm_up,
    run() goes once on a side stream first, so lazy initialisation stays out of the capture.
    Raises whatever the capture raises (an op that syncs or cannot be captured)."""
    if warm_up:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out


class EvalGraphs:
    """Evaluation forwards captured as CUDA graphs, one per batch shape, and replayed: a run scores
    the same validation batches after every epoch (and the same test batches before and after), so
    each shape is captured once and every later pass runs without Python or launch overhead.
    On a GPU unless speed.eval_graphs is off: a capture costs about the time of one eager pass, so
    it pays from the second pass on (bench/RESULTS.md). Packed evaluation runs a few large batches,
    which gain nothing from it: core.train uses it for padded models only. Eager on CPU, and after
    a capture fails."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = device
        self.enabled = device.type == "cuda" and enabled
        self.cache: dict[tuple, dict] = {}
        self.pool = None
        self.error: str | None = None

    def logits(self, batch: dict[str, torch.Tensor], forward, extra_key=None) -> torch.Tensor:
        """forward(batch on the device) -> logits, run through a graph for this batch's shape (and
        extra_key: what else forward bakes in). The result of a replay lives in the graph's
        output: use it before the same shape runs again."""
        entry = None
        if self.enabled:
            key = (extra_key, *((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items())))
            entry = self.cache.get(key) or self._capture(batch, forward, key)
        if entry is None:  # disabled, or the capture just failed
            return forward({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        for k, v in batch.items():
            entry["static"][k].copy_(v.pin_memory(), non_blocking=True)
        entry["graph"].replay()
        return entry["out"]

    def _capture(self, batch, forward, key) -> dict | None:
        static = {k: v.to(self.device) for k, v in batch.items()}
        try:
            graph, out = capture_graph(lambda: forward(static), self.device, self.pool, warm_up=not self.cache)
        except Exception as e:  # not capturable: evaluate eagerly from now on
            self.enabled = False
            self.error = f"{type(e).__name__}: {e}"[:500]
            torch.cuda.synchronize(self.device)
            return None
        self.pool = graph.pool()
        self.cache[key] = entry = {"graph": graph, "static": static, "out": out}
        return entry
