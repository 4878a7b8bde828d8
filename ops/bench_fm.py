"""``loopline bench fm``: examples/s of the online trainer against a bare PyTorch loop over the same model
and batches, in the same process, and peak memory.

Public surface: ``bench_fm``.

Both sides do the same work per micro-batch: predict under ``no_grad`` in eval mode (progressive
validation), then one training step with Adagrad on the embedding tables and Adam on the dense layers.
The bare loop is that, written inline; the ratio (trainer seconds / bare seconds) is the trainer's
overhead. Batches are featurized once, up front, so neither side pays for it. Repeats alternate the two
sides; medians are reported. Peak memory is the process's peak resident set size (``ru_maxrss``).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from loopline.model.features import Featurizer
from loopline.model.fm import FMConfig, FoundationModel
from loopline.model.pipeline import canonical_order
from loopline.model.trainer import OnlineTrainer, TrainerConfig, split_params

from .eventlog import read_log
from .generate import GenerateConfig, write_log

__all__ = ["bench_fm", "bare_loop"]


def _examples(n: int) -> list[dict]:
    from loopline.state.ingest import IngestCore
    with tempfile.TemporaryDirectory() as tmp:
        write_log(GenerateConfig(users=max(50, n // 10), days=7, seed=5), f"{tmp}/fm.jsonl")
        core, out = IngestCore({}, 0), []
        for i, rec in enumerate(read_log(f"{tmp}/fm.jsonl")):
            out += [o.value for o in core.handle(rec.raw, i) if o.kind == "example"]
        out += [o.value for o in core.end_of_log() if o.kind == "example"]
    return canonical_order(out)[:n]


def bare_loop(model: nn.Module, batches, cfg: TrainerConfig) -> float:
    """Seconds for a plain PyTorch loop over ``batches``: an eval forward (the progressive-validation
    prediction), then forward, backward and the Adagrad (sparse) + Adam (dense) step."""
    sparse, dense = split_params(model)
    opts = [torch.optim.Adagrad(sparse, lr=cfg.lr_sparse), torch.optim.Adam(dense, lr=cfg.lr_dense)]
    bce = nn.BCEWithLogitsLoss()
    t0 = time.perf_counter()
    for b in batches:
        model.eval()
        with torch.no_grad():
            torch.sigmoid(model(b)["logit"]).numpy()
        model.train()
        out = model(b)
        loss = bce(out["logit"], b.labels) + out["aux_loss"]
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
    return time.perf_counter() - t0


def _trainer_loop(model: nn.Module, batches, cfg: TrainerConfig) -> float:
    t = OnlineTrainer(model, cfg)
    t0 = time.perf_counter()
    for b in batches:
        t.step(b)
    return time.perf_counter() - t0


def bench_fm(n_examples: int = 8192, repeats: int = 3, out_path: str | None = None, progress: bool = True) -> dict:
    cfg = TrainerConfig()
    fm_cfg = FMConfig()
    exs = _examples(n_examples)
    f = Featurizer(fm_cfg.features)
    bs = cfg.batch_size
    # a fixed, plausible history per example (the same bytes for both sides)
    hist = [[(e["ts"] - 60 * k, f"a{k}", "c1", "impression" if k % 3 else "click") for k in range(1, 40)] for e in exs]
    batches = [f.batch(exs[i:i + bs], hist[i:i + bs]) for i in range(0, len(exs), bs)]
    runs = []
    for r in range(repeats):
        torch.manual_seed(r)
        bare = bare_loop(FoundationModel(fm_cfg), batches, cfg)
        torch.manual_seed(r)
        trainer = _trainer_loop(FoundationModel(fm_cfg), batches, cfg)
        run = {"bare_examples_per_s": round(len(exs) / bare, 1), "trainer_examples_per_s": round(len(exs) / trainer, 1),
               "overhead_ratio": round(trainer / bare, 3)}
        runs.append(run)
        if progress:
            print(f"bench fm: repeat {r + 1}/{repeats}: {run}", file=sys.stderr, flush=True)
    out = {"benchmark": "fm", "examples": len(exs), "batch_size": bs, "repeats": runs,
           "median_bare_examples_per_s": statistics.median(r["bare_examples_per_s"] for r in runs),
           "median_trainer_examples_per_s": statistics.median(r["trainer_examples_per_s"] for r in runs),
           "median_overhead_ratio": statistics.median(r["overhead_ratio"] for r in runs),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "fm_params": sum(p.numel() for p in FoundationModel(fm_cfg).parameters()),
           "torch_threads": torch.get_num_threads()}
    if out_path:
        Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
    return out
