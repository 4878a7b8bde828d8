"""The GEMM epilogue in plain torch: bias, BlockNorm and HardSwish, the reference the fused kernel matches.

Public surface: ``ACTIVATIONS``, ``hardswish``, ``block_rms_norm``, ``apply_epilogue``.

Order (the same in the fused triton epilogue and in ``model.mods.MLP``): ``y = act(norm(x + bias))``.

BlockNorm is a parameter-free RMSNorm over fixed-width feature blocks (LoKA's Mod: it keeps activation
ranges bounded for FP8 and fuses into a GEMM epilogue, since a block of 256 output columns is one output
tile). Widths that are not a multiple of the block: the last, partial block is normalized over its own
width; a width below the block is one block (plain RMSNorm). Each block ``b`` becomes
``x_b / sqrt(mean(x_b**2) + eps)``, computed in float32.

HardSwish is ``x * relu6(x + 3) / 6``: piecewise-polynomial, so it needs no exponential (cheap in an
epilogue) and is exactly 0 below -3 and the identity above 3.

>>> import torch
>>> x = torch.tensor([[3.0, 4.0]])
>>> block_rms_norm(x, 256)  # one block of width 2: rms = sqrt((9 + 16) / 2)
tensor([[0.8485, 1.1314]])
>>> hardswish(torch.tensor([-4.0, 0.0, 1.0, 4.0]))
tensor([-0.0000, 0.0000, 0.6667, 4.0000])
"""

from __future__ import annotations

import torch

from loopline.errors import ConfigError

__all__ = ["ACTIVATIONS", "hardswish", "block_rms_norm", "apply_epilogue"]

ACTIVATIONS = ("none", "hardswish", "relu")  # the activations the fused epilogue knows
NORM_EPS = 1e-6


def hardswish(x: torch.Tensor) -> torch.Tensor:
    return x * (x + 3.0).clamp(0.0, 6.0) / 6.0


def block_rms_norm(x: torch.Tensor, block: int = 256, eps: float = NORM_EPS) -> torch.Tensor:
    """RMSNorm without parameters over consecutive ``block``-wide slices of the last dimension."""
    if block < 1:
        raise ConfigError(f"block: must be >= 1, got {block}")
    dtype, D = x.dtype, x.shape[-1]
    xf = x.float()
    parts = []
    for start in range(0, D, block):
        b = xf[..., start:start + block]
        parts.append(b * torch.rsqrt(b.pow(2).mean(dim=-1, keepdim=True) + eps))
    return torch.cat(parts, dim=-1).to(dtype) if parts else x


def apply_epilogue(y: torch.Tensor, bias: torch.Tensor | None = None, act: str = "none",
                   norm_block: int | None = None, eps: float = NORM_EPS) -> torch.Tensor:
    """``act(norm(y + bias))`` in float32; ``norm_block`` None skips BlockNorm."""
    if act not in ACTIVATIONS:
        raise ConfigError(f"act: one of {ACTIVATIONS}, got {act!r}")
    y = y.float()
    if bias is not None:
        y = y + bias.float()
    if norm_block:
        y = block_rms_norm(y, norm_block, eps)
    if act == "hardswish":
        y = hardswish(y)
    elif act == "relu":
        y = torch.relu(y)
    return y
