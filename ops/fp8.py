"""``loopline fp8 report``: run LoKA's Probe and Dispatch on a model and print the decision table.

Public surface: ``representative_model``, ``calibration_batches``, ``fp8_report``, ``format_report``,
``Fp8Command`` and ``run_fp8_report`` (``loopline fp8 report``).

Without ``--snapshot`` the model is a representative one with Loopline's layer shapes (the vertical
models are not wired in yet; ``kernels.dispatch.dispatch_model`` is what their serving code calls):

- ``fm``: the FM's interaction MLP at its defaults, ``[in, *FMConfig.hidden, 1]`` = 240-128-64-1 (``in``
  is read from a built ``FoundationModel``: the pooled sparse embeddings, the Kunlun encoding and the
  means of the newest history tokens),
  with the Mods (HardSwish, BlockNorm, bias only in the last layer);
- ``wide``: 512-1024-1024-1 with the same Mods, a production-width interaction MLP (LoKA's regime), so
  the table shows larger layers too. It is not a Loopline model.

Calibration input: 8 batches of 256 rows (the trainer's micro-batch) of synthetic, correlated,
non-negative features with a few large channels (the shape of pooled embeddings after ReLU), seeded.

With ``--snapshot FILE`` the table saved with a snapshot (under ``kernels.dispatch.TABLE_KEY``, or a file
written by ``--save``) is printed as it was measured; a snapshot without one is a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loopline.errors import ConfigError
from loopline.kernels.dispatch import (HIGH_PRECISION, DispatchConfig, device_name, dispatch_model, load_table,
                                       save_table)
from loopline.kernels.fp8_gemm import scaled_mm_supported, triton_supported
from loopline.settings import argument, nested

__all__ = ["representative_model", "calibration_batches", "fp8_report", "format_report", "Fp8Command",
           "run_fp8_report"]

WIDE_DIMS = (512, 1024, 1024, 1)


def _fm_dims() -> list[int]:
    from loopline.model.fm import FMConfig, FoundationModel
    cfg = FMConfig()
    return [FoundationModel(cfg).mlp[0].in_features, *cfg.hidden, 1]


class _Representative(nn.Module):
    def __init__(self, fm_dims, wide_dims):
        super().__init__()
        from loopline.model.mods import MLP
        self.fm = MLP(fm_dims, act="hardswish", norm="block", bias="last")
        self.wide = MLP(wide_dims, act="hardswish", norm="block", bias="last")

    def forward(self, x_fm: torch.Tensor, x_wide: torch.Tensor):
        return self.fm(x_fm), self.wide(x_wide)  # (B, 1), (B, 1)


def representative_model(seed: int = 0, wide_dims=WIDE_DIMS) -> nn.Module:
    """The FM interaction MLP's shapes and a production-width MLP, both with the Mods (see the docstring)."""
    torch.manual_seed(seed)
    return _Representative(_fm_dims(), list(wide_dims))


def calibration_batches(model: nn.Module, n: int = 8, rows: int = 256, seed: int = 0) -> list[tuple]:
    """``n`` tuples ``(x_fm, x_wide)`` of ``rows`` correlated, non-negative rows with a few loud channels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    dims = (model.fm.dims[0], model.wide.dims[0])
    mixes = [torch.randn(d, d, generator=g) / d ** 0.5 for d in dims]
    gains = [torch.ones(d).index_fill_(0, torch.arange(0, d, max(1, d // 4)), 8.0) for d in dims]  # loud channels
    for _ in range(n):
        out.append(tuple(((torch.randn(rows, d, generator=g) @ mix + 0.3).relu() * gain)
                         for d, mix, gain in zip(dims, mixes, gains)))
    return out


def fp8_report(snapshot: str | None = None, cfg: DispatchConfig = DispatchConfig(), save: str | None = None,
               progress: bool = True) -> dict:
    """The decision table, measured now on the representative model, or the one saved with ``snapshot``."""
    fp8_hw = scaled_mm_supported()[0] or triton_supported()[0]
    if snapshot is not None:
        try:
            table = load_table(snapshot)
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"snapshot: cannot read {snapshot!r}: {exc}") from None
        if table is None:
            raise ConfigError(f"snapshot: {snapshot!r} holds no FP8 dispatch table; call "
                              "loopline.kernels.dispatch.dispatch_model on the serving module and save its table "
                              "with the snapshot (or use `loopline fp8 report --save FILE`)")
        source, model_desc = f"saved table in {snapshot}", "as saved"
    else:
        model = representative_model()
        if torch.cuda.is_available():
            model = model.cuda().to(torch.bfloat16)
        batches = calibration_batches(model)
        if torch.cuda.is_available():
            batches = [tuple(x.cuda().to(torch.bfloat16) for x in b) for b in batches]
        _, table = dispatch_model(model, batches, cfg, progress=progress)
        source = "measured now"
        model_desc = (f"representative: fm {list(model.fm.dims)} (the FM interaction MLP's shapes), wide "
                      f"{list(model.wide.dims)} (production width); Mods on; {len(batches)} calibration "
                      f"batches of {batches[0][0].shape[0]} rows")
        if save:
            save_table(save, table)
    n_fp8 = table["summary"]["fp8"]
    if n_fp8 == 0:
        verdict = (f"every layer stays in high precision ({table['hp_dtype']}): no FP8 candidate measured both "
                   f"MERE < {table['config']['threshold']:g} and speedup > {table['config']['min_speedup']:g}x "
                   f"on {table['device']}")
        if not fp8_hw and table["device"] == device_name():
            verdict += "; this machine has no FP8 hardware, so FP8 here is emulated and slower"
    else:
        verdict = (f"{n_fp8} of {table['summary']['layers']} layer(s) run FP8: "
                   + ", ".join(f"{r['name']}={r['choice']}" for r in table["layers"] if r["choice"] != HIGH_PRECISION))
    return {"source": source, "model": model_desc, "fp8_hardware": fp8_hw, "verdict": verdict, "table": table}


def format_report(out: dict) -> str:
    """A human-readable table: one line per layer and candidate."""
    t = out["table"]
    lines = [f"loopline fp8 report ({out['source']}) on {t['device']}", f"model: {out['model']}",
             f"verdict: {out['verdict']}"]
    unavailable = {}
    for row in t["layers"]:
        for c in row["candidates"]:
            if not c["available"]:
                unavailable.setdefault(c["reason"], []).append(c["name"])
    for reason, names in unavailable.items():
        lines.append(f"not available here: {', '.join(dict.fromkeys(names))}: {reason}")
    lines.append("")
    for row in t["layers"]:
        lines.append(f"{row['name']}  {row['rows']}x{row['in_features']}x{row['out_features']}  "
                     f"baseline {row['baseline']['dtype']} {row['baseline']['seconds'] * 1e6:.1f} us  "
                     f"-> {row['choice']}: {row['why']}")
        for c in row["candidates"]:
            if c["available"]:
                lines.append(f"    {c['name']:<22} MERE {c['mere_max']:.3f}  speedup {c['speedup']:.2f}x")
    return "\n".join(lines)


@dataclass(frozen=True)
class Fp8Command:
    """``loopline fp8 report``: measure the table now (with ``dispatch``'s thresholds) or print a saved one."""

    action: str = argument("report", "what to do", choices=("report",), positional=True, required=True)
    snapshot: str | None = argument(None, "print the table saved with this snapshot instead", metavar="FILE")
    save: str | None = argument(None, "also save the measured table (torch.save of plain data)", metavar="FILE")
    dispatch: DispatchConfig = nested(DispatchConfig)

    def __post_init__(self):
        if self.action != "report":
            raise ConfigError(f"action: only 'report', got {self.action!r}")
        if self.snapshot and self.save:
            raise ConfigError("save: a saved table is printed as is; --save goes with a fresh measurement")


def run_fp8_report(cfg: Fp8Command, progress: bool = True) -> dict:
    """The decision table of :func:`fp8_report` (its progress goes to stderr)."""
    return fp8_report(cfg.snapshot, cfg.dispatch, save=cfg.save, progress=progress)
