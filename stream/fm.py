"""The fm role: the FM stage (``model/pipeline.py``) fed from the stream.

Public surface: ``register_fm``.

One agent consumes ``history.events`` (impressions at event time) and ``examples`` (labels), feeds them
to :class:`~loopline.model.pipeline.FMStage`, and advances it to the stream's watermark: the minimum,
over every (input partition, ingest partition) pair, of the last watermark that ingest partition sent
to that input partition (ingest sends one after each batch's outputs, so everything before it on that
partition has arrived). Items are then processed in the canonical order, which makes the numbers those
of ``loopline evaluate``. DAS outputs go to ``examples.augmented`` and ``fm.embeddings``; ``/fm/`` shows
the progressive metrics.

One fm worker trains the model: two uncoordinated members would each see half the partitions. The
history store and the stage's snapshots live under the worker's data dir.

Restarts. Every ``SNAPSHOT_EVERY`` training steps the whole stage (models, optimizers, published
snapshots, the heap of unprocessed items, metrics) is saved atomically with the offset up to which each
input partition was fed and the watermarks. A restarted worker loads the newest snapshot and reads its
inputs again from those offsets with its own consumer (Faust's committed offsets run ahead of any
snapshot, so they are not trusted here); messages already fed are skipped by offset. The result is the
same as a run that never stopped; outputs made after the snapshot are sent again (at least once, with
the same ids). A worker with no snapshot and an empty history store (another machine) first rebuilds
the store from ``history.events``, ``examples`` and ``fm.embeddings``.
"""

from __future__ import annotations

import os

import faust
import numpy as np
import orjson
import torch

from loopline.model.pipeline import FMStage
from loopline.model.trainer import atomic_save, latest_snapshot
from loopline.state.history import HistoryStore

from .app import CONTROL_HEADER, WorkerConfig, control_of, read_topic

__all__ = ["register_fm"]

BATCH = 4000
BATCH_WITHIN_S = 0.1
SNAPSHOT_EVERY = 20  # training steps between snapshots of the whole stage
KEEP_SNAPSHOTS = 2  # the newest ones; older ones are deleted


def register_fm(app: faust.App, cfg: WorkerConfig) -> None:
    topics = app.loopline_topics
    source = app.topic("history.events", "examples", key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=cfg.partitions)
    snapshots = os.path.join(cfg.data_dir, "fm-snapshots")
    state: dict = {"stage": None, "finished": False, "rebuilt": None, "restored": None, "snapshot_at": 0}
    marks: dict[str, float] = {}  # "topic/partition/ingest partition" -> watermark
    fed: dict[str, int] = {}  # "topic/partition" -> next offset not yet fed to the stage

    async def start_stage() -> None:
        # the inputs, read whole once: for a rebuild and for the catch-up below (in memory: fine for
        # replays and the topic sizes here; a seek per partition at larger scale)
        inputs = {name: await read_topic(cfg.broker, name, cfg.partitions) for name in ("history.events", "examples")}
        history = HistoryStore(os.path.join(cfg.data_dir, "fm-history"))
        path = latest_snapshot(snapshots)
        # No snapshot: the stage starts over and its replay of the inputs writes the store again, as it
        # was. A snapshot but no store (the snapshots came to a new machine): rebuild the store from the
        # topics, then resume.
        if path is not None and next(history.raw_items(), None) is None:
            state["rebuilt"] = await rebuild(history, inputs)
        stage = FMStage(history)
        if path is not None:  # resume: the model, the heap, the metrics, and where each input stood
            snap = torch.load(path, weights_only=True)
            stage.load_state_dict(snap["stage"])
            marks.update(snap["marks"])
            fed.update(snap["fed"])
            state["finished"], state["snapshot_at"] = snap["finished"], stage.fm.version
            state["restored"] = os.path.basename(path)
        state["stage"] = stage
        # catch up on everything after the snapshot (or from the start), whatever Faust has committed:
        # the stage, not the consumer group, knows what it has seen
        await handle([(m.topic, m.partition, m.offset, m.headers, m.value) for msgs in inputs.values() for m in msgs])

    async def rebuild(history: HistoryStore, inputs: dict) -> dict:
        """A worker with an empty store (a new machine) re-creates it from the topics, in the order the
        stage wrote it: raw events by (time, id), codes by the examples' canonical order."""
        def data(msgs):
            return [orjson.loads(m.value) for m in msgs if control_of(m.headers) is None]
        events = [tuple(v) for v in data(inputs["history.events"])]
        events += [(e["user"], e["label_ts"], e["ad"], e["campaign"], "click", e["id"] + "/click")
                   for e in data(inputs["examples"]) if e["label"]]
        events.sort(key=lambda r: (r[1], r[5]))
        codes = sorted(data(await read_topic(cfg.broker, "fm.embeddings", cfg.partitions)),
                       key=lambda c: (c["label_ts"], c["id"]))
        rows = [(c["user"], c["ts"], c["fm_version"], np.asarray(c["code"], dtype=np.float32), c["id"]) for c in codes]
        return history.rebuild(rows, events, clear=False)

    def watermark() -> float:
        keys = [f"{t}/{q}/{p}" for t in ("history.events", "examples") for q in range(cfg.partitions)
                for p in range(cfg.partitions)]
        return min(marks.get(k, float("-inf")) for k in keys)

    async def handle(messages) -> None:
        """Feed ``(topic, partition, offset, headers, value)`` messages not fed before, advance, publish,
        and snapshot every SNAPSHOT_EVERY training steps."""
        st = state["stage"]
        history, examples = [], []
        for topic, partition, offset, headers, value in messages:
            tp = f"{topic}/{partition}"
            if offset < fed.get(tp, 0):
                continue  # already in the stage (before the snapshot, or in the catch-up)
            fed[tp] = offset + 1
            control = control_of(headers)
            if control is not None:
                kind, p, *rest = control.split(":")
                marks[f"{tp}/{int(p)}"] = float("inf") if kind == "end_of_log" else float(rest[0])
            elif topic == "history.events":
                history.append(tuple(orjson.loads(value)))
            else:
                examples.append(orjson.loads(value))
        st.feed_events(history)
        st.feed_examples(examples)
        wm = watermark()
        if wm == float("inf") and not state["finished"]:
            st.finish()
            state["finished"] = True
        elif not state["finished"]:
            st.advance(wm)
        await publish(st)
        if st.fm.version >= state["snapshot_at"] + SNAPSHOT_EVERY or (state["finished"] and st.fm.version > state["snapshot_at"]):
            await app.producer.flush()  # its outputs are out before a snapshot says they were made
            atomic_save({"stage": st.state_dict(), "marks": dict(marks), "fed": dict(fed),
                         "finished": state["finished"]}, os.path.join(snapshots, f"snapshot-{st.fm.version:010d}.pt"))
            state["snapshot_at"] = st.fm.version  # only once it is on disk: /fm/ must not claim it before
            for old in sorted(os.listdir(snapshots))[:-KEEP_SNAPSHOTS]:  # each is tens of MB
                if old.startswith("snapshot-"):
                    os.remove(os.path.join(snapshots, old))

    async def publish(st: FMStage) -> None:
        label_ts = {}
        for out in st.drain():
            for ex in out["augmented"]:
                label_ts[ex["id"]] = ex["label_ts"]
                await topics["examples.augmented"].send(key=ex["user"], value=ex)
            for user, ts, version, code, ident in out["embeddings"]:
                await topics["fm.embeddings"].send(key=user, value={
                    "user": user, "ts": ts, "fm_version": version, "code": [float(c) for c in code], "id": ident,
                    "label_ts": label_ts[ident], "step": out["step"]})  # the stage's order, for a rebuild
            for row in out["scores"]:
                await topics["model.scores"].send(key=row["user"], value=row)
            # the vm role's clock: everything of this step is on each partition before this mark
            mark = f"fmstep:{out['step']}".encode()
            for name in ("examples.augmented", "fm.embeddings"):
                for q in range(cfg.partitions):
                    await topics[name].send(partition=q, headers=[(CONTROL_HEADER, mark)])

    @app.agent(source, name="fm")
    async def fm(stream):
        await start_stage()
        async for events in stream.take_events(BATCH, within=BATCH_WITHIN_S):
            await handle([(ev.message.topic, ev.message.partition, ev.message.offset, ev.headers, ev.value)
                          for ev in events])

    @app.page("/fm/")
    async def fm_view(web, request):
        st = state["stage"]
        return web.json({"finished": state["finished"], "models": st.report() if st else {},
                         "counts": st.counts if st else {}, "rebuilt": state["rebuilt"], "restored": state["restored"],
                         "snapshot_at": state["snapshot_at"], "ready": st is not None})
