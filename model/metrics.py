"""Progressive-validation metrics for a binary CTR/CVR model: AUC, log loss, NE and calibration.

Public surface: ``BinaryMetrics``, ``auc``, ``log_loss``.

Every model predicts an example before it trains on it (design.md); those predictions feed these
metrics. NE (normalized entropy, ExFM) is the log loss divided by the entropy of the average label rate
seen so far, so a model that only knows the base rate scores 1.0 and lower is better. Calibration is the
sum of predictions over the sum of labels (1.0 is calibrated). AUC is exact (rank-based, ties averaged)
over the predictions kept; the arrays are small enough for an evaluation pass (8 bytes per example).

>>> m = BinaryMetrics()
>>> m.update([0.9, 0.2, 0.7, 0.1], [1, 0, 1, 0])
>>> r = m.report()
>>> r["auc"], r["n"], round(r["calibration"], 3)
(1.0, 4, 0.95)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["BinaryMetrics", "auc", "log_loss"]

EPS = 1e-7  # predictions are clipped to [EPS, 1 - EPS] before the log


def auc(p: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic (ties get their average rank).
    NaN when only one class is present."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    # average ranks over runs of equal predictions
    boundaries = np.flatnonzero(np.diff(sorted_p)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(p)]))
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each run
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(y, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


class BinaryMetrics:
    """Accumulates (prediction, label) pairs; ``report()`` gives auc, logloss, ne, calibration, n."""

    def __init__(self):
        self._p: list[np.ndarray] = []
        self._y: list[np.ndarray] = []

    def update(self, p, y) -> None:
        self._p.append(np.asarray(p, dtype=np.float64).ravel())
        self._y.append(np.asarray(y, dtype=np.int64).ravel())

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._p:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        return np.concatenate(self._p), np.concatenate(self._y)

    def report(self) -> dict:
        p, y = self.arrays()
        n = len(y)
        if n == 0:
            return {"auc": None, "logloss": None, "ne": None, "calibration": None, "n": 0}
        ll = log_loss(p, y)
        rate = float(y.mean())
        entropy = -(rate * math.log(max(rate, EPS)) + (1 - rate) * math.log(max(1 - rate, EPS)))
        a = auc(p, y)
        return {"auc": None if math.isnan(a) else round(a, 6), "logloss": round(ll, 6),
                "ne": round(ll / entropy, 6) if entropy > 0 else None,
                "calibration": round(float(p.sum() / y.sum()), 6) if y.sum() > 0 else None, "n": n}
