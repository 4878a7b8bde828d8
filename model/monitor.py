"""The monitor's core: feature/label drift and model health side by side, one report for every surface.

Public surface: ``MonitorConfig``, ``Monitor``.

:class:`Monitor` feeds examples (``examples.augmented``, or evaluate's example list) to
:class:`~loopline.model.drift.FeatureDrift` and score rows (``model.scores``, or evaluate's
``scores``) to :class:`~loopline.model.health.ModelHealth`. ``report()`` is the JSON a worker serves
at ``/drift`` and ``loopline drift --json`` prints; ``summary()`` is its short form (the newest
window's figures), which the Prometheus metrics are built from. No Faust here: the worker
(``stream/monitor.py``) and ``loopline report`` use the same object.

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

from .drift import DriftConfig, FeatureDrift
from .health import HealthConfig, ModelHealth

__all__ = ["MonitorConfig", "Monitor"]


@dataclass(frozen=True)
class MonitorConfig:
    drift: DriftConfig = field(default_factory=DriftConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    @classmethod
    def with_window(cls, window_s: float, min_count: int | None = None) -> "MonitorConfig":
        """Both parts on windows of ``window_s`` seconds (and, if given, one minimum count)."""
        d, h = DriftConfig(window_s=window_s), HealthConfig(window_s=window_s)
        if min_count is not None:
            d, h = replace(d, min_count=min_count), replace(h, min_window_examples=min_count)
        return cls(drift=d, health=h)


class Monitor:
    def __init__(self, cfg: MonitorConfig = MonitorConfig()):
        self.cfg = cfg
        self.drift = FeatureDrift(cfg.drift)
        self.health = ModelHealth(cfg.health)
        self.max_ts = None  # the newest event time seen (examples or rows)

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
        return {"summary": self._summary(drift, health), "drift": drift, "health": health}

    def summary(self) -> dict:
        return self._summary(self.drift.report(), self.health.report())

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
