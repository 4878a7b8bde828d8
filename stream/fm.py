"""The fm role: the FM stage (``model/pipeline.py``) fed from the stream.

Public surface: ``register_fm``.

One agent consumes ``history.events`` (impressions at event time) and ``examples`` (labels), feeds them
to :class:`~loopline.model.pipeline.FMStage`, and advances it to the stream's watermark: the minimum,
over every (input partition, ingest partition) pair, of the last watermark that ingest partition sent
to that input partition (ingest sends one after each batch's outputs, so everything before it on that
partition has arrived). Items are then processed in the canonical order, which makes the numbers those
of ``loopline evaluate``. DAS outputs go to ``examples.augmented`` and ``fm.embeddings``; ``/fm/`` shows
the progressive metrics.

Active and standby. One fm member trains the model; two uncoordinated members would each see half the
partitions and diverge. Every fm member joins a lease group (``<group>-lease``, sticky assignor) on
``fm.lease``, a one-partition topic: the member holding its partition is active and reads *every*
partition of its inputs with its own consumer; the others are standbys (``/fm/`` says ``role``) and
wait. A member joining leaves the lease where it is; when the active member dies, the group hands the
lease to a standby after the session timeout, and it starts from its own newest snapshot (or from the
topics, on a machine with none) and catches up: the result is the same as one member that never
stopped. The history store and the stage's snapshots live under the worker's data
dir.

Restarts. Every ``SNAPSHOT_EVERY`` training steps the whole stage (models, optimizers, published
snapshots, the heap of unprocessed items, metrics) is saved atomically with the offset up to which each
input partition was fed and the watermarks. A restarted worker loads the newest snapshot and reads its
inputs again from those offsets with its own consumer (Faust's committed offsets run ahead of any
snapshot, so they are not trusted here); messages already fed are skipped by offset. The result is the
same as a run that never stopped; outputs made after the snapshot are sent again (at least once, with
the same ids). The history store is first rebuilt from ``history.events``, ``examples`` and
``fm.embeddings`` as the stage had written it when the snapshot was taken, whether it is empty (another
machine) or holds what the killed run wrote later; a worker without a snapshot starts on an empty store.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import faust
import mode
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
import numpy as np
import orjson

from loopline.model.delay import DelayConfig
from loopline.model.fm import FMConfig
from loopline.model.pipeline import FMStage, FMStageConfig
from loopline.state.history import HistoryStore
from loopline.state.snapshots import SnapshotDir

from .app import (CONTROL_HEADER, STATUS_TOPIC, CachedView, OutputBatch, WorkerConfig, control_of, follow_topic,
                  group_id, read_topic)
from .role import Fed, msgs_of_records, run_role
from .supervise import off_loop, supervised

__all__ = ["register_fm"]

BATCH = 4000
BATCH_WITHIN_S = 0.1
SNAPSHOT_EVERY = 20  # training steps between snapshots of the whole stage
KEEP_SNAPSHOTS = 2  # the newest ones (each is tens of MB); older ones are deleted
INPUTS = ("history.events", "examples")
LEASE = TopicPartition("fm.lease", 0)  # whoever holds it in the lease group is the active fm


def _mark(control: str) -> tuple | None:
    """``("watermark" | "end_of_log", ingest partition, time)`` of a control mark, or None if unreadable."""
    kind, _, rest = control.partition(":")
    try:
        if kind == "end_of_log":
            return kind, int(rest), float("inf")
        if kind == "watermark":
            p, _, t = rest.partition(":")
            t = float(t)
            return (kind, int(p), t) if t == t else None  # NaN never becomes a watermark
    except ValueError:
        pass
    return None


def _history_event(value: bytes) -> tuple | None:
    """``(user, ts, ad, campaign, kind, id)`` or None when the value is not one."""
    try:
        v = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not (isinstance(v, list) and len(v) == 6 and all(isinstance(v[i], str) for i in (0, 2, 3, 4, 5))
            and isinstance(v[1], (int, float)) and not isinstance(v[1], bool)):
        return None
    return tuple(v)


_EXAMPLE_STR = ("id", "user", "ad", "campaign", "vertical")


def _example(value: bytes) -> dict | None:
    """A labelled example (the ingest's output) or None when the value is not one."""
    try:
        e = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in _EXAMPLE_STR):
        return None
    if not all(isinstance(e.get(k), (int, float)) and not isinstance(e.get(k), bool) for k in ("ts", "label_ts")):
        return None
    if e.get("label") not in (0, 1) or not isinstance(e.get("attrs", {}), dict) or \
            not isinstance(e.get("features", {}), dict):
        return None
    return e


def register_fm(app: faust.App, cfg: WorkerConfig) -> None:
    topics = app.loopline_topics
    snapshots = os.path.join(cfg.data_dir, "fm-snapshots")
    state: dict = {"stage": None, "finished": False, "rebuilt": None, "restored": None, "snapshot_at": 0,
                   "control_ignored": 0, "bad_values": 0, "task": None, "role": "standby", "active_since": None, "holds": False}
    marks: dict[str, float] = {}  # "topic/partition/ingest partition" -> watermark
    fed = Fed()  # "topic/partition" -> next offset not yet fed to the stage

    async def start_stage() -> None:
        history = HistoryStore(os.path.join(cfg.data_dir, "fm-history"))
        app.loopline_stores["fm-history"] = history
        # the one writer of the series: opening removes a killed save's temporaries; the newest snapshot
        # that verifies loads (an older one, with a warning, when the newest is damaged)
        state["snapshot_dir"] = SnapshotDir(snapshots, keep=KEEP_SNAPSHOTS)
        loaded = state["snapshot_dir"].load_latest()
        path = None if loaded is None else loaded[1]
        # No snapshot: the stage starts over on an empty store and its replay of the inputs writes the
        # store again, as it was. A snapshot: the store must be as it was when the snapshot was taken, so
        # it is rebuilt from the topics as of the snapshot. Without a store (the snapshots came to a new
        # machine) that is the only way; after a kill the store also holds what the run wrote after the
        # snapshot, and the per-user retention (HistoryConfig.max_len) let those rows evict older ones
        # that the resumed steps read (found by `loopline chaos`: after a restore the FM's numbers
        # differed from evaluate's).
        if path is not None:
            # (the one path that reads its inputs whole: the store is re-created in its own order)
            inputs = {name: await read_topic(cfg.broker, name, cfg.partitions) for name in INPUTS}
            state["rebuilt"] = await rebuild(history, inputs, loaded[0])
        else:  # starting over: what a killed run wrote to the store is not this run's past
            history.rebuild((), (), clear=True)
        # the delayed-feedback weights pair each positive with the negatives of one window earlier
        # (in the training thread: with --fm-ranks, starting the ranks and loading a snapshot into them
        # are collectives, seconds long, and every later one runs there too)
        stage_cfg = FMStageConfig(fm=FMConfig(user_table=cfg.user_table), ranks=cfg.fm,
                                  delay=DelayConfig(window_s=cfg.attribution.window_s))
        stage = await off_loop(FMStage, history, stage_cfg)
        if path is not None:  # resume: the model, the heap, the metrics, and where each input stood
            snap = loaded[0]  # verified, loaded with weights_only=True
            await off_loop(stage.load_state_dict, snap["stage"])
            marks.update(snap["marks"])
            fed.reset(snap["fed"])
            state["finished"], state["snapshot_at"] = snap["finished"], stage.fm.version
            state["restored"] = os.path.basename(path)
        state["stage"] = stage

    async def rebuild(history: HistoryStore, inputs: dict, snap: dict) -> dict:
        """Re-create the store as the stage had written it when ``snap`` was taken, from the topics and in
        the stage's order: the raw events it had fed (offsets below ``fed``) less those still in its heap
        or not yet written, by (time, id); the codes of the steps before the snapshot's, in the examples'
        canonical order."""
        upto, st = snap["fed"], snap["stage"]
        unwritten = {item[2] for item in st["pending"] if item[1] == 0} | {ev[5] for ev in st["events"]}

        def fed_values(name, parse):
            return [v for m in inputs[name] if control_of(m.headers) is None
                    and m.offset < upto.get(f"{m.topic}/{m.partition}", 0) and (v := parse(m.value)) is not None]
        events = fed_values("history.events", _history_event)
        events += [(e["user"], e["label_ts"], e["ad"], e["campaign"], "click", e["id"] + "/click")
                   for e in fed_values("examples", _example) if e["label"]]
        events = sorted((ev for ev in events if ev[5] not in unwritten), key=lambda r: (r[1], r[5]))
        steps = st["fm"]["version"]
        codes = [orjson.loads(m.value) for m in await read_topic(cfg.broker, "fm.embeddings", cfg.partitions)
                 if control_of(m.headers) is None]
        codes = sorted((c for c in codes if c["step"] < steps), key=lambda c: (c["label_ts"], c["id"]))
        rows = [(c["user"], c["ts"], c["fm_version"], np.asarray(c["code"], dtype=np.float32), c["id"]) for c in codes]
        return history.rebuild(rows, events, clear=True)

    def watermark() -> float:
        keys = [f"{t}/{q}/{p}" for t in ("history.events", "examples") for q in range(cfg.partitions)
                for p in range(cfg.partitions)]
        return min(marks.get(k, float("-inf")) for k in keys)

    async def handle(messages) -> None:
        """Feed ``(topic, partition, offset, headers, value)`` messages not fed before, advance, publish,
        and snapshot every SNAPSHOT_EVERY training steps."""
        st = state["stage"]
        history, examples = [], []
        for topic, partition, offset, headers, value in fed.take(messages):
            tp = f"{topic}/{partition}"
            control = control_of(headers)
            if control is not None:
                mark = _mark(control)
                if mark is None:
                    state["bad_values"] += 1
                elif mark[0] == "end_of_log" and not cfg.evaluation:
                    state["control_ignored"] += 1  # only an evaluation run ends event time
                else:
                    marks[f"{tp}/{mark[1]}"] = mark[2]
                    if mark[2] != float("inf"):
                        # a mark below the end after the end: a new log's data (a partition's marks come
                        # in order). Checked per mark, not on the batch's last watermark: a new run's
                        # marks and its end could come in one batch, and it ended without reporting
                        state["finished"] = False
                continue
            item = _history_event(value) if topic == "history.events" else _example(value)
            if item is None:
                state["bad_values"] += 1  # these topics are Loopline's own; a bad value is counted, never fatal
            else:
                (history if topic == "history.events" else examples).append(item)
        st.feed_events(history)
        st.feed_examples(examples)
        wm = watermark()
        # one training step at a time, publishing and snapshotting between steps and yielding to the
        # event loop: a long catch-up never holds views, timers and heartbeats for its whole length
        while st.pending_before(wm) and state["holds"]:
            await off_loop(st.advance, wm, 1)
            await publish(st)
            await maybe_snapshot(st)
            await asyncio.sleep(0)
        if wm == float("inf") and not state["finished"] and state["holds"]:
            await off_loop(st.finish)  # the last partial batch
            state["finished"] = True
            await publish(st)
            await announce_finished(st)
            await maybe_snapshot(st)

    async def announce_finished(st: FMStage) -> None:
        """The run's end, for ``replay --wait`` (the models) and the vm role (``fmdone:<last step>:<id>``
        on each of its input partitions, after that step's outputs: it reports once it has trained them)."""
        await topics[STATUS_TOPIC].send(partition=0, value={
            "role": "fm", "event": "finished", "step": st.fm.version - 1, "models": st.report(),
            "counts": st.counts})
        mark = f"fmdone:{st.fm.version - 1}:{uuid.uuid4().hex}".encode()  # one id per end, even of a re-run
        for name in ("examples.augmented", "fm.embeddings"):
            for q in range(cfg.partitions):
                await topics[name].send(partition=q, headers=[(CONTROL_HEADER, mark)])

    async def maybe_snapshot(st: FMStage) -> None:
        if st.fm.version >= state["snapshot_at"] + SNAPSHOT_EVERY or (state["finished"] and st.fm.version > state["snapshot_at"]):
            await app.producer.flush()  # its outputs are out before a snapshot says they were made
            snap = {"stage": await off_loop(st.state_dict), "marks": dict(marks), "fed": fed.positions(),
                    "finished": state["finished"]}
            await off_loop(state["snapshot_dir"].save, snap, st.fm.version)  # fsynced, rotates; off the loop
            state["snapshot_at"] = st.fm.version  # only once it is on disk: /fm/ must not claim it before

    async def publish(st: FMStage) -> None:
        """Send the drained steps' outputs, each step's after the last's, in per-partition batches."""
        out_batch = OutputBatch(app.producer._ensure_producer(), cfg.topic_partitions())
        label_ts = {}
        for out in st.drain():
            for ex in out["augmented"]:
                label_ts[ex["id"]] = ex["label_ts"]
                out_batch.add("examples.augmented", key=ex["user"], value=ex)
            for user, ts, version, code, ident in out["embeddings"]:
                out_batch.add("fm.embeddings", key=user, value={
                    "user": user, "ts": ts, "fm_version": version, "code": [float(c) for c in code], "id": ident,
                    "label_ts": label_ts[ident], "step": out["step"]})  # the stage's order, for a rebuild
            for row in out["scores"]:
                out_batch.add("model.scores", key=row["user"], value=row)
            # the vm role's clock: everything of this step is on each partition before this mark
            mark = f"fmstep:{out['step']}".encode()
            for name in ("examples.augmented", "fm.embeddings"):
                for q in range(cfg.partitions):
                    out_batch.add(name, partition=q, headers=[(CONTROL_HEADER, mark)])
        await out_batch.send()

    health = app.loopline_health
    health.add("fm")
    app.loopline_positions["fm"] = fed.positions

    async def start() -> None:
        while not app.producer.started:  # the lease can come before Faust has started its producer
            await asyncio.sleep(0.05)
        if state["stage"] is None:
            await start_stage()
        await topics[STATUS_TOPIC].send(partition=0, value={"role": "fm", "event": "started"})  # replay --wait
        # a snapshot taken between two steps of one batch holds work its marks already release (found by
        # `loopline chaos`, corrupt_snapshot): do it now, not when the next message happens to come
        await handle([])

    async def batches():
        async for msgs in follow_topic(cfg.broker, INPUTS, cfg.partitions, start=fed.positions(), max_records=BATCH):
            if not state["holds"]:
                return  # the lease went to another member
            if msgs:
                yield msgs_of_records(msgs)
            else:
                await asyncio.sleep(BATCH_WITHIN_S)

    @supervised("fm", health)
    async def run_active(_=None) -> None:
        """The active member: load the newest snapshot (once), then read every input partition from
        where the stage stands, whatever Faust has committed (the stage, not the consumer group, knows
        what it has seen): the catch-up and the live stream are one loop."""
        await run_role("fm", health, batches(), handle, start=start)

    def lease_changed(holds: bool) -> None:
        """The lease came or went. Losing it stops the active loop at its next step boundary (never in
        the middle of a training step, which runs in a thread); the stage stays in memory."""
        state["holds"] = holds
        state["role"] = "active" if holds else "standby"
        if not holds:
            health.ready("fm")  # a standby is ready: it waits
            return
        task = state["task"]
        if task is None or task.done():
            state["active_since"] = time.time()
            state["task"] = asyncio.ensure_future(run_active(None))

    class LeaseListener(ConsumerRebalanceListener):
        async def on_partitions_revoked(self, revoked):
            if LEASE in revoked:
                lease_changed(False)

        async def on_partitions_assigned(self, assigned):
            lease_changed(LEASE in assigned)

    @supervised("fm", health)
    async def hold_lease(_=None) -> None:
        """Membership of the lease group: a consumer of ``fm.lease`` (one partition) in a group of its
        own with the sticky assignor, so the member holding the lease keeps it when another joins and a
        standby gets it only when the holder leaves or dies (after ``session_timeout_s``)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.broker, group_id=f"{group_id(cfg)}-lease", enable_auto_commit=False,
            partition_assignment_strategy=(StickyPartitionAssignor,),
            session_timeout_ms=int(cfg.session_timeout_s * 1000),
            heartbeat_interval_ms=int(max(1.0, cfg.session_timeout_s / 5) * 1000),
            rebalance_timeout_ms=int(cfg.session_timeout_s * 2000))
        await consumer.start()
        try:
            consumer.subscribe([LEASE.topic], listener=LeaseListener())
            while True:
                await consumer.getmany(timeout_ms=1000)  # nothing is sent there: membership is the claim
        finally:
            await consumer.stop()  # leave the group: a standby takes over at once on a clean stop

    class LeaseHolder(mode.Service):
        """Joins the lease group as soon as the app starts. (As a Faust task it started only once every
        table had recovered: 12.7 s into a role ``all`` worker whose web server was up at 5 s, and the fm
        became active at 17.7 s.)"""

        async def on_start(self) -> None:
            self.add_future(hold_lease())

    app.add_dependency(LeaseHolder())

    answers = CachedView.of("fm", cfg)  # computed in a thread, never on the agent's loop

    def fm_report() -> dict:
        st = state["stage"]
        return {"finished": state["finished"], "models": st.report() if st else {},
                "counts": st.counts if st else {}, "rebuilt": state["rebuilt"], "restored": state["restored"],
                "snapshot_at": state["snapshot_at"], "ready": st is not None, "role": state["role"],
                "active_since": state["active_since"],
                "dedup": st.seen.counts() if st else {}, "dedup_events": st.seen_events.counts() if st else {},
                "delay": st.delay.counts() if st else {}, "ranks": cfg.fm.ranks,
                "tables": st.fm.model.embedding_report() if st else {}, "control_ignored": state["control_ignored"],
                "bad_values": state["bad_values"]}

    @app.page("/fm/")
    async def fm_view(web, request):
        return await answers.respond(web, fm_report)
