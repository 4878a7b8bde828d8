"""``loopline bench stage``: examples/s of the in-process model stage (the models part of ``loopline
evaluate``) against the bare FM trainer on the same batches, in the same process, and where the rest of
the time goes.

Public surface: ``bench_stage``, ``PART_GROUPS``.

A generated log (``ops/generate.py``) goes through in-process ingest once (``evaluate_records`` without
models: the examples ``evaluate`` would train on). Each repeat then runs:

* **the stage**: exactly what ``evaluate`` runs after ingest (:class:`~loopline.model.loop.ModelLoop`): an
  :class:`~loopline.model.pipeline.FMStage` (history, features, DAS, LoopFM codes, the FM and the logistic
  baseline, progressive metrics) on a fresh RocksDB history store, the
  :class:`~loopline.model.verticals.VMStage` with the default variants trailing the FM steps in its own
  thread, the score rows and the before/after windows;
* **the stage with the VMs in the FM's thread** (``ModelLoopConfig(threaded=False)``, each VM step right
  after its FM step): the same numbers, and the reference for where the time goes. Every micro-batch
  the FM trains on is recorded as it goes by;
* **the bare trainer** on those recorded batches (``bench fm``'s loop: predict under ``no_grad`` in eval
  mode, then one Adagrad + Adam step on a fresh FM with the same seed): what training alone costs.

``ratio`` = stage examples/s / bare examples/s (1.0 would be a stage that costs nothing beyond its
training); ``sequential_ratio`` the same for the one-thread stage; medians over repeats. ``breakdown``
gives the one-thread stage's seconds per part (the stages' own :class:`~loopline.model.timing.Timings`;
``other`` is the rest of its wall time: ordering, dedup, the report; with the VM thread the parts overlap
and no longer add up) and ``groups`` sums them as the issue names them. Progress goes to stderr.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import loopline  # noqa: F401 - before torch: it sets torch's OpenMP wait policy (loopline/__init__.py)
import torch

from loopline.errors import ConfigError
from loopline.model.fm import FoundationModel
from loopline.model.loop import ModelLoop, ModelLoopConfig
from loopline.model.pipeline import FMStage, FMStageConfig
from loopline.model.verticals import VMStage, VMStageConfig, windowed_report
from loopline.state.history import HistoryStore

from .bench_fm import bare_loop
from .eventlog import read_log
from .evaluate import evaluate_records
from .generate import GenerateConfig, write_log


__all__ = ["bench_stage", "PART_GROUPS"]

# the stages' parts, grouped as the issue asks ("featurize, history, DAS, LoopFM, VMs") plus training
PART_GROUPS = {
    "training": ("train",),
    "featurize": ("featurize",),
    "history": ("history_read", "history_write"),
    "das": ("das", "publish"),
    "loopfm": ("loopfm",),
    "baseline": ("baseline",),
    "outputs": ("outputs",),
    "vms": ("vm_history_read", "vm_featurize", "vm_train", "vm_outputs"),
}


def _examples(n_events: int, seed: int) -> list[dict]:
    users = max(50, n_events // 20)  # the generator writes about 22 events per user over 7 days
    with tempfile.TemporaryDirectory(prefix="loopline-bench-stage-") as tmp:
        write_log(GenerateConfig(users=users, days=7, seed=seed), f"{tmp}/stage.jsonl")
        records = read_log(f"{tmp}/stage.jsonl")[:n_events]
    return evaluate_records(records, models=False, keep_examples=True)["examples_list"]


def _run_stage(examples: list[dict], stage_cfg: FMStageConfig, vm_cfg: VMStageConfig,
               loop_cfg: ModelLoopConfig) -> tuple[float, dict, list]:
    """The models part of ``evaluate`` (``ops/evaluate.py``), timed; returns seconds, parts, batches."""
    batches: list = []
    with tempfile.TemporaryDirectory(prefix="loopline-bench-stage-") as tmp:
        with HistoryStore(tmp) as history:
            t0 = time.perf_counter()
            stage = FMStage(history, stage_cfg)
            vms = VMStage(history, vm_cfg)
            fm_step = stage.fm.step_outputs

            def recording_step(batch):
                batches.append(batch)
                return fm_step(batch)
            stage.fm.step_outputs = recording_step
            rows = ModelLoop(stage, vms, loop_cfg).run(examples)
            stage.report(), vms.report()
            if rows:
                ts = sorted(r["ts"] for r in rows.values())
                windowed_report(list(rows.values()), [ts[0], (ts[0] + ts[-1]) / 2, ts[-1] + 1e-6])
            seconds = time.perf_counter() - t0
            parts = stage.timings.merge(vms.timings).seconds
    parts["other"] = max(0.0, seconds - sum(parts.values()))
    return seconds, parts, batches


def _bare_loop(batches: list, stage_cfg: FMStageConfig, seed: int) -> float:
    """``bench fm``'s bare loop over the recorded batches, on a fresh FM seeded like the stage's."""
    torch.manual_seed(seed)
    return bare_loop(FoundationModel(stage_cfg.fm), batches, stage_cfg.trainer)


def bench_stage(n_events: int = 20000, repeats: int = 3, seed: int = 3, out_path: str | None = None,
                progress: bool = True) -> dict:
    if isinstance(n_events, bool) or not isinstance(n_events, int) or n_events < 100:
        raise ConfigError(f"events: must be an integer >= 100, got {n_events!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats: must be an integer >= 1, got {repeats!r}")

    def say(msg: str) -> None:
        if progress:
            print(f"bench stage: {msg}", file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    examples = _examples(n_events, seed)
    if not examples:
        raise ConfigError(f"events: {n_events} events gave no labelled examples; use more")
    stage_cfg, vm_cfg = FMStageConfig(), VMStageConfig()
    say(f"{len(examples)} examples from {n_events} events; {repeats} repeats of the stage and the bare trainer")
    runs = []
    for r in range(repeats):
        stage_s, _, batches = _run_stage(examples, stage_cfg, vm_cfg, ModelLoopConfig())
        del batches
        seq_s, parts, batches = _run_stage(examples, stage_cfg, vm_cfg, ModelLoopConfig(threaded=False))
        n = sum(b.size for b in batches)
        assert n == len(examples), f"the stage trained on {n} examples, not {len(examples)}"
        bare_s = _bare_loop(batches, stage_cfg, stage_cfg.trainer.seed)
        del batches
        run = {"stage_s": round(stage_s, 3), "sequential_s": round(seq_s, 3), "bare_s": round(bare_s, 3),
               "stage_examples_per_s": round(n / stage_s, 1), "bare_examples_per_s": round(n / bare_s, 1),
               "ratio": round(bare_s / stage_s, 4), "sequential_ratio": round(bare_s / seq_s, 4),
               "parts_s": {k: round(v, 3) for k, v in sorted(parts.items())}}
        runs.append(run)
        say(f"repeat {r + 1}/{repeats}: stage {run['stage_examples_per_s']:,.0f}/s, bare "
            f"{run['bare_examples_per_s']:,.0f}/s, ratio {run['ratio']:.3f} (VMs in the FM's thread: "
            f"{run['sequential_ratio']:.3f})")
    names = sorted({k for run in runs for k in run["parts_s"]})
    med_stage = statistics.median(r["sequential_s"] for r in runs)  # the parts add up to its wall time
    breakdown = {k: round(statistics.median(run["parts_s"].get(k, 0.0) for run in runs), 3) for k in names}
    groups = {g: round(sum(breakdown.get(p, 0.0) for p in ps), 3) for g, ps in PART_GROUPS.items()}
    groups["other"] = breakdown.get("other", 0.0)
    out = {
        "benchmark": "stage", "events": n_events, "examples": len(examples),
        "batch_size": stage_cfg.trainer.batch_size, "vm_variants": list(vm_cfg.variants), "repeats": runs,
        "median_stage_examples_per_s": statistics.median(r["stage_examples_per_s"] for r in runs),
        "median_bare_examples_per_s": statistics.median(r["bare_examples_per_s"] for r in runs),
        "median_ratio": statistics.median(r["ratio"] for r in runs),
        "median_sequential_ratio": statistics.median(r["sequential_ratio"] for r in runs),
        "median_stage_s": statistics.median(r["stage_s"] for r in runs),
        "median_sequential_s": med_stage,
        "median_bare_s": statistics.median(r["bare_s"] for r in runs),
        "breakdown_s": breakdown,
        "groups_s": groups,
        "groups_share": {g: round(v / med_stage, 4) if med_stage else 0.0 for g, v in groups.items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "python": sys.version.split()[0], "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in os.getloadavg()]},
    }
    if out_path:
        Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
    return out
