"""The monitor's Prometheus collector: what it exposes parses with prometheus-client's own parser."""

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loopline.model.monitor import Monitor, MonitorConfig
from loopline.stream.monitor import MonitorCollector


def _families(monitor):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector(monitor))
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_parse_and_carry_every_model_and_feature():
    rng = np.random.default_rng(0)
    m = Monitor(MonitorConfig.with_window(100.0))
    m.observe_examples({"ts": float(t) / 10, "campaign": "c1" if t < 1000 else "c2", "attrs": {"geo": "US"},
                        "label": int(rng.random() < 0.1)} for t in range(2000))
    m.observe_scores({"id": str(t), "ts": float(t) / 10, "label_ts": float(t) / 10, "label": t % 7 == 0,
                      "scores": {"fm": 0.5 if t % 7 == 0 else 0.1, "vm:base": 0.2}} for t in range(2000))
    fams = _families(m)
    psi = {s.labels["feature"]: s.value for s in fams["loopline_feature_psi"].samples}
    assert psi["campaign"] > 1 and psi["attrs.geo"] == 0.0
    auc = {s.labels["model"]: s.value for s in fams["loopline_model_auc"].samples}
    assert auc["fm"] == 1.0 and auc["vm:base"] == 0.5
    ne = {(s.labels["model"], s.labels["scope"]) for s in fams["loopline_model_ne"].samples}
    assert {("fm", "total"), ("fm", "window"), ("vm:base", "total")} <= ne
    examples = [s for s in fams["loopline_monitor_examples"].samples if s.name.endswith("_total")]
    assert examples[0].value == 2000
    alarms = {(s.labels["model"], s.labels["detector"]) for s in fams["loopline_drift_alarms"].samples}
    assert ("fm", "adwin") in alarms and ("vm:base", "page_hinkley") in alarms


def test_an_empty_monitor_still_serves_valid_metrics():
    fams = _families(Monitor())
    assert [s.value for s in fams["loopline_monitor_score_rows"].samples if s.name.endswith("_total")] == [0]
    assert fams["loopline_feature_psi"].samples == []
