"""FP8 (e4m3) quantization recipes: per-tensor, per-row and block-wise scaling from amax, with saturation.

Public surface: ``E4M3_MAX``, ``RECIPES``, ``QTensor``, ``quantize``, ``quantize_tensor``,
``quantize_rows``, ``quantize_blocks``, ``dequantize``, ``scale_from_amax``.

The math. A high-precision tensor ``x`` is stored as ``q = sat(x / s)`` cast to ``torch.float8_e4m3fn``,
with a float32 *dequantization* scale ``s`` so that ``x ~= q * s``. The scale comes from the absolute
maximum over the group it covers: ``s = amax / 448`` (448 is the largest finite e4m3 value), so the
group's largest element maps to the top of the FP8 range and nothing overflows. ``sat`` clamps to
[-448, 448] before the cast: that matters when the scale is *given* (a static scale learned by the
Probe) and a value exceeds the amax it was learned from; it saturates instead of becoming NaN.
An all-zero group gets a tiny positive scale (its elements quantize to exactly 0).

The recipes (``recipe`` names the pair used on the two GEMM operands; ``role`` picks the side):

    recipe   activations (M, K)         weights (N, K), nn.Linear layout   scale shapes (act / weight)
    tensor   one scale                  one scale                          () / ()
    row      one per row (per token)    one per output channel             (M, 1) / (N, 1)
    block    1 x 128 along K            128 x 128                          (M, ceil(K/128)) / (ceil(N/128), ceil(K/128))

Rounding error: e4m3 keeps 3 mantissa bits, so a normal value is off by at most 2**-4 (6.25%) of
itself, and values far below the group's amax lose more (subnormals start at 2**-6 * s). Finer
groups (row, block) keep small-magnitude rows and blocks accurate when a few outliers set the amax.
Partial groups (K or N not a multiple of 128) take the amax over the elements they hold.

>>> import torch
>>> x = torch.tensor([[1.0, -2.0, 448.0], [0.5, 0.25, -0.125]])
>>> q = quantize(x, "row")
>>> q.scale.shape, q.data.dtype
(torch.Size([2, 1]), torch.float8_e4m3fn)
>>> torch.allclose(dequantize(q), x)
True
>>> float(dequantize(quantize(torch.tensor([[1000.0]]), "tensor", scale=torch.tensor(1.0)))[0, 0])  # saturates
448.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopline.errors import ConfigError

__all__ = ["E4M3_MAX", "RECIPES", "QTensor", "quantize", "quantize_tensor", "quantize_rows",
           "quantize_blocks", "dequantize", "scale_from_amax"]

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0
RECIPES = ("tensor", "row", "block")
BLOCK = 128  # the block edge of the block-wise recipe (1x128 activations, 128x128 weights)
_TINY = 1e-12  # amax floor: an all-zero group still gets a finite, positive scale


@dataclass(frozen=True)
class QTensor:
    """An FP8 tensor and its float32 dequantization scale: ``x ~= data * scale`` (broadcast per group).

    ``group`` is the (rows, cols) a scale covers: (M, K) for per-tensor, (1, K) per row, (1, 128) or
    (128, 128) per block."""

    data: torch.Tensor  # (R, C) float8_e4m3fn
    scale: torch.Tensor  # float32: () | (R, 1) | (ceil(R/gr), ceil(C/gc))
    recipe: str
    group: tuple

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """The dequantization scale that maps ``amax`` onto the largest e4m3 value (float32)."""
    return amax.float().clamp_min(_TINY) / E4M3_MAX


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _check2d(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ConfigError(f"x: quantize expects a 2-D tensor (flatten leading dims first), got shape {tuple(x.shape)}")


def quantize_tensor(x: torch.Tensor, scale: torch.Tensor | None = None) -> QTensor:
    """One scale for the whole tensor; ``scale`` given = a static scale (values beyond it saturate)."""
    _check2d(x)
    s = scale_from_amax(x.detach().abs().amax()) if scale is None else torch.as_tensor(scale, dtype=torch.float32,
                                                                                         device=x.device).reshape(())
    return QTensor(_cast(x, s), s, "tensor", tuple(x.shape))


def quantize_rows(x: torch.Tensor) -> QTensor:
    """One scale per row: per token for activations (M, K), per output channel for weights (N, K)."""
    _check2d(x)
    s = scale_from_amax(x.detach().abs().amax(dim=1, keepdim=True))  # (R, 1)
    return QTensor(_cast(x, s), s, "row", (1, x.shape[1]))


def quantize_blocks(x: torch.Tensor, block: tuple = (1, BLOCK)) -> QTensor:
    """One scale per ``block`` = (rows, cols) tile; partial edge tiles use the amax of what they hold."""
    _check2d(x)
    br, bc = block
    R, C = x.shape
    Rb, Cb = -(-R // br), -(-C // bc)
    padded = torch.zeros(Rb * br, Cb * bc, dtype=torch.float32, device=x.device)
    padded[:R, :C] = x.detach().float()
    amax = padded.abs().reshape(Rb, br, Cb, bc).amax(dim=(1, 3))  # (Rb, Cb)
    s = scale_from_amax(amax)
    full = s.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:R, :C]  # (R, C)
    return QTensor(_cast(x, full), s, "block", (br, bc))


def quantize(x: torch.Tensor, recipe: str, role: str = "act", scale: torch.Tensor | None = None) -> QTensor:
    """Quantize a 2-D ``x`` with a recipe of ``RECIPES``; ``role`` "act" or "weight" picks the block
    shape of the block-wise recipe (1x128 or 128x128). A static ``scale`` is supported per tensor only."""
    if role not in ("act", "weight"):
        raise ConfigError(f"role: 'act' or 'weight', got {role!r}")
    if scale is not None and recipe != "tensor":
        raise ConfigError(f"scale: a static scale needs the 'tensor' recipe, got {recipe!r}; use dynamic scaling")
    if recipe == "tensor":
        return quantize_tensor(x, scale)
    if recipe == "row":
        return quantize_rows(x)
    if recipe == "block":
        return quantize_blocks(x, (1, BLOCK) if role == "act" else (BLOCK, BLOCK))
    raise ConfigError(f"recipe: one of {RECIPES}, got {recipe!r}")


def dequantize(q: QTensor) -> torch.Tensor:
    """Back to float32: ``data * scale`` with each scale spread over the group it covers."""
    x = q.data.float()
    if q.recipe in ("tensor", "row"):
        return x * q.scale
    br, bc = q.group
    R, C = x.shape
    return x * q.scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:R, :C]
