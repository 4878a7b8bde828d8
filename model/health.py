"""Model health from score rows: rolling AUC / log loss / NE / calibration per model, the FM-to-VM
transfer ratio over time, and change detectors on each model's loss.

Public surface: ``HealthConfig``, ``ModelHealth``, ``example_loss``.

Input: score rows, the contract between the models and monitoring: one JSON object per labelled
example and producing stage, ``{"id", "user", "ts", "label_ts", "vertical", "label", "scores": {MODEL:
p}}`` (the FM stage writes ``fm``, ``lr``, ``das``; the VM stage ``vm:base``, ``vm:<variant>``... for
the same ids, in rows of its own). Nothing here knows model names beyond the transfer ratio's three
roles, so new models show up by themselves.

* **Windows.** Rows go into tumbling event-time windows by ``ts`` (the impression's time, as in
  ``model/drift.py``), merged by example id, so every model of a window is measured on the examples
  it scored. Each window gives :class:`~loopline.model.metrics.BinaryMetrics`' figures per model (NE
  against the window's own label rate). A window keeps its predictions until every model has rows
  ``keep_windows`` windows past it (each stage on its own clock: the VMs' rows come after the FM's);
  then only its figures, for the newest ``max_windows`` windows; a row for a window already closed
  counts in the overall figures only.
* **Overall** per model: n, log loss, NE, calibration from running sums (constant memory; AUC needs
  the predictions, so it is per window only).
* **Transfer ratio** per window, for every ``vm:X`` beside ``vm:base`` and ``fm``, on the examples all
  three scored: ``TR = (NE(vm:base) - NE(vm:X)) / (NE(vm:base) - NE(fm))``, the fraction of the FM's
  gain over the plain VM that the VM variant captures. None when the FM gains less than
  ``min_gain`` NE over the base in that window (the ratio would be noise over almost zero).
* **Detectors**: one ADWIN and one Page-Hinkley (``model/detectors.py``) per model over its
  per-example log loss, in the order rows are given (the canonical label-time order in ``evaluate``;
  arrival order in a worker). An alarm records the model, the detector, the row's ``label_ts`` (when
  the label, and so the loss, became known) and the row count.

>>> h = ModelHealth(HealthConfig(window_s=100.0, min_window_examples=1))
>>> rows = [{"id": str(i), "ts": float(i), "label_ts": float(i), "label": i % 2,
...          "scores": {"fm": 0.8 if i % 2 else 0.2, "lr": 0.5}} for i in range(200)]
>>> h.update(rows)
>>> r = h.report()
>>> [w["models"]["fm"]["auc"] for w in r["windows"]], r["models"]["lr"]["n"]
([1.0, 1.0], 200)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from loopline.errors import ConfigError

from .detectors import ADWINConfig, PageHinkleyConfig, make_detector
from .metrics import EPS, BinaryMetrics

__all__ = ["HealthConfig", "ModelHealth", "example_loss"]


def example_loss(p: float, y: int) -> float:
    """Log loss of one prediction (clipped like ``model/metrics.py``)."""
    p = min(max(float(p), EPS), 1 - EPS)
    return -math.log(p) if y else -math.log(1 - p)


def _entropy(rate: float) -> float:
    return -(rate * math.log(max(rate, EPS)) + (1 - rate) * math.log(max(1 - rate, EPS)))


@dataclass(frozen=True)
class HealthConfig:
    window_s: float = 86400.0  # tumbling event-time windows (by the example's ts)
    origin: float = 0.0  # windows start at origin + k * window_s
    keep_windows: int = 3  # newest windows that keep their predictions (labels arrive up to a window late)
    max_windows: int = 90  # windows whose figures are kept (the newest)
    min_window_examples: int = 50  # a model with fewer examples in a window gets no figures there
    fm: str = "fm"  # the transfer ratio's three roles
    base: str = "vm:base"
    vm_prefix: str = "vm:"
    min_gain: float = 0.005  # least NE(vm:base) - NE(fm) for a transfer ratio
    detectors: tuple = ("adwin", "page_hinkley")  # run on each model's per-example log loss
    adwin: ADWINConfig = field(default_factory=ADWINConfig)
    page_hinkley: PageHinkleyConfig = field(default_factory=PageHinkleyConfig)
    max_alarms: int = 1000  # alarms kept (the newest)

    def __post_init__(self):
        if not (isinstance(self.window_s, (int, float)) and math.isfinite(self.window_s) and self.window_s > 0):
            raise ConfigError(f"window_s: must be a positive number of seconds, got {self.window_s!r}")
        for name in ("keep_windows", "max_windows", "min_window_examples", "max_alarms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {v!r}")
        object.__setattr__(self, "detectors", tuple(self.detectors))
        for d in self.detectors:
            if d not in ("adwin", "page_hinkley"):
                raise ConfigError(f"detectors: each must be adwin or page_hinkley, got {d!r}")

    def window_of(self, ts: float) -> int:
        return int(math.floor((ts - self.origin) / self.window_s))


class ModelHealth:
    """Windowed and overall metrics per model, transfer ratios and loss-change alarms, from score rows."""

    def __init__(self, cfg: HealthConfig = HealthConfig()):
        self.cfg = cfg
        self._open: dict[int, dict[str, list]] = {}  # window -> id -> [label, {model: p}]
        self._closed: dict[int, dict] = {}  # window -> its figures, once its predictions are dropped
        self._cache: dict[int, dict] = {}  # open window -> its figures, until a row changes it
        self._sums: dict[str, list[float]] = {}  # model -> [n, sum p, sum y, sum loss]
        self._newest: dict[str, int] = {}  # model -> the newest window it has a row in
        self._cutoff = -(1 << 62)  # windows below this are closed
        self._detectors: dict[str, dict] = {}  # model -> kind -> detector
        self.alarms: list[dict] = []
        self.alarm_counts: dict[str, dict[str, int]] = {}  # model -> kind -> alarms
        self.rows = 0

    def update(self, rows) -> None:
        cfg = self.cfg
        for row in rows:
            scores = row.get("scores") or {}
            y = int(row["label"])
            k = cfg.window_of(float(row["ts"]))
            for model in scores:  # each producing stage runs on its own clock (the VMs lag the FM)
                if k > self._newest.get(model, k - 1):
                    self._newest[model] = k
            if k not in self._closed and k >= self._cutoff:
                win = self._open.get(k)
                if win is None:
                    win = self._open[k] = {}
                    self._close_old()
                if k in self._open:
                    self._cache.pop(k, None)
                    entry = win.get(row["id"])
                    if entry is None:
                        entry = win[row["id"]] = [y, {}]
                    entry[1].update(scores)
            self.rows += 1
            for model, p in scores.items():
                loss = example_loss(p, y)
                s = self._sums.get(model)
                if s is None:
                    s = self._sums[model] = [0.0, 0.0, 0.0, 0.0]
                    self._detectors[model] = {d: make_detector(d, getattr(cfg, d)) for d in cfg.detectors}
                    self.alarm_counts[model] = {d: 0 for d in cfg.detectors}
                s[0] += 1
                s[1] += float(p)
                s[2] += y
                s[3] += loss
                for kind, det in self._detectors[model].items():
                    if det.update(loss):
                        self.alarm_counts[model][kind] += 1
                        self.alarms.append({"model": model, "detector": kind, "label_ts": float(row.get("label_ts", row["ts"])),
                                            "ts": float(row["ts"]), "n": int(s[0])})
                        if len(self.alarms) > cfg.max_alarms:
                            del self.alarms[0]

    def _close_old(self) -> None:
        """Close the windows every model has moved ``keep_windows`` past (a lagging stage's rows still
        find their window open); at most ``max_windows`` stay open whatever a stalled stage does."""
        if not self._newest:
            return
        slowest = min(self._newest.values())
        cutoff = max(slowest - self.cfg.keep_windows + 1, max(self._open) - self.cfg.max_windows + 1)
        self._cutoff = max(self._cutoff, cutoff)
        for k in sorted(self._open):
            if k >= self._cutoff:
                break
            self._closed[k] = self._cache.pop(k, None) or self._figures(k, self._open.pop(k))
            for k in sorted(self._closed)[:max(0, len(self._closed) + len(self._open) - self.cfg.max_windows)]:
                del self._closed[k]

    def _figures(self, k: int, win: dict) -> dict:
        cfg = self.cfg
        start = cfg.origin + k * cfg.window_s
        out = {"window": k, "start": start, "end": start + cfg.window_s, "n": len(win), "models": {},
               "transfer": {}}
        per_model: dict[str, tuple[list, list]] = {}
        for y, scores in win.values():
            for m, p in scores.items():
                ps, ys = per_model.setdefault(m, ([], []))
                ps.append(p)
                ys.append(y)
        for m in sorted(per_model):
            ps, ys = per_model[m]
            if len(ys) >= cfg.min_window_examples:
                bm = BinaryMetrics()
                bm.update(ps, ys)
                out["models"][m] = bm.report()
        out["transfer"] = self._transfer(win)
        return out

    def _transfer(self, win: dict) -> dict:
        cfg = self.cfg
        variants = sorted({m for _, s in win.values() for m in s
                           if m.startswith(cfg.vm_prefix) and m != cfg.base})
        out = {}
        for x in variants:
            trio = [(y, s[cfg.base], s[x], s[cfg.fm]) for y, s in win.values()
                    if cfg.base in s and x in s and cfg.fm in s]
            if len(trio) < cfg.min_window_examples:
                continue
            a = np.array(trio, dtype=np.float64)
            ne = [_ne(a[:, i], a[:, 0]) for i in (1, 2, 3)]
            gain = ne[0] - ne[2]
            out[x] = {"tr": round((ne[0] - ne[1]) / gain, 6) if gain >= cfg.min_gain else None,
                      "ne_base": round(ne[0], 6), "ne_vm": round(ne[1], 6), "ne_fm": round(ne[2], 6), "n": len(trio)}
        return out

    def windows(self) -> list[dict]:
        """Every window's figures, oldest first (the open ones computed now)."""
        ks = sorted(set(self._open) | set(self._closed))
        out = []
        for k in ks:
            if k in self._closed:
                out.append(self._closed[k])
            else:
                if k not in self._cache:
                    self._cache[k] = self._figures(k, self._open[k])
                out.append(self._cache[k])
        return out

    def overall(self) -> dict:
        out = {}
        for m, (n, sp, sy, sl) in sorted(self._sums.items()):
            ll = sl / n
            ent = _entropy(sy / n)
            out[m] = {"n": int(n), "logloss": round(ll, 6), "ne": round(ll / ent, 6) if ent > 0 else None,
                      "calibration": round(sp / sy, 6) if sy > 0 else None, "positives": int(sy)}
        return out

    def report(self) -> dict:
        windows = self.windows()
        latest_tr = next((w["transfer"] for w in reversed(windows) if w["transfer"]), {})
        return {"rows": self.rows, "models": self.overall(), "windows": windows,
                "transfer": latest_tr, "alarms": list(self.alarms),
                "alarm_counts": {m: dict(c) for m, c in self.alarm_counts.items()}}


def _ne(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, EPS, 1 - EPS)
    ll = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    ent = _entropy(float(y.mean()))
    return ll / ent if ent > 0 else float("nan")
