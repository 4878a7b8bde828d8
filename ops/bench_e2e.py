"""``loopline bench e2e``: the whole loop in a role ``all`` worker against ``loopline evaluate`` of the
same log, in one run.

Public surface: ``bench_e2e``.

Each repeat times, on the same generated log:

* ``evaluate``: :func:`~loopline.ops.evaluate.evaluate_records` in this process (ingest, attribution,
  the FM stage and the worker's VM variants), from the first line read to the last VM step;
* ``worker``: a fresh embedded broker holds the whole log (replayed with its end-of-log mark before the
  worker starts); one worker of role ``all`` (``--evaluation``) is started, and the clock runs from
  its process start to the vm role's report on ``models.status`` (published once the vm has trained
  every step of the fm's finished run: its last VM step). Start-up (imports, group joins, the fm's and
  vm's catch-up) is part of the worker's time, as it is of a user's.

``ratio`` is worker seconds over evaluate seconds (the goal: at most 1.3); the worker's models must
equal evaluate's (``same_numbers``), or the benchmark says so. Medians over ``repeats``. Each repeat's
``timeline`` says where the worker's time went, in seconds from its process start, from the brokers'
timestamps of the roles' own messages: ``fm_started``/``vm_started`` (their catch-up read done),
``ingest_done`` (the last ingest partition's end-of-log counts), ``fm_finished`` and ``vm_finished``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

from loopline.stream.app import STATUS_TOPIC, TOPICS

from .broker import EmbeddedBroker, create_topics
from .eventlog import read_log
from .generate import GenerateConfig, write_log
from .replay import read_topic, replay
from .worker import WorkerProcess

__all__ = ["bench_e2e"]

VARIANTS = ("base", "loopfm+kd")  # the worker's default VM variants (WorkerConfig.vm_variants)
METRICS = ("n", "auc", "ne", "logloss")


def _evaluate(records, partitions: int) -> tuple[float, dict]:
    from loopline.model.verticals import VMStageConfig

    from .evaluate import evaluate_records
    t0 = time.perf_counter()
    out = evaluate_records(records, partitions, models=True, vm_cfg=VMStageConfig(variants=VARIANTS))
    return time.perf_counter() - t0, out["models"]


async def _vm_report(bootstrap: str, since_ms: int, partitions: int) -> tuple[int, dict, dict] | None:
    """``(the vm's report time, the models, the timeline in ms)`` once both model roles finished."""
    fm = vm = None
    times: dict = {}
    for m in await read_topic(bootstrap, STATUS_TOPIC, 1):
        st = orjson.loads(m.value)
        if m.timestamp < since_ms or st.get("role") not in ("fm", "vm"):
            continue
        times[f"{st['role']}_{st.get('event')}"] = m.timestamp
        if st.get("event") == "finished":
            if st["role"] == "fm":
                fm = st
            else:
                vm = (m.timestamp, st)
    if vm is None or fm is None:
        return None
    done = [m.timestamp for m in await read_topic(bootstrap, "ingest.status", partitions) if m.timestamp >= since_ms]
    if done:
        times["ingest_done"] = max(done)
    return vm[0], {**fm["models"], **vm[1]["models"]}, times


def _worker(records, partitions: int, work: Path, timeout: float) -> tuple[float, dict, dict]:
    work.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker(log_path=str(work / "tansu.log")) as broker:
        create_topics(broker.bootstrap, {**{t: partitions for t in TOPICS}, STATUS_TOPIC: 1})
        asyncio.run(replay(broker.bootstrap, records, partitions, run_id="e2e", progress=False))
        start_ms = int(time.time() * 1000)
        w = WorkerProcess(broker.url, str(work / "worker"), partitions).start()
        try:
            deadline = time.monotonic() + timeout
            while (got := asyncio.run(_vm_report(broker.bootstrap, start_ms, partitions))) is None:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"the worker died:\n{w.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no vm report within {timeout:.0f}s:\n{w.tail()}")
                time.sleep(0.5)
        finally:
            w.stop()
    report_ms, models, times = got
    order = ("fm_started", "vm_started", "ingest_done", "fm_finished", "vm_finished")
    timeline = {k: round((times[k] - start_ms) / 1000.0, 2) for k in order if k in times}
    return (report_ms - start_ms) / 1000.0, models, timeline


def bench_e2e(n_events: int = 20000, repeats: int = 3, partitions: int = 4, out_path: str | None = None,
              progress: bool = True, timeout: float = 1800.0) -> dict:
    """Run the benchmark (see the module docstring); the JSON is written to ``out_path`` too."""
    users = max(50, int(n_events / 20))  # the generator makes about 20 events per user over 7 days
    runs = []
    with tempfile.TemporaryDirectory(prefix="loopline-e2e-") as tmp:
        work = Path(tmp)
        write_log(GenerateConfig(users=users, days=7, seed=3, malformed=0.01), str(work / "e2e.jsonl"))
        records = read_log(str(work / "e2e.jsonl"))[:n_events]
        for r in range(repeats):
            ev_s, want = _evaluate(records, partitions)
            if progress:
                print(f"bench e2e: repeat {r + 1}/{repeats}: evaluate {ev_s:.1f}s; starting the worker",
                      file=sys.stderr, flush=True)
            wk_s, got, timeline = _worker(records, partitions, work / f"run{r}", timeout)
            same = set(got) == set(want) and all(
                {k: got[n][k] for k in METRICS} == {k: want[n][k] for k in METRICS} for n in want)
            run = {"events": len(records), "evaluate_s": round(ev_s, 2), "worker_s": round(wk_s, 2),
                   "ratio": round(wk_s / ev_s, 3), "same_numbers": same, "timeline": timeline}
            runs.append(run)
            if progress:
                print(f"bench e2e: repeat {r + 1}/{repeats}: {run}", file=sys.stderr, flush=True)
    out = {"benchmark": "e2e", "events": len(records), "partitions": partitions, "variants": list(VARIANTS),
           "repeats": runs, "median_evaluate_s": statistics.median(r["evaluate_s"] for r in runs),
           "median_worker_s": statistics.median(r["worker_s"] for r in runs),
           "median_ratio": statistics.median(r["ratio"] for r in runs),
           "same_numbers": all(r["same_numbers"] for r in runs), "goal_ratio": 1.3,
           "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                       "load_avg_1m": round(os.getloadavg()[0], 2)}}
    if out_path:
        Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
    return out
