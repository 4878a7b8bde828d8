"""The quality half of the ``reach`` role: per-partition q_c counts and truth reports from ``audience``.

Public surface: ``register_quality``.

An agent on the ``audience`` topic (impressions and segment assertions keyed by user, truth reports
keyed by campaign; ingest writes it) feeds each partition's values to a
:class:`~loopline.state.quality_counts.QualityCounts` over the ``quality`` table (RocksDB with a
changelog; keys carry the partition). It takes values in batches and writes each touched key once per
batch. ``GET /quality`` returns the aggregates of the partitions this worker holds and, unless
``?fit=0``, the fit over them; ``loopline quality --workers URL,...`` sums every worker's partitions
and fits (a worker holds only part of the users, so its own fit is partial when there are several).

Delivery is at least once; effects are exactly once: an impression re-sent after an ingest crash or
redelivered after this worker's is recognized by its id among its user's latest ids (kept in the user's
record, written with the counts) and counted once; segment assertions and truth reports are
idempotent by construction.
"""

from __future__ import annotations

import copy
import logging

import faust
import orjson

from loopline.model.quality import QualityConfig, assess
from loopline.state.quality_counts import QualityCounts, load_aggregate, merge_aggregates

from .app import CachedView, WorkerConfig, make_table
from .role import by_partition, in_partition_of, role_agent

__all__ = ["register_quality"]

log = logging.getLogger("loopline.quality")

BATCH = 2000
BATCH_WITHIN_S = 0.1


def register_quality(app: faust.App, cfg: WorkerConfig, qcfg: QualityConfig = QualityConfig()) -> None:
    source = app.topic("audience", key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=cfg.partitions)
    table = make_table(app, cfg, "quality")
    counts: dict[int, QualityCounts] = {}  # per partition; dropped on every rebalance
    stats = {"values": 0, "bad_values": 0}

    async def _drop(app, tps, **kwargs):  # noqa: ANN001 - faust signal signature
        counts.clear()

    app.on_partitions_revoked.connect(_drop)
    app.on_partitions_assigned.connect(_drop)

    async def handle(events) -> None:
        for p, evs in by_partition(events, lambda ev: ev.message.partition).items():
            with in_partition_of(evs[-1]):
                qc = counts.get(p)
                if qc is None:
                    qc = counts[p] = QualityCounts(table, prefix=f"{p}|")
                for ev in evs:
                    stats["values"] += 1
                    try:
                        qc.learn_one(orjson.loads(ev.value))
                    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                        stats["bad_values"] += 1  # counted and logged, never fatal
                        log.warning("quality: unreadable audience value at %s/%s: %s", p, ev.message.offset, exc)
                qc.flush()

    # nothing to catch up on: its state is a table
    role_agent(app, "quality", source, handle, batch=BATCH, within=BATCH_WITHIN_S)

    def held_partitions() -> list[int]:
        try:
            tps = app.assignor.assigned_actives()
        except Exception:  # noqa: BLE001 - no assignment yet (or outside a running worker)
            return []
        return sorted(tp.partition for tp in tps if tp.topic == "audience")

    answers = CachedView.of("quality", cfg)  # the fit in a thread, never on the agent's loop

    def aggregates() -> tuple:
        """On the loop: the held partitions' aggregates, the live ones of their counts (copied in the
        view's thread: reassembling them from the table's chunks here held the loop 360 ms in `bench
        soak`), or from the table (a Faust table is read on the loop) before a partition's first batch."""
        parts = {}
        for p in held_partitions():
            qc = counts.get(p)
            agg = qc.agg if qc is not None else load_aggregate(table, f"{p}|")
            if agg is not None:
                parts[str(p)] = agg
        return parts, dict(stats)

    def quality_report(fit: bool, parts: dict, counters: dict) -> dict:
        # a copy that meets the agent's changes raises and is retried (CachedView)
        parts = {p: copy.deepcopy(agg) for p, agg in parts.items()}
        out = {"partitions": parts, "stats": counters}
        if fit:
            out["fit"] = assess(merge_aggregates(parts.values()), qcfg)
        return out

    @app.page("/quality")
    async def quality_view(web, request):
        fit = request.query.get("fit", "1") != "0"
        return await answers.respond(web, lambda *a: quality_report(fit, *a), key=fit, prepare=aggregates)
