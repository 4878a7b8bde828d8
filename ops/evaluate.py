"""``loopline evaluate``: the in-process replay through the same code the workers run.

Public surface: ``evaluate_records``, ``summarize``.

Events are routed to partitions exactly as ``loopline replay`` sends them (``ops/eventlog.py``), each
partition's :class:`~loopline.state.ingest.IngestCore` runs over a dict, and at the end of the log every
open window is closed. The output is design.md's evaluation JSON.
"""

from __future__ import annotations

import sys
import time

from loopline.state.attribution import AttributionConfig, STAT_NAMES
from loopline.state.ingest import IngestCore

from .eventlog import LogRecord, partition_for

__all__ = ["evaluate_records", "summarize"]


def summarize(read: int, deadletters: dict[str, int], examples: int, positives: int,
              attribution: dict | None = None) -> dict:
    """design.md's evaluation JSON from counts (shared by evaluate and the broker-side collector)."""
    dead = sum(deadletters.values())
    out = {
        "events": {"read": read, "accepted": read - dead, "deadletter": dead,
                   "by_reason": dict(sorted(deadletters.items()))},
        "examples": {"total": examples, "positive": positives,
                     "positive_rate": round(positives / examples, 6) if examples else 0.0},
        "models": {},
    }
    if attribution is not None:
        out["attribution"] = attribution
    return out


def evaluate_records(records: list[LogRecord], partitions: int = 4,
                     cfg: AttributionConfig = AttributionConfig(), progress: bool = False,
                     models: bool = False, stage_cfg=None) -> dict:
    """Ingest and attribution in-process; with ``models``, then the FM stage (FM, logistic baseline,
    DAS) over the examples, with its progressive metrics under ``models``."""
    stores: list[dict] = [{} for _ in range(partitions)]
    cores = [IngestCore(stores[p], p, cfg) for p in range(partitions)]
    offsets = [0] * partitions
    examples = positives = 0
    dead: dict[str, int] = {}
    emitted: list[dict] = []
    t0 = time.perf_counter()

    def consume(outs):
        nonlocal examples, positives
        for o in outs:
            if o.kind == "example":
                examples += 1
                positives += o.value["label"]
                if models:
                    emitted.append(o.value)
            else:
                dead[o.value["reason"]] = dead.get(o.value["reason"], 0) + 1

    for n, rec in enumerate(records, 1):
        p = partition_for(rec.key, rec.raw, partitions)
        outs = cores[p].handle(rec.raw, offsets[p])
        cores[p].acked(outs)  # in-process: delivered at once
        offsets[p] += 1
        consume(outs)
        if n % 1000 == 0:  # the worker flushes once per batch; the result does not depend on when
            for core in cores:
                core.flush()
        if progress and n % 50000 == 0:
            rate = n / (time.perf_counter() - t0)
            print(f"evaluate: {n}/{len(records)} events, {rate:,.0f}/s, ETA {(len(records) - n) / rate:.0f}s",
                  file=sys.stderr, flush=True)
    for core in cores:
        outs = core.end_of_log()
        core.acked(outs)
        core.flush()
        consume(outs)
    attribution = {k: sum(c.counts()["attribution"][k] for c in cores) for k in STAT_NAMES}
    out = summarize(len(records), dead, examples, positives, attribution)
    if models:
        out["models"], out["fm_stage"] = _run_models(emitted, stage_cfg, progress)
    return out


def _run_models(examples: list[dict], stage_cfg, progress: bool) -> tuple[dict, dict]:
    import tempfile

    from loopline.model.pipeline import FMStage, FMStageConfig
    from loopline.state.history import HistoryStore

    t0 = time.perf_counter()
    last = [t0]

    def tick(done: int, total: int) -> None:
        now = time.perf_counter()
        if progress and (now - last[0] > 5 or done == total):
            last[0] = now
            rate = done / (now - t0)
            print(f"evaluate: models {done}/{total} examples, {rate:,.0f}/s, ETA {(total - done) / rate:.0f}s",
                  file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="loopline-history-") as tmp:
        with HistoryStore(tmp) as history:
            stage = FMStage(history, stage_cfg or FMStageConfig())
            stage.run(examples, progress=tick)
            return stage.report(), {**stage.counts, "seconds": round(time.perf_counter() - t0, 2),
                                    "fm_params": sum(p.numel() for p in stage.fm.model.parameters()),
                                    "fm_flops_per_example": stage.fm.model.flops_per_example()}
