"""``loopline bench scale``: the ingest role with 1 and 2 workers in one consumer group, on the real broker.

Public surface: ``bench_scale``.

Each repeat and each worker count gets a fresh embedded broker. The workers (role ``ingest``) start
first and settle into the group, each with its share of the partitions. Then the generated log is
replayed. The time runs from the first processed batch until the workers' ``/ingest/`` views together
count every event: ``ops/bench.py``'s ``seconds_for``, summed over the members. The outputs are then checked:
every event was read once and examples came out. The JSON has each run, the median events/s per worker
count, and ``speedup`` (2 workers over 1).

What this does not measure yet: the FM with 1 and 2 ranks (issue 15). The FM is one process, and
``docs/scaling.md`` plans the distributed version from per-core rates.

On the 2-core development machine, two workers share the two cores with the broker and the replay, so
the speedup shows what a second member buys there, not what it buys on a machine of its own.
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
from .replay import collect_results, replay
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


def bench_scale(n_events: int = 20000, repeats: int = 3, partitions: int = 4, out_path: str | None = None,
                progress: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="loopline-bench-") as tmp:
        work = Path(tmp)
        records = bench_log(work, n_events)  # bench ingest's log
        runs = []
        for r in range(repeats):
            run = {}
            for n in (1, 2):
                seconds = _ingest_run(records, n, partitions, work / f"r{r}-w{n}")
                run[f"ingest_{n}_events_per_s"] = round(len(records) / seconds, 1)
            run["speedup"] = round(run["ingest_2_events_per_s"] / run["ingest_1_events_per_s"], 3)
            runs.append(run)
            if progress:
                print(f"bench scale: repeat {r + 1}/{repeats}: {run}", file=sys.stderr, flush=True)
    out = {"benchmark": "scale", "events": len(records), "partitions": partitions, "repeats": runs,
           "median_ingest_1_events_per_s": statistics.median(r["ingest_1_events_per_s"] for r in runs),
           "median_ingest_2_events_per_s": statistics.median(r["ingest_2_events_per_s"] for r in runs),
           "median_speedup": statistics.median(r["speedup"] for r in runs),
           "fm_ranks": "not measured: the FM runs as one process (issue 15; docs/scaling.md)",
           "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    if out_path:
        Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
    return out
