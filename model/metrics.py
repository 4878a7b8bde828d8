"""Progressive-validation metrics for a binary CTR/CVR model: AUC, log loss, NE and calibration, in
bounded memory.

Public surface: ``MetricsConfig``, ``BinaryMetrics``, ``auc``, ``log_loss``.

Every model predicts an example before it trains on it (design.md); those predictions feed these
metrics. NE (normalized entropy, ExFM) is the log loss divided by the entropy of the average label rate
seen so far, so a model that only knows the base rate scores 1.0 and lower is better. Calibration is the
sum of predictions over the sum of labels (1.0 is calibrated).

**Inputs.** Scores ``p`` are probabilities: finite, in ``[0, 1]`` (the exact ``auc()`` alone takes any
finite scores, since only their order counts). Labels ``y`` are in ``[0, 1]``: hard 0/1 labels, or soft
labels (a probability that the example is positive) used as floats everywhere: the log loss is the
cross-entropy ``-(y log p + (1 - y) log(1 - p))``, the label rate and calibration use
the sum of ``y``, and the AUC counts an example as ``y`` of a positive and ``1 - y`` of a negative (the
same as scikit-learn's ``roc_auc_score`` on each example twice, labelled 1 with weight ``y`` and 0 with
weight ``1 - y``). Anything else (NaN, infinities, scores outside ``[0, 1]``, labels in ``{-1, 1}``,
strings, lengths that differ) raises :class:`~loopline.errors.InvalidMetricInput`, whose one-line
message starts with the argument's name; no figure is ever computed from it. Predictions are clipped to
``[EPS, 1 - EPS]`` before the log (so a score of exactly 0 or 1 costs at most ``-log(EPS)`` ~ 16.1).

**Bounded: a binned AUC.** ``BinaryMetrics`` keeps no per-example arrays: a histogram of positive and
negative label weight over ``MetricsConfig.bins`` score bins, and four running sums (n, predictions,
labels, log loss). Memory is ``O(bins)`` (16 bytes a bin, 256 KiB at the default), whatever the traffic.
The bins are uniform in ``logit(p)`` over ``[logit(EPS), logit(1 - EPS)]`` (width ``w = 32.24 / bins``,
about 0.002 at the default), so CTR-scale scores near 0 (and scores near 1) are resolved as finely, in
relative terms, as scores near 0.5: a bin near ``p = 1e-3`` is ``2e-6`` wide, near 0.5 it is ``5e-4``.

*Error bound.* The binned AUC orders every positive-negative pair in different bins exactly as the exact
AUC does, and counts a pair that shares a bin as a tie (1/2). So, with ``pos_b``, ``neg_b`` the label
weight in bin ``b`` and ``P``, ``N`` their totals::

    |AUC_binned - AUC_exact| <= 1/2 * sum_b (pos_b / P) * (neg_b / N)  <=  1/2 * max_b neg_b / N

``BinaryMetrics.auc_error()`` returns the middle term, computed from the histogram (a bound that holds
for every input, not an assumption about it); ``auc_bounds()`` the interval it gives. For scores whose
logit has a density ``g`` (per unit logit, at most ``g_max``), it is about ``w/2 * integral(g_pos * g_neg)
<= w/2 * g_max``: under ``1e-3`` whenever the logit density stays under 1 (a normal logit with a
standard deviation of 0.4 or more), about ``1.3e-4`` for uniform scores, ``2.2e-4`` for
``sigmoid(N(-4, 1))``; the actual error is usually far smaller (within-bin pairs mostly cancel). A model
that puts every score in one bin gets an error bound of 1/2, and the bound says so. ``auc(p, y)`` is
the exact AUC over arrays, for evaluations and tests.

The running sums are fixed point (each term rounded once to a multiple of ``2**-48``, summed in a Python
int), so they do not depend on the order: a metric fed in any chunking, or merged from windows, has the
same sums to the last bit (and the same histogram: integer counts for hard labels; soft label weights
agree up to float rounding). ``merge()`` adds one
``BinaryMetrics`` into another (windows: one per window, merged for a wider view), and
``state_dict()``/``load_state_dict()`` round-trip through ``torch.load(weights_only=True)``.

>>> m = BinaryMetrics()
>>> m.update([0.9, 0.2, 0.7, 0.1], [1, 0, 1, 0])
>>> r = m.report()
>>> r["auc"], r["n"], round(r["calibration"], 3)
(1.0, 4, 0.95)
>>> m.auc_error()
0.0
>>> m.update([0.5], [float("nan")])
Traceback (most recent call last):
...
loopline.errors.InvalidMetricInput: y: 1 of 1 labels are not finite (first at index 0: nan)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from loopline.errors import ConfigError, InvalidMetricInput

__all__ = ["MetricsConfig", "BinaryMetrics", "auc", "log_loss"]

EPS = 1e-7  # predictions are clipped to [EPS, 1 - EPS] before the log (and the AUC grid spans that range)
_LOGIT_LO = math.log(EPS) - math.log1p(-EPS)  # logit(EPS) ~ -16.12; the grid spans [_LOGIT_LO, -_LOGIT_LO]
_SCALE = 2.0 ** 48  # fixed-point unit of the running sums: every term is <= -log(EPS) < 2**4.01
_CHUNK = 1024  # int64 partial sums of at most 1024 terms < 2**62.1: no overflow
_MAX_BINS = 1 << 22  # 64 MiB of histogram: past this a "bound" is no longer one


@dataclass(frozen=True)
class MetricsConfig:
    bins: int = 16384  # score bins of the AUC histogram (uniform in logit): memory 16 bytes a bin;
    # the AUC's error bound shrinks in proportion (about 1e-4 on uniform scores at this default)

    def __post_init__(self):
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or not 2 <= self.bins <= _MAX_BINS:
            raise ConfigError(f"bins: must be an integer in [2, {_MAX_BINS}], got {self.bins!r}")


@functools.lru_cache(maxsize=8)
def _edges(bins: int) -> np.ndarray:
    """The ``bins - 1`` inner bin edges in score space, strictly increasing (read-only, shared)."""
    logits = _LOGIT_LO + (-2 * _LOGIT_LO) * np.arange(1, bins, dtype=np.float64) / bins
    edges = 1.0 / (1.0 + np.exp(-logits))
    assert bins < 2 or np.all(np.diff(edges) > 0), f"bin edges not increasing for bins={bins}"
    edges.setflags(write=False)
    return edges


def _vector(x, name: str, what: str, unit: bool = True) -> np.ndarray:
    """``x`` as a 1-D float64 array of finite values (in [0, 1] if ``unit``), or :class:`InvalidMetricInput`."""
    try:
        a = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - ragged lists, tensors with grad, ...: one typed error
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidMetricInput(f"{name}: cannot be read as an array of numbers ({detail})") from None
    if a.dtype.kind not in "biuf":
        raise InvalidMetricInput(f"{name}: expected numbers, got an array of dtype {a.dtype}")
    a = np.asarray(a, dtype=np.float64).ravel()
    bad = ~np.isfinite(a)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidMetricInput(f"{name}: {int(bad.sum())} of {a.size} {what} are not finite "
                                 f"(first at index {i}: {float(a[i])!r})")
    out = (a < 0) | (a > 1) if unit else bad
    if out.any():
        i = int(np.flatnonzero(out)[0])
        kind = "probabilities" if what == "scores" else "0/1 or soft labels"
        raise InvalidMetricInput(f"{name}: {what} must lie in [0, 1] ({kind}); "
                                 f"{int(out.sum())} of {a.size} do not (first at index {i}: {float(a[i])!r})")
    return a


def _validate(p, y, probabilities: bool = True) -> tuple[np.ndarray, np.ndarray]:
    p, y = _vector(p, "p", "scores", unit=probabilities), _vector(y, "y", "labels")
    if p.size != y.size:
        raise InvalidMetricInput(f"y: {y.size} labels for {p.size} scores (p); they must pair up")
    return p, y


def _auc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from label weight per score group in increasing score order: a pair in different groups
    counts 1 or 0 by order, a pair within one group 1/2. NaN when either class has no weight."""
    P, N = float(pos.sum()), float(neg.sum())
    if not (P > 0 and N > 0):
        return float("nan")
    fp, fn = pos / P, neg / N  # normalised first: soft label totals may be tiny
    below = np.cumsum(fn) - fn  # negative weight strictly below each group
    return float(min(1.0, max(0.0, (fp * (below + 0.5 * fn)).sum())))  # not np.dot: BLAS threads cost ms


def _cross_entropy(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def _fixed_sum(v: np.ndarray) -> int:
    """Exact sum of ``v`` (each ``|v| < 2**4.01``) in units of ``2**-48``: the same whatever the order."""
    q = np.rint(v * _SCALE).astype(np.int64)  # < 2**53: exact in float64 and int64
    pad = (-q.size) % _CHUNK
    if pad:
        q = np.concatenate((q, np.zeros(pad, dtype=np.int64)))
    return sum(q.reshape(-1, _CHUNK).sum(axis=1).tolist())


def auc(p, y) -> float:
    """Exact area under the ROC curve (Mann-Whitney; tied scores count 1/2), with soft labels weighted
    as in the module docstring. NaN when only one class has weight (scikit-learn raises there). Only the
    scores' order matters, so any finite scores are accepted (logits too, as scikit-learn's
    ``roc_auc_score`` accepts decision values); labels are checked as everywhere.

    >>> auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> auc([-2.0, 3.0], [0, 1])
    1.0
    """
    p, y = _validate(p, y, probabilities=False)
    if p.size == 0:
        return float("nan")
    groups, inverse = np.unique(p, return_inverse=True)
    pos = np.bincount(inverse, weights=y, minlength=groups.size)
    neg = np.bincount(inverse, weights=1 - y, minlength=groups.size)
    return _auc_from_counts(pos, neg)


def log_loss(p, y) -> float:
    """Mean cross-entropy, predictions clipped to ``[EPS, 1 - EPS]``; soft labels as floats. NaN when
    empty.

    >>> round(log_loss([0.9, 0.2], [1, 0]), 6)
    0.164252
    """
    p, y = _validate(p, y)
    return float(_cross_entropy(p, y).mean()) if p.size else float("nan")


class BinaryMetrics:
    """Streaming AUC (binned), log loss, NE, calibration and n over (prediction, label) pairs, in memory
    ``O(cfg.bins)``. ``report()`` gives ``{"auc", "logloss", "ne", "calibration", "n"}``.

    >>> a, b = BinaryMetrics(), BinaryMetrics()
    >>> a.update([0.8, 0.3], [1, 0]); b.update([0.6, 0.7], [1, 0])
    >>> a.merge(b).report()["auc"], a.report()["n"]
    (0.75, 4)
    """

    def __init__(self, cfg: MetricsConfig = MetricsConfig()):
        self.cfg = cfg
        self._pos = np.zeros(cfg.bins, dtype=np.float64)  # label weight per score bin
        self._neg = np.zeros(cfg.bins, dtype=np.float64)  # (1 - label) weight per score bin
        self.n = 0
        self._sum_p = 0  # fixed point (units of 2**-48): sums of predictions, labels, log losses
        self._sum_y = 0
        self._sum_loss = 0

    def update(self, p, y) -> None:
        """Add predictions ``p`` with their labels ``y`` (validated first: nothing is added on error)."""
        p, y = _validate(p, y)
        if p.size == 0:
            return
        idx = np.searchsorted(_edges(self.cfg.bins), p, side="right")
        self._pos += np.bincount(idx, weights=y, minlength=self.cfg.bins)
        self._neg += np.bincount(idx, weights=1 - y, minlength=self.cfg.bins)
        self.n += int(p.size)
        self._sum_p += _fixed_sum(p)
        self._sum_y += _fixed_sum(y)
        self._sum_loss += _fixed_sum(_cross_entropy(p, y))

    def merge(self, other: "BinaryMetrics") -> "BinaryMetrics":
        """Add ``other``'s examples into this one (both on the same grid); returns ``self``."""
        if other.cfg.bins != self.cfg.bins:
            raise ConfigError(f"bins: cannot merge metrics over {other.cfg.bins} bins into {self.cfg.bins}")
        self._pos += other._pos
        self._neg += other._neg
        self.n += other.n
        self._sum_p += other._sum_p
        self._sum_y += other._sum_y
        self._sum_loss += other._sum_loss
        return self

    def auc(self) -> float:
        """The binned AUC (NaN when a class has no weight yet)."""
        return _auc_from_counts(self._pos, self._neg)

    def auc_error(self) -> float | None:
        """The bound on ``|binned AUC - exact AUC|`` for the examples seen (module docstring); None when
        the AUC is undefined."""
        P, N = float(self._pos.sum()), float(self._neg.sum())
        if not (P > 0 and N > 0):
            return None
        return float(0.5 * ((self._pos / P) * (self._neg / N)).sum())

    def auc_bounds(self) -> tuple[float, float] | None:
        """``(lower, upper)``: the exact AUC of the examples seen lies in it; None when undefined."""
        a, e = self.auc(), self.auc_error()
        return None if e is None else (max(0.0, a - e), min(1.0, a + e))

    def report(self) -> dict:
        n = self.n
        if n == 0:
            return {"auc": None, "logloss": None, "ne": None, "calibration": None, "n": 0}
        ll = self._sum_loss / n / _SCALE  # int / int is correctly rounded; the scale is a power of 2
        rate = self._sum_y / n / _SCALE
        entropy = -(rate * math.log(max(rate, EPS)) + (1 - rate) * math.log(max(1 - rate, EPS)))
        a = self.auc()
        return {"auc": None if math.isnan(a) else round(a, 6), "logloss": round(ll, 6),
                "ne": round(ll / entropy, 6) if entropy > 0 else None,
                "calibration": round(self._sum_p / self._sum_y, 6) if self._sum_y > 0 else None, "n": n}

    # -- snapshots: tensors and plain containers only (they load with torch.load(weights_only=True)) ------
    def state_dict(self) -> dict:
        """The histogram's non-empty bins and the exact sums; a few KiB for a CTR model, at most
        ``O(bins)``."""
        nz = np.flatnonzero((self._pos != 0) | (self._neg != 0))
        return {"format": "binned-v1", "bins": self.cfg.bins, "n": self.n, "sum_p": self._sum_p,
                "sum_y": self._sum_y, "sum_loss": self._sum_loss, "index": torch.from_numpy(nz.astype(np.int64)),
                "pos": torch.from_numpy(self._pos[nz].copy()), "neg": torch.from_numpy(self._neg[nz].copy())}

    def load_state_dict(self, state) -> None:
        """Restore from ``state_dict()`` (its grid replaces this one's: bins cannot be re-cut), or from
        the older ``[predictions, labels]`` tensor pair of earlier snapshots."""
        if isinstance(state, (list, tuple)) and len(state) == 2:  # the pre-binned form: replay it
            fresh = BinaryMetrics(self.cfg)
            fresh.update(_numpy(state[0], "state"), _numpy(state[1], "state"))
            self.__dict__.update(fresh.__dict__)
            return
        if not isinstance(state, dict) or state.get("format") != "binned-v1":
            raise InvalidMetricInput("state: not a BinaryMetrics state_dict (format binned-v1)")
        try:
            cfg = MetricsConfig(bins=state["bins"])
        except ConfigError as exc:
            raise InvalidMetricInput(f"state: {exc}") from None
        idx = _numpy(state["index"], "state.index").astype(np.int64)
        pos, neg = _numpy(state["pos"], "state.pos"), _numpy(state["neg"], "state.neg")
        ints = [state[k] for k in ("n", "sum_p", "sum_y", "sum_loss")]
        if not (idx.shape == pos.shape == neg.shape and idx.ndim == 1 and np.all((idx >= 0) & (idx < cfg.bins))
                and np.all(np.isfinite(pos) & (pos >= 0)) and np.all(np.isfinite(neg) & (neg >= 0))
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints)):
            raise InvalidMetricInput("state: a BinaryMetrics state_dict with out-of-range bins, weights or sums")
        fresh = BinaryMetrics(cfg)
        np.add.at(fresh._pos, idx, pos)
        np.add.at(fresh._neg, idx, neg)
        fresh.n, fresh._sum_p, fresh._sum_y, fresh._sum_loss = ints
        self.__dict__.update(fresh.__dict__)


def _numpy(t, name: str) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy().astype(np.float64, copy=False)
    raise InvalidMetricInput(f"{name}: expected a tensor, got {type(t).__name__}")
