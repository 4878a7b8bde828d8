"""Logistic regression on the FM's hashed sparse features: the baseline the FM must beat.

Public surface: ``LogisticBaseline``.

One weight per hashed id (an ``EmbeddingBag`` of width 1 per feature key, summed) plus a bias: the
classic online CTR baseline, trained by the same :class:`~loopline.model.trainer.OnlineTrainer`, on the
same micro-batches, in the same pass as the FM.
"""

from __future__ import annotations

import torch
from torch import nn

from .features import SPARSE_KEYS, Batch, FeatureConfig

__all__ = ["LogisticBaseline"]


class LogisticBaseline(nn.Module):
    def __init__(self, features: FeatureConfig = FeatureConfig()):
        super().__init__()
        self.weights = nn.ModuleDict({k: nn.EmbeddingBag(features.table_sizes[k], 1, mode="sum")
                                      for k in SPARSE_KEYS})
        for bag in self.weights.values():
            nn.init.zeros_(bag.weight)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> dict:
        logit = self.bias.expand(batch.size).clone()  # (B,)
        for k, bag in self.weights.items():
            values, lengths = batch.sparse[k]
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
            logit = logit + bag(values, offsets).squeeze(-1)
        return {"logit": logit}
