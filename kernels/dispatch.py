"""LoKA's Dispatch: per Linear layer, the fastest FP8 kernel that is accurate enough, measured on this
machine, else high precision; the decision table, and the module that serves it.

Public surface: ``DispatchConfig``, ``Candidate``, ``CANDIDATES``, ``DispatchLinear``, ``dispatch_model``,
``high_precision``,
``decide_layer``, ``apply_table``, ``save_table``, ``load_table``, ``median_timer``, ``interleaved_timer``,
``device_name``, ``hp_dtype``, ``TABLE_KEY``, ``HIGH_PRECISION``.

The rule (static, decided once per model version, as LoKA does for inference):

1. Probe the model on calibration batches (``kernels.probe``): each Linear layer's input statistics and a
   reservoir of real input rows.
2. For every candidate (library x scaling recipe x fast accumulation) that can run here, compute MERE
   against a float32 reference on three input sets: rows drawn from the learned Gaussian, the recorded
   real rows, and N(0, 1). The worst of the three is the candidate's MERE.
3. Time the candidate and the high-precision baseline (bfloat16 ``F.linear`` on a GPU, float32 on CPU)
   on the layer's serving batch size (medians of repeated runs, activation quantization included, weight
   quantization excluded: weights are quantized once, at load). The baseline is timed again right
   with each candidate and the speedup is that pair's ratio, so load changes on a shared machine
   affect both sides alike (:func:`interleaved_timer`: alternate runs, median of the per-pair ratios).
4. Keep candidates with MERE < ``threshold`` (0.2) *and* speedup > ``min_speedup`` (1.05x); pick the
   fastest; if none is left, the layer stays in high precision. The table says why, per layer.
   "Speedup > 1.05x" is required of the lower quartile of the per-pair ratios (faster in at least 3
   of 4 paired runs), not only of the median: on a loaded machine a lucky median is not a win. The
   median is what the table reports as ``speedup``.

``DispatchConfig(force="emulated:row")`` skips the speed condition and serves that candidate wherever
its MERE passes: for measuring FP8's effect on model quality on a machine where FP8 is never faster
(the evaluation table); the table marks those rows as forced.

Nothing is hard-coded per device: on a CPU the FP8 candidates that can run are emulated (quantize, then
a high-precision matmul), they measure slower, and every layer stays in high precision; on an H100/H200
the triton kernel and ``torch._scaled_mm`` are candidates too. Candidates that cannot run here are listed
with the reason.

The table is plain data (str, int, float, bool, None, lists, dicts): JSON-able, and loadable with
``torch.load(weights_only=True)``. Save it inside a model snapshot under ``TABLE_KEY`` or beside it
(:func:`save_table`); at load, :func:`apply_table` swaps the chosen Linear layers for
:class:`DispatchLinear`, whose state-dict keys (``weight``, ``bias``) are the Linear's, so snapshots
load into the dispatched model unchanged.

>>> import torch
>>> _ = torch.manual_seed(0)
>>> m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
>>> fake = lambda fn, key: 1.0 if key[1] == HIGH_PRECISION else 0.5  # every FP8 candidate "2x faster"
>>> cfg = DispatchConfig(candidates=("emulated:row",))
>>> m, table = dispatch_model(m, [torch.randn(32, 16)], cfg, timer=fake)
>>> [(row["name"], row["choice"]) for row in table["layers"]]
[('0', 'emulated:row'), ('2', 'emulated:row')]
>>> type(m[0]).__name__
'DispatchLinear'
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from loopline.errors import ConfigError
from loopline.settings import setting

from .fp8_gemm import scaled_mm_fp8_gemm, scaled_mm_supported, triton_fp8_gemm, triton_supported
from .probe import Probe, ProbeConfig, mere
from .quant import dequantize, quantize

__all__ = ["DispatchConfig", "Candidate", "CANDIDATES", "DispatchLinear", "dispatch_model", "decide_layer",
           "high_precision",
           "apply_table", "save_table", "load_table", "median_timer", "interleaved_timer", "TABLE_KEY",
           "HIGH_PRECISION", "device_name", "hp_dtype"]

TABLE_KEY = "fp8_dispatch"  # where the table sits inside a model snapshot dict
HIGH_PRECISION = "high_precision"
FORMAT = "loopline.fp8_dispatch/1"


@dataclass(frozen=True)
class Candidate:
    """One FP8 way to compute a Linear layer: ``library`` (triton | scaled_mm | emulated), ``recipe``
    (tensor | row | block) and, for ``_scaled_mm``, fast (lower-precision) accumulation."""

    library: str
    recipe: str
    fast_accum: bool = False

    @property
    def name(self) -> str:
        return f"{self.library}:{self.recipe}" + (":fast" if self.fast_accum else "")

    def available(self) -> tuple[bool, str]:
        if self.library == "triton":
            return triton_supported()
        if self.library == "scaled_mm":
            return scaled_mm_supported()
        return True, "quantize + dequantize in torch, then a high-precision matmul (no FP8 hardware used)"

    def prepare(self, weight: torch.Tensor):
        """Quantize the weight once (load time); the emulated path keeps it dequantized (FP8-rounded)."""
        wq = quantize(weight.detach(), self.recipe, "weight")
        if self.library == "emulated":
            return dequantize(wq).to(weight.dtype)
        return wq

    def __call__(self, x: torch.Tensor, prepared, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """``x`` (M, K) -> (M, N) in ``out_dtype``; activations are quantized here, per call."""
        a = quantize(x, self.recipe, "act")
        if self.library == "emulated":
            y = F.linear(dequantize(a).to(prepared.dtype), prepared, None if bias is None else bias.to(prepared.dtype))
            return y.to(out_dtype)
        if self.library == "triton":
            return triton_fp8_gemm(a, prepared, bias, out_dtype=out_dtype)
        od = out_dtype if self.recipe == "tensor" else torch.bfloat16  # row-wise _scaled_mm writes bf16
        return scaled_mm_fp8_gemm(a, prepared, bias, out_dtype=od, fast_accum=self.fast_accum).to(out_dtype)


CANDIDATES = {c.name: c for c in (
    [Candidate("triton", r) for r in ("tensor", "row", "block")]
    + [Candidate("scaled_mm", r, fa) for r in ("tensor", "row") for fa in (False, True)]
    + [Candidate("emulated", r) for r in ("tensor", "row", "block")])}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def hp_dtype() -> torch.dtype:
    """The high-precision serving dtype FP8 must beat: bfloat16 on a GPU, float32 on CPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def median_timer(fn, key=None, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup``, synchronizing a GPU."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_timer(base_fn, cand_fn, repeats: int = 20, warmup: int = 3) -> tuple[float, float, float, float]:
    """Time two functions alternately (A B A B ...): median seconds of each, and the median and lower
    quartile of the per-pair ratios A/B. On a shared machine both sides then see the same load, and one
    slow spell moves a few pairs, not the whole figure."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        base_fn(), cand_fn()
    sync()
    tb, tc = [], []
    for _ in range(repeats):
        for fn, out in ((base_fn, tb), (cand_fn, tc)):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
    ratios = sorted(b / c for b, c in zip(tb, tc) if c > 0)
    q25 = statistics.quantiles(ratios, n=4)[0] if len(ratios) > 1 else ratios[0]
    return statistics.median(tb), statistics.median(tc), statistics.median(ratios), q25


@dataclass(frozen=True)
class DispatchConfig:
    # MERE must be below this ("conservative" in LoKA)
    threshold: float = setting(0.2, "MERE a candidate must stay below", env="FP8_THRESHOLD")
    # and the measured speedup over high precision above this
    min_speedup: float = setting(1.05, "speedup over high precision a candidate must beat", env="FP8_MIN_SPEEDUP")
    candidates: tuple | None = None  # candidate names (see CANDIDATES); None = all
    samples: int = 1024  # rows drawn from the learned Gaussian (and from N(0, 1)) per layer for MERE
    # rows per timed GEMM; None = the largest batch the Probe saw for the layer
    rows: int | None = setting(None, "rows per timed GEMM (default: the calibration batch)", env="FP8_ROWS")
    repeats: int = 20  # timed runs per measurement (the median is used)
    record_rows: int = 512  # real input rows the Probe keeps per layer
    seed: int = 0
    force: str | None = None  # quality studies only: this candidate wherever its MERE passes, whatever its speed

    def __post_init__(self):
        if not 0 < self.threshold:
            raise ConfigError(f"threshold: must be > 0, got {self.threshold}")
        if self.min_speedup <= 0:
            raise ConfigError(f"min_speedup: must be > 0, got {self.min_speedup}")
        unknown = set(self.candidates or ()) - set(CANDIDATES)
        if unknown:
            raise ConfigError(f"candidates: unknown {sorted(unknown)}; known {sorted(CANDIDATES)}")
        if self.force is not None and self.force not in CANDIDATES:
            raise ConfigError(f"force: unknown {self.force!r}; known {sorted(CANDIDATES)}")
        if self.samples < 2:
            raise ConfigError(f"samples: must be >= 2, got {self.samples}")
        if self.repeats < 1:
            raise ConfigError(f"repeats: must be >= 1, got {self.repeats}")
        if self.rows is not None and self.rows < 1:
            raise ConfigError(f"rows: must be >= 1, got {self.rows}")


def _inputs(probe: Probe | None, name: str, K: int, cfg: DispatchConfig) -> dict:
    g = torch.Generator().manual_seed(cfg.seed)
    sets = {"normal": torch.randn(cfg.samples, K, generator=g)}
    if probe is not None and probe.stats[name].n > 1:
        sets["learned"] = probe.sample(name, cfg.samples, seed=cfg.seed)
    if probe is not None and len(probe.recorded(name)):
        sets["real"] = probe.recorded(name)
    return sets


def decide_layer(name: str, linear: nn.Linear, cfg: DispatchConfig = DispatchConfig(), probe: Probe | None = None,
                 timer=None) -> dict:
    """One row of the table: MERE and measured speedup per candidate, the choice and why.

    ``timer(fn, key) -> seconds`` measures ``fn``; ``key`` is ``(layer name, candidate name or
    HIGH_PRECISION)``; tests inject one to check the rule. The default is :func:`interleaved_timer`."""
    dev, dt = _device(), hp_dtype()
    K, N = linear.in_features, linear.out_features
    W32 = linear.weight.detach().float().to(dev)
    b32 = None if linear.bias is None else linear.bias.detach().float().to(dev)
    inputs = {k: v.to(dev) for k, v in _inputs(probe, name, K, cfg).items()}
    rows = cfg.rows or (probe.max_rows[name] if probe is not None and probe.max_rows[name] else 256)
    # the timed input: real rows when there are any (tiled to the serving batch), else learned, else normal
    src = inputs.get("real", inputs.get("learned", inputs["normal"]))
    x_t = src[torch.arange(rows, device=dev) % len(src)].to(dt)  # (rows, K)
    W_hp, b_hp = W32.to(dt), None if b32 is None else b32.to(dt)

    def baseline():
        return F.linear(x_t, W_hp, b_hp)
    base_times = []

    names = (cfg.force,) if cfg.force else (cfg.candidates or tuple(CANDIDATES))
    rows_out = []
    for cname in names:
        c = CANDIDATES[cname]
        ok, reason = c.available()
        entry = {"name": cname, "library": c.library, "recipe": c.recipe, "fast_accum": c.fast_accum,
                 "available": ok, "reason": reason, "mere": {}, "mere_max": None, "seconds": None,
                 "speedup": None, "speedup_q25": None, "passes_mere": False, "passes_speedup": False}
        rows_out.append(entry)
        if not ok:
            continue
        try:
            prepared = c.prepare(W32 if c.library != "emulated" else W32.to(dt))
            for src_name, x in inputs.items():
                ref = F.linear(x, W32, b32)  # float32 reference
                entry["mere"][src_name] = float(mere(c(x.to(dt), prepared, b32, torch.float32), ref))
        except (RuntimeError, ValueError) as exc:  # e.g. _scaled_mm refuses an N that is not a multiple of 16
            entry.update(available=False, reason=f"failed on this shape: {exc}"[:300], mere={})
            continue
        entry["mere_max"] = max(entry["mere"].values())
        # paired: the baseline is timed again with each candidate, so a machine whose load
        # changes (shared CPUs, GPU clocks) compares the two under the same conditions
        def cand():
            return c(x_t, prepared, b_hp, dt)
        if timer is None:
            b_s, c_s, ratio, low = interleaved_timer(baseline, cand, cfg.repeats)
        else:
            b_s, c_s = timer(baseline, (name, HIGH_PRECISION)), timer(cand, (name, cname))
            ratio = low = b_s / c_s if c_s > 0 else 0.0
        base_times.append(b_s)
        entry["seconds"], entry["baseline_seconds"], entry["speedup"], entry["speedup_q25"] = c_s, b_s, ratio, low
        entry["passes_mere"] = entry["mere_max"] < cfg.threshold
        # faster in at least 3 of 4 paired runs, not just on the median: a noisy machine gives no false win
        entry["passes_speedup"] = entry["speedup_q25"] > cfg.min_speedup

    if not base_times:
        base_times.append(timer(baseline, (name, HIGH_PRECISION)) if timer else median_timer(baseline))
    passing = [e for e in rows_out if e["passes_mere"] and e["passes_speedup"]]
    measured = [e for e in rows_out if e["available"]]
    if cfg.force:
        e = rows_out[0]
        choice = cfg.force if e["passes_mere"] else HIGH_PRECISION
        why = (f"forced by the config (a quality study, not a speed decision): {cfg.force} "
               + (f"has MERE {e['mere_max']:.3f} < {cfg.threshold:g}" if e["passes_mere"] else
                  "cannot run here or fails the MERE threshold"))
    elif passing:
        best = min(passing, key=lambda e: e["seconds"])
        choice = best["name"]
        why = (f"fastest of {len(passing)} candidate(s) with MERE < {cfg.threshold:g} and speedup > "
               f"{cfg.min_speedup:g}x: {best['speedup']:.2f}x, MERE {best['mere_max']:.3f}")
    elif not measured:
        choice, why = HIGH_PRECISION, "no FP8 candidate can run on this machine"
    else:
        fastest = max(measured, key=lambda e: e["speedup"])
        accurate = [e for e in measured if e["passes_mere"]]
        choice = HIGH_PRECISION
        why = (f"no candidate is both accurate and faster: best speedup {fastest['speedup']:.2f}x "
               f"({fastest['name']}, lower quartile {fastest['speedup_q25']:.2f}x, need > {cfg.min_speedup:g}x); "
               f"{len(accurate)} of {len(measured)} measured candidate(s) have MERE < {cfg.threshold:g}")
    return {"name": name, "in_features": K, "out_features": N, "rows": rows, "bias": b32 is not None,
            "probe": probe.stats[name].summary() if probe is not None else None,
            "baseline": {"dtype": str(dt).replace("torch.", ""), "seconds": statistics.median(base_times)},
            "candidates": rows_out, "choice": choice, "why": why}


class DispatchLinear(nn.Module):
    """A Linear layer served by an FP8 candidate. Same parameters (and state-dict keys) as ``nn.Linear``;
    the quantized weight is prepared on first use and again whenever the weight changes (an online
    learner's step). FP8 is for inference: when autograd records (a training step on the same module),
    the layer computes the plain high-precision ``F.linear``, so gradients are those of the Linear."""

    def __init__(self, linear: nn.Linear, candidate: str):
        super().__init__()
        if candidate not in CANDIDATES:
            raise ConfigError(f"candidate: one of {sorted(CANDIDATES)}, got {candidate!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.candidate = candidate
        self._prepared = None
        self._prepared_for = None

    def _weights(self):
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device)
        if self._prepared_for != key:
            with torch.no_grad():
                self._prepared = CANDIDATES[self.candidate].prepare(self.weight)
            self._prepared_for = key
        return self._prepared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _BYPASS[0] or torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)  # training: high precision, exact gradients
        lead = x.shape[:-1]
        y = CANDIDATES[self.candidate](x.reshape(-1, self.in_features), self._weights(), self.bias, x.dtype)
        return y.reshape(*lead, self.out_features)  # (..., N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, candidate={self.candidate}"


_BYPASS = [False]


@contextlib.contextmanager
def high_precision():
    """Within this block every :class:`DispatchLinear` computes the plain high-precision ``F.linear``:
    the same model's reference predictions, beside its dispatched ones (the evaluation table's FP8 check).

    >>> lin = DispatchLinear(torch.nn.Linear(4, 2), "emulated:row")
    >>> x = torch.randn(3, 4)
    >>> with torch.no_grad(), high_precision():
    ...     bool(torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias)))
    True
    """
    prev, _BYPASS[0] = _BYPASS[0], True
    try:
        yield
    finally:
        _BYPASS[0] = prev


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def apply_table(module: nn.Module, table: dict) -> dict:
    """Swap each layer whose choice is an FP8 candidate for a :class:`DispatchLinear`, in place.

    A choice that cannot run on this machine (a table measured on a GPU, loaded on a CPU) keeps the layer
    in high precision and says so. Returns ``{"swapped": [names], "kept": {name: reason}}``."""
    swapped, kept = [], {}
    for row in table["layers"]:
        name, choice = row["name"], row["choice"]
        if choice == HIGH_PRECISION:
            continue
        if name == "":
            kept[name] = "the root module itself cannot be swapped in place"
            continue
        try:
            m = module.get_submodule(name)
        except AttributeError:
            kept[name] = "no such module"
            continue
        if not isinstance(m, (nn.Linear, DispatchLinear)):
            kept[name] = f"not a Linear layer ({type(m).__name__})"
            continue
        ok, reason = CANDIDATES[choice].available() if choice in CANDIDATES else (False, "unknown candidate")
        if not ok:
            kept[name] = f"{choice} cannot run here: {reason}"
            continue
        if isinstance(m, DispatchLinear):  # applied before: change its candidate
            m.candidate, m._prepared_for = choice, None
        else:
            _set_module(module, name, DispatchLinear(m, choice))
        swapped.append(name)
    return {"swapped": swapped, "kept": kept}


def dispatch_model(module: nn.Module, calib_inputs, cfg: DispatchConfig = DispatchConfig(), *, timer=None,
                   progress: bool = False) -> tuple[nn.Module, dict]:
    """Probe ``module`` on ``calib_inputs``, decide per Linear layer, swap the chosen layers in place.

    Each item of ``calib_inputs`` is passed as ``module(item)`` (a tuple as ``module(*item)``), in eval
    mode under ``no_grad``. Returns ``(module, table)``; ``module`` is the same object, modified."""
    was_training = module.training
    module.eval()
    probe = Probe(module, ProbeConfig(every=1, record_rows=cfg.record_rows, seed=cfg.seed))
    with probe, torch.no_grad():
        for item in calib_inputs:
            module(*item) if isinstance(item, tuple) else module(item)
    layers = []
    names = [n for n in probe.layers if probe.stats[n].n > 0]
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, name in enumerate(names):
            layers.append(decide_layer(name, probe.layers[name], cfg, probe, timer))
            if progress:
                el = time.perf_counter() - t0
                print(f"fp8 dispatch: {i + 1}/{len(names)} layers, {(i + 1) / el:.1f} layers/s, "
                      f"ETA {el / (i + 1) * (len(names) - i - 1):.0f}s", file=sys.stderr, flush=True)
    chosen = [row["name"] for row in layers if row["choice"] != HIGH_PRECISION]
    table = {"format": FORMAT, "device": device_name(), "hp_dtype": str(hp_dtype()).replace("torch.", ""),
             "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
             "probe": {k: v for k, v in probe.summary().items() if k != "layers"},
             "not_called": [n for n in probe.layers if probe.stats[n].n == 0],
             "layers": layers,
             "summary": {"layers": len(layers), "fp8": len(chosen), "high_precision": len(layers) - len(chosen),
                         "fp8_layers": chosen}}
    table["applied"] = apply_table(module, table)
    module.train(was_training)
    return module, table


def save_table(path: str, table: dict) -> str:
    """Write the table on its own (``torch.save`` of plain data, atomic rename), e.g. beside a snapshot."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fp8-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({TABLE_KEY: table}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_table(path: str) -> dict | None:
    """The table in a file written by :func:`save_table`, or inside a snapshot dict under ``TABLE_KEY``
    (``torch.load(weights_only=True)``: nothing executable is loaded). None when there is none."""
    obj = torch.load(path, weights_only=True, map_location="cpu")
    if isinstance(obj, dict):
        if TABLE_KEY in obj:
            return obj[TABLE_KEY]
        if obj.get("format") == FORMAT:
            return obj
    return None
