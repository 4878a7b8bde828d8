"""``loopline demo``: the main job end to end on the embedded broker.

Public surface: ``DemoConfig``, ``run_demo``.

Starts a Tansu broker on a free loopback port and one worker (role ``all``), generates a small
synthetic log with some malformed lines, replays it, waits for the worker's end-of-log counts, checks
them against the in-process ``evaluate`` of the same file, and stops everything it started.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
import tempfile
import time
from pathlib import Path

from loopline.stream.app import TOPICS

from .broker import EmbeddedBroker, create_topics
from .evaluate import evaluate_records
from .eventlog import read_log
from .generate import GenerateConfig, write_log
from .replay import collect_results, replay
from .worker import WorkerProcess

__all__ = ["DemoConfig", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """What ``loopline demo`` generates and where it keeps its files (a temporary folder by default)."""

    users: int = 300
    days: float = 3.0
    seed: int = 1
    partitions: int = 4
    workdir: str | None = None


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"demo: {msg}", file=sys.stderr, flush=True)


def run_demo(cfg: DemoConfig = DemoConfig(), progress: bool = True) -> dict:
    users, days, seed, partitions = cfg.users, cfg.days, cfg.seed, cfg.partitions
    with tempfile.TemporaryDirectory(prefix="loopline-demo-") as tmp:
        work = Path(cfg.workdir or tmp)
        log_path = work / "events.jsonl"
        gen = write_log(GenerateConfig(users=users, days=days, seed=seed, malformed=0.01), str(log_path))
        records = read_log(str(log_path))
        _say(f"generated {len(records)} events ({gen['malformed_total']} malformed) in {log_path}", progress)
        broker = EmbeddedBroker(log_path=str(work / "tansu.log")).start()
        worker = None
        try:
            _say(f"broker (Tansu) on {broker.url}", progress)
            create_topics(broker.bootstrap, {t: partitions for t in TOPICS})
            worker = WorkerProcess(broker.url, str(work / "worker"), partitions).start()
            worker.wait_ready()
            _say(f"worker up (pid {worker.proc.pid}, http://127.0.0.1:{worker.port}/ingest/)", progress)
            t0 = time.perf_counter()
            sent = asyncio.run(replay(broker.bootstrap, records, partitions, progress=progress))
            got = asyncio.run(collect_results(broker.bootstrap, partitions, sent["run_id"], len(records),
                                              timeout=300, progress=progress))
            elapsed = time.perf_counter() - t0
        finally:
            how = worker.stop() if worker is not None else "not started"
            broker.stop()
            _say(f"worker {how}; broker stopped", progress)
        expected = evaluate_records(records, partitions)
        ev, ex = got["events"], got["examples"]
        return {
            "accepted": ev["accepted"], "deadlettered": ev["deadletter"], "by_reason": ev["by_reason"],
            "examples": ex["total"], "positives": ex["positive"], "positive_rate": ex["positive_rate"],
            "events_per_s": round(len(records) / elapsed, 1), "seconds": round(elapsed, 2),
            "matches_evaluate": all(got[k] == expected[k] for k in ("events", "examples")),
            "duplicates_removed": got["duplicates_removed"], "worker_stop": how,
        }
