"""The /metrics collector exports a bounded set of feature labels and counts the ones it leaves out."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loopline.model.drift import DriftConfig
from loopline.model.monitor import Monitor, MonitorConfig
from loopline.stream.monitor import MonitorCollector


def test_feature_labels_stop_at_the_cap_and_the_rest_are_counted():
    m = Monitor(MonitorConfig(drift=DriftConfig(window_s=10.0, min_count=5, max_features=400),
                              max_metric_features=10))
    # 300 distinct feature names, each carried by every example: all real, all drift figures
    m.observe_examples({"ts": float(t) / 100, "features": {f"f{k}": str((t + k) % 3) for k in range(300)},
                        "label": t % 2} for t in range(2000))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector(m))
    for _ in range(2):
        fams = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    labels = {s.labels["feature"] for s in fams["loopline_feature_psi"].samples}
    assert len(labels) == 10 and len(m.report()["summary"]["features"]) == 300
    refused = {s.labels["label"]: s.value for s in fams["loopline_metric_labels_dropped"].samples
               if s.name.endswith("_total")}
    assert refused == {"feature": 290.0, "model": 0.0}
