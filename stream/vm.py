"""The vm role: the VM stage (``model/verticals.py``) trained continuously from ``examples.augmented``,
and ``POST /score/`` serving its latest snapshot.

Public surface: ``register_vm``, ``fm_mark``, ``idle_snapshot_due``.

One agent consumes ``examples.augmented`` and ``fm.embeddings``. A :class:`~loopline.model.verticals.StepInbox`
holds them by FM step until every partition has shown the fm role's ``fmstep:S`` mark; then the step's
codes go into the worker's own history store and its examples, vertical by vertical, through every
variant (progressive metrics, then a training step), exactly as ``loopline evaluate`` does after each
FM step, so both give the same numbers. Score rows go to ``model.scores``; ``/vm/`` shows the metrics.

Snapshots: every ``SNAPSHOT_EVERY`` steps (and at the end of a replay) the whole stage is saved with the
last step trained on; the serving copy ``/score/`` answers from is refreshed at the same time (the
weights copied into a model traced once per vertical: ``model/serving.py``), its Linear layers
dispatched by LoKA's rule (``kernels/dispatch.py``: FP8 only where measured accurate and faster on this
machine; on a CPU every layer stays in high precision) and the decision tables saved with the snapshot.
A restarted worker loads the newest snapshot, reads both inputs again from the start (its own read: the
stage knows what it has trained on, the consumer group does not), puts the codes of the steps it has
already trained on back into its store (idempotent appends) and trains on from the next step.
"""

from __future__ import annotations

import asyncio
import copy
import math
import os
import re
import time

import faust
import numpy as np
import orjson
from faust.web import View

from loopline.errors import ConfigError
from loopline.kernels.dispatch import TABLE_KEY, apply_table, dispatch_model
from loopline.model.serving import ServingModel, score_answer
from loopline.model.verticals import StepInbox, VMStage, VMStageConfig
from loopline.state.history import HistoryStore
from loopline.state.snapshots import SnapshotDir

from .app import STATUS_TOPIC, CachedView, WorkerConfig, control_of, read_topic
from .role import Fed, msgs_of_records, role_agent
from .supervise import in_thread

__all__ = ["register_vm", "fm_mark", "idle_snapshot_due"]

BATCH = 4000
BATCH_WITHIN_S = 0.1
SNAPSHOT_EVERY = 20  # FM steps between snapshots of the VM stage
KEEP_SNAPSHOTS = 2  # the newest ones; older ones are deleted
# Between two snapshots of SNAPSHOT_EVERY steps, an idle stage saves at most this often: on live traffic
# (a step every few seconds, idle in between) it would otherwise copy and write the whole stage, tens of
# MB, after every step. The end of a finished fm run is saved at once, whatever the time.
IDLE_SNAPSHOT_EVERY_S = 60.0
INPUTS = ("examples.augmented", "fm.embeddings")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _item(topic: str, value: bytes) -> dict | None:
    """An augmented example or a code row as the fm role writes them, or None when it is not one."""
    try:
        v = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("id"), str) or not isinstance(v.get("user"), str):
        return None
    if not (_num(v.get("ts")) and _num(v.get("label_ts"))):
        return None
    if topic == "examples.augmented":
        ok = isinstance(v.get("fm_step"), int) and v.get("label") in (0, 1) and isinstance(v.get("vertical"), str) \
            and (v.get("soft_label") is None or (_num(v["soft_label"]) and 0 <= v["soft_label"] <= 1)) \
            and _num(v.get("weight", 1.0)) and 0 <= v.get("weight", 1.0) < float("inf")  # model/delay.py
    else:
        code = v.get("code")
        ok = isinstance(v.get("step"), int) and isinstance(code, list) and all(_num(c) for c in code) \
            and (v.get("fm_version") is None or isinstance(v.get("fm_version"), int))
    return v if ok else None


_STEP = re.compile(r"-?[0-9]{1,18}")


def fm_mark(control: str) -> tuple | None:
    """The fm role's mark in a control header: ``("fmstep", step, "")`` or ``("fmdone", the run's last
    step, the end's id)``; None for anything else (counted by the caller, never fatal).

    >>> fm_mark("fmstep:12"), fm_mark("fmdone:74:ab12"), fm_mark("fmstep:x"), fm_mark("end_of_log:0")
    (('fmstep', 12, ''), ('fmdone', 74, 'ab12'), None, None)
    """
    kind, _, rest = control.partition(":")
    step, _, end = rest.partition(":")
    if kind not in ("fmstep", "fmdone") or _STEP.fullmatch(step) is None:
        return None
    return kind, int(step), end


def register_vm(app: faust.App, cfg: WorkerConfig) -> None:
    if cfg.vm_serve not in cfg.vm_variants:
        raise ConfigError(f"serve: {cfg.vm_serve!r} is not among the trained variants {', '.join(cfg.vm_variants)}")
    stage_cfg = VMStageConfig(variants=tuple(cfg.vm_variants))
    raw = [v for v in stage_cfg.variants if "raw" in stage_cfg.config_of(v).uses]
    if raw:  # the raw-event sequence is an evaluation-time ablation; the vm role reads FM codes only
        raise ConfigError(f"variants: {', '.join(raw)} read raw event sequences, which the vm role does not "
                          "keep; use loopline evaluate for the gain decomposition")
    topics = app.loopline_topics
    source = app.topic(*INPUTS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                       partitions=cfg.partitions)
    snapshots = os.path.join(cfg.data_dir, "vm-snapshots")
    state: dict = {"stage": None, "inbox": None, "history": None, "serving": {}, "restored": None,
                   "snapshot_at": -1, "fp8": {}, "bad_values": 0,
                   "fm_done": {}, "reported": None}  # fm_done: input partition -> (the fm run's last step, id)
    fed = Fed()  # "topic/partition" -> next offset not yet fed

    async def start_stage() -> None:
        inputs = {name: await read_topic(cfg.broker, name, cfg.partitions) for name in INPUTS}
        history = HistoryStore(os.path.join(cfg.data_dir, "vm-history"))
        app.loopline_stores["vm-history"] = history
        stage = VMStage(history, stage_cfg)
        done = -1
        # the one writer of the series: opening removes a killed save's temporaries; the newest snapshot
        # that verifies loads (an older one, with a warning, when the newest is damaged)
        state["snapshot_dir"] = SnapshotDir(snapshots, keep=KEEP_SNAPSHOTS)
        loaded = state["snapshot_dir"].load_latest()
        if loaded is not None:
            snap, path = loaded  # verified, loaded with weights_only=True
            stage.load_state_dict(snap["stage"])
            done = int(snap["done"])
            state["fp8"].update(snap.get("fp8_tables") or {})
            state["restored"], state["snapshot_at"] = os.path.basename(path), done
            state["last_step"] = done  # trained on before the restart (a run's end may still be reported)
        # The store as of step ``done`` (empty when starting over): a killed run's later codes are not the
        # history of the steps about to be trained again, and the per-user retention let them evict older
        # ones those steps read (found by `loopline chaos`: after a restore the VMs' numbers differed)
        rows = [orjson.loads(m.value) for m in inputs["fm.embeddings"] if control_of(m.headers) is None]
        history.rebuild(_code_rows(sorted((r for r in rows if r["step"] <= done),
                                          key=lambda r: (r["step"], r["label_ts"], r["id"]))), (), clear=True)
        state.update(stage=stage, history=history,
                     inbox=StepInbox([f"{t}/{q}" for t in INPUTS for q in range(cfg.partitions)], done=done))
        refresh_serving(stage)
        await topics[STATUS_TOPIC].send(partition=0, value={"role": "vm", "event": "started"})  # replay --wait
        await handle(msgs_of_records(m for msgs in inputs.values() for m in msgs))

    def refresh_serving(stage: VMStage) -> None:
        """The serving copies (``model.serving.ServingModel``: traced once, then refreshed in place), each
        with its FP8 dispatch: LoKA's Probe + Dispatch measured on this machine once per vertical
        (calibrated on its newest batch), then re-applied to a copy built after a restart. The mapping is
        replaced, never changed, while the event loop may read it."""
        serving = dict(state["serving"])
        for (vt, va), learner in stage.learners.items():
            if va != cfg.vm_serve:
                continue
            measurable = vt not in state["fp8"] and (vt, cfg.vm_serve) in stage.last_batches
            if vt in serving and not measurable:
                serving[vt].refresh(learner.model)
                continue  # (a copy made before its vertical had a batch to measure on is made once more)
            model = copy.deepcopy(learner.model)
            if vt in state["fp8"]:
                apply_table(model, state["fp8"][vt])
            elif (vt, cfg.vm_serve) in stage.last_batches:
                _, state["fp8"][vt] = dispatch_model(model, [stage.last_batches[(vt, cfg.vm_serve)]])
            serving[vt] = ServingModel(model, learner.cfg)
        state["serving"] = serving

    async def handle(messages) -> None:
        state["busy"] = True  # the idle timer must not snapshot between a step and its bookkeeping
        try:
            await _handle(messages)
        finally:
            state["busy"] = False

    async def _handle(messages) -> None:
        stage, inbox = state["stage"], state["inbox"]
        for topic, partition, offset, headers, value in fed.take(messages):
            tp = f"{topic}/{partition}"
            control = control_of(headers)
            if control is not None:
                mark = fm_mark(control)
                if mark is None:
                    state["bad_values"] += 1  # another mark, or a malformed one: counted, never fatal
                elif mark[0] == "fmstep":
                    inbox.mark(tp, mark[1])
                else:
                    state["fm_done"][tp] = mark[1:]
            else:
                item = _item(topic, value)
                if item is None:
                    state["bad_values"] += 1  # these topics are Loopline's own; counted, never fatal
                elif topic == "examples.augmented":
                    inbox.add_example(item)
                else:
                    inbox.add_code(item)
        trained = False
        for step, codes, examples in inbox.ready():
            state["history"].append_embeddings(_code_rows(codes))
            for row in await in_thread("vm", stage.step, examples):
                await topics["model.scores"].send(key=row["user"], value=row)
            state["last_step"] = step
            trained = True
            await asyncio.sleep(0)  # a long catch-up must not starve timers, views and signal handling
        last = state.get("last_step", -1)
        ends = set(state["fm_done"].values())
        if len(state["fm_done"]) == len(inbox.marks) and len(ends) == 1 and (end := ends.pop()) != state["reported"] \
                and last >= end[0]:
            # every step of the fm's finished run is trained on: the models for ``replay --wait``
            state["reported"] = end
            await topics[STATUS_TOPIC].send(partition=0, value={"role": "vm", "event": "finished", "step": last,
                                                                "models": stage.report()})
        if trained and last >= state["snapshot_at"] + SNAPSHOT_EVERY:
            await save(stage, last)

    async def save(stage: VMStage, done: int) -> None:
        if state.get("saving"):
            return  # the agent and the idle timer both save; one at a time
        state["saving"] = True
        try:
            await _save(stage, done)
        finally:
            state["saving"] = False

    async def _save(stage: VMStage, done: int) -> None:
        # copied first, while it is the state after step `done` (the agent may train on during the flush),
        # in the vm's thread: the copy took most of a second on the event loop (stream/loop_watch.py),
        # and no later step can run before it there
        snap = await in_thread("vm", lambda: copy.deepcopy(stage.state_dict()))
        await app.producer.flush()  # the score rows of steps <= done are out before the snapshot says so
        # in the vm's thread (never beside one of its steps): LoKA's timing of the serving copies and the
        # fsynced write take seconds, which the event loop must not wait out
        await in_thread("vm", refresh_serving, stage)
        tables = dict(state["fp8"])
        # the decision tables go with the snapshot (``loopline fp8 report --snapshot`` prints the first)
        await in_thread("vm", state["snapshot_dir"].save, {"stage": snap, "done": done, "fp8_tables": tables,
                                                    TABLE_KEY: tables[min(tables)] if tables else None}, done)
        state["snapshot_at"] = done  # only once it is on disk
        state["saved_at"] = time.monotonic()

    app.loopline_positions["vm"] = fed.positions
    agent = role_agent(app, "vm", source, handle, batch=BATCH, within=BATCH_WITHIN_S, start=start_stage,
                       msgs=True, positions=fed.positions)

    @app.timer(2.0)
    async def snapshot_when_idle() -> None:
        """A replay that ends between two snapshots still gets one (and a fresh serving copy) at once; live
        traffic, at most one each ``IDLE_SNAPSHOT_EVERY_S``."""
        stage, last = state["stage"], state.get("last_step", -1)
        if stage is not None and not state.get("busy") and idle_snapshot_due(
                last, state["snapshot_at"], state["reported"], time.monotonic() - state.get("saved_at", -math.inf)):
            await save(stage, last)

    answers = CachedView.of("vm", cfg)  # computed in a thread, never on the agent's loop

    def vm_report() -> dict:
        stage = state["stage"]
        return {"ready": stage is not None, "models": stage.report() if stage else {},
                "steps": stage.steps if stage else 0, "examples": stage.examples if stage else 0,
                "bounds": stage.bounds() if stage else {},
                "teacher_gate": stage.teacher_gate() if stage else {},
                "last_step": state.get("last_step", -1), "snapshot_at": state["snapshot_at"],
                "restored": state["restored"], "bad_values": state["bad_values"],
                "gaps_read": dict(agent.loopline_gaps.counts), "serving": {
                    "variant": cfg.vm_serve, "verticals": sorted(state["serving"]),
                    "fp8": {vt: t["summary"] for vt, t in sorted(state["fp8"].items())}}}

    @app.page("/vm/")
    async def vm_view(web, request):
        return await answers.respond(web, vm_report)

    @app.page("/score/")
    class Score(View):
        async def post(self, request):
            status, answer = score_answer(await request.read(), state["serving"], stage_featurizer,
                                          state["history"], cfg.vm_serve)
            return self.json(answer, status=status)  # the status comes from the error's type

    def stage_featurizer():
        return state["stage"].featurizers[cfg.vm_serve]


def idle_snapshot_due(last: int, snapshot_at: int, run_end, since_save_s: float) -> bool:
    """Whether an idle vm stage saves now: it trained past its snapshot, and either it has trained every
    step of the fm's finished run (``run_end``: ``(last step, run id)`` or None), or the last save was at
    least ``IDLE_SNAPSHOT_EVERY_S`` ago.

    >>> idle_snapshot_due(5, 4, None, 10.0), idle_snapshot_due(5, 4, (5, "r"), 10.0), idle_snapshot_due(5, 4, None, 61.0)
    (False, True, True)
    """
    return last > snapshot_at and ((run_end is not None and last >= run_end[0]) or since_save_s >= IDLE_SNAPSHOT_EVERY_S)


def _code_rows(rows: list[dict]) -> list[tuple]:
    return [(r["user"], r["ts"], r["fm_version"], np.asarray(r["code"], dtype=np.float32), r["id"]) for r in rows]
