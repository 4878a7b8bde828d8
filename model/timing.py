"""Where a stage's time goes: seconds per named part, accumulated with ``time.perf_counter``.

Public surface: ``Timings``.

Always on and cheap: a stage calls ``clock()`` once per micro-batch and ``lap(part)`` after each part
(two ``perf_counter`` calls and a dict update, well under a microsecond against milliseconds of work per
batch). ``loopline bench stage`` reads the totals to say where the time goes beside training itself;
nothing else depends on them, and they never touch the numbers a stage computes.

>>> t = Timings()
>>> c = t.clock()
>>> c.lap("featurize"); c.lap("train")
>>> sorted(t.seconds), t.calls["train"]
(['featurize', 'train'], 1)
>>> t.merge(t).calls["train"], t.reset().seconds
(2, {})
"""

from __future__ import annotations

import time

__all__ = ["Timings"]


class _Clock:
    __slots__ = ("_t", "_last")

    def __init__(self, timings: "Timings"):
        self._t = timings
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        """Charge the time since the last lap (or the clock's start) to ``part``."""
        now = time.perf_counter()
        self._t.add(part, now - self._last)
        self._last = now


class Timings:
    """Seconds and calls per part; parts are plain strings chosen by the stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds
        self.calls[part] = self.calls.get(part, 0) + 1

    def clock(self) -> _Clock:
        return _Clock(self)

    def merge(self, other: "Timings") -> "Timings":
        """A new ``Timings`` with both totals."""
        out = Timings()
        for src in (self, other):
            for k, v in src.seconds.items():
                out.seconds[k] = out.seconds.get(k, 0.0) + v
                out.calls[k] = out.calls.get(k, 0) + src.calls[k]
        return out

    def reset(self) -> "Timings":
        self.seconds.clear()
        self.calls.clear()
        return self
