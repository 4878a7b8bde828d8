"""The online trainer: progressive validation over micro-batches, sparse and dense optimizers, atomic
snapshots that load with ``weights_only=True``.

Public surface: ``TrainerConfig``, ``OnlineTrainer``, ``latest_snapshot``, ``split_params``, ``atomic_save``,
``mode_free``, ``fitting_snapshot``, ``load_optimizers``, ``train_mode``.

``step(batch)`` predicts the batch with the current weights (the evaluation: the model has not seen these
labels), then trains on it. One forward pass serves both when the model has no module that behaves
differently in training (dropout, batch norm, ``nn.MultiheadAttention``'s eval fast path): the training
forward's logits are then bit for bit the eval-mode ones (``tests/model/test_trainer.py`` checks it for
the FM and the baseline), so the prediction is read off them before the update. Parameters of embedding
tables (``nn.Embedding``/``EmbeddingBag``/TorchRec tables, found by type) get Adagrad (``model/optim.py``:
torch's numbers, computed on the rows a batch reached), which adapts per row and suits sparse,
rarely-updated ids; the dense rest gets Adam. A model may return ``aux_loss`` (the LoopFM
autoencoder's), added to the BCE loss. A batch may carry importance ``weights`` (``model/delay.py``):
each example's BCE term is multiplied by its weight (the mean is still over the batch, so weight 0
removes an example from the update).

Snapshots: ``save(dir, meta)`` writes the model, the optimizers, the version and ``meta`` through
``loopline.state.snapshots`` (atomic, fsynced, digest in the name, the newest ``keep`` kept) as the
snapshot of step ``version``; the caller puts the consumer offsets in ``meta``: a snapshot is consistent
with the offsets in it, so resuming from it and re-reading from those offsets gives the same model as
never stopping. ``restore`` verifies the digest and loads with ``torch.load(weights_only=True)``: no
pickled code is ever executed. ``latest_snapshot`` and ``atomic_save`` are thin wrappers kept for callers
that want a path or a single file.

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

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from loopline.errors import ConfigError
from loopline.state import snapshots

from .optim import RowAdagrad

__all__ = ["TrainerConfig", "OnlineTrainer", "latest_snapshot", "split_params", "atomic_save", "mode_free",
           "fitting_snapshot", "load_optimizers", "train_mode"]

_SPARSE_TYPES = (nn.Embedding, nn.EmbeddingBag)
# modules whose forward depends on train/eval mode: a model holding one predicts with its own eval pass
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase, nn.MultiheadAttention,
                   nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def mode_free(model: nn.Module) -> bool:
    """Whether ``model`` holds none of the standard modules that behave differently in training."""
    return not any(isinstance(m, _MODE_DEPENDENT) for m in model.modules())


@dataclass(frozen=True)
class TrainerConfig:
    lr_dense: float = 1e-3  # Adam on dense layers
    # Adagrad on embedding rows. Each row sees only its own id's examples, so it needs a large step: at 0.05
    # the FM lost to a VM on MovieLens (AUC 0.707 vs 0.712); 0.4 gives 0.714 (docs/transfer.md)
    lr_sparse: float = 0.4
    batch_size: int = 256  # examples per micro-batch (the stream is cut by count)
    seed: int = 0
    # torch intra-op threads. One: these models' ops are too small for a pool to pay its fork-join, and
    # in a worker the fm's and the vm's training threads already fill two cores (measured on 2 cores:
    # evaluate's model stage 6.4-6.9 s with one thread, 9.9-10.2 s with two; docs/benchmarks.md)
    threads: int = 1

    def __post_init__(self):
        for name in ("lr_dense", "lr_sparse"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")


def train_mode(model: nn.Module) -> None:
    """``model.train()``, skipped when the model is in training mode already: the call walks every
    submodule (about 0.3 ms for a VM), and a training step makes it every time. (Loopline never sets a
    submodule's mode on its own, so the root's flag is the whole model's.)"""
    if not model.training:
        model.train()


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
        # a model without first-order rows names its output intercept, which then learns with the rows:
        # under Adam it moved about lr_dense a step, and the FM took a day of a 4% stream to come down
        # from p = 0.5 (docs/transfer.md)
        intercept = getattr(model, "intercept", None)
        if intercept is not None:
            dense = [p for p in dense if p is not intercept]
            sparse = sparse + [intercept]
        self.optimizers = []
        if sparse:
            self.optimizers.append(RowAdagrad(sparse, lr=cfg.lr_sparse))  # torch's numbers, on the rows hit
        if dense:
            # foreach: one C++ loop over the many small dense tensors instead of a Python one; on CPU it
            # runs the same per-tensor kernels, so the same numbers (tests/model/test_trainer.py)
            self.optimizers.append(torch.optim.Adam(dense, lr=cfg.lr_dense, foreach=True))
        self.shared_forward = mode_free(model)  # step() predicts from the training forward

    def current_model(self) -> nn.Module:
        """The model with its current weights (``RankedTrainer`` gathers its shards first)."""
        return self.model

    def close(self) -> None:
        """Nothing to release (``RankedTrainer`` stops its other ranks)."""

    @torch.no_grad()
    def predict_many(self, batch) -> np.ndarray:
        self.model.eval()
        return torch.sigmoid(self.model(batch)["logit"]).numpy().astype(np.float64)

    def learn_many(self, batch) -> float:
        return self._learn(batch)[0]

    def _learn(self, batch) -> tuple[float, dict]:
        train_mode(self.model)
        out = self.model(batch)
        # rows a managed-collision table just gave to new ids start with a fresh Adagrad sum
        for p, rows in getattr(self.model, "take_fresh_rows", dict)().items():
            for opt in self.optimizers:
                if p in opt.state and "sum" in opt.state[p]:
                    opt.state[p]["sum"][rows] = 0.0
        weights = getattr(batch, "weights", None)
        loss = F.binary_cross_entropy_with_logits(out["logit"], batch.labels, weight=weights)
        if "aux_loss" in out:
            loss = loss + out["aux_loss"]
        before = {k: v.detach() for k, v in out.items()}  # outputs of the weights before this update
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        self.version += 1
        return float(loss.detach()), before

    def step(self, batch) -> np.ndarray:
        """Progressive validation: predict first (the evaluation), then learn."""
        return self.step_outputs(batch)[0]

    def step_outputs(self, batch) -> tuple[np.ndarray, dict | None]:
        """``step``, and the model's whole output before the update (detached) when the model is
        mode-free, so that one forward serves both; None otherwise."""
        if not self.shared_forward:
            p = self.predict_many(batch)
            self.learn_many(batch)
            return p, None
        _, out = self._learn(batch)
        return torch.sigmoid(out["logit"]).numpy().astype(np.float64), out

    # -- snapshots -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                "version": self.version, "config": asdict(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        with fitting_snapshot():
            self.model.load_state_dict(state["model"])
            load_optimizers(self.optimizers, state["optimizers"])
        self.version = int(state["version"])

    def save(self, directory: str, meta: dict | None = None, keep: int = snapshots.DEFAULT_KEEP) -> str:
        """Write the snapshot of step ``version`` into ``directory`` (the ``keep`` newest remain)."""
        return snapshots.SnapshotDir(directory, keep).save({**self.state_dict(), "meta": dict(meta or {})},
                                                           self.version)

    def restore(self, path: str) -> dict:
        """Load a snapshot written by :meth:`save` (verified; ``SnapshotError`` if it is damaged);
        returns its ``meta``."""
        state = snapshots.read(path)
        self.load_state_dict(state)
        return state["meta"]


@contextmanager
def fitting_snapshot():
    """Turns a snapshot that does not fit the model (another version's or config's layout: other tables,
    layers or optimizer groups) into one ``SnapshotError`` line saying what to do, not torch's traceback."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise snapshots.SnapshotError(
            f"snapshot: does not fit this model ({first[:200]}); it was written by another version or "
            "config of it: restart with that one, or on an empty --data-dir to start over") from None


def load_optimizers(optimizers: list, states: list) -> None:
    if len(optimizers) != len(states):
        raise ValueError(f"{len(states)} optimizer states for {len(optimizers)} optimizers")
    for opt, st in zip(optimizers, states):
        opt.load_state_dict(st)


def atomic_save(obj, path: str) -> str:
    """``torch.save`` ``obj`` to ``path`` durably (temporary, fsync, rename, fsync of the directory): a
    reader, or a restart after a crash, sees the old file or the whole new one, never a part."""
    return snapshots.write_atomic(path, snapshots.encoder(obj))


def latest_snapshot(directory: str) -> str | None:
    """The path of the newest snapshot in ``directory`` that verifies (an older one, with a logged
    warning, when the newest is damaged); None when there is none. Loads it to check: callers that want
    the object use ``loopline.state.snapshots.read_latest``."""
    found = snapshots.read_latest(directory)
    return None if found is None else found[1]
