"""Python's cyclic garbage collector in a long-lived worker: how often it ran and how long it held
every thread, and the objects of start-up frozen out of its full passes.

Public surface: ``GcWatch``.

A full (generation 2) collection walks every container object the process holds: a role ``all``
worker holds about half a million (torch modules, Faust's machinery, the roles' state), and the
collection holds the GIL throughout, so the event loop, the training threads and every view wait.
``GcWatch`` times each collection (``gc.callbacks``) and :meth:`GcWatch.freeze` moves the objects alive
at that moment (what start-up built, which lives as long as the process) to the permanent generation
(``gc.freeze``), which later passes skip. Objects created afterwards are collected as before, so a
cycle made later is still reclaimed; only a cycle among start-up objects that later becomes garbage is
kept, which start-up objects do not do.

>>> import gc
>>> w = GcWatch().start()
>>> _ = gc.collect()
>>> w.report()["collections"][2] >= 1
True
>>> w.stop()
"""

from __future__ import annotations

import gc
import time

__all__ = ["GcWatch"]


class GcWatch:
    """Per generation: ``collections``, ``max_ms``, ``total_ms``; ``frozen``: objects frozen."""

    def __init__(self):
        self._t0 = 0.0
        self.counts = {"collections": [0, 0, 0], "max_ms": [0.0, 0.0, 0.0], "total_ms": [0.0, 0.0, 0.0],
                       "frozen": 0}

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        g = info["generation"]
        ms = (time.perf_counter() - self._t0) * 1000
        self.counts["collections"][g] += 1
        self.counts["max_ms"][g] = max(self.counts["max_ms"][g], round(ms, 1))
        self.counts["total_ms"][g] = round(self.counts["total_ms"][g] + ms, 1)

    def start(self) -> "GcWatch":
        gc.callbacks.append(self._on_gc)
        return self

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def freeze(self) -> int:
        """Collect once, then freeze what is left: the number of objects the full passes skip from now."""
        gc.collect()
        gc.freeze()
        self.counts["frozen"] = gc.get_freeze_count()
        return self.counts["frozen"]

    def report(self) -> dict:
        return {k: list(v) if isinstance(v, list) else v for k, v in self.counts.items()}
