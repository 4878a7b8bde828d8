"""LoKA's Probe: activation statistics of a serving model's Linear layers, gathered online, and MERE.

Public surface: ``ProbeConfig``, ``WelfordStats``, ``Probe``, ``mere``, ``MERE_FLOOR``.

What it does. Forward hooks on every ``nn.Linear`` (or the named ones) see each layer's input. Every
``every``-th forward pass of the model (the cadence), each layer's input rows (B, K) are folded into
running statistics with the *batched* Welford/Chan merge, in float32 (passes every-1, 2*every-1, ...:
the last of each period, so the cold first pass of a process is not the one measured):

    n' = n + b,   delta = mean_b - mean,   mean' = mean + delta * b / n'
    M2' = M2 + M2_b + outer(delta, delta) * n * b / n'          (M2 = sum of centred outer products)

so the mean and covariance (``M2 / (n - 1)``) are exact up to rounding after any number of batches, and
two probes (two partitions) merge with the same formula. The absolute maximum (amax) is kept beside them
(the static FP8 scale a layer would need). A reservoir of up to ``record_rows`` real input rows is kept
per layer, so candidate kernels can also be run on recorded activations.

Candidate inputs are then drawn from the learned Gaussian N(mean, cov) (:meth:`Probe.sample`); LoKA
found such inputs give up to 15% higher error than N(0, 1), which is why they are used.

Overhead is measured, not assumed: the time spent inside the hooks and the model's whole forward time
are both accumulated; ``overhead()`` is their ratio (hook time over the forward time without hooks).

MERE (mean relative error) of an output against a float32 reference is ``mean(|out - ref| / |ref|)``.
Elements whose reference is exactly or nearly zero would make a single ratio unbounded, so each
denominator is floored at ``MERE_FLOOR`` (1%) of the mean ``|ref|`` of the whole output; this is a
decision of ours (the paper does not say how it treats zeros), and it is applied to every candidate alike.

>>> import torch
>>> lin = torch.nn.Linear(4, 2)
>>> probe = Probe(lin, ProbeConfig(every=1))
>>> with probe:
...     _ = lin(torch.arange(8.0).reshape(2, 4))
>>> probe.stats[""].n, probe.stats[""].mean.tolist(), float(probe.stats[""].amax)
(2, [2.0, 3.0, 4.0, 5.0], 7.0)
>>> float(mere(torch.tensor([1.1, -2.0]), torch.tensor([1.0, -2.0])))  # (0.1 / 1 + 0 / 2) / 2
0.05...
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from loopline.errors import ConfigError

__all__ = ["ProbeConfig", "WelfordStats", "Probe", "mere", "MERE_FLOOR"]

MERE_FLOOR = 0.01  # denominators |ref| are floored at this fraction of mean |ref| (see the module docstring)


def mere(out: torch.Tensor, ref: torch.Tensor, floor: float = MERE_FLOOR) -> torch.Tensor:
    """Mean relative error ``mean(|out - ref| / max(|ref|, floor * mean|ref|))``, in float32 (a 0-d tensor)."""
    out, ref = out.float(), ref.float()
    den = ref.abs().clamp_min(floor * float(ref.abs().mean()) + 1e-30)
    return ((out - ref).abs() / den).mean()


class WelfordStats:
    """Running mean, covariance and amax of the rows of (B, D) batches, merged batch by batch in float32."""

    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self.mean = torch.zeros(dim)  # (D,)
        self.m2 = torch.zeros(dim, dim)  # (D, D) sum of centred outer products
        self.amax = torch.zeros(())

    def update(self, x: torch.Tensor) -> "WelfordStats":
        """Fold a batch of rows (B, D) in (on the device the statistics live on: the first batch's)."""
        if self.n == 0 and self.mean.device != x.device:
            self.mean, self.m2, self.amax = self.mean.to(x.device), self.m2.to(x.device), self.amax.to(x.device)
        x = x.detach().float().reshape(-1, self.dim).to(self.mean.device)
        b = x.shape[0]
        if b == 0:
            return self
        mean_b = x.mean(0)  # (D,)
        c = x - mean_b
        return self._merge(b, mean_b, c.T @ c, x.abs().max())

    def merge(self, other: "WelfordStats") -> "WelfordStats":
        """Fold another probe's statistics in (Chan's parallel formula)."""
        if other.dim != self.dim:
            raise ConfigError(f"dim: cannot merge statistics of width {other.dim} into {self.dim}")
        dev = self.mean.device
        return self._merge(other.n, other.mean.to(dev), other.m2.to(dev), other.amax.to(dev)) if other.n else self

    def _merge(self, b: int, mean_b, m2_b, amax_b) -> "WelfordStats":
        n = self.n + b
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + torch.outer(delta, delta) * (self.n * b / n)
        self.mean = self.mean + delta * (b / n)
        self.n = n
        self.amax = torch.maximum(self.amax, amax_b.float())
        return self

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased covariance (D, D); zeros before two rows were seen."""
        return self.m2 / (self.n - 1) if self.n > 1 else torch.zeros_like(self.m2)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` rows from N(mean, cov) (float32). A singular covariance (fewer rows than features, constant
        features) is handled by clipping its eigenvalues at zero."""
        evals, evecs = torch.linalg.eigh(self.cov.double())
        root = (evecs * evals.clamp_min(0).sqrt()).float()  # (D, D): root @ root.T == cov
        z = torch.randn(n, self.dim, generator=generator).to(self.mean.device)
        return self.mean + z @ root.T

    def summary(self) -> dict:
        sd = self.cov.diagonal().clamp_min(0).sqrt()
        return {"n": self.n, "amax": float(self.amax), "mean_abs": float(self.mean.abs().mean()),
                "std_mean": float(sd.mean()), "std_max": float(sd.max()) if self.dim else 0.0}


@dataclass(frozen=True)
class ProbeConfig:
    every: int = 100  # model forward passes between statistics updates (LoKA: ~100 steps, <1% overhead)
    record_rows: int = 512  # real input rows kept per layer (reservoir sample) for MERE on recorded data
    layers: tuple | None = None  # qualified names of the Linear layers to probe; None = every nn.Linear
    seed: int = 0

    def __post_init__(self):
        if self.every < 1:
            raise ConfigError(f"every: must be >= 1, got {self.every}")
        if self.record_rows < 0:
            raise ConfigError(f"record_rows: must be >= 0, got {self.record_rows}")


class Probe:
    """Hooks on a model's Linear layers; use as a context manager or ``attach()`` / ``detach()``.

    After forward passes: ``stats[name]`` (:class:`WelfordStats`), ``recorded(name)`` (real rows),
    ``max_rows[name]`` (the largest batch of rows one call saw), ``overhead()``."""

    def __init__(self, model: nn.Module, cfg: ProbeConfig = ProbeConfig()):
        self.model, self.cfg = model, cfg
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
                       and (cfg.layers is None or name in cfg.layers)}
        if cfg.layers is not None and set(cfg.layers) - set(self.layers):
            raise ConfigError(f"layers: not Linear layers of the model: {sorted(set(cfg.layers) - set(self.layers))}")
        self.stats = {name: WelfordStats(m.in_features) for name, m in self.layers.items()}
        self.max_rows = {name: 0 for name in self.layers}
        self._rec = {name: torch.zeros(0, m.in_features) for name, m in self.layers.items()}
        self._seen = {name: 0 for name in self.layers}
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self.steps = 0  # model forward passes seen
        self.sampled_steps = 0  # of which the statistics were updated
        self.hook_s = 0.0
        self.forward_s = 0.0
        self._active = False
        self._t0 = 0.0
        self._handles: list = []

    # -- hooks --------------------------------------------------------------------------------------------
    def attach(self) -> "Probe":
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._pre))
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_hook(self._make_hook(name)))
        self._handles.append(self.model.register_forward_hook(self._post))  # after the layer hooks
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "Probe":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _pre(self, module, args):
        self._active = (self.steps + 1) % self.cfg.every == 0  # the last pass of each period: warm, not the cold first
        self.steps += 1
        self.sampled_steps += self._active
        self._t0 = time.perf_counter()

    def _post(self, module, args, output):
        self.forward_s += time.perf_counter() - self._t0

    def _make_hook(self, name: str):
        def hook(module, args, output):
            if not self._active:
                return
            t0 = time.perf_counter()
            with torch.no_grad():
                x = args[0].detach().reshape(-1, module.in_features)  # (B, K)
                self.stats[name].update(x)
                self.max_rows[name] = max(self.max_rows[name], x.shape[0])
                self._record(name, x)
            self.hook_s += time.perf_counter() - t0
        return hook

    def _record(self, name: str, x: torch.Tensor) -> None:
        """Reservoir sampling (algorithm R, vectorized over the batch): every row seen so far has the same
        chance of being among the kept ``record_rows``."""
        R = self.cfg.record_rows
        if R == 0:
            return
        x = x.float().cpu()
        seen, rec = self._seen[name], self._rec[name]
        if len(rec) < R:
            take = min(R - len(rec), len(x))
            rec = torch.cat([rec, x[:take]])
            x, seen = x[take:], seen + take
        if len(x):
            idx = torch.arange(seen, seen + len(x), dtype=torch.float64)
            j = (torch.rand(len(x), generator=self._gen, dtype=torch.float64) * (idx + 1)).long()
            keep = j < R
            rec[j[keep]] = x[keep]
            seen += len(x)
        self._rec[name], self._seen[name] = rec, seen

    # -- results ------------------------------------------------------------------------------------------
    def recorded(self, name: str) -> torch.Tensor:
        """The kept real input rows of a layer (R, K), float32."""
        return self._rec[name]

    def sample(self, name: str, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` input rows drawn from the layer's learned Gaussian."""
        return self.stats[name].sample(n, torch.Generator().manual_seed(seed))

    def overhead(self) -> float:
        """Time inside the hooks over the model's forward time without them (0.01 = 1%)."""
        base = self.forward_s - self.hook_s
        return self.hook_s / base if base > 0 else 0.0

    def summary(self) -> dict:
        return {"steps": self.steps, "sampled_steps": self.sampled_steps, "every": self.cfg.every,
                "hook_s": self.hook_s, "forward_s": self.forward_s, "overhead": self.overhead(),
                "layers": {name: s.summary() for name, s in self.stats.items()}}
