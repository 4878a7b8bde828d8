"""LoKA's Mods as reusable pieces: BlockNorm, an activation factory and an MLP that honours ``bias="last"``.

Public surface: ``BlockNorm``, ``activation``, ``MLP``, ``ACTIVATION_NAMES``, ``NORMS``, ``BIAS_MODES``.

The Mods make a model friendlier to FP8 inference (``../shared/papers.md`` section 4):
- **no bias except in the last layer** (``bias="last"``): one less epilogue input per hidden layer, and
  BlockNorm right after the GEMM would cancel a per-feature shift anyway;
- **BlockNorm** (``norm="block"``): parameter-free RMSNorm over 256-wide feature blocks, so activation
  ranges stay bounded (good FP8 scales) and the norm fuses into the GEMM epilogue (a 256-wide output tile
  is one block). Widths that are not a multiple of 256: the last, partial block is normalized over its
  own width; a layer narrower than 256 is one block, i.e. a plain parameter-free RMSNorm;
- **HardSwish** (``act="hardswish"``) ``x * relu6(x + 3) / 6`` instead of SiLU/Swish: no exponential.

Each hidden layer is ``act(norm(linear(x)))``, the order the fused FP8 epilogue applies
(``kernels.epilogue``); the last layer is a plain Linear (the logits / output projection).

>>> import torch
>>> m = MLP([8, 16, 1], act="hardswish", norm="block", bias="last")
>>> [l.bias is None for l in m.linears]
[True, False]
>>> m(torch.zeros(3, 8)).shape
torch.Size([3, 1])
>>> BlockNorm(4)(torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 2.0]])).round(decimals=4).tolist()  # blocks of 4, 2
[[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import torch
from torch import nn

from loopline.errors import ConfigError
from loopline.kernels.epilogue import NORM_EPS, block_rms_norm

__all__ = ["BlockNorm", "activation", "MLP", "ACTIVATION_NAMES", "NORMS", "BIAS_MODES"]

ACTIVATION_NAMES = ("hardswish", "silu", "swish", "relu")  # "swish" is SiLU's other name
NORMS = ("block", "none")
BIAS_MODES = ("last", "all", "none")


class BlockNorm(nn.Module):
    """Parameter-free RMSNorm over consecutive ``block``-wide slices of the last dimension."""

    def __init__(self, block: int = 256, eps: float = NORM_EPS):
        super().__init__()
        if block < 1:
            raise ConfigError(f"block: must be >= 1, got {block}")
        self.block, self.eps = block, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_rms_norm(x, self.block, self.eps)

    def extra_repr(self) -> str:
        return f"block={self.block}"


def activation(name: str) -> nn.Module:
    """An activation module by name: "hardswish" | "silu" (= "swish") | "relu"."""
    if name == "hardswish":
        return nn.Hardswish()
    if name in ("silu", "swish"):
        return nn.SiLU()
    if name == "relu":
        return nn.ReLU()
    raise ConfigError(f"act: one of {ACTIVATION_NAMES}, got {name!r}")


class MLP(nn.Module):
    """``dims = [in, h1, ..., out]``; hidden layers ``act(norm(linear(x)))``, the last a plain Linear.

    ``bias``: "last" (only the last layer has one; the LoKA Mod), "all" or "none". ``norm``: "block"
    (BlockNorm of ``block`` features) or "none". The Linear layers are ``self.linears`` (a ModuleList),
    so their state-dict keys are ``linears.0.weight`` and so on, and Dispatch can swap them."""

    def __init__(self, dims, act: str = "hardswish", norm: str = "block", bias: str = "last", block: int = 256):
        super().__init__()
        dims = [int(d) for d in dims]
        if len(dims) < 2 or min(dims) < 1:
            raise ConfigError(f"dims: needs at least [in, out], all >= 1, got {dims}")
        if norm not in NORMS:
            raise ConfigError(f"norm: one of {NORMS}, got {norm!r}")
        if bias not in BIAS_MODES:
            raise ConfigError(f"bias: one of {BIAS_MODES}, got {bias!r}")
        n = len(dims) - 1
        has_bias = [bias == "all" or (bias == "last" and i == n - 1) for i in range(n)]
        self.linears = nn.ModuleList(nn.Linear(a, b, bias=hb) for a, b, hb in zip(dims[:-1], dims[1:], has_bias))
        self.norm = BlockNorm(block) if norm == "block" else nn.Identity()
        self.act = activation(act)
        self.dims, self.act_name, self.norm_name, self.bias_mode = tuple(dims), act, norm, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *hidden, last = self.linears
        for lin in hidden:
            x = self.act(self.norm(lin(x)))  # (B, d_i)
        return last(x)  # (B, out)
