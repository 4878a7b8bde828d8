"""``loopline evaluate``: the in-process replay through the same code the workers run.

Public surface: ``evaluate_records``, ``summarize``, ``format_table``, ``ingest_outputs``,
``with_transfer_ratios``; ``EvaluateCommand``, ``run_evaluate``, ``format_evaluate`` and
``vm_stage_config`` (``loopline evaluate``).

Events are routed to partitions exactly as ``loopline replay`` sends them (``ops/eventlog.py``), each
partition's :class:`~loopline.state.ingest.IngestCore` runs over a dict, and at the end of the log every
open window is closed. The output is design.md's evaluation JSON.

Total on input: every line is accepted or dead-lettered by the ingest core (which never raises), so any
log gives exit 0; a bad setting (``partitions`` < 1) is a :class:`~loopline.errors.ConfigError`
naming it; a metric that is undefined on the data (an NE with one class only) is ``None``, and so is
every transfer ratio computed from it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Iterable

import orjson

from loopline.errors import ConfigError
from loopline.model.fm_settings import RanksConfig, UserTableConfig
from loopline.settings import argument, nested, same_as, setting
from loopline.state.attribution import AttributionConfig, STAT_NAMES
from loopline.state.ingest import IngestCore
from loopline.stream.app import WorkerConfig

from .eventlog import LogRecord, partition_for
from .source import JoinConfig, SourceConfig

__all__ = ["evaluate_records", "summarize", "format_table", "ingest_outputs", "with_transfer_ratios",
           "EvaluateCommand", "run_evaluate", "format_evaluate", "vm_stage_config"]


def summarize(read: int, deadletters: dict[str, int], examples: int, positives: int,
              attribution: dict | None = None) -> dict:
    """design.md's evaluation JSON from counts (shared by evaluate and the broker-side collector)."""
    dead = sum(deadletters.values())
    out = {
        "events": {"read": read, "accepted": read - dead, "deadletter": dead,
                   "by_reason": dict(sorted(deadletters.items()))},
        "examples": {"total": examples, "positive": positives,
                     "positive_rate": round(positives / examples, 6) if examples else 0.0},
        "models": {},
    }
    if attribution is not None:
        out["attribution"] = attribution
    return out


def _check_partitions(partitions) -> None:
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ConfigError(f"partitions: must be an integer >= 1, got {partitions!r}")


def evaluate_records(records: Iterable[LogRecord], partitions: int = 4,
                     cfg: AttributionConfig = AttributionConfig(), progress: bool = False,
                     models: bool = False, stage_cfg=None, vm_cfg=None, scores: bool = False,
                     split_ts: float | None = None, keep_examples: bool = False,
                     ranks: RanksConfig = RanksConfig(), user_table: UserTableConfig = UserTableConfig()) -> dict:
    """Ingest and attribution in-process; with ``models``, then the FM stage (FM, logistic baseline,
    DAS) and, with ``vm_cfg`` (a :class:`~loopline.model.verticals.VMStageConfig`), the VM variants
    side by side on each FM step's augmented examples, in one pass. Progressive metrics go under
    ``models`` (each VM variant with its transfer ratio ``tr``), the same before and after ``split_ts``
    (default: the middle of the examples' event time) under ``windows``; ``scores`` also returns every
    example's score row; ``keep_examples`` returns the labelled examples as ``examples_list`` (in the
    order attribution emitted them: the monitor's feature drift reads them); ``ranks`` trains the FM over
    that many torch.distributed ranks (``model/ranks.py``) and ``user_table`` says how its user table is
    kept (``model/fm.py``), when ``stage_cfg`` is not given. ``records`` may be any iterable (a streamed
    :func:`~loopline.ops.eventlog.read_log`)."""
    _check_partitions(partitions)
    total = len(records) if hasattr(records, "__len__") else None
    stores: list[dict] = [{} for _ in range(partitions)]
    cores = [IngestCore(stores[p], p, cfg) for p in range(partitions)]
    offsets = [0] * partitions
    examples = positives = 0
    dead: dict[str, int] = {}
    emitted: list[dict] = []
    t0 = time.perf_counter()

    def consume(outs):
        nonlocal examples, positives
        for o in outs:
            if o.kind == "example":
                examples += 1
                positives += o.value["label"]
                if models or keep_examples:
                    emitted.append(o.value)
            else:
                dead[o.value["reason"]] = dead.get(o.value["reason"], 0) + 1

    n = 0
    for n, rec in enumerate(records, 1):
        p = partition_for(rec.key, rec.raw, partitions)
        outs = cores[p].handle(rec.raw, offsets[p])
        cores[p].acked(outs)  # in-process: delivered at once
        offsets[p] += 1
        consume(outs)
        if n % 1000 == 0:  # the worker flushes once per batch; the result does not depend on when
            for core in cores:
                core.flush()
        if progress and n % 50000 == 0:
            rate = n / (time.perf_counter() - t0)
            eta = f", ETA {(total - n) / rate:.0f}s" if total else ""
            print(f"evaluate: {n}/{total if total is not None else '?'} events, {rate:,.0f}/s{eta}",
                  file=sys.stderr, flush=True)
    for core in cores:
        outs = core.end_of_log()
        core.acked(outs)
        core.flush()
        consume(outs)
    attribution = {k: sum(c.counts()["attribution"][k] for c in cores) for k in STAT_NAMES}
    out = summarize(n, dead, examples, positives, attribution)
    if models:
        out.update(_run_models(emitted, stage_cfg, vm_cfg, progress, scores, split_ts, cfg.window_s, ranks,
                               user_table))
    if keep_examples:
        out["examples_list"] = emitted
    return out


def with_transfer_ratios(models: dict) -> dict:
    """Each VM's transfer ratio ``tr``: None when an NE it needs is undefined on the data."""
    from loopline.model.verticals import transfer_ratio
    base, fm = models.get("vm:base"), models.get("fm")
    for name, r in models.items():
        if name.startswith("vm:") and base and fm:
            nes = (base.get("ne"), r.get("ne"), fm.get("ne"))
            r["tr"] = transfer_ratio(*nes) if all(x is not None for x in nes) else None
    return models


def _run_models(examples: list[dict], stage_cfg, vm_cfg, progress: bool, keep_scores: bool,
                split_ts: float | None, window_s: float, ranks: RanksConfig, user_table: UserTableConfig) -> dict:
    import tempfile
    from dataclasses import replace

    from loopline.model.delay import DelayConfig
    from loopline.model.fm import FMConfig
    from loopline.model.loop import ModelLoop
    from loopline.model.pipeline import FMStage, FMStageConfig
    from loopline.model.verticals import VMStage, windowed_report
    from loopline.state.history import HistoryStore

    t0 = time.perf_counter()
    last = [t0]

    def tick(done: int, total: int) -> None:
        now = time.perf_counter()
        if progress and (now - last[0] > 5 or done == total):
            last[0] = now
            rate = done / max(now - t0, 1e-9)
            eta = f", ETA {(total - done) / rate:.0f}s" if rate > 0 else ""
            print(f"evaluate: models {done}/{total} examples, {rate:,.0f}/s{eta}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="loopline-history-") as tmp:
        with HistoryStore(tmp) as history:
            # the delayed-feedback weights pair each positive with the negatives of one window earlier
            stage_cfg = stage_cfg or FMStageConfig(fm=FMConfig(user_table=user_table),
                                                   delay=DelayConfig(window_s=window_s))
            stage = FMStage(history, replace(stage_cfg, ranks=ranks) if ranks.ranks > 1 else stage_cfg)
            vms = VMStage(history, vm_cfg) if vm_cfg is not None else None
            try:
                rows = ModelLoop(stage, vms).run(examples, progress=tick)
            finally:
                stage.close()
            report = {**stage.report(), **(vms.report() if vms is not None else {})}
            result = {"models": with_transfer_ratios(report),
                      "fm_stage": {**stage.counts, "seconds": round(time.perf_counter() - t0, 2),
                                   "ranks": stage.cfg.ranks.ranks,
                                   "fm_params": sum(p.numel() for p in stage.fm.model.parameters()),
                                   "fm_flops_per_example": stage.fm.model.flops_per_example(),
                                   "fm_tables": stage.fm.model.embedding_report()}}
            if vms is not None:
                result["vm_stage"] = {"variants": list(vms.cfg.variants), "steps": vms.steps,
                                      "verticals": sorted({vt for vt, _ in vms.learners}), "bounds": vms.bounds(),
                                      "teacher_gate": vms.teacher_gate(),
                                      "params": {va: sum(p.numel() for p in learner.model.parameters())
                                                 for (_, va), learner in sorted(vms.learners.items())}}
            if rows:
                ts = sorted(r["ts"] for r in rows.values())
                split = split_ts if split_ts is not None else (ts[0] + ts[-1]) / 2
                windows = windowed_report(list(rows.values()), [ts[0], split, ts[-1] + 1e-6])
                for w, name in zip(windows, ("before", "after")):
                    w["window"] = name
                    with_transfer_ratios(w["models"])
                result["windows"] = windows
            if keep_scores:
                result["scores"] = list(rows.values())
            return result


def format_table(out: dict) -> str:
    """The evaluation table: one row per model, overall and before/after the split.

    >>> print(format_table({"models": {"fm": {"auc": 0.7, "ne": 0.9, "logloss": 0.3, "calibration": 1.0,
    ...                                         "n": 10}}}))
    model                       n     AUC      NE  logloss   calib      TR
    fm                         10  0.7000  0.9000   0.3000   1.000       -
    """
    cols = ["model", "n", "AUC", "NE", "logloss", "calib", "TR"]
    windows = out.get("windows", [])
    head = f"{cols[0]:<22}{cols[1]:>7}{cols[2]:>8}{cols[3]:>8}{cols[4]:>9}{cols[5]:>8}{cols[6]:>8}"
    for w in windows:
        head += f"{'AUC ' + w['window']:>13}{'NE ' + w['window']:>12}{'TR ' + w['window']:>11}"
    lines = [head]

    def num(v, width, fmt):
        return f"{'-':>{width}}" if v is None else f"{v:>{width}{fmt}}"

    for name, r in out.get("models", {}).items():
        line = (f"{name:<22}{r['n']:>7}{num(r['auc'], 8, '.4f')}{num(r['ne'], 8, '.4f')}"
                f"{num(r['logloss'], 9, '.4f')}{num(r['calibration'], 8, '.3f')}{num(r.get('tr'), 8, '.3f')}")
        for w in windows:
            m = w["models"].get(name)
            line += (num(m and m["auc"], 13, ".4f") + num(m and m["ne"], 12, ".4f") +
                     num(m and m.get("tr"), 11, ".3f"))
        lines.append(line)
    return "\n".join(lines)


def ingest_outputs(records: list[LogRecord], partitions: int = 4, cfg: AttributionConfig = AttributionConfig(),
                   progress: str | None = None, **core_kw):
    """Every output of the in-process ingest cores, record by record, routed exactly as ``replay``
    sends (``core_kw``: e.g. ``audience=True``); ``progress`` names the periodic stderr line. Windows
    still open at the end are not closed (no examples at the end), but every line is accepted or
    dead-lettered."""
    _check_partitions(partitions)
    total = len(records) if hasattr(records, "__len__") else None
    cores = [IngestCore({}, p, cfg, **core_kw) for p in range(partitions)]
    offsets = [0] * partitions
    t0 = time.perf_counter()
    for n, rec in enumerate(records, 1):
        p = partition_for(rec.key, rec.raw, partitions)
        outs = cores[p].handle(rec.raw, offsets[p])
        cores[p].acked(outs)
        offsets[p] += 1
        yield from outs
        if n % 5000 == 0:
            for core in cores:
                core.flush()
        if progress and n % 100_000 == 0:
            rate = n / (time.perf_counter() - t0)
            eta = f", ETA {(total - n) / rate:.0f}s" if total else ""
            print(f"{progress}: {n}/{total if total is not None else '?'} events, {rate:,.0f}/s{eta}",
                  file=sys.stderr, flush=True)
    for core in cores:  # events still held for the skew check at the end: dead letters, as in evaluate
        yield from core.drop_held()


@dataclass(frozen=True)
class EvaluateCommand:
    """``loopline evaluate``: the log, how it is partitioned and joined, and which models run on it."""

    source: SourceConfig = nested(SourceConfig)
    partitions: int = same_as(WorkerConfig, "partitions")
    models: bool = setting(True, "counts only: skip the FM stage", flag="no-models")
    # None: VMStageConfig's variants (the evaluation table's seven); "none": no VM stage
    variants: str | None = setting(None, "VM variants trained side by side, comma-separated, or 'none' "
                                         "(default: the table's seven)")
    split_ts: float | None = setting(None, "event time splitting the before/after windows (default: the middle)")
    scores: str | None = argument(None, "also write every example's score row (JSONL)", metavar="FILE")
    fp8: bool = setting(False, "also score each VM through emulated FP8 Linear layers (rows vm:VARIANT@fp8)")
    join: JoinConfig = nested(JoinConfig)
    fm: RanksConfig = nested(RanksConfig, prefix="fm-")
    user_table: UserTableConfig = nested(UserTableConfig)


def vm_stage_config(variants: str | None, fp8: bool = False):
    """The VM stage for a ``--variants`` value: None for ``none``, the default variants for None."""
    if variants == "none":
        return None
    from loopline.model.verticals import VMStageConfig, parse_variants
    return VMStageConfig(variants=parse_variants(variants) if variants else VMStageConfig.variants, fp8=fp8)


def run_evaluate(cfg: EvaluateCommand, progress: bool = True) -> dict:
    """design.md's evaluation JSON for ``cfg``; with ``scores``, the score rows go to that file instead."""
    attribution = cfg.join.attribution(cfg.source.dataset)
    vm_cfg = vm_stage_config(cfg.variants, cfg.fp8) if cfg.models else None
    out = evaluate_records(cfg.source.records(), cfg.partitions, attribution, progress=progress, models=cfg.models,
                           vm_cfg=vm_cfg, scores=bool(cfg.scores), split_ts=cfg.split_ts, ranks=cfg.fm,
                           user_table=cfg.user_table)
    if cfg.scores:
        with open(cfg.scores, "wb") as f:
            f.writelines(orjson.dumps(r) + b"\n" for r in out.pop("scores"))
    return out


def format_evaluate(out: dict) -> tuple:
    """For people: the counts, then the evaluation table."""
    return {k: v for k, v in out.items() if k not in ("models", "windows")}, format_table(out)
