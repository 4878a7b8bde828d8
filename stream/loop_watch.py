"""How long the event loop went without running, and what held it: the cause of a slow view or a late
heartbeat, named.

Public surface: ``LoopWatch``.

Every view, heartbeat and timer of a worker waits while one callback holds the event loop (a batch
handled synchronously, a state copy, a fit). ``LoopWatch`` schedules a tick on the loop every
``every_s``; a watcher thread checks how old the last tick is. When the loop has been held longer than
``stall_ms``, the thread samples the loop thread's stack (``sys._current_frames``) and keeps the
innermost Loopline frame, so ``/views`` says, e.g., ``stream/vm.py:181 _save`` held the loop 640 ms.
Counters: ``stalls`` (holds longer than ``stall_ms``), ``max_ms`` and ``top`` (the ``keep`` places that
held it longest, with their longest hold).

>>> import asyncio, time
>>> async def main():
...     watch = LoopWatch(stall_ms=50, every_s=0.01).start()
...     await asyncio.sleep(0.05)
...     time.sleep(0.2)  # holds the loop
...     await asyncio.sleep(0.05)
...     watch.stop()
...     return watch.report()
>>> r = asyncio.run(main()); r["stalls"] >= 1 and r["max_ms"] >= 150
True
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

__all__ = ["LoopWatch"]

def _roots() -> tuple[str, ...]:
    """The folders of Loopline's own packages (wherever they are installed)."""
    import importlib
    out = []
    for name in ("state", "model", "kernels", "stream", "ops"):
        try:
            out.append(os.path.dirname(importlib.import_module(f"loopline.{name}").__file__) + os.sep)
        except ImportError:  # a package that fails to import is in no stack either
            continue
    return tuple(out)


def _place(frame, roots: tuple[str, ...]) -> str:
    """The innermost frame of Loopline's own code on a stack (else the innermost one): ``dir/file:line fn``."""
    inner = None
    f = frame
    while f is not None:
        name = f.f_code.co_filename
        here = f"{os.path.basename(os.path.dirname(name))}/{os.path.basename(name)}:{f.f_lineno} {f.f_code.co_name}"
        if inner is None:
            inner = here
        if name.startswith(roots) and not name.endswith("loop_watch.py"):
            return here
        f = f.f_back
    return inner or "?"


class LoopWatch:
    def __init__(self, stall_ms: float = 100.0, every_s: float = 0.02, keep: int = 8):
        self.stall_s = stall_ms / 1000.0
        self.every_s = every_s
        self.keep = keep
        self._last = time.monotonic()
        self._loop_thread: int | None = None
        self._stop = threading.Event()
        self._held: dict[str, float] = {}  # place -> its longest hold (s)
        self.counts = {"stalls": 0, "max_ms": 0.0}
        self._roots = _roots()

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> "LoopWatch":
        loop = loop or asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

        def tick():
            self._last = time.monotonic()
            if not self._stop.is_set():
                loop.call_later(self.every_s, tick)
        loop.call_soon(tick)
        threading.Thread(target=self._watch, name="loopline-loop-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        stalled_at, place = None, None
        while not self._stop.wait(self.every_s):
            lag = time.monotonic() - self._last
            if lag > self.stall_s:
                if stalled_at is None:  # one sample per hold: where it is held once it is too long
                    stalled_at = self._last
                    frame = sys._current_frames().get(self._loop_thread)
                    place = _place(frame, self._roots) if frame is not None else "?"
                    self.counts["stalls"] += 1
                self._held[place] = max(self._held.get(place, 0.0), lag)
                self.counts["max_ms"] = max(self.counts["max_ms"], round(lag * 1000, 1))
            elif stalled_at is not None and self._last > stalled_at:
                stalled_at = None
            if len(self._held) > 4 * self.keep:  # bounded: keep the longest holds
                self._held = dict(sorted(self._held.items(), key=lambda kv: -kv[1])[: self.keep])

    def report(self) -> dict:
        top = sorted(self._held.items(), key=lambda kv: -kv[1])[: self.keep]
        return {**self.counts, "stall_ms": self.stall_s * 1000,
                "top": [{"where": p, "max_ms": round(s * 1000, 1)} for p, s in top]}
