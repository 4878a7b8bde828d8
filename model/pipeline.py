"""The FM stage: labelled examples -> progressive metrics, DAS soft labels, LoopFM codes, history.

Public surface: ``FMStageConfig``, ``FMStage``, ``canonical_order``, ``score_row``.

Plain Python and torch over a :class:`~loopline.state.history.HistoryStore`, so ``loopline evaluate``
and an ``fm`` worker run the same code. Per micro-batch (``step``):

0. ``observe`` appends raw events to the history *at their own event time* (impressions at ``ts``,
   clicks at the conversion's time), not when their label arrives: a history filled at label time
   would hold a positive's recent impressions but not the negatives of the last window (still
   unlabelled), and its completeness would leak the label (seen: FM AUC 0.89 vs 0.68 on a synthetic
   stream before this was fixed);
1. read each example's history (raw events strictly before its ``ts``) from the store, in one batched
   read (``HistoryStore.last_events_many``: one scan per distinct user);
2. DAS (ExFM): score the batch with the *published* FM snapshot (soft label + its version) and, once an
   embedding snapshot exists, compute the LoopFM code with it. By default a snapshot is published every
   step and codes come from each one: the model before the batch's update, whose outputs step 3's
   training forward computes anyway. (LoopFM's ablation favoured a checkpoint frozen for the run, but its
   FM was trained before; one that learns online from nothing is untrained at its first snapshot, and on
   MovieLens ``vm:loopfm+kd``'s transfer ratio went from -0.05 with a frozen embedder to 0.46 with live
   codes, docs/transfer.md section 2);
3. progressive validation: the training FM and the logistic baseline predict, then learn, each example
   weighted against delayed feedback (``model/delay.py``: positives come a window before their
   negatives; the weight goes on with the augmented example, so the VMs train with it too);
4. append the examples' codes (with the embedding snapshot's version) to the embedding history.

Examples are processed in ``canonical_order`` (label time, then id): the order in which a label becomes
known, independent of how partitions interleave, so every path that sees the same examples trains the
same model (with ``ranks`` > 1 the FM trains over torch.distributed ranks, ``model/ranks.py``: the same
model up to floating-point order). ``run`` does a finite stream in one call; a streaming caller uses ``feed_events`` /
``feed_examples`` as messages arrive and ``advance(watermark)``, which releases items in that same order
(a heap), so it gets the same numbers as ``run`` provided nothing older than a watermark arrives after it.
"""

from __future__ import annotations

import copy
import heapq
from dataclasses import dataclass, field

import numpy as np
import torch

from loopline.errors import ConfigError
from loopline.state.dedup import DedupConfig, RecentIds

from .baseline import LogisticBaseline
from .delay import DelayConfig, DelayWeights
from .features import Featurizer
from .fm import FMConfig, FoundationModel
from .fm_settings import RanksConfig
from .metrics import BinaryMetrics
from .ranks import RankedTrainer
from .timing import Timings
from .trainer import OnlineTrainer, TrainerConfig

__all__ = ["FMStageConfig", "FMStage", "canonical_order", "score_row"]

_EVENT_FIELD = {"ad": 2, "campaign": 3}  # where a history event (user, ts, ad, campaign, kind, id) holds a key


def score_row(ex: dict, scores: dict) -> dict:
    """One labelled example's predictions by the models of one stage: the contract between the models
    and monitoring (topic ``model.scores``; ``evaluate --json``'s score log).

    >>> score_row({"id": "i1", "user": "u1", "ts": 1.0, "label_ts": 5.0, "vertical": "feed", "label": 1,
    ...            "ad": "a1"}, {"fm": 0.25})
    {'id': 'i1', 'user': 'u1', 'ts': 1.0, 'label_ts': 5.0, 'vertical': 'feed', 'label': 1, 'scores': {'fm': 0.25}}
    """
    return {"id": ex["id"], "user": ex["user"], "ts": ex["ts"], "label_ts": ex["label_ts"],
            "vertical": ex.get("vertical"), "label": int(ex["label"]), "scores": scores}


def canonical_order(examples: list[dict]) -> list[dict]:
    return sorted(examples, key=lambda e: (e["label_ts"], e["id"]))


@dataclass(frozen=True)
class FMStageConfig:
    fm: FMConfig = field(default_factory=FMConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # training steps between published snapshots (what DAS scores with). 1: DAS scores each batch with the
    # model as it stands before the batch's update, which the training forward computes anyway (no copy)
    publish_every: int = 1
    # publishes between embedding-snapshot refreshes; 0 = the first snapshot's codes for the whole run
    embed_refresh_every: int = 1
    baseline: bool = True  # train the logistic-regression baseline in the same pass
    # examples re-sent after a restart or rebalance are dropped by id (each example trains once)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    # delayed-feedback weights; ``delay.window_s`` must be the attribution window of the examples
    delay: DelayConfig = field(default_factory=DelayConfig)
    # the FM over N torch.distributed ranks (``model/ranks.py``); 1: in this process alone
    ranks: RanksConfig = field(default_factory=RanksConfig)

    def __post_init__(self):
        if self.publish_every < 1:
            raise ConfigError(f"publish_every: must be >= 1, got {self.publish_every}")
        if self.embed_refresh_every < 0:
            raise ConfigError(f"embed_refresh_every: must be >= 0, got {self.embed_refresh_every}")


class FMStage:
    def __init__(self, history, cfg: FMStageConfig = FMStageConfig()):
        torch.manual_seed(cfg.trainer.seed)
        self.cfg = cfg
        self.history = history
        self.featurizer = Featurizer(cfg.fm.features)
        if cfg.ranks.ranks > 1:
            self.fm = RankedTrainer.start(FoundationModel(cfg.fm), cfg.trainer, cfg.ranks)
        else:
            self.fm = OnlineTrainer(FoundationModel(cfg.fm), cfg.trainer)
        self.lr = OnlineTrainer(LogisticBaseline(cfg.fm.features), cfg.trainer) if cfg.baseline else None
        self.metrics = {"fm": BinaryMetrics(), "das": BinaryMetrics()}
        if self.lr is not None:
            self.metrics["lr"] = BinaryMetrics()
        self.published = None  # (version, model) DAS scores with
        self.embedder = None  # (version, model) LoopFM codes come from
        self.publishes = 0
        self.counts = {"examples": 0, "augmented": 0, "embeddings": 0}
        self.seen = RecentIds(cfg.dedup)  # example ids fed within the horizon
        # history event ids fed within the horizon: the store ignores a re-sent event, but the delay
        # weights count impressions, and a worker's re-sent ones made its numbers differ from evaluate's
        self.seen_events = RecentIds(cfg.dedup)
        self.delay = DelayWeights(cfg.delay)  # impressions by event time -> weights of positives
        self._pending: list = []  # heap of (time, 0 event | 1 example, id, item) not yet processed
        self._events: list = []  # released history events not yet written
        self._batch: list = []  # released examples of the next micro-batch
        self.outputs: list = []  # DAS outputs of each step, for a streaming caller to send and clear
        self.timings = Timings()  # seconds per part of ``step`` and ``observe`` (``loopline bench stage``)
        # publishing every step, codes from every snapshot: DAS's snapshot is the training model before its
        # update, so the training forward's outputs are the soft labels and codes (the same numbers as a
        # copy scoring them, tests/model/test_pipeline.py; a mode-dependent model needs its eval pass)
        self.live = cfg.publish_every == 1 and cfg.embed_refresh_every == 1 and self.fm.shared_forward

    def _publish(self) -> None:
        model = copy.deepcopy(self.fm.current_model()).eval()
        self.published = (self.fm.version, model)
        self.publishes += 1
        refresh = self.cfg.embed_refresh_every
        if self.embedder is None or (refresh and self.publishes % refresh == 0):
            self.embedder = (self.fm.version, model)

    @torch.no_grad()
    def _das(self, batch, clock) -> tuple[np.ndarray | None, np.ndarray | None]:
        if self.published is None:
            return None, None
        out = self.published[1](batch, aux=False)
        soft = torch.sigmoid(out["logit"]).numpy()
        clock.lap("das")
        if self.embedder is not None and self.embedder[1] is not self.published[1]:
            out = self.embedder[1](batch, aux=False)  # (the same snapshot until the next publish)
        code = out["code"].numpy() if self.embedder is not None else None
        clock.lap("loopfm")
        return soft, code

    def step(self, examples: list[dict]) -> dict:
        """One micro-batch (in canonical order); returns the DAS outputs for it."""
        clock = self.timings.clock()
        L = self.cfg.fm.features.seq_len * 4  # both event types, with room
        hist = self.history.last_events_many([e["user"] for e in examples], [e["ts"] for e in examples], L)
        clock.lap("history_read")
        weights = self.delay.weights(examples)
        batch = self.featurizer.batch(examples, hist)._replace(weights=torch.from_numpy(weights))
        clock.lap("featurize")
        soft, code = (None, None) if self.live else self._das(batch, clock)
        y = batch.labels.numpy()
        step = self.fm.version  # this micro-batch's index: the VMs' consumers order by it
        p_fm, before = self.fm.step_outputs(batch)
        clock.lap("train")
        if self.live and step > 0:  # (version 0, the initial model, is never published)
            soft, code = torch.sigmoid(before["logit"]).numpy(), before["code"].numpy()
        self.metrics["fm"].update(p_fm, y)
        preds = {"fm": p_fm}
        if self.lr is not None:
            clock.lap("outputs")
            preds["lr"] = self.lr.step(batch)
            clock.lap("baseline")
            self.metrics["lr"].update(preds["lr"], y)
        if soft is not None:
            self.metrics["das"].update(soft, y)
            preds["das"] = soft
        # every example goes on; before the first published snapshot DAS has no soft label (null)
        version = None if soft is None else step if self.live else self.published[0]
        # (columns as Python floats once: tolist() gives what float(a[i]) would, without numpy scalars)
        softs = [None] * len(examples) if soft is None else soft.tolist()
        ws = weights.tolist()
        augmented = [dict(e, soft_label=softs[i], fm_version=version, fm_step=step, weight=ws[i])
                     for i, e in enumerate(examples)]
        cols = {k: v.tolist() for k, v in preds.items()}
        scores = [score_row(e, {k: c[i] for k, c in cols.items()}) for i, e in enumerate(examples)]
        embeddings = []
        if code is not None:
            version = step if self.live else self.embedder[0]
            embeddings = [(e["user"], e["ts"], version, c, e["id"]) for e, c in zip(examples, code)]
            clock.lap("outputs")
            self.history.append_embeddings(embeddings)
            clock.lap("history_write")
        # ids make the appends idempotent under replays (state/history.py)
        if not self.live and self.fm.version % self.cfg.publish_every == 0:
            self._publish()
            clock.lap("publish")
        self.counts["examples"] += len(examples)
        self.counts["augmented"] += len(augmented)
        self.counts["embeddings"] += len(embeddings)
        out = {"step": step, "augmented": augmented, "embeddings": embeddings, "scores": scores}
        self.outputs.append(out)
        clock.lap("outputs")
        return out

    def observe(self, events: list[tuple]) -> None:
        """Raw events ``(user, ts, ad, campaign, kind, id)`` for the history, at their event time."""
        clock = self.timings.clock()
        self.history.append_events(events)
        imps = [ev for ev in events if ev[4] == "impression"]
        by = self.cfg.delay.by
        self.delay.observe([ev[1] for ev in imps], [ev[_EVENT_FIELD[by]] for ev in imps] if by else None)
        clock.lap("history_write")

    # -- streaming: a time-ordered merge of history events and examples ------------------------------
    def feed_events(self, events) -> None:
        """History events ``(user, ts, ad, campaign, kind, id)`` as they arrive (any order); a repeat of an
        id already fed (a re-send) is dropped."""
        for ev in events:
            if self.seen_events.first(ev[5], ev[1]):
                heapq.heappush(self._pending, (ev[1], 0, ev[5], ev))

    def feed_examples(self, examples) -> None:
        """Labelled examples as they arrive (any order); a positive also brings its click event.
        A repeat of an example id already fed (a re-send) is dropped: each example trains once."""
        for e in examples:
            if not self.seen.first(e["id"], e["label_ts"]):
                continue
            heapq.heappush(self._pending, (e["label_ts"], 1, e["id"], e))  # after the events of its time
            if e["label"]:
                click = (e["user"], e["label_ts"], e["ad"], e["campaign"], "click", e["id"] + "/click")
                heapq.heappush(self._pending, (e["label_ts"], 0, click[5], click))

    def advance(self, until: float, max_steps: int | None = None) -> int:
        """Process everything fed with time <= ``until`` in (time, kind, id) order; micro-batches are
        cut by count, so a partial batch waits for the next call (or :meth:`finish`). A caller that
        only advances to a watermark below which nothing more can arrive gets exactly the numbers of
        a single pass over the whole stream. ``max_steps`` stops after that many training steps (a
        streaming caller yields to its event loop between steps; :meth:`pending_before` says whether
        more is ready). Returns the examples trained on."""
        done = steps = 0
        while self._pending and self._pending[0][0] <= until and (max_steps is None or steps < max_steps):
            _, is_example, _, item = heapq.heappop(self._pending)
            if not is_example:
                self._events.append(item)
                continue
            self._batch.append(item)
            if len(self._batch) == self.cfg.trainer.batch_size:
                done += self._flush_batch()
                steps += 1
        return done

    def pending_before(self, until: float) -> bool:
        """Whether anything fed with time <= ``until`` still waits to be processed."""
        return bool(self._pending) and self._pending[0][0] <= until

    def finish(self) -> int:
        """End of the stream: process everything left, including a last partial batch."""
        done = self.advance(float("inf"))
        self.observe(self._events)
        self._events = []
        if self._batch:
            done += self._flush_batch()
        return done

    def _flush_batch(self) -> int:
        self.observe(self._events)  # reads are strictly before each example's ts: later events are unseen
        self._events = []
        batch, self._batch = self._batch, []
        self.step(batch)
        return len(batch)

    # -- snapshots (tensors and plain containers only: they load with weights_only=True) --------------
    def state_dict(self) -> dict:
        def model_state(pm):
            return None if pm is None else [pm[0], pm[1].state_dict()]
        return {"fm": self.fm.state_dict(), "lr": self.lr.state_dict() if self.lr is not None else None,
                "metrics": {k: m.state_dict() for k, m in self.metrics.items()},
                "published": model_state(self.published), "embedder": model_state(self.embedder),
                "publishes": self.publishes, "counts": dict(self.counts), "delay": self.delay.state_dict(),
                "pending": list(self._pending), "events": list(self._events), "batch": list(self._batch),
                "seen": {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                         for k, v in self.seen.state_dict().items()},
                "seen_events": {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                                for k, v in self.seen_events.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        def model_from(pm):
            if pm is None:
                return None
            m = FoundationModel(self.cfg.fm)
            m.load_state_dict(pm[1])
            return (int(pm[0]), m.eval())
        self.fm.load_state_dict(state["fm"])
        if self.lr is not None:
            self.lr.load_state_dict(state["lr"])
        for k, st in state["metrics"].items():
            self.metrics[k] = BinaryMetrics()
            self.metrics[k].load_state_dict(st)
        self.published, self.embedder = model_from(state["published"]), model_from(state["embedder"])
        self.publishes, self.counts = state["publishes"], dict(state["counts"])
        if "delay" in state:
            self.delay.load_state_dict(state["delay"])
        self._pending, self._events, self._batch = list(state["pending"]), list(state["events"]), list(state["batch"])
        for name in ("seen", "seen_events"):
            if name in state:
                getattr(self, name).load_state_dict({k: v.numpy() if isinstance(v, torch.Tensor) else v
                                                     for k, v in state[name].items()})
        self.outputs = []

    def close(self) -> None:
        """Release the FM's other ranks, if it has any (the stage is not used after)."""
        self.fm.close()

    def drain(self) -> list[dict]:
        out, self.outputs = self.outputs, []
        return out

    def run(self, examples: list[dict], progress=None, on_step=None) -> None:
        """A finite stream in-process: each example's impression is observed at its event time, and the
        examples are trained on in canonical order, in micro-batches by count. ``on_step(out)`` gets
        each step's outputs right after that step, before the next one writes its codes (the VM stage
        hangs off it, and must see the store as a vm worker does); without it they are dropped."""
        self.feed_events((e["user"], e["ts"], e["ad"], e["campaign"], "impression", e["id"]) for e in examples)
        self.feed_examples(examples)
        total, done = len(examples), 0
        times = sorted({e["label_ts"] for e in examples})
        step = max(1, len(times) // 100)  # report progress about a hundred times
        for t in times[step - 1::step] + [float("inf")]:
            while self.pending_before(t):
                done += self.advance(t, max_steps=1)
                self._hand_over(on_step)
            if t == float("inf"):
                done += self.finish()
                self._hand_over(on_step)
            if progress is not None:
                progress(done, total)

    def _hand_over(self, on_step) -> None:
        for out in self.drain():
            if on_step is not None:
                on_step(out)

    def report(self) -> dict:
        return {name: m.report() for name, m in self.metrics.items() if m.report()["n"]}
