"""Delayed-feedback correction: importance weights for a stream whose positives come before their negatives.

Public surface: ``DelayConfig``, ``DelayWeights``.

Attribution labels an impression positive as soon as its conversion arrives (minutes, for a click) and
negative only when its window closes (``window_s`` later, a day by default). In label-time order, what a
trainer meets at time ``T`` is therefore the positives of the impressions of about ``T`` and the negatives
of the impressions of ``T - window``: two cohorts. With steady traffic the mix is the true one, but:

* in the stream's first window there are positives and no negatives at all (their cohort is before the
  stream began): a model trained on them learns that every impression converts;
* when traffic grows or falls, the positives come from a cohort of another size than the negatives.

The correction (the cohort form of importance weighting for delayed feedback, as in Ktena et al. 2019,
"Addressing delayed feedback for continuous training with neural networks in CTR prediction", and Yang et
al. 2021, ES-DFM, which weight each observed label by the ratio of the true to the observed label
distribution): a positive with impression time ``s`` and label time ``T`` is weighted by
``N(T - window) / N(s)``, ``N(t)`` the impressions in the ``rate_s`` before ``t``. The positives of each
time then stand for the cohort whose negatives arrive with them, so the weighted stream at every time
has the label mix of one complete cohort: the conversion rate within the window. Negatives weigh 1. A
positive whose paired cohort is before the stream's start weighs 0 (it is still evaluated, and its click
still goes to the history). Weights are capped at ``max_weight`` (the variance of a weight on a thin
cohort). Metrics are never weighted: the evaluation is of true labels.

**Per campaign** (``by``). The stream's total can be steady while its parts are not: a campaign that
starts brings positives for a whole window before its first negatives, and one whose traffic is cut
brings today's few positives against yesterday's many negatives. So each positive's ratio also uses its
campaign's own two cohorts (hashed into ``key_slots`` counters), shrunk towards the stream's ratio by
``key_prior`` impressions (``weights``). On the synthetic stream, whose shift starts a third of the
campaigns, the FM over-predicted the new campaigns by 201 conversions the day after the shift; with the
per-campaign ratio by 32 (docs/delayed_feedback.md).

The impressions are counted per ``rate_s / 16`` bucket of event time; a bucket is dropped once no later
example can need it (examples come in label-time order), and at most 4 windows' worth are kept
(``dropped`` counts what that bound drops): memory is ``O(16 (window_s / rate_s + 2))`` counters whatever
the traffic, and as many arrays of ``key_slots`` counters for the per-campaign counts (16 KB each at the
default), however many campaigns there are.

>>> dw = DelayWeights(DelayConfig(window_s=100.0, rate_s=10.0))
>>> dw.observe([float(t) for t in range(0, 200)])  # one impression a second
>>> dw.weights([{"ts": 150.0, "label_ts": 151.0, "label": 1}, {"ts": 50.0, "label_ts": 150.0, "label": 0},
...             {"ts": 30.0, "label_ts": 31.0, "label": 1}]).tolist()
[1.0, 1.0, 0.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from loopline.errors import ConfigError

from .features import hash_id

__all__ = ["DelayConfig", "DelayWeights"]

_SLOTS = 16  # buckets per rate window


@dataclass(frozen=True)
class DelayConfig:
    enabled: bool = True
    window_s: float = 86400.0  # the attribution window: a negative is labelled this long after its impression
    rate_s: float = 3600.0  # impressions are counted over this much event time
    max_weight: float = 4.0  # a positive never weighs more than this
    # the cohorts are counted per campaign too ("campaign", "ad", or "" for the whole stream only): a
    # campaign that starts has positives for a window before its first negatives, however steady the
    # stream's total is (the synthetic stream's shift: its new campaigns over-predicted by 200
    # conversions the next day)
    by: str = "campaign"
    key_slots: int = 4096  # hashed per-key counters per time bucket (keys beyond it share counters)
    key_prior: float = 2.0  # impressions of the stream's own ratio a key's counts are shrunk towards

    def __post_init__(self):
        if self.by not in ("campaign", "ad", ""):
            raise ConfigError(f"by: must be campaign, ad or empty, got {self.by!r}")
        if isinstance(self.key_slots, bool) or not isinstance(self.key_slots, int) or self.key_slots < 1:
            raise ConfigError(f"key_slots: must be an integer >= 1, got {self.key_slots!r}")
        for name in ("window_s", "rate_s", "max_weight", "key_prior"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
                raise ConfigError(f"{name}: must be a positive number, got {v!r}")


class DelayWeights:
    """Counts impressions by event time (``observe``) and weights labelled examples (``weights``)."""

    def __init__(self, cfg: DelayConfig = DelayConfig()):
        self.cfg = cfg
        self._width = cfg.rate_s / _SLOTS
        self._keep = int(math.ceil((cfg.window_s + 2 * cfg.rate_s) / self._width)) + 1  # buckets one window needs
        self._counts: dict[int, int] = {}  # bucket -> impressions
        # bucket -> impressions per key slot (int32, made when the bucket first sees a key): 16 KB a bucket
        # at the default 4096 slots, so at most 4 windows' worth of buckets whatever the number of keys
        self._keyed: dict[int, np.ndarray] = {}
        self._first: int | None = None  # the first bucket seen: before it, nothing happened
        self.dropped = 0  # buckets dropped by the bound (4 x what one window needs), not by time

    def _slot(self, key) -> int:
        return hash_id("delay", str(key), self.cfg.key_slots)

    def observe(self, impression_ts, keys=None) -> None:
        """Impression times (any order; each impression once) and, with ``cfg.by``, each one's key (its
        campaign or ad, in the same order)."""
        times = list(impression_ts)
        keys = list(keys) if keys is not None and self.cfg.by else [None] * len(times)
        for t, key in zip(times, keys):
            if not math.isfinite(t):
                continue
            b = int(t // self._width)
            self._counts[b] = self._counts.get(b, 0) + 1
            if key is not None:
                per = self._keyed.get(b)
                if per is None:
                    per = self._keyed[b] = np.zeros(self.cfg.key_slots, np.int32)
                per[self._slot(key)] += 1
            if self._first is None or b < self._first:
                self._first = b
        if len(self._counts) > 4 * self._keep:  # times far apart (a sparse or skewed stream): oldest first
            for b in sorted(self._counts)[:len(self._counts) - 4 * self._keep]:
                del self._counts[b]
                self._keyed.pop(b, None)
                self.dropped += 1

    def _rate(self, t: float, slot: int | None = None) -> int:
        """Impressions (of one key slot, or all) in the ``rate_s`` up to ``t``; -1 for a time before the
        stream began (or not a time)."""
        if not math.isfinite(t):
            return -1
        b = int(t // self._width)
        if self._first is None or b < self._first:
            return -1
        if slot is None:
            return sum(self._counts.get(k, 0) for k in range(b - _SLOTS + 1, b + 1))
        return sum(int(per[slot]) for k in range(b - _SLOTS + 1, b + 1) if (per := self._keyed.get(k)) is not None)

    def weights(self, examples: list[dict]) -> np.ndarray:
        """One weight per example (``ts``, ``label_ts``, ``label``, and the key ``cfg.by`` names): 1 for a
        negative, the cohort ratio for a positive; all 1 when the correction is off.

        Per key, the ratio is ``(n_paired + a G) / (n_own + a)``: the key's own impression counts in the
        two cohorts (``n_own`` without the positive's own impression), shrunk towards the stream's ratio
        ``G`` by ``a = key_prior`` impressions: a key with few impressions weighs about as the stream does,
        and one that started within the last window weighs ``a G / (n_own + a)``, less the more it has
        shown since."""
        out = np.ones(len(examples), dtype=np.float32)
        if not self.cfg.enabled:
            return out
        cap, a = self.cfg.max_weight, self.cfg.key_prior
        for i, e in enumerate(examples):
            if not e["label"]:
                continue
            paired_t = e["label_ts"] - self.cfg.window_s
            paired = self._rate(paired_t)
            if paired <= 0:
                out[i] = 0.0
                continue
            ratio = paired / max(1, self._rate(e["ts"]))
            key = e.get(self.cfg.by) if self.cfg.by else None
            if key is not None:
                slot = self._slot(key)
                # the key's own count less this positive's impression: a positive's own cohort always
                # holds it, which would bias a thin key's ratio down by 1 / (its count + 1)
                own = max(0, self._rate(e["ts"], slot) - 1)
                ratio = (max(0, self._rate(paired_t, slot)) + a * ratio) / (own + a)
            out[i] = min(cap, ratio)
        newest = max((e["label_ts"] for e in examples if math.isfinite(e["label_ts"])), default=None)
        if newest is not None:  # later examples come later in label time: what they can need starts here
            floor = int((newest - self.cfg.window_s) // self._width) - _SLOTS
            for b in [b for b in self._counts if b < floor]:
                del self._counts[b]
                self._keyed.pop(b, None)
        return out

    def counts(self) -> dict:
        return {"buckets": len(self._counts), "dropped": self.dropped, "enabled": self.cfg.enabled}

    def state_dict(self) -> dict:
        return {"counts": {int(b): int(n) for b, n in self._counts.items()}, "first": self._first,
                "dropped": self.dropped,
                "keyed": {int(b): {int(k): int(per[k]) for k in np.flatnonzero(per)} for b, per in self._keyed.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._counts = {int(b): int(n) for b, n in state["counts"].items()}
        self._first = None if state["first"] is None else int(state["first"])
        self.dropped = int(state["dropped"])
        # a snapshot from before the per-key counts: they start empty and fill within a rate window
        self._keyed = {}
        for b, per in state.get("keyed", {}).items():
            arr = self._keyed[int(b)] = np.zeros(self.cfg.key_slots, np.int32)
            for k, n in per.items():
                arr[int(k) % self.cfg.key_slots] += int(n)
