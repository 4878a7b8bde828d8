"""``loopline bench drift``: the change detectors and PSI on generated streams with a known shift.

Public surface: ``bench_drift``, ``shift_study``, ``baseline_score_rows``.

For each seed: ``loopline generate`` a log whose distribution shifts at ``shift_ts`` (``shift_at=0.5``;
``shift_strength=1.0``, stronger than the generator's default 0.6, whose effect on a model's loss is
within the daily cycle's swing at this size), run ingest and attribution in-process (``evaluate``'s
code; a one-hour attribution window, which holds every generated click, so the loss around the shift
is not mixed with day-old negatives), then the **logistic baseline** (the FM stage's ``lr``: same
featurizer, trainer and micro-batches) predicts and learns in canonical order. The baseline stands in
for the FM because it runs about fifty times faster here; the detectors only see a loss stream.

Measured per detector (ADWIN and Page-Hinkley, each at its default, a more sensitive and a stricter
setting) on the
baseline's per-example log loss, in label-time order:

* ``false_alarms``: alarms whose ``label_ts`` is before the shift, and the rate per day before it;
* ``delay_s``: event time from the shift to the first alarm after it (``label_ts`` of the row that
  fired), and ``delay_examples``, the rows after the shift up to it; a seed counts as ``detected``
  when that delay is at most ``bound_s`` (one day).

And the drift figures of ``model/drift.py`` with daily windows aligned to the log's start (so the
shift opens a window): each feature's PSI in the first window after the shift against the one
before, and its largest PSI between any other two neighbouring windows; and the label-rate z score.
Campaigns and ads are the features the generator shifts; attributes, slot, hour and vertical it does
not.

Medians over seeds go under ``summary``. ``bench_drift`` writes the JSON.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import orjson

from loopline.model.detectors import ADWIN, ADWINConfig, PageHinkley, PageHinkleyConfig
from loopline.model.drift import DriftConfig, FeatureDrift
from loopline.model.health import HealthConfig, ModelHealth, example_loss
from loopline.state.attribution import AttributionConfig

__all__ = ["bench_drift", "shift_study", "baseline_score_rows"]

SHIFTED = ("campaign", "ad")  # what the generator's shift changes among the drift features
DETECTORS = {  # name -> a fresh detector: each at its default, more sensitive, and stricter
    "adwin": lambda: ADWIN(),
    "adwin_sensitive": lambda: ADWIN(ADWINConfig(delta=0.02)),
    "adwin_strict": lambda: ADWIN(ADWINConfig(delta=0.0002)),
    "page_hinkley": lambda: PageHinkley(),
    "page_hinkley_sensitive": lambda: PageHinkley(PageHinkleyConfig(threshold=50.0)),
    "page_hinkley_strict": lambda: PageHinkley(PageHinkleyConfig(threshold=200.0)),
}
DAY = 86400.0


def baseline_score_rows(examples: list[dict], model: str = "lr") -> list[dict]:
    """Score rows of the logistic baseline, predicting each micro-batch before learning it, over the
    examples in canonical order (the FM stage's ``lr`` without the FM)."""
    from loopline.model.baseline import LogisticBaseline
    from loopline.model.features import Featurizer
    from loopline.model.pipeline import canonical_order
    from loopline.model.trainer import OnlineTrainer, TrainerConfig

    tcfg = TrainerConfig()
    featurizer, trainer = Featurizer(), OnlineTrainer(LogisticBaseline(), tcfg)
    rows = []
    order = canonical_order(examples)
    for i in range(0, len(order), tcfg.batch_size):
        batch = order[i:i + tcfg.batch_size]
        p = trainer.step(featurizer.batch(batch, [[] for _ in batch]))
        rows += [{"id": e["id"], "user": e["user"], "ts": e["ts"], "label_ts": e["label_ts"],
                  "vertical": e.get("vertical"), "label": int(e["label"]), "scores": {model: float(q)}}
                 for e, q in zip(batch, p)]
    return rows


def _detector_run(rows: list[dict], model: str, shift_ts: float, start_ts: float, bound_s: float) -> dict:
    out = {}
    losses = [example_loss(r["scores"][model], r["label"]) for r in rows]
    label_ts = [r["label_ts"] for r in rows]
    first_after = next((i for i, t in enumerate(label_ts) if t >= shift_ts), len(rows))
    for name, make in DETECTORS.items():
        det = make()
        alarms = [i for i, x in enumerate(losses) if det.update(x)]
        before = [i for i in alarms if label_ts[i] < shift_ts]
        after = [i for i in alarms if label_ts[i] >= shift_ts]
        delay = label_ts[after[0]] - shift_ts if after else None
        out[name] = {"false_alarms": len(before),
                     "false_alarms_per_day": round(len(before) / max((shift_ts - start_ts) / DAY, 1e-9), 3),
                     "delay_s": None if delay is None else round(delay, 1),
                     "delay_examples": after[0] - first_after if after else None,
                     "detected": delay is not None and delay <= bound_s, "alarms_after": len(after)}
    return out


def _psi_run(examples: list[dict], start_ts: float, shift_ts: float) -> dict:
    d = FeatureDrift(DriftConfig(window_s=DAY, origin=start_ts))
    d.update(examples)
    windows = d.report()["windows"]
    at = next((w for w in windows if abs(w["start"] - shift_ts) < 1e-6 and w["features"]), None)
    if at is None:
        return {}
    feats = {}
    for name, f in at["features"].items():
        other = [w["features"][name]["psi"] for w in windows if w is not at and name in w["features"]]
        feats[name] = {"psi_at_shift": f["psi"], "psi_elsewhere_max": max(other) if other else None,
                       "psi_null": f["psi_null"], "shifted": name in SHIFTED}
    return {"features": feats, "label_z_at_shift": at["label"].get("z")}


def shift_study(seeds=(1, 2, 3), users: int = 3000, days: float = 8.0, shift_strength: float = 1.0,
                bound_s: float = DAY, progress: bool = True) -> dict:
    from .evaluate import evaluate_records
    from .eventlog import read_log
    from .generate import GenerateConfig, write_log

    runs = []
    t_start = time.perf_counter()
    attribution = AttributionConfig(window_s=3600.0, bucket_s=600.0)
    for n, seed in enumerate(seeds, 1):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="loopline-drift-") as tmp:
            path = os.path.join(tmp, "events.jsonl")
            gen = write_log(GenerateConfig(users=users, days=days, seed=seed, shift_strength=shift_strength), path)
            ev = evaluate_records(read_log(path), cfg=attribution, keep_examples=True)
        examples = ev["examples_list"]
        rows = baseline_score_rows(examples)
        health = ModelHealth(HealthConfig(window_s=DAY, origin=gen["start_ts"], detectors=()))
        health.update(rows)
        runs.append({"seed": seed, "examples": len(examples), "shift_ts": gen["shift_ts"],
                     "start_ts": gen["start_ts"],
                     "detectors": _detector_run(rows, "lr", gen["shift_ts"], gen["start_ts"], bound_s),
                     "drift": _psi_run(examples, gen["start_ts"], gen["shift_ts"]),
                     "windows": [{"start": w["start"], **{k: w["models"]["lr"][k] for k in ("auc", "ne", "calibration", "n")}}
                                 for w in health.report()["windows"] if "lr" in w["models"]],
                     "seconds": round(time.perf_counter() - t0, 1)})
        if progress:
            el = time.perf_counter() - t_start
            print(f"bench drift: seed {seed} ({n}/{len(seeds)}), {len(examples)} examples, {runs[-1]['seconds']}s, "
                  f"ETA {el / n * (len(seeds) - n):.0f}s", file=sys.stderr, flush=True)
    return {"config": {"seeds": list(seeds), "users": users, "days": days, "shift_strength": shift_strength,
                       "shift_at": 0.5, "attribution_window_s": 3600.0, "bound_s": bound_s, "model": "lr",
                       "detectors": {"adwin": "delta=0.002", "adwin_sensitive": "delta=0.02",
                                     "adwin_strict": "delta=0.0002",
                                     "page_hinkley": "delta=0.005 threshold=100 memory=20000",
                                     "page_hinkley_sensitive": "threshold=50", "page_hinkley_strict": "threshold=200"}},
            "summary": _summarize(runs), "runs": runs}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None


def _summarize(runs: list[dict]) -> dict:
    det = {}
    for name in DETECTORS:
        rs = [r["detectors"][name] for r in runs]
        det[name] = {"detected": sum(x["detected"] for x in rs), "seeds": len(rs),
                     "median_delay_s": _median([x["delay_s"] for x in rs if x["detected"]]),
                     "median_delay_examples": _median([x["delay_examples"] for x in rs if x["detected"]]),
                     "false_alarms_total": sum(x["false_alarms"] for x in rs),
                     "median_false_alarms_per_day": _median([x["false_alarms_per_day"] for x in rs])}
    feats = {}
    names = sorted({f for r in runs for f in r["drift"].get("features", {})})
    for f in names:
        vals = [r["drift"]["features"][f] for r in runs if f in r["drift"].get("features", {})]
        feats[f] = {"shifted": f in SHIFTED, "median_psi_at_shift": _median([v["psi_at_shift"] for v in vals]),
                    "median_psi_elsewhere_max": _median([v["psi_elsewhere_max"] for v in vals])}
    shifted = [v["median_psi_at_shift"] for v in feats.values() if v["shifted"]]
    unshifted = [v["median_psi_at_shift"] for v in feats.values() if not v["shifted"]]
    return {"detectors": det, "psi": feats,
            "min_psi_shifted": min(shifted) if shifted else None,
            "max_psi_unshifted": max(unshifted) if unshifted else None,
            "median_label_z_at_shift": _median([r["drift"].get("label_z_at_shift") for r in runs])}


def bench_drift(repeats: int = 3, out_path: str = "bench-drift.json", progress: bool = True, **kw) -> dict:
    """The shift study over ``repeats`` seeds (1..repeats), written to ``out_path``."""
    out = {"benchmark": "drift", **shift_study(seeds=tuple(range(1, repeats + 1)), progress=progress, **kw)}
    with open(out_path, "wb") as f:
        f.write(orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return out

