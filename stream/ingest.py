"""The ingest role: validate raw events, join them into labelled examples, dead-letter the rest.

Public surface: ``register_ingest``.

The agent is a few lines around :class:`loopline.state.ingest.IngestCore`, one per partition, over the
``attribution`` table (RocksDB-backed with a changelog, so a restarted or replacing worker resumes the
join where the last committed state left it). Each message's source offset goes into the join state so
a message redelivered after a crash is recognized and skipped (at-least-once delivery, exactly-once
effect on the join); outputs that were already sent may be sent again and are de-duplicated by id
downstream (``ops/results.py``).
"""

from __future__ import annotations

import logging

import faust

from loopline.state.ingest import IngestCore

from .app import CONTROL_HEADER, WorkerConfig

__all__ = ["register_ingest"]

log = logging.getLogger("loopline.ingest")


def _control(headers) -> str | None:
    if not headers:
        return None
    items = headers.items() if hasattr(headers, "items") else headers
    for k, v in items:
        if k == CONTROL_HEADER:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def register_ingest(app: faust.App, cfg: WorkerConfig) -> None:
    topics = app.loopline_topics
    # keys are str, values JSON (the app's table_key/value_serializer defaults)
    table = app.Table("attribution", default=None, partitions=cfg.partitions)
    cores: dict[int, IngestCore] = {}  # cached per partition; dropped on every rebalance

    @app.on_partitions_revoked.connect
    async def _drop_revoked(app, revoked, **kwargs):  # noqa: ANN001 - faust signal signature
        cores.clear()

    @app.on_partitions_assigned.connect
    async def _drop_assigned(app, assigned, **kwargs):  # noqa: ANN001
        cores.clear()

    def core_for(partition: int) -> IngestCore:
        core = cores.get(partition)
        if core is None:
            core = cores[partition] = IngestCore(table, partition, cfg.attribution)
        return core

    @app.agent(topics["events"], name="ingest")
    async def ingest(stream):
        async for event in stream.events():
            msg = event.message
            core = core_for(msg.partition)
            control = _control(event.headers)
            if control is not None:
                outs = core.end_of_log() if control.startswith("end_of_log") else []
            else:
                outs = core.handle(event.value, [msg.partition, msg.offset])
            for o in outs:
                if o.kind == "example":
                    await topics["examples"].send(key=o.key, value=o.value)
                else:
                    await topics["deadletter"].send(value=o.value)
            if control is not None and control.startswith("end_of_log"):
                await topics["ingest.status"].send(
                    value={"partition": msg.partition, "control": control, "counts": core.counts()})

    @app.page("/ingest/")
    async def ingest_view(web, request):
        out = {}
        for p in range(cfg.partitions):
            meta = table.get(f"{p}|m")
            if meta is not None:
                out[str(p)] = {k: meta.get(k) for k in ("read", "accepted", "deadletter", "max_ts", "stats")}
        return web.json(out)
