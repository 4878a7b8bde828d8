"""Feature and label drift: a reference window against the current one, in event time.

Public surface: ``DriftConfig``, ``FeatureDrift``, ``feature_values``, ``psi``, ``js_divergence``,
``quantile_psi``.

Examples are bucketed into tumbling event-time windows by their ``ts`` (the impression's time):
window ``k`` covers ``[origin + k * window_s, origin + (k + 1) * window_s)``. The default is a UTC day,
which keeps the daily cycle (the ``hour`` feature, the traffic mix) out of the distance. Each window
is compared with its reference: the window before it (``reference="previous"``, the default: a
long-lived worker compares like with like and a shift shows as a spike) or the first window seen
(``"first"``: a shift shows as a step that stays).

Features of an example (``feature_values``): ``vertical``, ``campaign``, ``ad``, ``attrs.<name>``,
``features.<name>`` and ``soft_label`` (the DAS score on ``examples.augmented``). Names in
``numeric`` are numbers; the rest are categories. A feature's distribution is over the examples that
carry it.

* Categorical: PSI and Jensen-Shannon divergence of the value frequencies. At most
  ``max_categories`` distinct values are counted per feature and window; later new values share the
  bucket ``(other)``.
* Numeric: PSI on ``bins`` quantile bins of the reference window. Values go into a KLL sketch
  (datasketches; bounded memory, rank error about 1.7% at k=200), the reference's quantiles are the
  bin edges (equal edges merge, so a feature with few distinct values gets a bin per value), and the
  sketches' PMFs give the two distributions. KLL compacts at random, so a numeric PSI is within the
  sketch's error but not bit-identical between two runs over the same examples (categorical figures
  are exact).
* Labels: the positive rate of each window, its difference from the reference's and a pooled
  two-proportion z score.

Feature *names* come from the events (any ``attrs`` or ``features`` key), so a window holds at most
``max_features`` of them: when a new name would go past it, the window keeps the ``max_features // 2``
names with the most values counted so far (ties: categorical names first, each kind in the order first
seen) and drops the rest, counted in
``features_pruned`` (names) and ``values_pruned`` (their counted values). Names seen on most examples
keep their place however many one-off names arrive; a dropped name that comes back starts again from
zero in that window. Under the cap nothing changes.

PSI is ``sum((c - r) * ln(c / r))`` over bins, with proportions smoothed by half a count per bin so a
value seen on one side only (a campaign that starts or stops) gives a large, finite figure. By the
usual rule of thumb PSI < 0.1 is stable, 0.1-0.25 a moderate shift, > 0.25 a large one. Small windows
have a floor of their own: with no drift at all PSI is about ``(K - 1) * (1 / n_ref + 1 / n_cur)`` for
K bins, reported beside it as ``psi_null``. Jensen-Shannon is in bits (0 to 1), on unsmoothed
proportions.

>>> round(psi({"a": 50, "b": 50}, {"a": 50, "b": 50}), 6)
0.0
>>> psi({"a": 90, "b": 10}, {"a": 50, "b": 50}) > 0.25
True
>>> round(js_divergence({"a": 1}, {"b": 1}), 6)
1.0
>>> d = FeatureDrift(DriftConfig(window_s=10.0, min_count=1))
>>> d.update([{"ts": t, "campaign": "c1" if t < 10 else "c2", "label": t % 2} for t in range(20)])
>>> r = d.report()
>>> r["windows"][1]["features"]["campaign"]["psi"] > 1, r["windows"][1]["label"]["rate"]
(True, 0.5)
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from datasketches import kll_doubles_sketch

from loopline.errors import ConfigError

__all__ = ["DriftConfig", "FeatureDrift", "feature_values", "psi", "js_divergence", "quantile_psi"]

OTHER = "(other)"
SMOOTH = 0.5  # counts added to every bin before PSI's logarithm


@dataclass(frozen=True)
class DriftConfig:
    window_s: float = 86400.0  # tumbling event-time windows; a day keeps the daily cycle out
    origin: float = 0.0  # windows start at origin + k * window_s (UTC days by default)
    reference: str = "previous"  # previous: the window before each one; first: the first window seen
    numeric: tuple = ("features.slot", "soft_label")  # features compared as numbers (quantile bins)
    bins: int = 10  # quantile bins of a numeric feature
    max_categories: int = 1000  # distinct values counted per feature and window; the rest: (other)
    keep_windows: int = 90  # windows kept (older ones are dropped: a long-lived worker)
    min_count: int = 50  # a window with fewer examples gets no drift figures (too noisy)
    sketch_k: int = 200  # KLL accuracy parameter of the numeric sketches
    # feature names a window holds (each holds up to max_categories counts or a KLL sketch, ~10 kB);
    # reaching it prunes the window to its max_features // 2 most counted names (module docstring)
    max_features: int = 512

    def __post_init__(self):
        if not (isinstance(self.window_s, (int, float)) and math.isfinite(self.window_s) and self.window_s > 0):
            raise ConfigError(f"window_s: must be a positive number of seconds, got {self.window_s!r}")
        if self.reference not in ("previous", "first"):
            raise ConfigError(f"reference: must be previous or first, got {self.reference!r}")
        for name, lo in (("bins", 2), ("max_categories", 2), ("keep_windows", 2), ("min_count", 1),
                         ("sketch_k", 8), ("max_features", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name}: must be an integer >= {lo}, got {v!r}")
        object.__setattr__(self, "numeric", tuple(self.numeric))

    def window_of(self, ts: float) -> int:
        return int(math.floor((ts - self.origin) / self.window_s))

    def bounds(self, k: int) -> tuple[float, float]:
        start = self.origin + k * self.window_s
        return start, start + self.window_s


def feature_values(example: dict) -> dict:
    """The drift features of one example (see the module docstring)."""
    out = {}
    for name in ("vertical", "campaign", "ad"):
        if name in example:
            out[name] = example[name]
    for group in ("attrs", "features"):
        for k, v in (example.get(group) or {}).items():
            out[f"{group}.{k}"] = v
    if example.get("soft_label") is not None:
        out["soft_label"] = example["soft_label"]
    return out


def _proportions(ref: dict, cur: dict, smooth: float) -> tuple[np.ndarray, np.ndarray]:
    keys = sorted(set(ref) | set(cur), key=str)
    r = np.array([ref.get(k, 0) for k in keys], dtype=np.float64) + smooth
    c = np.array([cur.get(k, 0) for k in keys], dtype=np.float64) + smooth
    return r / r.sum(), c / c.sum()


def psi(ref: dict, cur: dict) -> float:
    """Population stability index of two count dicts (value -> count), half a count added per bin."""
    r, c = _proportions(ref, cur, SMOOTH)
    return float(((c - r) * np.log(c / r)).sum())


def js_divergence(ref: dict, cur: dict) -> float:
    """Jensen-Shannon divergence in bits (0 identical, 1 disjoint) of two count dicts."""
    r, c = _proportions(ref, cur, 0.0)
    m = (r + c) / 2

    def kl(p):
        nz = p > 0
        return float((p[nz] * np.log2(p[nz] / m[nz])).sum())
    return max(0.0, (kl(r) + kl(c)) / 2)


def quantile_psi(ref: kll_doubles_sketch, cur: kll_doubles_sketch, bins: int) -> tuple[float, int]:
    """PSI of two sketches on the reference's quantile bins; returns (psi, bins used)."""
    edges = sorted(set(ref.get_quantiles([i / bins for i in range(1, bins)])))
    edges = [e for e in edges if math.isfinite(e)]
    if not edges:
        return 0.0, 1
    r = {i: p * ref.n for i, p in enumerate(ref.get_pmf(edges))}
    c = {i: p * cur.n for i, p in enumerate(cur.get_pmf(edges))}
    return psi(r, c), len(edges) + 1


class _Window:
    __slots__ = ("n", "positives", "cats", "nums")

    def __init__(self):
        self.n = 0
        self.positives = 0
        self.cats: dict[str, Counter] = {}
        self.nums: dict[str, kll_doubles_sketch] = {}


class FeatureDrift:
    """Per-window feature and label distributions; ``report()`` compares each window with its reference."""

    def __init__(self, cfg: DriftConfig = DriftConfig()):
        self.cfg = cfg
        self._windows: dict[int, _Window] = {}
        self._first: int | None = None  # the first window seen (the reference when reference="first")
        self._numeric = set(cfg.numeric)
        self.examples = 0
        self.unparsed = 0  # numeric features whose value is not a finite number (not counted)
        self.features_pruned = 0  # feature names a full window dropped (max_features)
        self.values_pruned = 0  # the values those names had counted

    def update(self, examples) -> None:
        cfg = self.cfg
        for ex in examples:
            k = cfg.window_of(float(ex["ts"]))
            w = self._windows.get(k)
            if w is None:
                w = self._windows[k] = _Window()
                if self._first is None or k < self._first:
                    self._first = k
                self._evict()
                if k not in self._windows:  # older than every kept window: too late to count
                    continue
            self.examples += 1
            w.n += 1
            w.positives += int(ex.get("label", 0) or 0)
            for name, v in feature_values(ex).items():
                if name in self._numeric:
                    try:
                        x = float(v)
                    except (TypeError, ValueError):
                        x = float("nan")
                    if not math.isfinite(x):
                        self.unparsed += 1
                        continue
                    sk = w.nums.get(name)
                    if sk is None:
                        if len(w.cats) + len(w.nums) >= cfg.max_features:
                            self._prune(w)
                        sk = w.nums[name] = kll_doubles_sketch(cfg.sketch_k)
                    sk.update(x)
                else:
                    c = w.cats.get(name)
                    if c is None:
                        if len(w.cats) + len(w.nums) >= cfg.max_features:
                            self._prune(w)
                        c = w.cats[name] = Counter()
                    v = str(v)
                    if v in c or len(c) < cfg.max_categories:
                        c[v] += 1
                    else:
                        c[OTHER] += 1

    def _prune(self, w: _Window) -> None:
        """Keep the window's ``max_features // 2`` most counted feature names (a stable sort: ties keep
        categorical names first, each kind in the order first seen)."""
        sizes = [(sum(c.values()), name) for name, c in w.cats.items()]
        sizes += [(sk.n, name) for name, sk in w.nums.items()]
        keep = {name for _, name in sorted(sizes, key=lambda t: -t[0])[:self.cfg.max_features // 2]}
        for n, name in sizes:
            if name not in keep:
                w.cats.pop(name, None)
                w.nums.pop(name, None)
                self.features_pruned += 1
                self.values_pruned += n

    def _evict(self) -> None:
        keep = self.cfg.keep_windows
        if len(self._windows) > keep:
            for k in sorted(self._windows)[:len(self._windows) - keep]:
                if k != self._first or self.cfg.reference != "first":
                    del self._windows[k]

    def report_bounds(self) -> dict:
        """The feature-name bound and how often it bit."""
        return {"max_features": self.cfg.max_features, "features_pruned": self.features_pruned,
                "values_pruned": self.values_pruned}

    def windows(self) -> list[int]:
        return sorted(self._windows)

    def reference_of(self, k: int) -> int | None:
        ks = [j for j in self.windows() if j < k]
        if not ks:
            return None
        return ks[-1] if self.cfg.reference == "previous" else ks[0]

    def compare(self, k: int) -> dict:
        """Window ``k`` against its reference: per-feature figures and label-rate drift."""
        cfg = self.cfg
        w = self._windows[k]
        start, end = cfg.bounds(k)
        out = {"window": k, "start": start, "end": end, "n": w.n,
               "label": {"rate": round(w.positives / w.n, 6) if w.n else None}, "features": {}}
        j = self.reference_of(k)
        if j is None:
            return out
        r = self._windows[j]
        out["reference"] = {"window": j, "start": cfg.bounds(j)[0], "n": r.n}
        if w.n < cfg.min_count or r.n < cfg.min_count:
            return out
        out["label"].update(_label_drift(r.n, r.positives, w.n, w.positives))
        feats = {}
        for name in sorted(set(r.cats) | set(w.cats)):
            rc, cc = r.cats.get(name, {}), w.cats.get(name, {})
            nr, nc = sum(rc.values()), sum(cc.values())
            if nr < cfg.min_count or nc < cfg.min_count:
                continue
            bins = len(set(rc) | set(cc))
            feats[name] = {"kind": "categorical", "psi": round(psi(rc, cc), 6),
                           "js": round(js_divergence(rc, cc), 6), "bins": bins,
                           "psi_null": round((bins - 1) * (1 / nr + 1 / nc), 6), "n_ref": nr, "n": nc}
        for name in sorted(set(r.nums) & set(w.nums)):
            rs, cs = r.nums[name], w.nums[name]
            if rs.n < cfg.min_count or cs.n < cfg.min_count:
                continue
            value, bins = quantile_psi(rs, cs, cfg.bins)
            feats[name] = {"kind": "numeric", "psi": round(value, 6), "bins": bins,
                           "psi_null": round((bins - 1) * (1 / rs.n + 1 / cs.n), 6), "n_ref": rs.n, "n": cs.n}
        out["features"] = feats
        return out

    def report(self) -> dict:
        """Every kept window compared with its reference, oldest first, and the latest one's figures."""
        windows = [self.compare(k) for k in self.windows()]
        return {"config": {"window_s": self.cfg.window_s, "reference": self.cfg.reference},
                "examples": self.examples, "unparsed": self.unparsed,
                "bounds": self.report_bounds(),
                "windows": windows,
                "latest": windows[-1] if windows else None}


def _label_drift(n_ref: int, pos_ref: int, n: int, pos: int) -> dict:
    r0, r1 = pos_ref / n_ref, pos / n
    pooled = (pos_ref + pos) / (n_ref + n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_ref + 1 / n))
    return {"rate_ref": round(r0, 6), "delta": round(r1 - r0, 6),
            "z": round((r1 - r0) / se, 4) if se > 0 else 0.0}
