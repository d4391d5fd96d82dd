"""The Playground's models: each checkpoint folder's classifier loaded once for the whole server,
a few kept, one loading at a time, and a visitor who would have to wait told so at once.

    clf = POOL.get(run / "checkpoints" / "epoch-2")    # load_classifier(folder), or the one kept
    # raises Busy ("... loading other models ...") when no loading slot frees within BUSY_WAIT_S

A model is large (a base model in 4 bits, its adapter and head) and slow to load: several visitors
each loading another run's models at once all ran out of time. The pool lets MAX_LOADING loads run
together, keeps the MAX_MODELS used last, and answers the others Busy in one sentence instead of
letting them queue. It lives here, not in Streamlit's cache: any browser can send Streamlit's
clear-cache message, which empties st.cache_resource for every session, and would drop these.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_MODELS = 4
"""Classifiers kept loaded (two runs' before and after models); the least recently used goes first."""
MAX_LOADING = 1
"""Classifiers loading at once, server-wide (each reads a whole base model into memory)."""
BUSY_WAIT_S = 3.0
"""How long a request waits for a loading slot (or for another request loading the same folder)."""


class Busy(RuntimeError):
    """No model could be loaded in time for this request; its text says so in one sentence."""


class ModelPool:
    """Loaded models by folder, at most `max_models`, at most `max_loading` loading at once.
    Thread-safe: one instance, POOL, serves every session of the server."""

    def __init__(
        self,
        load: Callable[[Path], Any],
        max_models: int = MAX_MODELS,
        max_loading: int = MAX_LOADING,
        wait_s: float = BUSY_WAIT_S,
    ):
        self.load, self.max_models, self.wait_s = load, max_models, wait_s
        self._models: OrderedDict[tuple, Any] = OrderedDict()
        self._loading: dict[tuple, threading.Event] = {}
        self._slots = threading.BoundedSemaphore(max_loading)
        self._lock = threading.Lock()

    @staticmethod
    def _key(folder: Path) -> tuple:
        """The folder and when its files last changed (a run trained again in place loads anew)."""
        folder = Path(folder).resolve()
        try:
            mtime = max(p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file())
        except (OSError, ValueError):
            mtime = None
        return (str(folder), mtime)

    def loaded(self) -> list[str]:
        """The folders whose models are loaded now, least recently used first."""
        with self._lock:
            return [k[0] for k in self._models]

    def get(self, folder: Path) -> Any:
        """The model of `folder`: the one kept, else loaded now (load(folder)). Busy when every
        loading slot stays taken (or another request loading this folder has not finished) for
        wait_s seconds; what load() raises passes through."""
        key = self._key(folder)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            pending = self._loading.get(key)
            if pending is None:
                pending = self._loading[key] = threading.Event()
                mine = True
            else:
                mine = False
        if not mine:  # someone else loads this very folder: wait for it, then take it
            if not pending.wait(self.wait_s):
                raise Busy(self._busy())
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
            return self.get(folder)  # that load failed: try it ourselves
        try:
            if not self._slots.acquire(timeout=self.wait_s):
                raise Busy(self._busy())
            try:
                model = self.load(Path(folder))
            finally:
                self._slots.release()
            with self._lock:
                self._models[key] = model
                self._models.move_to_end(key)
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            return model
        finally:
            with self._lock:
                self._loading.pop(key, None)
            pending.set()

    def _busy(self) -> str:
        return (
            "The Playground is loading other models for other visitors right now (one at a time, so that "
            "the server keeps its memory): try again in a few seconds."
        )

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


def _load_classifier(folder: Path):
    from .classifier import load_classifier  # torch and transformers: only when a model loads

    return load_classifier(folder)


POOL = ModelPool(_load_classifier)
