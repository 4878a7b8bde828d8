"""``loopline bench scale``: the ingest role with 1 and 2 workers in one consumer group, on the real broker,
and the FM stage over 1 and 2 torch.distributed ranks.

Public surface: ``bench_scale``.

**Ingest.** Each repeat and each worker count gets a fresh embedded broker. The workers (role
``ingest``) start first and settle into the group, each with its share of the partitions. Then the
generated log is replayed. The time runs from the first processed batch until the workers' ``/ingest/``
views together count every event: ``ops/bench.py``'s ``seconds_for``, summed over the members. The
outputs are then checked: every event was read once and examples came out.

**The FM.** The examples of the same log (in-process ingest) go through the FM stage (``evaluate``'s:
history, features, the FM, the baseline, DAS and codes; no VMs) with ``--fm-ranks`` 1 and 2; the time
is the stage's run, rank 1's start-up left out. With 2 ranks the JSON also gives the bytes through rank
0's link per training step, by kind (``RankedTrainer.traffic``: the batch sent to the other rank, the
dense gradients' all-reduce, the embedding all-to-all, the outputs gathered), and checks that the two
FMs agree (AUC within 0.005).

The JSON has each run, the medians per worker or rank count, and ``speedup`` (2 over 1) for each.

On the 2-core development machine, two workers (or ranks) share the two cores with the broker and the
replay, or with rank 0's own featurizing, so the speedups show what a second member buys there, not what
it buys on a machine of its own (``docs/scaling.md`` plans beyond).
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

from loopline.stream.app import TOPICS

from .bench import bench_log, seconds_for
from .broker import EmbeddedBroker, create_topics
from .evaluate import evaluate_records
from .replay import collect_results, replay
from .source import JoinConfig
from .worker import WorkerProcess

__all__ = ["bench_scale"]

SETTLE_S = 5.0  # after the last member serves: the group's join and assignment


def _ingest_run(records, workers: int, partitions: int, work: Path) -> float:
    work.mkdir(parents=True)
    with EmbeddedBroker(log_path=str(work / "tansu.log")) as broker:
        create_topics(broker.bootstrap, {t: partitions for t in TOPICS})
        ws = [WorkerProcess(broker.url, str(work / f"ingest{i}"), partitions, extra=("--role", "ingest")).start()
              for i in range(workers)]
        try:
            for w in ws:
                w.wait_ready()
            time.sleep(SETTLE_S)
            asyncio.run(replay(broker.bootstrap, records, partitions, run_id="scale", progress=False))

            def failure():
                dead = [w for w in ws if w.proc.poll() is not None]
                return f"an ingest worker died:\n{dead[0].tail()}" if dead else None
            seconds = seconds_for(len(records), lambda: sum(w.processed() for w in ws), failure)
            got = asyncio.run(collect_results(broker.bootstrap, partitions, "scale", len(records), timeout=300))
            if got["events"]["read"] != len(records) or got["examples"]["total"] == 0:
                raise RuntimeError(f"the {workers}-worker run lost events: {got['events']}")
            return seconds
        finally:
            for w in ws:
                w.stop()


def _fm_run(examples: list, ranks: int, window_s: float) -> tuple[float, dict, dict]:
    """Seconds of the FM stage's run over ``examples`` with ``ranks`` ranks, its report, and the
    traffic per step through rank 0's link (empty for one rank)."""
    from loopline.model.delay import DelayConfig
    from loopline.model.fm_settings import RanksConfig
    from loopline.model.pipeline import FMStage, FMStageConfig
    from loopline.state.history import HistoryStore

    with tempfile.TemporaryDirectory(prefix="loopline-bench-history-") as tmp, HistoryStore(tmp) as history:
        stage = FMStage(history, FMStageConfig(delay=DelayConfig(window_s=window_s), ranks=RanksConfig(ranks=ranks)))
        try:
            t0 = time.perf_counter()
            stage.run(examples)
            seconds = time.perf_counter() - t0
        finally:
            stage.close()
        steps = max(1, stage.fm.version)
        traffic = {k: round(v / steps) for k, v in getattr(stage.fm, "traffic", {}).items()}
        return seconds, stage.report(), traffic


def bench_scale(n_events: int = 20000, repeats: int = 3, partitions: int = 4, out_path: str | None = None,
                progress: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="loopline-bench-") as tmp:
        work = Path(tmp)
        records = bench_log(work, n_events)  # bench ingest's log
        join = JoinConfig().attribution()
        examples = evaluate_records(records, partitions, join, keep_examples=True)["examples_list"]
        runs, traffic = [], {}
        for r in range(repeats):
            run = {}
            for n in (1, 2):
                seconds = _ingest_run(records, n, partitions, work / f"r{r}-w{n}")
                run[f"ingest_{n}_events_per_s"] = round(len(records) / seconds, 1)
            run["speedup"] = round(run["ingest_2_events_per_s"] / run["ingest_1_events_per_s"], 3)
            aucs = {}
            for n in (1, 2):
                seconds, report, traffic = _fm_run(examples, n, join.window_s)
                run[f"fm_{n}_examples_per_s"] = round(len(examples) / seconds, 1)
                aucs[n] = report["fm"]["auc"]
            if abs(aucs[2] - aucs[1]) >= 0.005:
                raise RuntimeError(f"the 2-rank FM's AUC {aucs[2]} is not the 1-rank FM's {aucs[1]}")
            run["fm_speedup"] = round(run["fm_2_examples_per_s"] / run["fm_1_examples_per_s"], 3)
            runs.append(run)
            if progress:
                print(f"bench scale: repeat {r + 1}/{repeats}: {run}", file=sys.stderr, flush=True)
    out = {"benchmark": "scale", "events": len(records), "partitions": partitions, "examples": len(examples),
           "repeats": runs, **{f"median_{k}": statistics.median(r[k] for r in runs) for k in runs[0]},
           "fm_2_bytes_per_step": traffic,
           "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    if out_path:
        Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
    return out
