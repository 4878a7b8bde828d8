"""The monitor role: drift and model health from the stream, served as Prometheus metrics and JSON.

Public surface: ``register_monitor``, ``MonitorCollector``.

One agent consumes ``examples.augmented`` (the examples with their DAS soft label: feature and label
drift) and ``model.scores`` (one score row per example and producing stage: per-model health) and
feeds them to :class:`~loopline.model.monitor.Monitor`. It runs in a consumer group of its own
(``OWN_GROUP_ROLES`` in ``stream/app.py``), so it sees every partition of ``examples.augmented``
beside the vm role. Two views, on 127.0.0.1 like every view:

* ``/metrics``: the Prometheus text format, from a per-app ``CollectorRegistry`` whose one collector
  (:class:`MonitorCollector`) reads the monitor's summary at scrape time;
* ``/drift``: the monitor's whole report as JSON (what ``loopline drift --json`` prints).

On start the agent reads both topics from the beginning with its own consumer (as the fm role
does) and skips what it has already fed by offset, so a restarted monitor ends with the figures of
one that never stopped (numeric PSI within its sketch's error), as long as the topics still hold
the history (an integration test restarts it). Detectors see rows in arrival
order, sorted by label time within each batch (partitions interleave), not ``evaluate``'s exact
order, so their alarms can differ from a replay's by a few rows; the windowed figures do not depend
on the order as long as no partition lags the others by more than ``HealthConfig.keep_windows``
windows.

Metrics (all gauges unless named ``_total``; ``model`` and ``feature`` labels are what the stream
carries, at most ``MonitorConfig.max_metric_models`` / ``max_metric_features`` distinct values, the
first ones exported; the rest stay in ``/drift`` and are counted):

    loopline_monitor_examples_total, loopline_monitor_score_rows_total, loopline_monitor_event_time_seconds
    loopline_feature_psi{feature}, loopline_feature_js{feature}      newest window vs its reference
    loopline_label_rate{window="current"|"reference"}, loopline_label_rate_z
    loopline_model_auc{model}                                         newest window with figures
    loopline_model_logloss{model,scope}, loopline_model_ne{model,scope}, loopline_model_calibration{model,scope}
                                                                      scope: window | total
    loopline_model_examples_total{model}
    loopline_transfer_ratio{model}                                    vm:X against vm:base and fm
    loopline_drift_alarms_total{model,detector}
    loopline_metric_labels_dropped_total{label}                       label values left out (label: feature | model)
    loopline_drift_features_pruned_total                              feature names dropped by full drift windows
"""

from __future__ import annotations

import math

import faust
import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from loopline.model.monitor import Monitor, MonitorConfig

from loopline.state.dedup import RecentIds

from .app import TOPICS, CachedView, WorkerConfig, control_of, iter_topic
from .role import Fed, Msg, msgs_of_records, role_agent

__all__ = ["register_monitor", "MonitorCollector"]

INPUTS = ("examples.augmented", "model.scores")
BATCH = 2000
BATCH_WITHIN_S = 0.2
CONTENT_TYPE = "text/plain; version=0.0.4"  # the Prometheus text format (charset is utf-8)


class MonitorCollector:
    """A prometheus-client collector over a :class:`Monitor`: the figures are read at scrape time."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor

    def collect(self):
        s = self.monitor.metrics_summary()  # feature and model labels capped (MonitorConfig)

        def gauge(name, doc, labels=()):
            return GaugeMetricFamily(name, doc, labels=list(labels))

        c = CounterMetricFamily("loopline_monitor_examples", "examples the monitor has read")
        c.add_metric([], s["examples"])
        yield c
        c = CounterMetricFamily("loopline_monitor_score_rows", "score rows the monitor has read")
        c.add_metric([], s["score_rows"])
        yield c
        g = gauge("loopline_monitor_event_time_seconds", "newest event time seen (epoch seconds)")
        if s["event_time"] is not None:
            g.add_metric([], s["event_time"])
        yield g

        psi = gauge("loopline_feature_psi", "PSI of the newest window against its reference", ["feature"])
        js = gauge("loopline_feature_js", "Jensen-Shannon divergence (bits), categorical features", ["feature"])
        for name, f in sorted(s["features"].items()):
            psi.add_metric([name], f["psi"])
            if "js" in f:
                js.add_metric([name], f["js"])
        yield psi
        yield js
        rate = gauge("loopline_label_rate", "positive rate of the newest window and its reference", ["window"])
        z = gauge("loopline_label_rate_z", "two-proportion z score of the label-rate change")
        label = s["label"] or {}
        if label.get("rate") is not None:
            rate.add_metric(["current"], label["rate"])
        if "rate_ref" in label:
            rate.add_metric(["reference"], label["rate_ref"])
            z.add_metric([], label["z"])
        yield rate
        yield z

        auc = gauge("loopline_model_auc", "AUC in the model's newest window with figures", ["model"])
        fams = {k: gauge(f"loopline_model_{k}", doc, ["model", "scope"]) for k, doc in (
            ("logloss", "log loss"), ("ne", "normalized entropy (1.0: the base rate)"),
            ("calibration", "sum of predictions / sum of labels"))}
        n = CounterMetricFamily("loopline_model_examples", "examples scored per model", labels=["model"])
        alarms = CounterMetricFamily("loopline_drift_alarms", "loss-change alarms", labels=["model", "detector"])
        for model, m in sorted(s["models"].items()):
            n.add_metric([model], m["overall"]["n"])
            for scope, figs in (("total", m["overall"]), ("window", m["window"] or {})):
                for k, fam in fams.items():
                    if figs.get(k) is not None:
                        fam.add_metric([model, scope], figs[k])
            if m["window"] and m["window"].get("auc") is not None:
                auc.add_metric([model], m["window"]["auc"])
            for det, count in sorted(m["alarms"].items()):
                alarms.add_metric([model, det], count)
        yield auc
        yield from fams.values()
        yield n
        yield alarms
        tr = gauge("loopline_transfer_ratio", "(NE(vm:base) - NE(vm:X)) / (NE(vm:base) - NE(fm))", ["model"])
        for model, t in sorted(s["transfer"].items()):
            if t.get("tr") is not None:
                tr.add_metric([model], t["tr"])
        yield tr
        left = CounterMetricFamily("loopline_metric_labels_dropped", "label values left out of these metrics "
                                   "(MonitorConfig.max_metric_*), each name counted once", labels=["label"])
        bounds = self.monitor.bounds()
        for label, b in sorted(bounds["metric_labels"].items()):
            left.add_metric([label], b["dropped"])
        yield left
        pruned = CounterMetricFamily("loopline_drift_features_pruned", "feature names full drift windows "
                                     "dropped (DriftConfig.max_features)")
        pruned.add_metric([], bounds["drift"]["features_pruned"])
        yield pruned


def _canonical(item: dict) -> tuple:
    return (float(item.get("label_ts", item["ts"])), str(item.get("id", "")))


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _well_formed(topic: str, item) -> bool:
    """An example (``examples.augmented``) or a score row (``model.scores``) the monitor can use: ids,
    finite times, a 0/1 label and, for a score row, scores that are probabilities."""
    if not isinstance(item, dict) or not isinstance(item.get("id"), str) or item.get("label") not in (0, 1):
        return False
    if not _number(item.get("ts")) or ("label_ts" in item and not _number(item["label_ts"])):
        return False
    if topic == "model.scores":
        scores = item.get("scores")
        return isinstance(scores, dict) and bool(scores) and all(
            isinstance(k, str) and _number(v) and 0 <= v <= 1 for k, v in scores.items())
    soft = item.get("soft_label")
    return soft is None or (_number(soft) and 0 <= soft <= 1)


def _row_id(item: dict) -> str:
    scores = item.get("scores")
    return f"{item.get('id')}|{min(scores) if isinstance(scores, dict) and scores else ''}"


def register_monitor(app: faust.App, cfg: WorkerConfig, monitor_cfg: MonitorConfig = MonitorConfig()) -> None:
    monitor = Monitor(monitor_cfg)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector(monitor))
    inputs = [t for t in INPUTS if t in TOPICS]  # model.scores: once the stages publish score rows
    source = app.topic(*inputs, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=cfg.partitions)
    fed = Fed()  # "topic/partition" -> next offset not yet fed
    state = {"ready": False}
    stats = {"bad_values": 0}
    # re-sent outputs (the fm or a vm restarted after its snapshot) count once: examples by id, score
    # rows by id and producing stage (each stage sends one row per example)
    seen = {"examples.augmented": RecentIds(), "model.scores": RecentIds()}

    async def handle(messages: list[Msg]) -> None:
        examples, rows = [], []
        for topic, partition, offset, headers, value in fed.take(messages):
            if control_of(headers) is not None:
                continue
            try:
                item = orjson.loads(value)
            except orjson.JSONDecodeError:
                item = None
            if not _well_formed(topic, item):
                stats["bad_values"] += 1  # these topics are Loopline's own; a bad value is counted, never fatal
                continue
            if not seen[topic].first(_row_id(item), _canonical(item)[0]):
                continue
            (examples if topic == "examples.augmented" else rows).append(item)
        # canonical order (label time, id) within what arrived together: a catch-up reads whole
        # partitions one after another, and the health windows only keep the newest few open
        monitor.observe_examples(sorted(examples, key=_canonical))
        monitor.observe_scores(sorted(rows, key=_canonical))

    app.loopline_positions["monitor"] = fed.positions

    async def catch_up() -> None:
        """From the beginning, whatever the group has committed, a chunk at a time."""
        async for msgs in iter_topic(cfg.broker, inputs, cfg.partitions, chunk=20000):
            await handle(msgs_of_records(msgs))
        state["ready"] = True

    agent = role_agent(app, "monitor", source, handle, batch=BATCH, within=BATCH_WITHIN_S, start=catch_up,
                       msgs=True, positions=fed.positions)

    # both computed in a thread, never on the agent's loop
    metrics_answers = CachedView.of("metrics", cfg, content_type=CONTENT_TYPE)
    drift_answers = CachedView.of("drift", cfg)

    @app.page("/metrics")
    async def metrics_view(web, request):
        return await metrics_answers.respond(web, lambda: generate_latest(registry))

    @app.page("/drift")
    async def drift_view(web, request):
        return await drift_answers.respond(web, lambda: {
            "ready": state["ready"], "stream": {**stats, "gaps_read": dict(agent.loopline_gaps.counts)},
            **monitor.report()})
