"""Data-source quality benchmark: recovery, interval coverage and time of the fits over several seeds.

Public surface: ``bench_quality``.

For each seed, ``loopline generate`` with :data:`~loopline.ops.generate.QUALITY_SOURCES` (a good, a
poor and an adversarial source of known a and b) goes through the offline path of ``loopline quality``
(ingest cores, ``audience`` values, q_c counts), then each method fits every source:

* ``ls``: constrained impression-weighted least squares with a campaign bootstrap (percentile intervals);
* ``em``: the binomial likelihood by EM, Wald intervals inflated by the Pearson dispersion.

Per method: mean absolute error of a and b, the fraction of intervals (a and b of every source and seed)
that hold the true value at the stated coverage, the mean interval width, the fraction of seeds whose
sources are ranked in the true order (by a - b), and the median seconds per fit (the ``ls`` time
includes its bootstrap). Errors and coverage are given against the sources' parameters a, b and
against their realized values in the log (``a_realized``: the fraction of labelled impressions whose
user is truly in): users are drawn once per log and heavy users weigh a lot, so the log's own a and b
differ from the parameters by more than the measurement noise the intervals describe.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import replace

import numpy as np

from loopline.errors import ConfigError
from loopline.model.quality import METHODS, QualityConfig, assess

from .eventlog import order_records
from .generate import QUALITY_SOURCES, GenerateConfig, _Log  # _Log: the lines and the summary of one log
from .quality import quality_counts_from_records

__all__ = ["bench_quality"]


def _one(seed: int, gcfg: GenerateConfig, qcfg: QualityConfig) -> dict:
    cfg = replace(gcfg, seed=seed)
    log = _Log(cfg)
    truth = {s["source"]: s for s in log.summary()["quality"]["sources"]}
    records = order_records(line for line, _ in log.lines())
    agg, _ = quality_counts_from_records(records)
    rep = assess(agg, qcfg, METHODS)
    rows = {r["source"]: r for r in rep["sources"]}
    true_order = sorted(truth, key=lambda s: -(truth[s]["a"] - truth[s]["b"]))
    out = {"seed": seed, "fits": {}}
    for m in METHODS:
        fits, gaps = {}, {}
        for name, tr in truth.items():
            r = rows.get(name, {}).get("methods", {}).get(m)
            if r is None:
                continue
            gaps[name] = r["a"] - r["b"]
            for kind, iv in r["intervals"].items():
                fits.setdefault(kind, {})[name] = {
                    "a": r["a"], "b": r["b"], "a_ci": iv["a_ci"], "b_ci": iv["b_ci"], "seconds": r["seconds"],
                    "a_true": tr["a"], "b_true": tr["b"], "a_realized": tr["a_realized"],
                    "b_realized": tr["b_realized"]}
        ranked = sorted(gaps, key=lambda s: -gaps[s]) == true_order
        for kind, f in fits.items():
            out["fits"][f"{m}/{kind}"] = {"sources": f, "ranked_right": ranked,
                                          "verdicts": {s: rows[s]["verdict"] for s in rows}}
    return out


def _summarize(runs: list[dict], key: str) -> dict:
    err = {"a": [], "b": []}
    cover = {"param": [], "realized": []}
    width, secs = [], []
    for run in runs:
        for f in run["fits"][key]["sources"].values():
            secs.append(f["seconds"])
            for k in ("a", "b"):
                err[k].append(abs(f[k] - f[f"{k}_true"]))
                if f[f"{k}_ci"] is None:
                    cover["param"].append(False)
                    cover["realized"].append(False)
                    continue
                lo, hi = f[f"{k}_ci"]
                cover["param"].append(lo <= f[f"{k}_true"] <= hi)
                cover["realized"].append(lo <= f[f"{k}_realized"] <= hi)
                width.append(hi - lo)
    return {"mae_a": float(np.mean(err["a"])), "mae_b": float(np.mean(err["b"])),
            "coverage": float(np.mean(cover["param"])), "coverage_realized": float(np.mean(cover["realized"])),
            "mean_ci_width": float(np.mean(width)) if width else None,
            "ranked_right": float(np.mean([r["fits"][key]["ranked_right"] for r in runs])),
            "median_ms_per_fit": 1000 * statistics.median(secs)}


def bench_quality(seeds: int = 10, users: int = 2000, days: float = 7.0, campaigns: int = 40,
                  out_path: str | None = "bench-quality.json", progress: bool = True,
                  qcfg: QualityConfig = QualityConfig()) -> dict:
    """Run the comparison over ``seeds`` generated logs; write and return the JSON."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds: must be an integer >= 1, got {seeds!r}")
    gcfg = GenerateConfig(users=users, days=days, campaigns=campaigns, quality_sources=QUALITY_SOURCES)
    runs = []
    t0 = time.perf_counter()
    for i in range(seeds):
        runs.append(_one(i, gcfg, qcfg))
        if progress:
            rate = (i + 1) / (time.perf_counter() - t0)
            print(f"bench quality: seed {i + 1}/{seeds}, {rate:.2f} seeds/s, ETA {(seeds - i - 1) / rate:.0f}s",
                  file=sys.stderr, flush=True)
    out = {"bench": "quality", "seeds": seeds, "users": users, "days": days, "campaigns": campaigns,
           "coverage_nominal": qcfg.coverage, "bootstrap": qcfg.bootstrap,
           "sources": [{"source": s, "segment": g, "a": a, "b": b} for s, g, a, b in QUALITY_SOURCES],
           "methods": {k: _summarize(runs, k) for k in runs[0]["fits"]},
           "verdicts": {s: sorted({r["fits"]["ls/users"]["verdicts"][s] for r in runs if "ls/users" in r["fits"]})
                        for s, _, _, _ in QUALITY_SOURCES},
           "machine": {"python": platform.python_version(), "cpu": platform.machine()},
           "runs": runs}
    if out_path:
        with open(out_path, "w") as f:
            json.dump(out, f, indent=1)
    return out
