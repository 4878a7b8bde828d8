"""``loopline drift``: the current drift and model-health figures of a running monitor worker.

Public surface: ``fetch_drift``, ``drift_summary``; ``DriftCommand`` and ``run_drift`` (``loopline drift``).

Reads the worker's ``/drift`` view (JSON; ``stream/monitor.py``). ``loopline drift --json`` prints it
whole (every kept window, the alarms, the summary); without ``--json`` it prints the summary: the
newest window's PSI per feature, the label rate, each model's figures and alarm counts, and the
transfer ratios. Only ``http://`` URLs are accepted; the default is a local worker's.

>>> drift_summary({"summary": {"event_time": 1.0, "features": {"ad": {"psi": 0.5}}, "models": {}}})["features"]
{'ad': 0.5}
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from dataclasses import dataclass

import orjson

from loopline.errors import BrokerError, ConfigError
from loopline.settings import setting

__all__ = ["fetch_drift", "drift_summary", "DriftCommand", "run_drift"]


@dataclass(frozen=True)
class DriftCommand:
    """``loopline drift``: which monitor worker to ask. ``--json`` prints its whole ``/drift`` report."""

    worker: str = setting("http://127.0.0.1:6066", "the monitor worker's base URL")


def run_drift(cfg: DriftCommand, progress: bool = False) -> dict:
    """The worker's ``/drift`` report (``drift_summary`` shortens it for a terminal)."""
    return fetch_drift(cfg.worker)


def fetch_drift(worker: str = DriftCommand.worker, timeout: float = 10.0) -> dict:
    """The ``/drift`` JSON of the monitor worker at ``worker`` (its base URL)."""
    parts = urllib.parse.urlsplit(worker)
    if parts.scheme != "http" or not parts.netloc:
        raise ConfigError(f"worker: must be an http://host:port URL, got {worker!r}")
    url = f"http://{parts.netloc}/drift"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise BrokerError(f"worker {worker} answered {exc.code} on /drift: is it running the monitor role?") from None
    except (OSError, ValueError) as exc:
        raise BrokerError(f"worker {worker} unreachable: {exc}") from None


def drift_summary(report: dict) -> dict:
    """The short form for a terminal: PSI per feature (largest first), label, models, transfer."""
    s = report.get("summary") or {}
    feats = sorted((s.get("features") or {}).items(), key=lambda kv: -kv[1]["psi"])
    models = {}
    for name, m in (s.get("models") or {}).items():
        w = m.get("window") or {}
        models[name] = {"auc": w.get("auc"), "ne": w.get("ne"), "calibration": w.get("calibration"),
                        "ne_total": m["overall"].get("ne"), "n": m["overall"].get("n"), "alarms": m.get("alarms")}
    return {"event_time": s.get("event_time"), "examples": s.get("examples"), "score_rows": s.get("score_rows"),
            "features": {k: v["psi"] for k, v in feats}, "label": s.get("label"), "models": models,
            "transfer": {k: v.get("tr") for k, v in (s.get("transfer") or {}).items()}}
