"""``loopline report``: an HTML page with PNG plots of a replay's drift and model health.

Public surface: ``ReportConfig``, ``build_report``, ``write_report``, ``report_records``; ``ReportCommand``
and ``run_report`` (``loopline report``).

``report_records`` replays a log in-process (``loopline evaluate``'s code, with the models and their score
rows), feeds the examples and the score rows to a :class:`~loopline.model.monitor.Monitor` (the object
a ``monitor`` worker serves), and ``write_report`` writes into the output folder:

* ``index.html``: the evaluation table (``evaluate``'s ``models``, whatever models ran), the counts,
  the newest drift figures, the alarms, and the plots;
* ``health.png``: AUC, NE and calibration per model over event-time windows;
* ``drift.png``: PSI per feature over windows (each against its reference) and the label rate;
* ``alarms.png``: each model's loss (a moving average over rows, by label time) with its ADWIN and
  Page-Hinkley alarms;
* ``transfer.png``: the transfer ratio of each ``vm:X`` over windows (a note when no VM ran);
* ``report.json``: the monitor's whole report and the evaluation output (without per-row data).

Plots are drawn with matplotlib's Agg backend (no display needed). Times on the axes are UTC.
"""

from __future__ import annotations

import datetime as dt
import html
import os
import sys
from dataclasses import dataclass

import numpy as np
import orjson

from loopline.errors import ConfigError
from loopline.model.health import example_loss
from loopline.model.monitor import Monitor, MonitorConfig
from loopline.settings import argument, nested, same_as, setting
from loopline.stream.app import WorkerConfig

from .evaluate import EvaluateCommand, vm_stage_config
from .source import JoinConfig, SourceConfig

__all__ = ["ReportConfig", "build_report", "write_report", "report_records", "ReportCommand", "run_report"]


@dataclass(frozen=True)
class ReportConfig:
    window_s: float = setting(86400.0, "event-time window of the figures, seconds", flag="every",
                              env="REPORT_EVERY")
    smooth_rows: int = 500  # rows in the moving average of the loss plot
    max_features: int = 12  # features drawn in the drift plot (the most drifted)

    def __post_init__(self):
        if not (isinstance(self.window_s, (int, float)) and self.window_s > 0):
            raise ConfigError(f"window_s: must be a positive number of seconds, got {self.window_s!r}")
        if not isinstance(self.smooth_rows, int) or self.smooth_rows < 1:
            raise ConfigError(f"smooth_rows: must be an integer >= 1, got {self.smooth_rows!r}")


def build_report(examples: list[dict], rows: list[dict], cfg: ReportConfig = ReportConfig()) -> Monitor:
    """A monitor fed with the examples and the score rows (in the order given)."""
    monitor = Monitor(MonitorConfig.with_window(cfg.window_s))
    monitor.observe_examples(examples)
    monitor.observe_scores(rows)
    return monitor


def _times(ts) -> list:
    return [dt.datetime.fromtimestamp(float(t), dt.timezone.utc) for t in ts]


def _figure(n_rows: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(n_rows, 1, figsize=(10, 3.2 * n_rows), sharex=True, squeeze=False)
    return plt, fig, [a[0] for a in axes]


def _save(plt, fig, path: str) -> None:
    import matplotlib.dates as mdates
    for ax in fig.axes:
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
        ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_health(report: dict, path: str) -> None:
    windows = report["health"]["windows"]
    models = sorted({m for w in windows for m in w["models"]})
    plt, fig, (a_auc, a_ne, a_cal) = _figure(3)
    for m in models:
        pts = [(w["start"] + w["end"]) / 2 for w in windows if m in w["models"]]
        vals = [w["models"][m] for w in windows if m in w["models"]]
        t = _times(pts)
        for ax, key in ((a_auc, "auc"), (a_ne, "ne"), (a_cal, "calibration")):
            ax.plot(t, [np.nan if v[key] is None else v[key] for v in vals], marker="o", label=m)
    a_auc.set_ylabel("AUC")
    a_ne.set_ylabel("NE")
    a_ne.axhline(1.0, color="grey", lw=0.8, ls="--")
    a_cal.set_ylabel("calibration")
    a_cal.axhline(1.0, color="grey", lw=0.8, ls="--")
    a_auc.set_title("Model health per event-time window")
    if models:
        a_auc.legend(loc="best", fontsize=8)
    _save(plt, fig, path)


def _plot_drift(report: dict, path: str, max_features: int) -> None:
    windows = [w for w in report["drift"]["windows"] if w["features"]]
    top = {}
    for w in windows:
        for name, f in w["features"].items():
            top[name] = max(top.get(name, 0.0), f["psi"])
    names = sorted(top, key=lambda n: -top[n])[:max_features]
    plt, fig, (a_psi, a_label) = _figure(2)
    t = _times([w["start"] for w in windows])
    for name in names:
        a_psi.plot(t, [w["features"].get(name, {}).get("psi", np.nan) for w in windows], marker="o", label=name)
    a_psi.set_yscale("symlog", linthresh=0.01)
    for level, text in ((0.1, "0.1 moderate"), (0.25, "0.25 large")):
        a_psi.axhline(level, color="grey", lw=0.8, ls="--")
        a_psi.text(0.005, level, text, transform=a_psi.get_yaxis_transform(), fontsize=7, va="bottom")
    a_psi.set_ylabel("PSI vs reference")
    a_psi.set_title(f"Feature drift (reference: {report['drift']['config']['reference']} window)")
    if names:
        a_psi.legend(loc="upper left", fontsize=7, ncol=2)
    all_w = report["drift"]["windows"]
    a_label.plot(_times([w["start"] for w in all_w]), [w["label"]["rate"] for w in all_w], marker="o", color="k")
    a_label.set_ylabel("label rate")
    _save(plt, fig, path)


def _plot_alarms(report: dict, rows: list[dict], path: str, smooth: int) -> None:
    models = sorted({m for r in rows for m in r["scores"]})
    plt, fig, axes = _figure(max(1, len(models)))
    alarms = report["health"]["alarms"]
    marks = {"adwin": ("v", "tab:red"), "page_hinkley": ("^", "tab:purple")}
    for ax, m in zip(axes, models):
        pts = [(r["label_ts"], example_loss(r["scores"][m], r["label"])) for r in rows if m in r["scores"]]
        if not pts:
            continue
        ts = np.array([p[0] for p in pts])
        loss = np.array([p[1] for p in pts])
        k = min(smooth, len(loss))
        avg = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(_times(ts[k - 1:]), avg, lw=1, color="tab:blue", label=f"{m} loss ({k}-row mean)")
        for det, (marker, color) in marks.items():
            at = [a["label_ts"] for a in alarms if a["model"] == m and a["detector"] == det]
            if at:
                y = np.interp(at, ts[k - 1:], avg)
                ax.scatter(_times(at), y, marker=marker, color=color, s=60, zorder=3, label=f"{det} alarm")
        ax.set_ylabel("log loss")
        ax.legend(loc="upper right", fontsize=7)
    axes[0].set_title("Loss over label time, with change-detector alarms")
    _save(plt, fig, path)


def _plot_transfer(report: dict, path: str) -> bool:
    windows = report["health"]["windows"]
    variants = sorted({x for w in windows for x in w["transfer"]})
    plt, fig, (ax,) = _figure(1)
    for x in variants:
        pts = [w for w in windows if w["transfer"].get(x, {}).get("tr") is not None]
        ax.plot(_times([(w["start"] + w["end"]) / 2 for w in pts]), [w["transfer"][x]["tr"] for w in pts],
                marker="o", label=x)
    ax.set_ylabel("transfer ratio")
    ax.set_title("FM-to-VM transfer ratio: (NE(vm:base) - NE(vm:X)) / (NE(vm:base) - NE(fm))")
    if variants:
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no VM models (vm:base and a vm:X) in this run", ha="center", va="center",
                transform=ax.transAxes)
    _save(plt, fig, path)
    return bool(variants)


def _table(rows: list[list], head: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return html.escape("" if v is None else str(v))
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows]
    return "\n".join(out) + "</table>"


def write_report(evaluation: dict, examples: list[dict], rows: list[dict], out_dir: str,
                 cfg: ReportConfig = ReportConfig(), title: str = "Loopline report") -> dict:
    """Write index.html, the PNGs and report.json into ``out_dir``; returns the paths and a summary."""
    os.makedirs(out_dir, exist_ok=True)
    report = build_report(examples, rows, cfg).report()
    images = {"health.png": "AUC, NE and calibration per model over time",
              "drift.png": "PSI per feature over time, and the label rate",
              "alarms.png": "Loss per model with change-detector alarms",
              "transfer.png": "Transfer ratio over time"}
    _plot_health(report, os.path.join(out_dir, "health.png"))
    _plot_drift(report, os.path.join(out_dir, "drift.png"), cfg.max_features)
    _plot_alarms(report, rows, os.path.join(out_dir, "alarms.png"), cfg.smooth_rows)
    has_vm = _plot_transfer(report, os.path.join(out_dir, "transfer.png"))

    models = evaluation.get("models") or {}
    keys = sorted({k for m in models.values() for k in m}, key=lambda k: (k != "n", k))
    model_table = _table([[name] + [m.get(k) for k in keys] for name, m in sorted(models.items())], ["model"] + keys)
    ev, ex = evaluation.get("events", {}), evaluation.get("examples", {})
    counts = _table([[ev.get("read"), ev.get("accepted"), ev.get("deadletter"), ex.get("total"), ex.get("positive"),
                      len(rows)]], ["events read", "accepted", "dead letters", "examples", "positives", "score rows"])
    s = report["summary"]
    feats = sorted(s["features"].items(), key=lambda kv: -kv[1]["psi"])
    drift_table = _table([[n, f["kind"], f["psi"], f.get("js"), f["psi_null"], f["n_ref"], f["n"]] for n, f in feats],
                         ["feature", "kind", "PSI", "JS (bits)", "PSI with no drift (about)", "n ref", "n"])
    alarm_table = _table([[a["model"], a["detector"], _times([a["label_ts"]])[0].strftime("%Y-%m-%d %H:%M"), a["n"]]
                          for a in report["health"]["alarms"][:200]], ["model", "detector", "label time (UTC)", "row"])
    window = s["window"]
    when = "" if window is None else (f" (window from {_times([window['start']])[0]:%Y-%m-%d %H:%M} UTC against "
                                      f"{_times([window['reference_start']])[0]:%Y-%m-%d %H:%M})")
    imgs = "\n".join(f'<figure><img src="{name}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}'
                     f"</figcaption></figure>" for name, alt in images.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}td:first-child{{text-align:left}}img{{max-width:100%;border:1px solid #ddd}}
figure{{margin:1em 0}}figcaption{{color:#666;font-size:0.9em}}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Evaluation</h2>{model_table}{counts}
<h2>Plots</h2>{imgs}
<h2>Newest feature drift{html.escape(when)}</h2>{drift_table}
<h2>Change-detector alarms ({len(report['health']['alarms'])})</h2>{alarm_table}
<p>Windows of {cfg.window_s:g} s of event time. {'' if has_vm else 'No VM models ran, so no transfer ratio.'}</p>
</body></html>
"""
    with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
        f.write(page)
    slim = {k: v for k, v in evaluation.items() if k not in ("scores", "examples_list")}
    with open(os.path.join(out_dir, "report.json"), "wb") as f:
        f.write(orjson.dumps({"evaluation": slim, "monitor": report}, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return {"out": out_dir, "index": os.path.join(out_dir, "index.html"), "images": sorted(images),
            "models": sorted(models), "windows": len(report["health"]["windows"]),
            "alarms": len(report["health"]["alarms"]), "features": len(s["features"])}


def report_records(records, attribution, out_dir: str, cfg: ReportConfig = ReportConfig(),
                   title: str = "Loopline report", progress: bool = True, vm_cfg=None, partitions: int = 4) -> dict:
    """Evaluate the log with the models (the VM variants of ``vm_cfg`` too) and their score rows, then
    write the report."""
    from .evaluate import evaluate_records
    evaluation = evaluate_records(records, partitions, cfg=attribution, progress=progress, models=True,
                                  scores=True, keep_examples=True, vm_cfg=vm_cfg)
    if progress:
        print("report: drawing", file=sys.stderr, flush=True)
    return write_report(evaluation, evaluation.get("examples_list", []), evaluation.get("scores", []), out_dir,
                        cfg, title)


@dataclass(frozen=True)
class ReportCommand:
    """``loopline report``: the log, the models, the figures' window, and where the page goes."""

    source: SourceConfig = nested(SourceConfig)
    out: str = argument(None, "folder for index.html and the PNGs", metavar="DIR", required=True)
    figures: ReportConfig = nested(ReportConfig)
    variants: str | None = same_as(EvaluateCommand, "variants")
    partitions: int = same_as(WorkerConfig, "partitions")
    join: JoinConfig = nested(JoinConfig)


def run_report(cfg: ReportCommand, progress: bool = True) -> dict:
    """Replay the log with the models and write the report into ``cfg.out``."""
    return report_records(cfg.source.records(), cfg.join.attribution(cfg.source.dataset), cfg.out, cfg.figures,
                          title=f"Loopline report: {cfg.source.name}", progress=progress,
                          vm_cfg=vm_stage_config(cfg.variants), partitions=cfg.partitions)
