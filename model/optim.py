"""Adagrad for embedding tables that touches only the rows a batch reached.

Public surface: ``RowAdagrad``.

``torch.optim.Adagrad`` with a dense gradient updates the whole table every step: four passes (square,
sum, square root, divide) over every row, though a micro-batch reaches a few hundred of them. A row whose
gradient is all zero is left exactly as it was by that update (its sum gains ``0 * 0``, and its
weights ``-lr * 0 / std``), so :class:`RowAdagrad` finds the rows with a nonzero gradient and applies
the same elementwise operations to those rows only: the numbers are torch's bit for bit
(``tests/model/test_optim.py``), and the state (``sum``, ``step``) and its ``state_dict`` are torch's
too, so snapshots load either way. Parameters that are not 2-D tables (an output intercept), and
tables most of whose rows moved, take torch's dense update.

**Importance weights** (``step(row_weight=...)``). Adagrad's step ``lr g / sqrt(sum g^2)`` does not depend
on the scale of ``g``: a row trained only by examples of weight ``w`` moves as far as at weight 1, so
down-weighting them (``model/delay.py``: a new campaign's positives, before their negatives exist) does
not slow the row at all. Given the mean weight ``omega`` of the examples that reached each row (those of
weight > 0; a row reached by none has no gradient), the sum gains ``g^2 / omega`` instead of ``g^2``:
the importance-weighted second moment, as ``g`` is the importance-weighted first. A row whose examples
all weigh ``w`` then steps ``sqrt(w)`` times as far as at weight 1. With every ``omega`` 1 the numbers
are torch's, bit for bit.

>>> import torch
>>> table = torch.nn.Parameter(torch.ones(1000, 4))
>>> opt = RowAdagrad([table], lr=0.5)
>>> table.grad = torch.zeros(1000, 4); table.grad[7] = 1.0
>>> opt.step()
>>> round(table[7, 0].item(), 6), table[8, 0].item()
(0.5, 1.0)
"""

from __future__ import annotations

import torch

__all__ = ["RowAdagrad"]


class RowAdagrad(torch.optim.Adagrad):
    """``torch.optim.Adagrad(params, lr, eps=1e-10)`` (no weight decay, learning-rate decay, or
    maximize), updating only the rows of a table with a nonzero gradient."""

    def __init__(self, params, lr: float, eps: float = 1e-10):
        super().__init__(params, lr=lr, eps=eps)

    @torch.no_grad()
    def step(self, closure=None, row_weight: dict | None = None):
        """One step. ``row_weight``: for some 2-D tables, a (rows,) tensor of the mean importance weight of
        the examples that reached each row in this batch (> 0 wherever the row has a gradient)."""
        assert closure is None, "RowAdagrad takes no closure"
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                state = self.state[p]
                state["step"] += 1  # (torch's clr = lr / (1 + (step - 1) * lr_decay) is lr: no decay)
                total = state["sum"]
                omega = None if row_weight is None else row_weight.get(p)
                if p.dim() == 2 and not g.is_sparse:
                    rows = g.any(dim=1).nonzero().squeeze(1)  # (any: nonzero, NaN included)
                    if 2 * rows.numel() < p.shape[0]:
                        gr, s, w = g.index_select(0, rows), total.index_select(0, rows), p.index_select(0, rows)
                        s.addcmul_(gr, gr if omega is None else _per_weight(gr, omega.index_select(0, rows)), value=1)
                        w.addcdiv_(gr, s.sqrt().add_(eps), value=-lr)
                        total.index_copy_(0, rows, s)
                        p.index_copy_(0, rows, w)
                        continue
                total.addcmul_(g, g if omega is None else _per_weight(g, omega), value=1)
                p.addcdiv_(g, total.sqrt().add_(eps), value=-lr)


def _per_weight(g: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``g / omega`` row by row; a row no example of weight > 0 reached (omega 0) has no gradient, and
    stays at 0 rather than 0 / 0."""
    return g / omega.clamp_min(torch.finfo(g.dtype).tiny).unsqueeze(1)
