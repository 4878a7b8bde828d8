"""The online trainer: progressive validation over micro-batches, sparse and dense optimizers, atomic
snapshots that load with ``weights_only=True``.

Public surface: ``TrainerConfig``, ``OnlineTrainer``, ``latest_snapshot``.

``step(batch)`` predicts the batch with the current weights (the evaluation: the model has not seen these
labels), then trains on it. Parameters of embedding tables (``nn.Embedding``/``EmbeddingBag``/TorchRec
tables, found by type) get Adagrad, which adapts per row and suits sparse, rarely-updated ids; the dense
rest gets Adam. A model may return ``aux_loss`` (the LoopFM autoencoder's), added to the BCE loss.

Snapshots: ``save(dir, meta)`` writes ``snapshot-<version>.pt`` to a temporary file and renames it into
place (atomic on POSIX), with the model, the optimizers, the version and ``meta`` (the caller puts the
consumer offsets there: a snapshot is consistent with the offsets in it, so resuming from it and
re-reading from those offsets gives the same model as never stopping). ``restore`` loads with
``torch.load(weights_only=True)``: no pickled code is ever executed.

>>> import torch
>>> from loopline.model.baseline import LogisticBaseline
>>> from loopline.model.features import Featurizer
>>> t = OnlineTrainer(LogisticBaseline(), TrainerConfig(seed=0))
>>> b = Featurizer().batch([{"user": "u", "ad": "a", "campaign": "c", "vertical": "v", "ts": 1.0, "label": 1}], [[]])
>>> p = t.step(b)
>>> float(p[0])  # a zero-initialized logistic model predicts 0.5 before its first update
0.5
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from loopline.state.errors import ConfigError

__all__ = ["TrainerConfig", "OnlineTrainer", "latest_snapshot", "split_params", "atomic_save"]

_SPARSE_TYPES = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class TrainerConfig:
    lr_dense: float = 1e-3  # Adam on dense layers
    lr_sparse: float = 0.05  # Adagrad on embedding rows
    batch_size: int = 256  # examples per micro-batch (the stream is cut by count)
    seed: int = 0
    threads: int = 2  # torch intra-op threads: the machine's cores, not more

    def __post_init__(self):
        for name in ("lr_dense", "lr_sparse"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")


def split_params(model: nn.Module) -> tuple[list, list]:
    """(sparse, dense) parameters: embedding tables by module type, everything else dense."""
    sparse_ids = set()
    for m in model.modules():
        if isinstance(m, _SPARSE_TYPES) or type(m).__name__ in ("EmbeddingBagCollection", "EmbeddingCollection"):
            sparse_ids.update(id(p) for p in m.parameters())
    sparse = [p for p in model.parameters() if id(p) in sparse_ids]
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    return sparse, dense


class OnlineTrainer:
    def __init__(self, model: nn.Module, cfg: TrainerConfig = TrainerConfig()):
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.model = model
        self.version = 0  # number of training steps taken
        sparse, dense = split_params(model)
        self.optimizers = []
        if sparse:
            self.optimizers.append(torch.optim.Adagrad(sparse, lr=cfg.lr_sparse))
        if dense:
            self.optimizers.append(torch.optim.Adam(dense, lr=cfg.lr_dense))
        self.loss_fn = nn.BCEWithLogitsLoss()

    @torch.no_grad()
    def predict_many(self, batch) -> np.ndarray:
        self.model.eval()
        return torch.sigmoid(self.model(batch)["logit"]).numpy().astype(np.float64)

    def learn_many(self, batch) -> float:
        self.model.train()
        out = self.model(batch)
        loss = self.loss_fn(out["logit"], batch.labels)
        if "aux_loss" in out:
            loss = loss + out["aux_loss"]
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        self.version += 1
        return float(loss.detach())

    def step(self, batch) -> np.ndarray:
        """Progressive validation: predict first (the evaluation), then learn."""
        p = self.predict_many(batch)
        self.learn_many(batch)
        return p

    # -- snapshots -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                "version": self.version, "config": asdict(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for opt, st in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(st)
        self.version = int(state["version"])

    def save(self, directory: str, meta: dict | None = None) -> str:
        path = os.path.join(directory, f"snapshot-{self.version:010d}.pt")
        return atomic_save({**self.state_dict(), "meta": dict(meta or {})}, path)

    def restore(self, path: str) -> dict:
        """Load a snapshot written by :meth:`save`; returns its ``meta``."""
        state = torch.load(path, weights_only=True)
        self.load_state_dict(state)
        return state["meta"]


def atomic_save(obj, path: str) -> str:
    """``torch.save`` to a temporary file beside ``path``, then rename: a reader (or a restart after a
    crash) sees the old file or the whole new one, never a part."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".snapshot-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def latest_snapshot(directory: str) -> str | None:
    """The newest complete snapshot in ``directory`` (temporary files are never matched)."""
    if not os.path.isdir(directory):
        return None
    names = sorted(n for n in os.listdir(directory) if re.fullmatch(r"snapshot-\d{10}\.pt", n))
    return os.path.join(directory, names[-1]) if names else None
