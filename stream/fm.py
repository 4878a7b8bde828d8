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
history store lives under the worker's data dir; a worker that starts with an empty one (another
machine) rebuilds it from ``history.events``, ``examples`` and ``fm.embeddings`` before it consumes.
Not yet here: resuming the model from a snapshot with its offsets (see the README).
"""

from __future__ import annotations

import os

import faust
import numpy as np
import orjson

from loopline.model.pipeline import FMStage
from loopline.state.history import HistoryStore

from .app import CONTROL_HEADER, WorkerConfig, read_topic

__all__ = ["register_fm"]

BATCH = 4000
BATCH_WITHIN_S = 0.1


def register_fm(app: faust.App, cfg: WorkerConfig) -> None:
    topics = app.loopline_topics
    source = app.topic("history.events", "examples", key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=cfg.partitions)
    state: dict = {"stage": None, "finished": False, "rebuilt": None}
    marks: dict[tuple, float] = {}  # (topic, partition, ingest partition) -> watermark

    async def start_stage() -> None:
        history = HistoryStore(os.path.join(cfg.data_dir, "fm-history"))
        if next(history.raw_items(), None) is None:
            state["rebuilt"] = await rebuild(history)
        state["stage"] = FMStage(history)

    async def rebuild(history: HistoryStore) -> dict:
        """A worker with an empty store (a new machine) re-creates it from the topics, in the order the
        stage wrote it: raw events by (time, id), codes by the examples' canonical order."""
        def data(msgs):
            return [orjson.loads(m.value) for m in msgs if not any(k == CONTROL_HEADER for k, _ in m.headers or ())]
        events = [tuple(v) for v in data(await read_topic(cfg.broker, "history.events", cfg.partitions))]
        events += [(e["user"], e["label_ts"], e["ad"], e["campaign"], "click", e["id"] + "/click")
                   for e in data(await read_topic(cfg.broker, "examples", cfg.partitions)) if e["label"]]
        events.sort(key=lambda r: (r[1], r[5]))
        codes = sorted(data(await read_topic(cfg.broker, "fm.embeddings", cfg.partitions)),
                       key=lambda c: (c["label_ts"], c["id"]))
        rows = [(c["user"], c["ts"], c["fm_version"], np.asarray(c["code"], dtype=np.float32), c["id"]) for c in codes]
        return history.rebuild(rows, events, clear=False)

    def watermark() -> float:
        keys = [(t, q, p) for t in ("history.events", "examples") for q in range(cfg.partitions)
                for p in range(cfg.partitions)]
        return min(marks.get(k, float("-inf")) for k in keys)

    async def publish(st: FMStage) -> None:
        label_ts = {}
        for out in st.drain():
            for ex in out["augmented"]:
                label_ts[ex["id"]] = ex["label_ts"]
            for ex in out["augmented"]:
                await topics["examples.augmented"].send(key=ex["user"], value=ex)
            for user, ts, version, code, ident in out["embeddings"]:
                await topics["fm.embeddings"].send(key=user, value={
                    "user": user, "ts": ts, "fm_version": version, "code": [float(c) for c in code], "id": ident,
                    "label_ts": label_ts[ident]})  # the stage's order, for a rebuild

    @app.agent(source, name="fm")
    async def fm(stream):
        await start_stage()
        async for events in stream.take_events(BATCH, within=BATCH_WITHIN_S):
            st = state["stage"]
            history, examples = [], []
            for ev in events:
                msg = ev.message
                control = dict(ev.headers or {}).get(CONTROL_HEADER) if ev.headers else None
                if control is not None:
                    kind, p, *rest = (control.decode() if isinstance(control, bytes) else control).split(":")
                    key = (msg.topic, msg.partition, int(p))
                    marks[key] = float("inf") if kind == "end_of_log" else float(rest[0])
                elif msg.topic == "history.events":
                    history.append(tuple(orjson.loads(ev.value)))
                else:
                    examples.append(orjson.loads(ev.value))
            st.feed_events(history)
            st.feed_examples(examples)
            wm = watermark()
            if wm == float("inf"):
                st.finish()
                state["finished"] = True
            else:
                st.advance(wm)
            await publish(st)

    @app.page("/fm/")
    async def fm_view(web, request):
        st = state["stage"]
        return web.json({"finished": state["finished"], "models": st.report() if st else {},
                         "counts": st.counts if st else {}, "rebuilt": state["rebuilt"], "ready": st is not None})
