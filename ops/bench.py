"""``loopline bench ingest``: ingest + attribution throughput on the real broker, as a ratio to raw
aiokafka consume-and-produce of the same messages in the same run.

Public surface: ``bench_ingest``, ``raw_consume_produce``, and for the other broker benchmarks
``seconds_for`` (their timing) and ``bench_log`` (their generated log).

Each repeat starts a fresh embedded broker, preloads the same generated log into an input topic, and
times (a) a plain aiokafka consumer-group member that reads every message and produces one output per
message (the floor any Kafka stream processor pays), (b) the Faust floor (``ops/faust_floor.py``: a
Faust agent with the ingest role's batches that forwards each message and does nothing else; its
``faust_ratio`` bounds what ingest can reach while it keeps Faust's delivery and sends), and (c) one
Loopline worker (role ``ingest``) processing the same backlog, from its first processed batch until
its ``/ingest/`` view counts every event as processed (group joins and start-up are excluded from all
three; the outputs are then checked). The JSON has every repeat and the medians; ``--profile`` also runs
the worker under cProfile and groups its time by layer.
"""

from __future__ import annotations

import asyncio
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from loopline.stream.app import TOPICS

from .broker import EmbeddedBroker, create_topics
from .eventlog import read_log
from .generate import GenerateConfig, write_log
from .replay import collect_results, replay
from .worker import WorkerProcess

__all__ = ["bench_ingest", "raw_consume_produce", "seconds_for", "bench_log"]


async def raw_consume_produce(bootstrap: str, topic: str, out_topic: str, n: int) -> float:
    """Seconds for one consumer-group member to read ``n`` messages and produce one output each,
    from the first message received to the last output acknowledged."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"raw-{time.time_ns()}",
                                auto_offset_reset="earliest", enable_auto_commit=True,
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_request_size=16 * 1024 * 1024)
    await consumer.start()
    await producer.start()
    try:
        seen, t0, pending = 0, None, []
        while seen < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for msgs in batch.values():
                for m in msgs:
                    if t0 is None:
                        t0 = time.perf_counter()
                    pending.append(await producer.send(out_topic, m.value, key=m.key))
                    seen += 1
            if len(pending) > 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        return time.perf_counter() - t0
    finally:
        await consumer.stop()
        await producer.stop()


def bench_log(work: Path, n_events: int) -> list:
    """The first ``n_events`` records of a generated 7-day log written in ``work`` (the generator makes
    about 20 events per user over 7 days, so the users are ``n_events / 20``)."""
    write_log(GenerateConfig(users=max(50, int(n_events / 20)), days=7, seed=3, malformed=0.01),
              str(work / "bench.jsonl"))
    return read_log(str(work / "bench.jsonl"))[:n_events]


def seconds_for(n: int, processed, failure) -> float:
    """Seconds a process takes for ``n`` messages, from its first processed batch (start-up and group
    joins left out) to ``processed() >= n``, scaled to all ``n``; ``failure()`` names why it cannot get
    there (None while it still can)."""
    t_first, n_first = None, 0
    while True:
        done = processed()
        if done and t_first is None:
            t_first, n_first = time.perf_counter(), done
        if done >= n:
            return (time.perf_counter() - t_first) / max(1, n - n_first) * n
        why = failure()
        if why is not None:
            raise RuntimeError(why)
        time.sleep(0.02)


def _floor_run(broker: EmbeddedBroker, n: int, work: Path, timeout_s: float = 300.0) -> float:
    """Seconds for the Faust floor (``ops/faust_floor.py``) to forward ``n`` messages of ``raw.in``,
    timed like the ingest worker: from its first forwarded batch, scaled to all ``n``."""
    data = work / "floor"
    data.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LOOPLINE_FLOOR_BROKER": broker.bootstrap, "LOOPLINE_FLOOR_DIR": str(data)}
    with open(work / "floor.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "loopline.ops.faust_floor"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
    def forwarded() -> int:
        try:
            return int((data / "forwarded").read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    deadline = time.monotonic() + timeout_s

    def failure() -> str | None:
        if proc.poll() is None and time.monotonic() < deadline:
            return None
        return (f"the Faust floor worker stopped at {forwarded()} of {n} messages:\n"
                f"{(work / 'floor.log').read_text()[-2000:]}")
    try:
        return seconds_for(n, forwarded, failure)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _loopline_run(broker: EmbeddedBroker, records, partitions: int, work: Path, profile: str | None) -> float:
    asyncio.run(replay(broker.bootstrap, records, partitions, run_id="bench", progress=False))
    w = WorkerProcess(broker.url, str(work / "worker"), partitions, extra=("--role", "ingest"),
                      env={"LOOPLINE_PROFILE": profile} if profile else None).start()
    try:
        w.wait_ready()
        # every event processed and its state flushed (the view reads it)
        seconds = seconds_for(len(records), w.processed,
                               lambda: None if w.proc.poll() is None else f"worker died:\n{w.tail()}")
        got = asyncio.run(collect_results(broker.bootstrap, partitions, "bench", len(records), timeout=300))
        if got["events"]["read"] != len(records) or got["examples"]["total"] == 0:
            raise RuntimeError(f"benchmark run lost events: {got['events']}")
        return seconds
    finally:
        w.stop()


# where the worker's time goes: cumulative seconds of these functions (file suffix, function name)
PROFILE_POINTS = {
    "ingest agent (all of it)": ("stream/ingest.py", "ingest"),
    "  parse + validate + join (IngestCore.handle)": ("state/ingest.py", "handle"),
    "  state writes to the Faust table (IngestCore.flush)": ("state/ingest.py", "flush"),
    "  durability barrier (producer flush)": ("stream/ingest.py", "durable"),
    "  sending examples and dead letters": ("stream/ingest.py", "send"),
    "Faust consumer: fetch and deliver to the stream": ("faust/transport/consumer.py", "_drain_messages"),
    "Faust table changelog sends": ("faust/tables/base.py", "send_changelog"),
    "waiting for I/O (event loop idle)": ("selectors.py", "select"),
}


def _profile_summary(path: str) -> dict:
    st = pstats.Stats(path)
    points = {label: 0.0 for label in PROFILE_POINTS}
    for (fname, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
        for label, (suffix, name) in PROFILE_POINTS.items():
            if func == name and fname.endswith(suffix):
                points[label] += ct
    return {"cumulative_s": {k: round(v, 3) for k, v in points.items()},
            "note": "an extra, untimed run under cProfile; whole worker lifetime (start-up and idle included)"}


def bench_ingest(n_events: int = 20000, repeats: int = 3, partitions: int = 4, out_path: str | None = None,
                 profile: bool = False, progress: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="loopline-bench-") as tmp:
        work = Path(tmp)
        records = bench_log(work, n_events)
        runs = []
        for r in range(repeats + (1 if profile else 0)):  # the profiled run is extra and not timed
            profiled = r == repeats
            with EmbeddedBroker(log_path=str(work / f"tansu-{r}.log")) as broker:
                create_topics(broker.bootstrap, {**{t: partitions for t in TOPICS}, "raw.in": partitions,
                                                 "raw.out": partitions})
                asyncio.run(replay(broker.bootstrap, records, partitions, end_of_log=False, progress=False,
                                   topic="raw.in"))
                raw_s = asyncio.run(raw_consume_produce(broker.bootstrap, "raw.in", "raw.out", len(records)))
                floor_s = None if profiled else _floor_run(broker, len(records), work / f"floor{r}")
                prof = str(work / "worker.prof") if profiled else None
                ll_s = _loopline_run(broker, records, partitions, work / f"run{r}", prof)
            if profiled:
                break
            run = {"events": len(records), "raw_events_per_s": round(len(records) / raw_s, 1),
                   "faust_events_per_s": round(len(records) / floor_s, 1),
                   "loopline_events_per_s": round(len(records) / ll_s, 1), "ratio": round(raw_s / ll_s, 3),
                   "faust_ratio": round(raw_s / floor_s, 3)}
            runs.append(run)
            if progress:
                print(f"bench ingest: repeat {r + 1}/{repeats}: {run}", file=sys.stderr, flush=True)
        out = {
            "benchmark": "ingest", "events": len(records), "partitions": partitions, "repeats": runs,
            "median_raw_events_per_s": statistics.median(r["raw_events_per_s"] for r in runs),
            "median_faust_events_per_s": statistics.median(r["faust_events_per_s"] for r in runs),
            "median_loopline_events_per_s": statistics.median(r["loopline_events_per_s"] for r in runs),
            "median_ratio": statistics.median(r["ratio"] for r in runs),
            "median_faust_ratio": statistics.median(r["faust_ratio"] for r in runs),
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        }
        if profile and (work / "worker.prof").exists():
            out["profile"] = _profile_summary(str(work / "worker.prof"))
    if out_path:
        Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
    return out
