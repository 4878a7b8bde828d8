"""ExFM's distillation pieces for the vertical models: KD, the Auxiliary Head, the Student Adapter.

Public surface: ``grad_scale``, ``soft_bce``, ``aux_target``, ``StudentAdapter``.

``shared/papers.md`` section 2. The VM's backbone feeds a serving head (true label only) and, with the
Auxiliary Head, a distillation head that learns from the FM's prediction ``y_F``:

    L = BCE(y_S, y) + w * BCE(y_D, min(1, alpha * y_F))

and the distillation head's gradient into the backbone is scaled by ``beta`` (``grad_scale``: identity
forward, ``beta`` times the gradient backward), so the teacher shapes the shared representation only
as much as asked, and the serving head never sees the FM label. The Student Adapter is a small MLP on
the FM's logit, trained on fresh labels before the VM each step; its stop-gradient output is a second
distillation target that follows the drift between two FM snapshots.

Soft labels may be missing (before the FM's first snapshot is published, DAS has none): every loss
here takes a mask and averages over the examples that have one.

>>> import torch
>>> x = torch.ones(3, requires_grad=True)
>>> grad_scale(x, 0.25).sum().backward()
>>> x.grad.tolist()
[0.25, 0.25, 0.25]
>>> aux_target(torch.tensor([0.2, 0.7]), alpha=2.0).tolist()
[0.4000000059604645, 1.0]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["grad_scale", "soft_bce", "aux_target", "StudentAdapter"]


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, beta):  # noqa: ANN001 - autograd signature
        ctx.beta = beta
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return grad * ctx.beta, None


def grad_scale(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Identity forward; the gradient flowing back through it is multiplied by ``beta``."""
    return _GradScale.apply(x, float(beta))


def soft_bce(logit: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of ``logit`` against a (soft) target in [0, 1], averaged over ``mask``.
    Zero (and no gradient) when the mask is empty."""
    loss = F.binary_cross_entropy_with_logits(logit, target.clamp(0.0, 1.0), reduction="none")
    if mask is None:
        return loss.mean()
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp_min(1.0)


def aux_target(soft: torch.Tensor, alpha: float) -> torch.Tensor:
    """The distillation head's target ``min(1, alpha * y_F)`` (ExFM)."""
    return (alpha * soft).clamp(max=1.0)


class StudentAdapter(nn.Module):
    """``SA(y_F)``: a logit in, a logit out. It starts as the identity (a skip connection with weight 1
    and a zero-initialised MLP), so before it has learned anything its target is the FM's prediction.

    >>> sa = StudentAdapter()
    >>> round(float(torch.sigmoid(sa(torch.tensor([0.0, 2.0])))[1]), 4) == round(float(torch.sigmoid(torch.tensor(2.0))), 4)
    True
    """

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.skip = nn.Parameter(torch.ones(1))

    def forward(self, fm_logit: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,)
        x = fm_logit.unsqueeze(-1)
        return (self.skip * x + self.mlp(x)).squeeze(-1)
