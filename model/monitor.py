"""The monitor's core: feature/label drift and model health side by side, one report for every surface.

Public surface: ``MonitorConfig``, ``Monitor``, ``LabelCap``.

:class:`Monitor` feeds examples (``examples.augmented``, or evaluate's example list) to
:class:`~loopline.model.drift.FeatureDrift` and score rows (``model.scores``, or evaluate's
``scores``) to :class:`~loopline.model.health.ModelHealth`. ``report()`` is the JSON a worker serves
at ``/drift`` and ``loopline drift --json`` prints; ``summary()`` is its short form (the newest
window's figures), which the Prometheus metrics are built from. No Faust here: the worker
(``stream/monitor.py``) and ``loopline report`` use the same object.

**Bounded label sets.** Prometheus keeps a time series for every label value it was ever shown, so
:meth:`Monitor.metrics_summary` (the summary the ``/metrics`` collector reads) passes feature and model
names through a :class:`LabelCap` each: the first ``max_metric_features`` (``max_metric_models``)
distinct names exported keep their series for good; later ones are left out of the metrics (never
out of the JSON report) and counted once per name (``report()["bounds"]``). The drift features
themselves are bounded per window (``DriftConfig.max_features``), and a feature reaches the summary only
once it has ``min_count`` values in two windows, so one-off names never take a label.

>>> m = Monitor(MonitorConfig.with_window(10.0, min_count=1))
>>> m.observe_examples([{"ts": float(t), "campaign": "c1" if t < 10 else "c2", "label": t % 2} for t in range(20)])
>>> m.observe_scores([{"id": str(t), "ts": float(t), "label_ts": float(t), "label": t % 2,
...                    "scores": {"fm": 0.7 if t % 2 else 0.3}} for t in range(20)])
>>> s = m.summary()
>>> s["features"]["campaign"]["psi"] > 1, s["models"]["fm"]["window"]["auc"]
(True, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from loopline.errors import ConfigError

from .drift import DriftConfig, FeatureDrift
from .health import HealthConfig, ModelHealth

__all__ = ["MonitorConfig", "Monitor", "LabelCap"]


@dataclass(frozen=True)
class MonitorConfig:
    drift: DriftConfig = field(default_factory=DriftConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    # distinct values of the Prometheus ``feature`` and ``model`` labels ever exported (module docstring);
    # a scrape is a few lines per label value, so 200 features stay a small page
    max_metric_features: int = 200
    max_metric_models: int = 64  # models are Loopline's own stages and VM variants: a handful

    def __post_init__(self):
        for name in ("max_metric_features", "max_metric_models"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {v!r}")

    @classmethod
    def with_window(cls, window_s: float, min_count: int | None = None) -> "MonitorConfig":
        """Both parts on windows of ``window_s`` seconds (and, if given, one minimum count)."""
        d, h = DriftConfig(window_s=window_s), HealthConfig(window_s=window_s)
        if min_count is not None:
            d, h = replace(d, min_count=min_count), replace(h, min_window_examples=min_count)
        return cls(drift=d, health=h)


class LabelCap:
    """A bounded set of label values: the first ``cap`` distinct names admitted stay; later ones are
    refused and counted once each (the count remembers the last ``memory`` refused names, so it can
    overcount only when more than that many distinct names keep coming back).

    >>> lc = LabelCap(2, memory=1)
    >>> [lc.admit(n) for n in ("a", "b", "c", "a", "c", "d")]
    [True, True, False, True, False, False]
    >>> lc.dropped
    2
    """

    def __init__(self, cap: int, memory: int = 4096):
        self.cap = cap
        self.memory = memory  # refused names remembered (a few hundred kB at most)
        self.admitted: dict[str, None] = {}  # insertion-ordered
        self.dropped = 0
        self._recent: dict[str, None] = {}  # refused names already counted (oldest first)

    def admit(self, name: str) -> bool:
        if name in self.admitted:
            return True
        if len(self.admitted) < self.cap:
            self.admitted[name] = None
            return True
        if name not in self._recent:
            self.dropped += 1
            self._recent[name] = None
            if len(self._recent) > self.memory:
                del self._recent[next(iter(self._recent))]
        return False

    def bounds(self) -> dict:
        return {"labels": len(self.admitted), "cap": self.cap, "dropped": self.dropped}


class Monitor:
    def __init__(self, cfg: MonitorConfig = MonitorConfig()):
        self.cfg = cfg
        self.drift = FeatureDrift(cfg.drift)
        self.health = ModelHealth(cfg.health)
        self.max_ts = None  # the newest event time seen (examples or rows)
        self.labels = {"feature": LabelCap(cfg.max_metric_features), "model": LabelCap(cfg.max_metric_models)}

    def observe_examples(self, examples) -> None:
        examples = list(examples)
        self.drift.update(examples)
        self._seen(examples)

    def observe_scores(self, rows) -> None:
        rows = list(rows)
        self.health.update(rows)
        self._seen(rows)

    def _seen(self, items) -> None:
        if items:
            t = max(float(x["ts"]) for x in items)
            self.max_ts = t if self.max_ts is None else max(self.max_ts, t)

    def report(self) -> dict:
        """Everything: every kept window's drift and health figures, the alarms, and the summary."""
        drift, health = self.drift.report(), self.health.report()
        return {"summary": self._summary(drift, health), "drift": drift, "health": health,
                "bounds": self.bounds()}

    def summary(self) -> dict:
        return self._summary(self.drift.report(), self.health.report())

    def bounds(self) -> dict:
        """Every bound of the monitor and how often it bit: drift feature names pruned per window, and
        label values left out of the metrics."""
        return {"drift": self.drift.report_bounds(),
                "metric_labels": {k: lc.bounds() for k, lc in self.labels.items()}}

    def metrics_summary(self) -> dict:
        """:meth:`summary` with feature and model names limited to the admitted label values (what the
        Prometheus collector exports)."""
        s = self.summary()
        feat, model = self.labels["feature"], self.labels["model"]
        s["features"] = {k: v for k, v in sorted(s["features"].items()) if feat.admit(k)}
        s["models"] = {k: v for k, v in sorted(s["models"].items()) if model.admit(k)}
        s["transfer"] = {k: v for k, v in s["transfer"].items() if k in model.admitted}
        return s

    def _summary(self, drift: dict, health: dict) -> dict:
        """The newest window with drift figures (against its reference) and each model's newest window
        with figures, beside its overall figures, alarm counts and the newest transfer ratios."""
        latest = next((w for w in reversed(drift["windows"]) if w["features"]), None)
        models = {}
        for name, overall in health["models"].items():
            win = next((w for w in reversed(health["windows"]) if name in w["models"]), None)
            models[name] = {"overall": overall, "window": win["models"][name] if win else None,
                            "window_start": win["start"] if win else None,
                            "alarms": health["alarm_counts"].get(name, {})}
        return {"event_time": self.max_ts, "examples": drift["examples"], "score_rows": health["rows"],
                "window": None if latest is None else {"start": latest["start"], "n": latest["n"],
                                                       "reference_start": latest["reference"]["start"]},
                "features": {} if latest is None else latest["features"],
                "label": None if latest is None else latest["label"],
                "models": models, "transfer": health["transfer"],
                "alarms": health["alarms"][-20:]}
