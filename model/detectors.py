"""Change detectors on a stream of numbers (a model's per-example loss): ADWIN and Page-Hinkley.

Public surface: ``ADWINConfig``, ``ADWIN``, ``PageHinkleyConfig``, ``PageHinkley``, ``make_detector``.

Both take one value at a time (``update(x) -> bool``, True on an alarm) and keep O(log n) (ADWIN) or
O(1) (Page-Hinkley) state, so a monitor can run one per model for as long as the stream lasts.

**ADWIN** (Bifet & Gavaldà, "Learning from time-changing data with adaptive windowing", 2007) keeps a
window of recent values in an exponential histogram: level ``k`` holds up to ``max_buckets`` buckets
of ``2**k`` values, each stored as (count, mean, M2), so the window costs O(max_buckets * log n).
Every ``clock`` values it tries each bucket boundary as a cut into an older part W0 (n0 values) and a
newer part W1 (n1 values) and declares a change when

    |mean(W1) - mean(W0)| > sqrt(2 / m * var(W) * ln(2 / d)) + 2 / (3 m) * ln(2 / d),
    m = 1 / (1 / n0 + 1 / n1),  d = delta / ln(n),

the variance-aware form of the Hoeffding/Bernstein cut; it then drops the oldest buckets until no
cut fires. The window therefore shrinks on any change; ``direction="up"`` (the default) raises an
alarm only when the newer part's mean is the larger one (the loss got worse), so the falling loss of
a model that is still learning moves the window without alarming anyone.

**Page-Hinkley** (Page 1954; Hinkley 1971) accumulates ``m_t = sum(x_i - mean_i - delta)`` and alarms
when ``m_t - min(m_t) > threshold``: a sustained rise of the mean by more than ``delta``. ``mean_i`` is
an exponentially fading mean with a memory of ``memory`` values, not the mean since the start: a
model's loss falls a long way while it learns, and a mean over all of it would sit far above the
settled loss and hide a later rise. After an alarm it starts over.

Per-example log loss is heavy-tailed (a missed click costs about 3 nats, a correct negative a few
hundredths), so the Page-Hinkley threshold is in nats summed over examples; ``loopline bench drift``
measures detection delay and false alarms of both on generated streams with a known shift.

>>> import random
>>> rng = random.Random(0)
>>> stream = [rng.gauss(0.2, 0.05) for _ in range(2000)] + [rng.gauss(0.5, 0.05) for _ in range(2000)]
>>> for det in (ADWIN(), PageHinkley(PageHinkleyConfig(threshold=5.0))):
...     alarms = [i for i, x in enumerate(stream) if det.update(x)]
...     print(type(det).__name__, 2000 <= alarms[0] < 2200, all(a >= 2000 for a in alarms))
ADWIN True True
PageHinkley True True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loopline.errors import ConfigError

__all__ = ["ADWINConfig", "ADWIN", "PageHinkleyConfig", "PageHinkley", "make_detector"]


def _direction(d: str) -> str:
    if d not in ("up", "down", "both"):
        raise ConfigError(f"direction: must be up, down or both, got {d!r}")
    return d


@dataclass(frozen=True)
class ADWINConfig:
    delta: float = 0.002  # confidence of a cut; smaller: fewer false alarms, later detection
    clock: int = 32  # look for a cut every this many values (the check is O(log n))
    max_buckets: int = 5  # buckets per level of the exponential histogram
    min_window: int = 10  # neither part of a cut may hold fewer values than this
    direction: str = "up"  # which changes raise an alarm: up (the loss rose), down, both

    def __post_init__(self):
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta: must be in (0, 1), got {self.delta!r}")
        for name in ("clock", "max_buckets", "min_window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {getattr(self, name)!r}")
        _direction(self.direction)


class ADWIN:
    """Adaptive windowing: a window that shrinks when its older and newer parts differ in mean."""

    def __init__(self, cfg: ADWINConfig = ADWINConfig()):
        self.cfg = cfg
        self.levels: list[list[list[float]]] = []  # level k: buckets [count, mean, M2], oldest first
        self.width = 0  # values in the window
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.seen = 0
        self.last_change: dict | None = None  # the cut that fired last: n0, n1, mean0, mean1

    @property
    def variance(self) -> float:
        return self.m2 / self.width if self.width else 0.0

    def update(self, x: float) -> bool:
        x = float(x)
        self.seen += 1
        self._insert(x)
        if self.seen % self.cfg.clock or self.width < 2 * self.cfg.min_window:
            return False
        return self._shrink()

    # -- the exponential histogram ----------------------------------------------------------------
    def _insert(self, x: float) -> None:
        n = self.width
        delta = x - self.mean
        self.width += 1
        self.mean += delta / self.width
        self.m2 += delta * (x - self.mean)
        if not self.levels:
            self.levels.append([])
        self.levels[0].append([1.0, x, 0.0])
        k = 0
        while len(self.levels[k]) > self.cfg.max_buckets:  # merge the two oldest into the next level
            a, b = self.levels[k].pop(0), self.levels[k].pop(0)
            if k + 1 == len(self.levels):
                self.levels.append([])
            self.levels[k + 1].append(_merge(a, b))
            k += 1
        assert n + 1 == self.width, f"width {self.width} after inserting into {n}"

    def _drop_oldest(self) -> None:
        top = len(self.levels) - 1
        n_b, mean_b, m2_b = self.levels[top].pop(0)
        if not self.levels[top]:
            self.levels.pop()
        n = self.width
        rest = n - n_b
        if rest <= 0:
            self.width, self.mean, self.m2 = 0, 0.0, 0.0
            return
        mean_rest = (self.mean * n - mean_b * n_b) / rest
        self.m2 = max(0.0, self.m2 - m2_b - (mean_b - mean_rest) ** 2 * n_b * rest / n)
        self.width, self.mean = int(rest), mean_rest

    def _shrink(self) -> bool:
        alarm = False
        while True:
            cut = self._find_cut()
            if cut is None:
                return alarm
            self.last_change = cut
            rising = cut["mean1"] > cut["mean0"]
            d = self.cfg.direction
            alarm = alarm or d == "both" or (d == "up") == rising
            for _ in range(cut["drop"]):
                self._drop_oldest()

    def _find_cut(self) -> dict | None:
        n = self.width
        var = self.variance
        d = self.cfg.delta / math.log(n)
        log_term = math.log(2.0 / d)
        n0 = 0
        s0 = 0.0
        buckets = 0
        total = self.mean * n
        for level in reversed(self.levels):  # oldest data first
            for count, mean, _ in level:
                n0 += int(count)
                s0 += count * mean
                buckets += 1
                n1 = n - n0
                if n1 < self.cfg.min_window:
                    return None
                if n0 < self.cfg.min_window:
                    continue
                mean0, mean1 = s0 / n0, (total - s0) / n1
                m = 1.0 / (1.0 / n0 + 1.0 / n1)
                eps = math.sqrt(2.0 / m * var * log_term) + 2.0 / (3.0 * m) * log_term
                if abs(mean1 - mean0) > eps:
                    return {"n0": n0, "n1": n1, "mean0": mean0, "mean1": mean1, "drop": buckets}
        return None


def _merge(a: list, b: list) -> list:
    n = a[0] + b[0]
    mean = (a[0] * a[1] + b[0] * b[1]) / n
    return [n, mean, a[2] + b[2] + (a[1] - b[1]) ** 2 * a[0] * b[0] / n]


@dataclass(frozen=True)
class PageHinkleyConfig:
    delta: float = 0.005  # rises of the mean smaller than this are tolerated (units of x)
    threshold: float = 100.0  # alarm when the cumulative excess passes this (units of x, summed)
    memory: int = 20000  # values the fading mean remembers (about); 0: the plain mean since the start
    min_instances: int = 100  # no alarm before this many values (since the start or the last alarm)
    direction: str = "up"  # up: a rise of the mean; down: a fall; both

    def __post_init__(self):
        if not self.delta >= 0:
            raise ConfigError(f"delta: must be >= 0, got {self.delta!r}")
        if not self.threshold > 0:
            raise ConfigError(f"threshold: must be > 0, got {self.threshold!r}")
        if not isinstance(self.memory, int) or self.memory < 0:
            raise ConfigError(f"memory: must be an integer >= 0, got {self.memory!r}")
        if not isinstance(self.min_instances, int) or self.min_instances < 1:
            raise ConfigError(f"min_instances: must be an integer >= 1, got {self.min_instances!r}")
        _direction(self.direction)


class PageHinkley:
    """The Page-Hinkley test for a sustained change of the mean."""

    def __init__(self, cfg: PageHinkleyConfig = PageHinkleyConfig()):
        self.cfg = cfg
        self.seen = 0
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.up = self.up_min = 0.0  # cumulative excess over the mean, and its minimum
        self.down = self.down_max = 0.0

    def update(self, x: float) -> bool:
        x = float(x)
        self.seen += 1
        self.n += 1
        rate = 1.0 / self.n if not self.cfg.memory else max(1.0 / self.n, 1.0 / self.cfg.memory)
        self.mean += rate * (x - self.mean)
        self.up += x - self.mean - self.cfg.delta
        self.up_min = min(self.up_min, self.up)
        self.down += x - self.mean + self.cfg.delta
        self.down_max = max(self.down_max, self.down)
        if self.n < self.cfg.min_instances:
            return False
        d = self.cfg.direction
        fired = (d in ("up", "both") and self.up - self.up_min > self.cfg.threshold) or \
                (d in ("down", "both") and self.down_max - self.down > self.cfg.threshold)
        if fired:
            self._reset()
        return fired


def make_detector(kind: str, cfg=None):
    """``"adwin"`` or ``"page_hinkley"`` with its config (or the default)."""
    if kind == "adwin":
        return ADWIN(cfg or ADWINConfig())
    if kind == "page_hinkley":
        return PageHinkley(cfg or PageHinkleyConfig())
    raise ConfigError(f"detector: must be adwin or page_hinkley, got {kind!r}")
