"""``loopline replay``: send an event log to the broker in event-time order, then (optionally) the
end-of-log watermark, and collect what the workers produced.

Public surface: ``replay``, ``collect_results``, ``collect_models``, ``send_end_of_log``; ``ReplayCommand``,
``run_replay`` and ``format_replay`` (``loopline replay``).

The collector reads the ``examples`` and ``deadletter`` topics from the beginning and removes the
duplicates that at-least-once delivery can produce after a crash (examples by impression id, dead
letters by source partition/offset), reporting how many it removed.

The models come from ``models.status`` (``collect_models``): the fm and vm roles announce themselves
there when they start, and publish their models' metrics when a run ends (the fm when every input
partition's end-of-log has been trained on; the vm once it has trained every step of that fm run). The
collector waits for a report from every role that announced itself, published after the replay began,
so ``replay --wait`` prints the same table as ``evaluate``.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from loopline.errors import ConfigError
from loopline.settings import nested, same_as, setting
from loopline.state.attribution import STAT_NAMES
from loopline.stream.app import CONTROL_HEADER, STATUS_TOPIC, TOPICS, WorkerConfig, control_of, read_topic

from .evaluate import format_table, with_transfer_ratios, summarize
from .eventlog import LogRecord, partition_for
from .source import SourceConfig

__all__ = ["replay", "collect_results", "collect_models", "send_end_of_log", "read_topic", "ReplayCommand",
           "run_replay", "format_replay"]

MAX_REQUEST = 16 * 1024 * 1024


async def send_end_of_log(producer: AIOKafkaProducer, partitions: int, run_id: str, topic: str = "events"):
    header = [(CONTROL_HEADER, f"end_of_log:{run_id}".encode())]
    await asyncio.gather(*[await producer.send(topic, b"", partition=p, headers=header)
                           for p in range(partitions)])


async def replay(bootstrap: str, records: list[LogRecord], partitions: int, end_of_log: bool = True,
                 run_id: str | None = None, progress: bool = True, topic: str = "events") -> dict:
    """Send ``records`` in order; return ``{"sent", "seconds", "events_per_s", "run_id"}``."""
    run_id = run_id or uuid.uuid4().hex[:12]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=MAX_REQUEST, linger_ms=5,
                                max_batch_size=256 * 1024, request_timeout_ms=30000)
    await producer.start()
    t0 = time.perf_counter()
    try:
        pending = []
        bar = tqdm(total=len(records), unit="ev", desc="replay", disable=not progress, file=sys.stderr)
        for rec in records:
            p = partition_for(rec.key, rec.raw, partitions)
            pending.append(await producer.send(topic, rec.raw, key=rec.key, partition=p))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                bar.update(len(pending))
                pending.clear()
        await asyncio.gather(*pending)
        bar.update(len(pending))
        bar.close()
        if end_of_log:
            await send_end_of_log(producer, partitions, run_id, topic)
    finally:
        await producer.stop()
    dt = time.perf_counter() - t0
    return {"sent": len(records), "seconds": round(dt, 3), "events_per_s": round(len(records) / dt, 1) if dt else None,
            "run_id": run_id, "end_of_log": end_of_log}


async def collect_results(bootstrap: str, partitions: int, run_id: str, read: int,
                          timeout: float = 120.0, progress: bool = False) -> dict:
    """Wait for every partition's end-of-log status of ``run_id``, then count the output topics."""
    deadline = time.monotonic() + timeout
    statuses: dict[int, dict] = {}
    control = f"end_of_log:{run_id}"
    while len(statuses) < partitions:
        if time.monotonic() > deadline:
            missing = sorted(set(range(partitions)) - set(statuses))
            raise TimeoutError(f"no end-of-log status from partitions {missing} within {timeout:.0f}s "
                               "(is a worker with the ingest role running?)")
        for m in await read_topic(bootstrap, "ingest.status", partitions):
            st = orjson.loads(m.value)
            if st.get("control") == control:
                statuses[st["partition"]] = st["counts"]
        if len(statuses) < partitions:
            if progress:
                print(f"collect: end-of-log from {len(statuses)}/{partitions} partitions", file=sys.stderr)
            await asyncio.sleep(1.0)
    # The status and the last outputs travel on different partitions: read until the counts are stable.
    prev = None
    while True:
        examples = await read_topic(bootstrap, "examples", partitions)
        dead = await read_topic(bootstrap, "deadletter", partitions)
        if prev == (len(examples), len(dead)):
            break
        prev = (len(examples), len(dead))
        await asyncio.sleep(0.5)
    examples = [m for m in examples if control_of(m.headers) is None]  # not the fm role's watermarks
    seen_ex: dict[str, int] = {}
    for m in examples:
        ex = orjson.loads(m.value)
        seen_ex.setdefault(ex["id"], ex["label"])
    seen_dl: dict[tuple, str] = {}
    for m in dead:
        d = orjson.loads(m.value)
        seen_dl.setdefault(tuple(d["src"]) if isinstance(d["src"], list) else (d["src"],), d["reason"])
    by_reason: dict[str, int] = {}
    for reason in seen_dl.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    attribution = {k: sum(s["attribution"].get(k, 0) for s in statuses.values()) for k in STAT_NAMES}
    out = summarize(read, by_reason, len(seen_ex), sum(seen_ex.values()), attribution)
    out["duplicates_removed"] = {"examples": len(examples) - len(seen_ex), "deadletter": len(dead) - len(seen_dl)}
    return out


async def collect_models(bootstrap: str, since_ms: int, timeout: float = 300.0, progress: bool = False) -> dict:
    """The models' metrics of the run that began at ``since_ms`` (wall clock, ms): the newest report of
    each role (fm, vm) that announced itself on ``models.status``, published after ``since_ms``; waits
    until every announced role has reported. ``{"models": {...}, "reported_by": [...]}``; roles that
    did not report within ``timeout`` are listed under ``missing`` (an fm that died, a vm without an fm)."""
    deadline = time.monotonic() + timeout
    while True:
        announced, reports = set(), {}
        for m in await read_topic(bootstrap, STATUS_TOPIC, 1):
            try:
                st = orjson.loads(m.value)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(st, dict) or st.get("role") not in ("fm", "vm"):
                continue
            announced.add(st["role"])
            if st.get("event") == "finished" and m.timestamp >= since_ms:
                reports[st["role"]] = st  # the newest wins: they are read in order
        missing = sorted(announced - set(reports))
        if not missing or time.monotonic() > deadline:
            break
        if progress:
            print(f"collect: waiting for the models of {', '.join(missing)}", file=sys.stderr)
        await asyncio.sleep(1.0)
    models = {}
    for role in ("fm", "vm"):
        got = (reports.get(role) or {}).get("models")
        models.update(got if isinstance(got, dict) else {})  # a value not written by Loopline counts as none
    out = {"models": with_transfer_ratios(models), "reported_by": sorted(reports)}
    if missing:
        out["missing"] = missing
    return out


@dataclass(frozen=True)
class ReplayCommand:
    """``loopline replay``: which log, to which broker, and whether to wait for the workers' results."""

    source: SourceConfig = nested(SourceConfig)
    broker: str = same_as(WorkerConfig, "broker")
    partitions: int = same_as(WorkerConfig, "partitions")
    end_of_log: bool = setting(True, "do not close the windows at the end", flag="no-end-of-log")
    wait: bool = setting(False, "wait for the workers; print their counts and the models of the fm and vm roles "
                                "running")
    timeout_s: float = setting(300.0, "with --wait: seconds to wait for the workers' results", flag="timeout",
                               env="REPLAY_TIMEOUT")

    def __post_init__(self):
        if self.wait and not self.end_of_log:
            raise ConfigError("wait: needs the end-of-log watermark; drop --no-end-of-log")


def run_replay(cfg: ReplayCommand, progress: bool = True) -> dict:
    """Send the log; with ``wait``, also the workers' counts (``collect_results``) and models."""
    from .broker import create_topics
    records = cfg.source.records()
    create_topics(cfg.broker, {**{t: cfg.partitions for t in TOPICS}, STATUS_TOPIC: 1})
    since_ms = int(time.time() * 1000)
    sent = asyncio.run(replay(cfg.broker, records, cfg.partitions, end_of_log=cfg.end_of_log, progress=progress))
    out = {"replay": sent}
    if cfg.wait:
        t0 = time.monotonic()
        out.update(asyncio.run(collect_results(cfg.broker, cfg.partitions, sent["run_id"], len(records),
                                               timeout=cfg.timeout_s, progress=progress)))
        left = max(1.0, cfg.timeout_s - (time.monotonic() - t0))
        out.update(asyncio.run(collect_models(cfg.broker, since_ms, timeout=left, progress=progress)))
    return out


def format_replay(out: dict) -> tuple:
    """For people: the counts (the models go in the table that follows, after ``--wait``)."""
    counts = {k: v for k, v in out.items() if k != "models"}
    return (counts, format_table(out)) if "examples" in out else (counts,)
