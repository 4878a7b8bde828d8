"""The ingest role: validate raw events, join them into labelled examples, dead-letter the rest.

Public surface: ``register_ingest``.

The agent is a few lines around :class:`loopline.state.ingest.IngestCore`, one per partition, over the
``attribution`` table (RocksDB-backed with a changelog, so a restarted or replacing worker resumes the
join). It takes events in batches: each partition's share of a batch is processed, its state flushed
once (each table key written once per batch), its outputs sent; Faust acks the batch only afterwards,
so a committed offset never runs ahead of the state. A message redelivered after a crash is recognized
by its source offset in the join state and skipped; the outbox re-sends outputs that may have been lost
with the producer's buffer, and ``ops/replay.py`` de-duplicates them by id.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager

import faust
from faust.streams import _current_event  # the context Faust tables use to pick a partition

from loopline.state.ingest import IngestCore

from .app import CONTROL_HEADER, WorkerConfig, control_of

__all__ = ["register_ingest"]

log = logging.getLogger("loopline.ingest")

BATCH = 2000  # events per batch at most
BATCH_WITHIN_S = 0.05  # and at most this long a wait for a batch to fill


@contextmanager
def _in_partition_of(event):
    """Make table reads and writes go to ``event``'s partition (its RocksDB and changelog partition).

    A batch mixes partitions, and Faust picks a table's partition from the current event."""
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def register_ingest(app: faust.App, cfg: WorkerConfig) -> None:
    topics = app.loopline_topics
    # keys are str, values JSON (the app's table serializer defaults)
    table = app.Table("attribution", default=None, partitions=cfg.partitions)
    cores: dict[int, IngestCore] = {}  # cached per partition; dropped on every rebalance

    async def _drop_cores(app, tps, **kwargs):  # noqa: ANN001 - faust signal signature
        cores.clear()

    app.on_partitions_revoked.connect(_drop_cores)
    app.on_partitions_assigned.connect(_drop_cores)

    sent = {"sent": 0, "acked": 0, "failed": 0}

    def on_sent(fut, core: IngestCore, o) -> None:
        if fut.cancelled() or fut.exception() is not None:
            sent["failed"] += 1
            log.warning("ingest: send failed (%s); it stays in the outbox",
                        "cancelled" if fut.cancelled() else fut.exception())
            return
        sent["acked"] += 1
        core.acked([o])

    async def durable() -> None:
        """Wait until everything produced so far (changelog included) is acknowledged."""
        if app.producer.started:  # not in agent.test_context(), where nothing reaches a broker
            await app.producer.flush()

    async def send(core: IngestCore, outs) -> None:
        for o in outs:
            topic = topics[{"example": "examples", "history": "history.events",
                           "audience": "audience"}.get(o.kind, "deadletter")]
            # sent at once (not attached to the input's commit); the outbox covers a crash
            fut = await topic.send(key=o.key, value=o.value)
            sent["sent"] += 1
            fut.add_done_callback(lambda f, o=o: on_sent(f, core, o))

    async def tell_fm(core: IngestCore, controls: list[str]) -> None:
        """After the outputs, this partition's watermark (or end of log) to every fm input partition:
        the fm role may then process everything of this partition up to it (stream/fm.py)."""
        marks = [f"end_of_log:{core.partition}"] if controls else [f"watermark:{core.partition}:{core.watermark()!r}"]
        for mark in marks:
            for name in ("examples", "history.events"):
                for q in range(cfg.partitions):
                    await topics[name].send(value=None, partition=q, headers=[(CONTROL_HEADER, mark.encode())])

    @app.agent(topics["events"], name="ingest")
    async def ingest(stream):
        async for events in stream.take_events(BATCH, within=BATCH_WITHIN_S):
            by_partition: dict[int, list] = {}
            for ev in events:
                by_partition.setdefault(ev.message.partition, []).append(ev)
            done = []
            for p, evs in by_partition.items():
                with _in_partition_of(evs[-1]):
                    core = cores.get(p)
                    outs, controls = [], []
                    if core is None:  # first batch since (re)assignment: re-send what may be lost
                        core = cores[p] = IngestCore(table, p, cfg.attribution, history=True, audience=True)
                        outs.extend(core.unacked())
                    for ev in evs:
                        control = control_of(ev.headers)
                        if control is None:
                            outs.extend(core.handle(ev.value, ev.message.offset))
                        elif control.startswith("end_of_log"):
                            outs.extend(core.end_of_log())
                            controls.append(control)
                    core.flush(meta=False)
                done.append((evs[-1], core, outs, controls))
            await durable()  # every partition's outbox and state acknowledged before its meta record
            for last, core, outs, controls in done:
                with _in_partition_of(last):
                    core.flush_meta()
                await send(core, outs)
                for control in controls:
                    await topics["ingest.status"].send(
                        value={"partition": core.partition, "control": control, "counts": core.counts()})
                await tell_fm(core, controls)

    @app.page("/ingest/")
    async def ingest_view(web, request):
        out = {"sends": dict(sent)}
        for p in range(cfg.partitions):
            meta = table.get(f"{p}|m")
            if meta is not None:
                out[str(p)] = {k: meta.get(k) for k in ("read", "accepted", "deadletter", "redelivered", "through",
                                                        "max_ts", "stats")}
        return web.json(out)
