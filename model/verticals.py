"""The VM stage: one vertical model per (vertical, variant), trained continuously on the augmented examples.

Public surface: ``VARIANTS``, ``DEFAULT_VARIANTS``, ``OTHER_VERTICAL``, ``VMStageConfig``, ``VMStage``,
``StepWork``, ``StepInbox``, ``parse_variants``, ``transfer_ratio``, ``windowed_report``.

Each augmented example (``examples.augmented``: an example, DAS's soft label or null, the FM step that
produced it) goes to the VMs of its own vertical. Per micro-batch (one FM step's examples of a vertical):
read each user's LoopFM codes and raw events strictly before the example's time from the history
store (once, shared by every variant), then for every variant predict (progressive validation, the
serving head) and learn. Variants are named recipes over :class:`~loopline.model.vm.VMConfig`; the
evaluation table trains them side by side in one pass over the same stream order.

**Bounded verticals.** The vertical is whatever string the events carry, and each one costs a learner
per variant, so at most ``max_verticals`` get learners of their own: the first ones seen, in the order
the stage sees examples (FM step by FM step, each step in its canonical order, which ``evaluate`` and a
vm worker share, so both admit the same verticals). Examples of later verticals are trained and scored
by one shared learner per variant, ``OTHER_VERTICAL``, and counted (:meth:`VMStage.bounds`). Their score
rows keep their own vertical. A real vertical named ``(other)`` would share that learner.

The transfer ratio (LoopFM, ``shared/papers.md`` section 1) is the fraction of the FM's improvement over
the base VM that a variant captures: ``TR = (NE(base) - NE(variant)) / (NE(base) - NE(FM))``.

>>> transfer_ratio(ne_base=0.95, ne_variant=0.93, ne_fm=0.90)
0.4
>>> parse_variants("base, loopfm+kd")
('base', 'loopfm+kd')
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch

from loopline.errors import ConfigError

from loopline.kernels.dispatch import DispatchConfig, dispatch_model, high_precision

from .metrics import BinaryMetrics
from .pipeline import score_row
from .timing import Timings
from .vm import VMConfig, VMFeaturizer, VMLearner

__all__ = ["VARIANTS", "DEFAULT_VARIANTS", "OTHER_VERTICAL", "VMStageConfig", "VMStage", "StepWork", "StepInbox",
           "parse_variants", "transfer_ratio", "windowed_report"]

_LOOP = {"history": "attention", "sequence": "fm"}
VARIANTS = {
    "base": {},
    "kd": {"distill": "kd"},
    "loopfm": _LOOP,
    "loopfm+kd": {**_LOOP, "distill": "kd"},
    "ah": {"distill": "ah"},
    "ah+sa": {"distill": "ah", "adapter": True},
    "kd+sa": {"distill": "kd", "adapter": True},
    "loopfm+ah+sa": {**_LOOP, "distill": "ah", "adapter": True},
    # the gain decomposition: raw history alone, the FM sequence alone (loopfm), both
    "raw": {"history": "attention", "sequence": "raw"},
    "raw+loopfm": {"history": "attention", "sequence": "both"},
    # LoKA's Mods (HardSwish, BlockNorm, no hidden biases) on the best recipe, for their effect on quality
    "loopfm+kd+mods": {**_LOOP, "distill": "kd", "mods": True},
    "base+mods": {"mods": True},
    # the sequence encoders
    "loopfm-mean": {"history": "mean", "sequence": "fm"},
    "loopfm-sum": {"history": "sum", "sequence": "fm"},
}
DEFAULT_VARIANTS = ("base", "kd", "loopfm", "loopfm+kd", "ah", "ah+sa", "loopfm+ah+sa")
OTHER_VERTICAL = "(other)"  # the shared learner of the verticals beyond VMStageConfig.max_verticals
OVERFLOW_NAMES = 10  # overflowed vertical names listed in bounds() (the first ones; the count is exact)


def parse_variants(text: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in VARIANTS]
    if not names or unknown:
        raise ConfigError(f"variants: unknown {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(VARIANTS)}")
    return names


def transfer_ratio(ne_base: float, ne_variant: float, ne_fm: float) -> float | None:
    """None when the FM is no better than the base VM (the ratio has no meaning then)."""
    gap = ne_base - ne_fm
    if not gap > 0:
        return None
    return round((ne_base - ne_variant) / gap, 4)


@dataclass(frozen=True)
class VMStageConfig:
    variants: tuple = DEFAULT_VARIANTS
    vm: VMConfig = field(default_factory=VMConfig)  # the shared base every variant's recipe modifies
    seed: int = 0
    # LoKA check: each VM's Linear layers dispatched to emulated FP8 (row-wise scales) wherever MERE passes,
    # whatever the speed; ``vm:<variant>@fp8`` are the same models' dispatched predictions
    fp8: bool = False
    # verticals with learners of their own (first seen, first admitted); later ones share OTHER_VERTICAL's.
    # Each costs one VM per variant (about 150k parameters and their optimizer state, ~2 MB), so 16
    # bounds the stage near 250 MB with the 7 default variants; a real deployment has a few surfaces
    max_verticals: int = 16
    # torch intra-op threads, as the FM trainer's (TrainerConfig.threads): a VM's ops are too small for a
    # pool's fork-join. A vm-only worker builds no FM trainer, and scored 100 candidates in 3.1 ms with
    # torch's default two threads against 1.4 ms with one (its training's last digits depend on it too)
    threads: int = 1

    def __post_init__(self):
        parse_variants(",".join(self.variants))
        t = self.threads
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ConfigError(f"threads: must be an integer >= 1, got {t!r}")
        v = self.max_verticals
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"max_verticals: must be an integer >= 1, got {v!r}")

    def config_of(self, variant: str) -> VMConfig:
        return replace(self.vm, **VARIANTS[variant])


def _featurizer_key(c: VMConfig) -> tuple:
    """What a VM batch depends on (``VMFeaturizer.batch``)."""
    return (tuple(c.fields), c.table_size, c.seq_len, c.code_dim, c.hash_cache)


class VMStage:
    def __init__(self, history, cfg: VMStageConfig = VMStageConfig()):
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.history = history
        self.configs = {v: cfg.config_of(v) for v in cfg.variants}
        # variants that featurize alike (same fields, table size, sequence length, code width) share one
        # featurizer and, in each step, one batch: the recipes differ only in what the model does with it
        shared: dict[tuple, VMFeaturizer] = {}
        self.featurizers = {v: shared.setdefault(_featurizer_key(c), VMFeaturizer(c)) for v, c in self.configs.items()}
        self.learners: dict[tuple[str, str], VMLearner] = {}  # (vertical, variant) -> learner
        self.metrics = {v: BinaryMetrics() for v in cfg.variants}
        if cfg.fp8:
            self.metrics.update({f"{v}@fp8": BinaryMetrics() for v in cfg.variants})
        self.dispatch: dict[tuple[str, str], dict] = {}  # (vertical, variant) -> FP8 decision table
        self.last_batches: dict[tuple[str, str], object] = {}  # (vertical, variant) -> its newest batch
        self.steps = 0
        self.examples = 0
        self.verticals: list[str] = []  # the admitted verticals, in the order they were first seen
        self._admitted: set[str] = set()
        self.overflow = {"examples": 0, "names": []}  # examples sent to OTHER_VERTICAL; first few names
        self._reads = set().union(*(c.uses for c in self.configs.values()))  # the sequences read, once
        self._L = max(c.seq_len for c in self.configs.values())
        self.timings = Timings()  # seconds per part of ``step`` (``loopline bench stage``)

    def learner(self, vertical: str, variant: str) -> VMLearner:
        key = (vertical, variant)
        if key not in self.learners:
            # seeded by the vertical only: the same whatever the arrival order, and every variant starts
            # from the same draws (common random numbers), so the table compares recipes, not inits
            seed = zlib.crc32(f"{self.cfg.seed}/{vertical}".encode())
            self.learners[key] = VMLearner(self.configs[variant], seed=seed)
        return self.learners[key]

    def vertical_of(self, vertical: str) -> str:
        """The learner an example of ``vertical`` goes to: its own, admitted now if there is room, or
        ``OTHER_VERTICAL`` (counted)."""
        if vertical in self._admitted:
            return vertical
        if len(self.verticals) < self.cfg.max_verticals:
            self._admitted.add(vertical)
            self.verticals.append(vertical)
            return vertical
        self.overflow["examples"] += 1
        names = self.overflow["names"]
        if len(names) < OVERFLOW_NAMES and vertical not in names:
            names.append(vertical)
        return OTHER_VERTICAL

    def bounds(self) -> dict:
        """The vertical cap and how often it bit (``overflow_examples``: examples trained by the shared
        ``OTHER_VERTICAL`` learners)."""
        return {"verticals": len(self.verticals), "max_verticals": self.cfg.max_verticals,
                "overflow_examples": self.overflow["examples"], "overflow_names": list(self.overflow["names"])}

    def teacher_gate(self) -> dict:
        """Per distilling variant, the learner steps its teacher gate closed (``VMLearner._gate``: the FM
        did not beat the VM) out of all its learners' steps, summed over the verticals."""
        out = {}
        for (_, va), learner in sorted(self.learners.items()):
            if learner.cfg.distill != "none" and learner.cfg.teacher_gate:
                g = out.setdefault(va, {"gated_steps": 0, "steps": 0})
                g["gated_steps"] += learner.gated_steps
                g["steps"] += learner.version
        return out

    def sequences(self, examples: list[dict]) -> tuple[list | None, list | None]:
        """Each example's LoopFM codes and raw events strictly before its ts (history store reads)."""
        codes = raw = None
        if "fm" in self._reads:
            codes = [self.history.last_embeddings(e["user"], e["ts"], self._L)["codes"] for e in examples]
        if "raw" in self._reads:
            raw = self.history.last_events_many([e["user"] for e in examples], [e["ts"] for e in examples], self._L)
        return codes, raw

    def step(self, augmented: list[dict]) -> list[dict]:
        """One FM step's augmented examples (in their order); returns their score rows, one per example,
        with every variant's serving prediction (``vm:<variant>``)."""
        return self.train(self.prepare(augmented))

    def prepare(self, augmented: list[dict]) -> "StepWork":
        """The part of :meth:`step` that reads the history store, and admits verticals: it must run while
        the store holds the codes of FM steps up to this one and no later (``StepInbox``). The rest,
        :meth:`train`, touches only the learners, so it may run later, in another thread
        (:class:`~loopline.model.loop.ModelLoop`), in the order of the steps."""
        clock = self.timings.clock()
        by_vertical: dict[str, list[int]] = {}
        for i, e in enumerate(augmented):
            by_vertical.setdefault(self.vertical_of(e.get("vertical") or ""), []).append(i)
        parts = []
        for vertical in sorted(by_vertical):
            idx = by_vertical[vertical]
            exs = [augmented[i] for i in idx]
            for variant in self.cfg.variants:  # created here, in step order: their seeds touch torch's RNG
                self.learner(vertical, variant)
            clock.lap("vm_prepare")
            codes, raw = self.sequences(exs)
            parts.append((vertical, idx, exs, codes, raw))
            clock.lap("vm_history_read")
        return StepWork(augmented, parts)

    def train(self, work: "StepWork") -> list[dict]:
        """Featurize, score (progressive validation) and learn one prepared step, every variant of every
        vertical; returns the step's score rows."""
        clock = self.timings.clock()
        augmented = work.augmented
        preds = [dict() for _ in augmented]
        for vertical, idx, exs, codes, raw in work.parts:
            y = np.array([float(e["label"]) for e in exs])
            batches: dict[int, object] = {}  # id(featurizer) -> this vertical's batch
            for variant in self.cfg.variants:
                learner = self.learner(vertical, variant)
                fz = self.featurizers[variant]
                b = batches.get(id(fz))
                if b is None:
                    b = batches[id(fz)] = fz.batch(exs, codes, raw)
                self.last_batches[(vertical, variant)] = b  # calibration data for the serving dispatch
                clock.lap("vm_featurize")
                if self.cfg.fp8:
                    names = {f"{variant}@fp8": self._fp8_predict(vertical, variant, learner, b)}
                    with high_precision():
                        names[variant] = learner.predict_many(b)
                    learner.learn_many(b)
                else:
                    p, _ = learner.step(b)
                    names = {variant: p}
                clock.lap("vm_train")
                for name, p in names.items():
                    self.metrics[name].update(p, y)
                    key = f"vm:{name}"
                    for i, pi in zip(idx, p.tolist()):
                        preds[i][key] = pi
                clock.lap("vm_outputs")
        self.steps += 1
        self.examples += len(augmented)
        rows = [score_row(e, s) for e, s in zip(augmented, preds)]
        clock.lap("vm_outputs")
        return rows

    def _fp8_predict(self, vertical: str, variant: str, learner: VMLearner, b) -> np.ndarray:
        key = (vertical, variant)
        if key not in self.dispatch:  # decided once per model, on its first batch (the calibration data)
            _, table = dispatch_model(learner.model, [b], DispatchConfig(force="emulated:row", repeats=1))
            self.dispatch[key] = table["summary"]
        return learner.predict_many(b)

    def report(self) -> dict:
        return {f"vm:{v}": m.report() for v, m in self.metrics.items() if m.report()["n"]}

    def state_dict(self) -> dict:
        return {"learners": {f"{vt}\x1f{va}": l.state_dict() for (vt, va), l in self.learners.items()},
                "metrics": {k: m.state_dict() for k, m in self.metrics.items()},
                "steps": self.steps, "examples": self.examples,
                "verticals": list(self.verticals), "overflow": {**self.overflow, "names": list(self.overflow["names"])}}

    def load_state_dict(self, state: dict) -> None:
        # the admitted verticals in their order (older snapshots: the learners' own, in their order)
        order = state.get("verticals")
        if order is None:
            order = list(dict.fromkeys(k.split("\x1f")[0] for k in state["learners"]))
            order = [v for v in order if v != OTHER_VERTICAL]
        self.verticals, self._admitted = list(order), set(order)  # a snapshot's verticals are all kept
        ov = state.get("overflow") or {}
        self.overflow = {"examples": int(ov.get("examples", 0)), "names": list(ov.get("names", []))}
        for key, st in state["learners"].items():
            vertical, variant = key.split("\x1f")
            self.learner(vertical, variant).load_state_dict(st)
        for k, st in state["metrics"].items():
            self.metrics[k] = BinaryMetrics()
            self.metrics[k].load_state_dict(st)
        self.steps, self.examples = int(state["steps"]), int(state["examples"])


class StepWork(NamedTuple):
    """One FM step prepared for the VMs (:meth:`VMStage.prepare`): its augmented examples, and per
    vertical (sorted) ``(vertical, indices into augmented, examples, codes, raw events)``."""
    augmented: list
    parts: list


class StepInbox:
    """The vm role's clock. In ``loopline evaluate`` the VM stage runs right after each FM step, so when it
    trains on step ``S`` the store holds the codes of steps ``<= S``. A vm worker receives the same
    augmented examples and codes over several partitions in any interleaving; it holds them by FM step
    and releases step ``S`` (codes first, then examples, both in canonical order) only once every input
    partition has shown the mark ``fmstep:S`` that the fm role sends after a step's outputs. Steps at or
    below ``done`` (already trained on before a restart) are dropped.

    >>> box = StepInbox(["a/0", "a/1"])
    >>> box.add_example({"id": "i1", "label_ts": 2.0, "fm_step": 0})
    >>> box.mark("a/0", 0); box.ready()
    []
    >>> box.mark("a/1", 0); [(s, [e["id"] for e in exs]) for s, _, exs in box.ready()]
    [(0, ['i1'])]
    """

    def __init__(self, inputs: list[str], done: int = -1):
        self.marks = {k: -1 for k in inputs}
        self.done = done
        self._codes: dict[int, list] = {}
        self._examples: dict[int, list] = {}

    def add_example(self, ex: dict) -> None:
        if ex["fm_step"] > self.done:
            self._examples.setdefault(ex["fm_step"], {})[ex["id"]] = ex  # a re-sent copy replaces itself

    def add_code(self, row: dict) -> None:
        if row["step"] > self.done:
            self._codes.setdefault(row["step"], {})[row["id"]] = row

    def mark(self, key: str, step: int) -> None:
        self.marks[key] = max(self.marks.get(key, -1), step)

    def ready(self) -> list[tuple[int, list, list]]:
        """``(step, codes, examples)`` for every complete step not yet released, in step order."""
        upto = min(self.marks.values())
        steps = sorted(s for s in set(self._codes) | set(self._examples) if s <= upto)
        order = lambda r: (r["label_ts"], r["id"])  # noqa: E731 - the FM batch's own order
        out = [(s, sorted(self._codes.pop(s, {}).values(), key=order),
                sorted(self._examples.pop(s, {}).values(), key=order))
               for s in steps]
        self.done = max(self.done, upto)
        return out


def windowed_report(rows: list[dict], edges: list[float], key: str = "ts") -> list[dict]:
    """Per event-time window ``[edges[i], edges[i+1])``: each model's AUC/NE/... over the rows whose
    ``key`` falls in it (rows: ``score_row`` dicts, one model or several per row).

    >>> rows = [{"ts": t, "label": t % 2, "scores": {"m": 0.8 if t % 2 else 0.3}} for t in range(8)]
    >>> [w["models"]["m"]["auc"] for w in windowed_report(rows, [0, 4, 8])]
    [1.0, 1.0]
    """
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        per: dict[str, tuple[list, list]] = {}
        for r in rows:
            if lo <= r[key] < hi:
                for m, p in r["scores"].items():
                    ps, ys = per.setdefault(m, ([], []))
                    ps.append(p)
                    ys.append(r["label"])
        models = {}
        for m, (ps, ys) in sorted(per.items()):
            bm = BinaryMetrics()
            bm.update(np.asarray(ps), np.asarray(ys))
            models[m] = bm.report()
        out.append({"from": lo, "to": hi, "models": models})
    return out
