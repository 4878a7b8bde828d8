"""``loopline bench fp8``: FP8 GEMM throughput and speedup over high precision per shape, MERE per recipe,
the fused epilogue, the Probe's overhead, and end-to-end inference of a dispatched model.

Public surface: ``bench_fp8``, ``GPU_LARGE_SHAPES``.

One prepared script for whatever machine it runs on. Every figure is a median over ``5 x repeats``
timings of ``iters`` calls each, in this process, each FP8 candidate timed alternately with the
high-precision baseline (``kernels.dispatch.interleaved_timer``; speedup = median of the per-pair
ratios, ``speedup_q25`` their lower quartile, the figure Dispatch requires above 1.05x). Weights are
quantized once, outside the timing; activation quantization is inside it (it is part of serving).

- Shapes (M x K x N, ``y = x @ W.T`` with x (M, K), W (N, K)): the layers of
  ``ops.fp8.representative_model`` (the FM interaction MLP's shapes and a production-width MLP) at the
  serving micro-batch of 256 rows and, on a GPU, at 4096 rows; on a GPU also large GEMMs
  (``GPU_LARGE_SHAPES``, e.g. 4096x8192x8192) where FP8 tensor cores should pay.
- Baseline: bfloat16 ``F.linear`` on a GPU (cuBLAS), float32 on CPU (what the model serves in there).
- Candidates: those of ``kernels.dispatch.CANDIDATES`` that can run here. On CPU that is only the
  emulated path (quantize + dequantize + a float32 matmul): there is no FP8 hardware, and the output says
  so; the triton kernel and ``_scaled_mm`` are GPU figures.
- MERE per recipe against a float32 reference, on N(0, 1) inputs and on "learned-like" inputs (the
  representative model's calibration features: correlated, non-negative, a few loud channels).
- Fused epilogue (GPU): the triton kernel with bias + BlockNorm + HardSwish in its epilogue against bf16
  ``F.linear`` followed by the same epilogue in torch.
- Probe overhead at LoKA's cadence (statistics every 100 forward passes) on the representative model.
- End to end: examples/s of the representative model in high precision against the same model after
  ``dispatch_model`` (whatever it chose here), same batches.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from torch.nn import functional as F

from loopline.kernels.dispatch import (CANDIDATES, HIGH_PRECISION, DispatchConfig, device_name, dispatch_model,
                                       hp_dtype, interleaved_timer)
from loopline.kernels.epilogue import apply_epilogue
from loopline.kernels.fp8_gemm import scaled_mm_supported, triton_fp8_gemm, triton_supported
from loopline.kernels.probe import Probe, ProbeConfig, mere
from loopline.kernels.quant import RECIPES, quantize

from .fp8 import WIDE_DIMS, calibration_batches, representative_model

__all__ = ["bench_fp8", "GPU_LARGE_SHAPES"]

GPU_LARGE_SHAPES = [(1024, 2048, 1024), (4096, 4096, 4096), (4096, 8192, 8192), (4096, 8192, 16384),
                    (8192, 8192, 8192)]
CPU_EXTRA_SHAPES = [(1024, 1024, 1024), (4096, 512, 512)]  # what a CPU can time in seconds
QUICK_WIDE_DIMS = (64, 128, 1)  # the smoke run's stand-in for the wide MLP


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"bench fp8: {msg}", file=sys.stderr, flush=True)


def _model_shapes(model, rows: int) -> list[tuple]:
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and (m.in_features, m.out_features) not in seen:
            seen.add((m.in_features, m.out_features))
            out.append((rows, m.in_features, m.out_features))
    return out


def _gemm_row(M: int, K: int, N: int, repeats: int, iters: int, dev, dt) -> dict:
    g = torch.Generator().manual_seed(M * 31 + K * 7 + N)
    x = torch.randn(M, K, generator=g).to(dev, dt)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(dev)
    W_hp = W.to(dt)
    flops = 2.0 * M * N * K
    row = {"shape": [M, K, N], "baseline": {"dtype": str(dt).replace("torch.", "")}, "candidates": {}}

    def base():
        for _ in range(iters):
            F.linear(x, W_hp)
    base_times = []
    for name, c in CANDIDATES.items():
        ok, reason = c.available()
        if not ok:
            row["candidates"][name] = {"available": False, "reason": reason}
            continue
        prepared = c.prepare(W if c.library != "emulated" else W_hp)

        def cand():
            for _ in range(iters):
                c(x, prepared, None, dt)
        try:
            b_s, c_s, ratio, low = interleaved_timer(base, cand, repeats=repeats, warmup=1)
        except (RuntimeError, ValueError) as exc:  # a library that refuses this shape on this device
            row["candidates"][name] = {"available": False, "reason": f"failed: {exc}"[:200]}
            continue
        base_times.append(b_s)
        row["candidates"][name] = {"available": True, "seconds": c_s / iters,
                                   "tflops": flops / (c_s / iters) / 1e12, "speedup": ratio, "speedup_q25": low}
    if not base_times:
        b_s, _, _, _ = interleaved_timer(base, base, repeats=repeats, warmup=1)
        base_times.append(b_s)
    b = statistics.median(base_times) / iters
    row["baseline"].update({"seconds": b, "tflops": flops / b / 1e12})
    fastest = max(((n, r) for n, r in row["candidates"].items() if r["available"]),
                  key=lambda t: t[1]["speedup"], default=None)
    row["best"] = None if fastest is None else {"name": fastest[0], "speedup": fastest[1]["speedup"]}
    return row


def _mere_rows(dev, dt, samples: int = 1024, wide_dims=WIDE_DIMS) -> list[dict]:
    """MERE per recipe (and per library that runs here) on two layer shapes and two input kinds."""
    model = representative_model(wide_dims=wide_dims)
    calib = calibration_batches(model, n=4)
    out = []
    for lname, layer, x_learned in (("fm.linears.0", model.fm.linears[0], torch.cat([b[0] for b in calib])),
                                    ("wide.linears.1", model.wide.linears[1], None)):
        K = layer.in_features
        if x_learned is None:  # the wide MLP's second layer: its real inputs, through the first layer
            with torch.no_grad():
                h = torch.cat([b[1] for b in calib])
                x_learned = model.wide.act(model.wide.norm(model.wide.linears[0](h)))
        inputs = {"normal": torch.randn(samples, K, generator=torch.Generator().manual_seed(1)),
                  "learned": x_learned[:samples]}
        W = layer.weight.detach().float()
        for kind, x in inputs.items():
            x, Wd = x.to(dev), W.to(dev)
            ref = F.linear(x, Wd)
            row = {"layer": lname, "shape": [len(x), K, layer.out_features], "inputs": kind, "mere": {}}
            for name, c in CANDIDATES.items():
                if not c.available()[0]:
                    continue
                prepared = c.prepare(Wd if c.library != "emulated" else Wd.to(dt))
                row["mere"][name] = float(mere(c(x.to(dt), prepared, None, torch.float32), ref))
            by_recipe = {}
            for r in RECIPES:
                vals = [v for n, v in row["mere"].items() if CANDIDATES[n].recipe == r]
                if vals:
                    by_recipe[r] = max(vals)
            row["by_recipe"] = by_recipe
            out.append(row)
    return out


def _fused_epilogue(repeats: int, iters: int) -> dict:
    if not triton_supported()[0]:
        return {"measured": False, "reason": triton_supported()[1]}
    rows = []
    for M, K, N in ((256, 1024, 1024), (4096, 4096, 4096), (4096, 8192, 8192)):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(M, K, generator=g).cuda().bfloat16()
        W = (torch.randn(N, K, generator=g) / K ** 0.5).cuda()
        bias = torch.randn(N, generator=g).cuda()
        wq = quantize(W, "row", "weight")
        W_hp, b_hp = W.bfloat16(), bias.bfloat16()

        def base():
            for _ in range(iters):
                apply_epilogue(F.linear(x, W_hp, b_hp), None, "hardswish", 256).bfloat16()

        def fused():
            for _ in range(iters):
                triton_fp8_gemm(quantize(x, "row", "act"), wq, bias, "hardswish", 256, torch.bfloat16)
        b_s, f_s, ratio, _ = interleaved_timer(base, fused, repeats=repeats, warmup=1)
        ref = apply_epilogue(F.linear(x.float(), W, bias), None, "hardswish", 256)
        err = float(mere(triton_fp8_gemm(quantize(x, "row", "act"), wq, bias, "hardswish", 256, torch.float32), ref))
        rows.append({"shape": [M, K, N], "bf16_unfused_seconds": b_s / iters, "fp8_fused_seconds": f_s / iters,
                     "speedup": ratio, "mere": err})
    return {"measured": True, "epilogue": "bias + BlockNorm(256) + HardSwish", "recipe": "row", "rows": rows}


def _probe_overhead(model, batches, passes: int = 300, every: int = 100) -> dict:
    probe = Probe(model, ProbeConfig(every=every))
    with probe, torch.no_grad():
        for i in range(passes):
            model(*batches[i % len(batches)])
    return {"every": every, "passes": passes, "sampled_passes": probe.sampled_steps,
            "hook_s": probe.hook_s, "forward_s": probe.forward_s, "overhead": probe.overhead()}


def _end_to_end(repeats: int, iters: int, dev, dt, progress: bool, quick: bool) -> dict:
    wide = QUICK_WIDE_DIMS if quick else WIDE_DIMS
    hp = representative_model(wide_dims=wide).to(dev, dt).eval()
    batches = [tuple(x.to(dev, dt) for x in b) for b in calibration_batches(hp, n=2 if quick else 8)]
    overhead = _probe_overhead(hp, batches, *((21, 10) if quick else (300, 100)))
    fp8 = representative_model(wide_dims=wide).to(dev, dt).eval()
    _, table = dispatch_model(fp8, batches, DispatchConfig(repeats=3 if quick else 20, samples=256 if quick else 1024),
                              progress=progress)
    rows = batches[0][0].shape[0]

    def run(model):
        def f():
            with torch.no_grad():
                for i in range(iters):
                    model(*batches[i % len(batches)])
        return f
    b_s, d_s, ratio, _ = interleaved_timer(run(hp), run(fp8), repeats=repeats, warmup=1)
    return {"model": "representative (ops.fp8): fm " + "-".join(map(str, hp.fm.dims)) + ", wide "
            + "-".join(map(str, hp.wide.dims)), "rows_per_batch": rows,
            "high_precision_examples_per_s": rows * iters / b_s, "dispatched_examples_per_s": rows * iters / d_s,
            "speedup": ratio, "fp8_layers": table["summary"]["fp8_layers"],
            "choices": {r["name"]: r["choice"] for r in table["layers"]}, "probe_overhead": overhead}


def bench_fp8(repeats: int = 3, out_path: str | None = None, progress: bool = True, iters: int | None = None,
              quick: bool = False) -> dict:
    """Run the benchmark. ``quick`` (the test's smoke run) keeps the model shapes at 256 rows, shrinks the
    wide MLP to ``QUICK_WIDE_DIMS`` and the Probe's cadence to every 10 passes: its figures mean nothing."""
    gpu = torch.cuda.is_available()
    dev, dt = (torch.device("cuda") if gpu else torch.device("cpu")), hp_dtype()
    fp8_hw = scaled_mm_supported()[0] or triton_supported()[0]
    repeats = max(repeats, 1) * 5  # alternating pairs per figure
    iters = iters or (20 if gpu else 3)
    t0 = time.perf_counter()
    model = representative_model(wide_dims=QUICK_WIDE_DIMS if quick else WIDE_DIMS)
    shapes = _model_shapes(model, 256)
    if not quick:
        shapes += _model_shapes(model, 4096) + GPU_LARGE_SHAPES if gpu else CPU_EXTRA_SHAPES
    shapes = list(dict.fromkeys(shapes))  # each shape once
    gemm = []
    for i, (M, K, N) in enumerate(shapes):
        gemm.append(_gemm_row(M, K, N, repeats, iters, dev, dt))
        el = time.perf_counter() - t0
        _log(progress, f"GEMM {i + 1}/{len(shapes)} {M}x{K}x{N}: best "
             f"{gemm[-1]['best']['speedup'] if gemm[-1]['best'] else float('nan'):.2f}x; "
             f"{(i + 1) / el:.2f} shapes/s, ETA {el / (i + 1) * (len(shapes) - i - 1):.0f}s")
    _log(progress, "MERE per recipe")
    mere_rows = _mere_rows(dev, dt, *((256, QUICK_WIDE_DIMS) if quick else (1024, WIDE_DIMS)))
    _log(progress, "fused epilogue")
    fused = _fused_epilogue(repeats, iters) if not quick else {"measured": False, "reason": "quick run"}
    _log(progress, "end to end")
    e2e = _end_to_end(repeats, iters, dev, dt, progress, quick)
    out = {
        "benchmark": "fp8", "device": device_name(), "fp8_hardware": fp8_hw, "quick": quick,
        "note": ("FP8 tensor cores present: triton and _scaled_mm candidates measured" if fp8_hw else
                 "no FP8 hardware present on this machine: FP8 is emulated (quantize + dequantize + "
                 "high-precision matmul), so it is expected to be slower; speed claims need an H100/H200"),
        "baseline_dtype": str(dt).replace("torch.", ""), "repeats": repeats, "iters": iters,
        "candidates": {n: {"available": c.available()[0], "reason": c.available()[1]} for n, c in CANDIDATES.items()},
        "gemm": gemm, "mere": mere_rows, "fused_epilogue": fused, "end_to_end": e2e,
        "dispatch_rule": {"threshold": DispatchConfig.threshold, "min_speedup": DispatchConfig.min_speedup,
                          "high_precision": HIGH_PRECISION},
        "seconds": time.perf_counter() - t0,
    }
    if out_path:
        with open(out_path, "w") as f:
            json.dump(out, f, indent=2)
    return out
