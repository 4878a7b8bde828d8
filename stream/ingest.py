"""The ingest role: validate raw events, join them into labelled examples, dead-letter the rest.

Public surface: ``register_ingest``, ``FORWARD_HEADER``, ``route_of``.

The agent is a few lines around :class:`loopline.state.ingest.IngestCore`, one per partition, over the
``attribution`` table (RocksDB-backed with a changelog, so a restarted or replacing worker resumes the
join). It takes events in batches: each partition's share of a batch is processed, its outbox, state
and counters flushed as one atomic change (each table key written once per batch), its outputs sent;
Faust acks the batch only afterwards, so a committed offset never runs ahead of the state. A message
redelivered after a crash is recognized by its offset (at most the partition's ``through``) and
skipped; the outbox re-sends outputs that may have been lost with the producer's buffer, and
``ops/replay.py`` de-duplicates them by id.

**Outbox.** Once a batch's outputs are acknowledged by the broker, they leave the outbox in the same
batch (their chunks are deleted: ``state/ingest.py``), so a rebalance or a restart re-sends only what was never
acknowledged (``resent`` in ``/ingest/``), not the whole last batch.

**Any producer.** Every message a standard Kafka producer sends is taken: compressed batches (gzip,
snappy, lz4, zstd: aiokafka decodes them with ``cramjam``), headers, keys of any bytes, idempotent and
transactional producers. A tombstone (null value) is dead-lettered as ``null_value``.

**Re-keying.** The join needs an impression and its conversions in one partition: the one Kafka's
default partitioner (murmur2, as in Java clients and ``ops/eventlog.py``) gives the impression id. A
message elsewhere (an unkeyed producer's sticky partitioner, librdkafka's default CRC32 partitioner, a
wrong key) is forwarded, keyed by its impression id, to its partition of ``events`` with
``FORWARD_HEADER`` (``<partition>:<offset>`` of the original), and processed there once: a forwarded
message is never forwarded again. Forwards are acknowledged before the batch's offsets can be
committed; one re-sent after a crash in between arrives twice and its second copy is dead-lettered as
a duplicate by the join (loud, never counted twice). A forwarded event reaches its partition about one
batch later than its neighbours, well within the join's ``lateness_s`` on a live stream. ``/ingest/``
counts them (``forwarded``: out, in). A librdkafka producer avoids the extra hop with
``partitioner=murmur2_random``.

**Control messages** (``CONTROL_HEADER``): ``end_of_log`` closes every window of the partition only in a
worker started for evaluation (``WorkerConfig.evaluation``); any other worker counts it
(``control_ignored``) and goes on, so nobody who can write to ``events`` can end event time.
"""

from __future__ import annotations

import asyncio
import logging

import faust

from loopline.state.events import event_key, key_partition
from loopline.state.ingest import IngestCore

from .app import CONTROL_HEADER, CachedView, WorkerConfig, control_of, make_table
from .gaps import GapReader
from .role import by_partition, in_partition_of, msgs_of_events, role_agent, with_skipped

__all__ = ["register_ingest", "FORWARD_HEADER", "route_of"]

log = logging.getLogger("loopline.ingest")

BATCH = 2000  # events per batch at most
BATCH_WITHIN_S = 0.05  # and at most this long a wait for a batch to fill
FORWARD_HEADER = "loopline-forwarded"  # b"<source partition>:<source offset>" on a re-keyed event


def route_of(raw: bytes | None, partitions: int) -> tuple[bytes, int] | None:
    """``(impression id, partition)`` of an attribution event, or None for anything else (segments,
    truth reports, unreadable lines: those are handled where they land).

    >>> route_of(b'{"type":"impression","id":"i1","ts":1}', 4)
    (b'i1', 0)
    >>> route_of(b'{"type":"conversion","id":"v","impression":"i1","ts":2}', 4)[1]
    0
    >>> route_of(b'not json', 4) is None, route_of(None, 4) is None
    (True, True)
    """
    if not isinstance(raw, bytes):
        return None
    try:
        key, _ = event_key(raw)
    except Exception:  # noqa: BLE001 - routing is a hint: the core, where it lands, dead-letters the line
        return None
    if key is None:
        return None
    return key, key_partition(key, partitions)


def _header(headers, name: str) -> bytes | None:
    """The value of header ``name`` (headers come as a list of pairs or a mapping), or None."""
    if not headers:
        return None
    for k, v in (headers.items() if hasattr(headers, "items") else headers):
        if k == name:
            return v if isinstance(v, bytes) else str(v).encode()
    return None


def register_ingest(app: faust.App, cfg: WorkerConfig) -> None:
    topics = app.loopline_topics
    # keys are str, values JSON (the app's table serializer defaults)
    table = make_table(app, cfg, "attribution")
    cores: dict[int, IngestCore] = {}  # cached per partition; dropped on every rebalance

    async def _drop_cores(app, tps, **kwargs):  # noqa: ANN001 - faust signal signature
        cores.clear()

    app.on_partitions_revoked.connect(_drop_cores)
    app.loopline_positions["ingest"] = lambda: {f"events/{p}": c.next_offset() for p, c in cores.items()}
    app.on_partitions_assigned.connect(_drop_cores)

    # this process's counters (the per-partition counts live in the table, see the view)
    sent = {"sent": 0, "acked": 0, "failed": 0, "resent": 0}
    routing = {"forwarded": 0, "forwarded_in": 0, "control_ignored": 0}

    async def durable() -> None:
        """Wait until everything produced so far (changelog included) is acknowledged."""
        if app.producer.started:  # not in agent.test_context(), where nothing reaches a broker
            await app.producer.flush()

    async def send(outs) -> list:
        pending = []
        for o in outs:
            topic = topics[{"example": "examples", "history": "history.events",
                           "audience": "audience"}.get(o.kind, "deadletter")]
            # sent at once (not attached to the input's commit); the outbox covers a crash
            pending.append((await topic.send(key=o.key, value=o.value), o))
            sent["sent"] += 1
        return pending

    async def settle(core: IngestCore, pending: list) -> None:
        """Wait for the broker's acknowledgements of ``pending`` sends; acknowledged outputs leave the
        outbox (written with the core's next flush)."""
        results = await asyncio.gather(*(f for f, _ in pending), return_exceptions=True)
        acked = []
        for res, (_, o) in zip(results, pending):
            if isinstance(res, BaseException):
                sent["failed"] += 1
                log.warning("ingest: send failed (%s); it stays in the outbox", res or type(res).__name__)
            else:
                acked.append(o)
        sent["acked"] += len(acked)
        core.acked(acked)

    async def forward(p: int, offset: int, key: bytes, raw: bytes, q: int) -> None:
        await app.producer.send("events", key, raw, q, None, [(FORWARD_HEADER, f"{p}:{offset}".encode())])
        routing["forwarded"] += 1

    async def tell_fm(core: IngestCore, controls: list[str]) -> None:
        """After the outputs, this partition's watermark (or end of log) to every fm input partition:
        the fm role may then process everything of this partition up to it (stream/fm.py)."""
        marks = [f"end_of_log:{core.partition}"] if controls else [f"watermark:{core.partition}:{core.watermark()!r}"]
        for mark in marks:
            for name in ("examples", "history.events"):
                for q in range(cfg.partitions):
                    await topics[name].send(value=None, partition=q, headers=[(CONTROL_HEADER, mark.encode())])

    gaps = GapReader(cfg.broker)

    async def handle(events) -> None:
        # the last batch's writes are acknowledged before this batch's begin: after a crash, the table
        # recovers its local writes and re-applies the changelog's unconfirmed tail over them, which
        # must then be this flush's own (state/ingest.py, _Overlay)
        await durable()
        done = []
        for p, evs in by_partition(events, lambda ev: ev.message.partition).items():
            with in_partition_of(evs[-1]):
                core = cores.get(p)
                outs, controls = [], []
                if core is None:  # first batch since (re)assignment: re-send what may be lost
                    core = cores[p] = IngestCore(table, p, cfg.attribution, history=True, audience=True)
                    outs.extend(core.unacked())
                    sent["resent"] += len(outs)
                durable_through = core.join.meta["through"]  # every effect up to here is stored
                # with any offsets Faust's consumer skipped, read from the broker (stream/gaps.py)
                msgs = await with_skipped(gaps, msgs_of_events(evs), {f"events/{p}": core.next_offset()})
                for _, _, offset, headers, value in msgs:
                    control = control_of(headers)
                    if control is not None:
                        core.passed(offset)
                        if control.startswith("end_of_log") and cfg.evaluation:
                            outs.extend(core.end_of_log())
                            controls.append(control)
                        else:  # only an evaluation run ends event time; unknown marks are no one's
                            routing["control_ignored"] += 1
                        continue
                    if _header(headers, FORWARD_HEADER) is not None:
                        routing["forwarded_in"] += 1  # its home: processed here, never forwarded again
                    elif offset > durable_through:
                        route = route_of(value, cfg.partitions)
                        if route is not None and route[1] != p:
                            await forward(p, offset, route[0], value, route[1])
                            core.passed(offset)
                            continue
                    outs.extend(core.handle(value, offset))
                core.flush()  # outbox, state and counters: one atomic change
            done.append((evs[-1], core, outs, controls))
        await durable()  # forwards and every partition's flush acknowledged before the batch is acked
        settled = []
        for last, core, outs, controls in done:
            settled.append((last, core, await send(outs)))
            for control in controls:
                await topics["ingest.status"].send(
                    value={"partition": core.partition, "control": control, "counts": core.counts()})
            await tell_fm(core, controls)
        # Acknowledged outputs leave the outbox now, not with the next batch: a rebalance or restart
        # in between would re-send all of them.
        for last, core, pending in settled:
            if pending:
                await settle(core, pending)
                with in_partition_of(last):
                    core.flush()

    # nothing to catch up on: its state is a table
    role_agent(app, "ingest", topics["events"], handle, batch=BATCH, within=BATCH_WITHIN_S, gaps=gaps)

    view = CachedView.of("ingest", cfg)

    def partitions_meta() -> tuple:
        """On the loop: the table's per-partition meta records (a Faust table is read on its loop)."""
        return ({p: table.get(f"{p}|m") for p in range(cfg.partitions)},)

    def report(metas: dict) -> dict:
        out = {"sends": dict(sent), "gaps_read": dict(gaps.counts),
               "forwarded": {"out": routing["forwarded"], "in": routing["forwarded_in"]},
               "control_ignored": routing["control_ignored"], "evaluation": cfg.evaluation}
        for p, meta in metas.items():
            if meta is not None:
                out[str(p)] = {k: meta.get(k) for k in ("read", "accepted", "deadletter", "redelivered", "through",
                                                        "max_ts", "stats")}
        return out

    @app.page("/ingest/")
    async def ingest_view(web, request):
        return await view.respond(web, report, prepare=partitions_meta)
