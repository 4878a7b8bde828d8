"""A vertical model (VM): a small DeepFM that serves one vertical, optionally fed the LoopFM sequence and
distilled from the FM (KD, Auxiliary Head, Student Adapter).

Public surface: ``VMConfig``, ``VMBatch``, ``VMFeaturizer``, ``VerticalModel``, ``VMLearner``.

``shared/papers.md`` sections 1-2. The VM sees its own small feature subset (hashed ids of ad, campaign,
user attrs and extra features, 8-wide embeddings; no user id), and, with ``history`` set, the user's
sequence strictly before the example's time:

* ``sequence="fm"``: the LoopFM codes the FM wrote for the user's earlier examples (the wide channel);
* ``sequence="raw"``: the user's raw earlier events (ad, campaign) with the VM's own embeddings, for the
  gain decomposition (what history alone gives, without the FM);
* ``sequence="both"``: both encoders side by side.

The history encoder pools the sequence (``mean`` or ``sum``) or attends to it with the target ad and
campaign as the query (``attention``: LoopFM's best). Each pooled sequence becomes one more field of the
factorization machine and one more input of the MLP.

Distillation (``distill``): ``kd`` adds ``kd_weight * BCE(y_S, y_F)`` on the serving head; ``ah`` adds
the Auxiliary Head (``model/distill.py``). ``adapter=True`` trains a Student Adapter on the FM's logit
first and adds its stop-gradient output as a second target of the distilling head. With ``teacher_gate``
(the default) every distillation term is on only while the FM's recent log loss on the distilled
examples is below the VM's own (``VMLearner._gate``).

A VM starts at ``p = 0.5``; its first step on weighted examples ends by setting the intercept to that
batch's label rate (``VMLearner._start_intercept``), so the stream's first day is not spent coming down.

>>> cfg = VMConfig(history="attention", distill="ah", adapter=True)
>>> ex = {"ad": "a1", "campaign": "c1", "attrs": {"age": "25-34"}, "features": {"slot": "1"}, "label": 1,
...       "soft_label": 0.3}
>>> b = VMFeaturizer(cfg).batch([ex], codes=[np.ones((2, cfg.code_dim), np.float32)], raw=[[]])
>>> learner = VMLearner(cfg, seed=0)
>>> p = learner.predict_many(b); 0.0 < float(p[0]) < 1.0
True
>>> sorted(learner.learn_many(b))
['adapter', 'distill', 'loss', 'serving']
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loopline.errors import ConfigError

from .distill import StudentAdapter, aux_target, grad_scale, soft_bce
from .features import HashCache
from .mods import MLP, BlockNorm, activation
from .optim import RowAdagrad
from .trainer import fitting_snapshot, load_optimizers, mode_free, split_params, train_mode

__all__ = ["VMConfig", "VMBatch", "VMFeaturizer", "VerticalModel", "VMLearner"]

HISTORY = ("none", "mean", "sum", "attention")
SEQUENCES = ("fm", "raw", "both")
DISTILL = ("none", "kd", "ah")
FIELDS = ("ad", "campaign", "attrs", "feats")


@dataclass(frozen=True)
class VMConfig:
    fields: tuple = FIELDS  # the VM's own features: a subset of the FM's, no user id (a small model)
    table_size: int = 4096  # hashed rows per field
    emb_dim: int = 8  # small embeddings (the FM's are 16)
    hidden: tuple = (64, 32)  # the MLP; its last width is the backbone output both heads read
    history: str = "none"  # none | mean | sum | attention: the encoder over the user's sequence
    sequence: str = "fm"  # fm (LoopFM codes) | raw (raw events) | both
    seq_len: int = 20  # newest entries read, strictly before the example's time
    code_dim: int = 16  # LoopFM code width (FMConfig.code_dim)
    distill: str = "none"  # none | kd | ah
    kd_weight: float = 0.5  # lambda of plain KD
    ah_alpha: float = 1.0  # distillation-head target min(1, alpha * y_F)
    ah_beta: float = 0.5  # scale of the distillation head's gradient into the backbone
    ah_weight: float = 1.0  # w: weight of the distillation head's loss
    adapter: bool = False  # Student Adapter (its output: a second distillation target)
    adapter_hidden: int = 8
    adapter_weight: float = 1.0
    # Adam on the adapter: a calibration map of one input, which must follow the FM's calibration between
    # snapshots faster than the VM's dense layers learn. At 1e-2 it took days of the synthetic stream to
    # undo the FM's first-day over-prediction (vm:kd+sa calibration 1.085; 0.1: 1.051, NE 0.888 -> 0.883)
    adapter_lr: float = 0.1
    # distil only while the teacher beats the VM (ExFM's premise): the FM's log loss and the VM's serving
    # log loss, each a sum over the distilled examples decayed by gate_decay a step; while the FM's is not
    # the lower, the distillation terms are off. The FM's own start-up and a stale snapshot teach
    # calibration errors otherwise (synthetic vm:kd 1.054 -> 1.031, NE 0.8814 -> 0.8808)
    teacher_gate: bool = True
    gate_decay: float = 0.9
    mods: bool = False  # LoKA's Mods: HardSwish, BlockNorm, no bias in the hidden layers (heads keep theirs)
    lr_dense: float = 1e-3  # Adam on dense layers
    lr_sparse: float = 0.05  # Adagrad on embedding rows
    # Adagrad on the first-order rows, a logistic regression inside the VM: at the logistic baseline's rate
    # (TrainerConfig.lr_sparse). At lr_sparse they took days of a 4% stream to carry the output from 0.5
    # down to the base rate (synthetic calibration 1.50 -> 1.16, NE 0.970 -> 0.900; docs/transfer.md)
    lr_first: float = 0.4
    hash_cache: int = 65_536  # hashed id strings cached by the featurizer (model/features.py HashCache)

    def __post_init__(self):
        for name, allowed in (("history", HISTORY), ("sequence", SEQUENCES), ("distill", DISTILL)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not self.fields or any(f not in FIELDS for f in self.fields):
            raise ConfigError(f"fields: must be a non-empty subset of {FIELDS}, got {self.fields}")
        if isinstance(self.hash_cache, bool) or not isinstance(self.hash_cache, int) or self.hash_cache < 0:
            raise ConfigError(f"hash_cache: must be an integer >= 0, got {self.hash_cache!r}")
        for name in ("table_size", "emb_dim", "seq_len", "code_dim", "adapter_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden: must be positive widths, got {self.hidden}")
        for name in ("lr_dense", "lr_sparse", "lr_first", "adapter_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ConfigError(f"{name}: must be a positive number, got {v!r}")
        for name in ("kd_weight", "ah_alpha", "ah_beta", "ah_weight", "adapter_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        g = self.gate_decay
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g < 1:
            raise ConfigError(f"gate_decay: must be in [0, 1), got {self.gate_decay!r}")
        if self.adapter and self.distill == "none":
            raise ConfigError("adapter: needs distill = kd or ah (its output is a distillation target)")

    @property
    def uses(self) -> set:
        """Which sequences the model reads: a subset of {"fm", "raw"}."""
        if self.history == "none":
            return set()
        return {"fm", "raw"} if self.sequence == "both" else {self.sequence}


@dataclass
class VMBatch:
    """One micro-batch for a VM. ``ids``: field -> (values (N,), offsets (B,)) for an EmbeddingBag;
    ``codes`` (B, L, C) and ``code_mask`` (B, L); ``raw_ad``/``raw_campaign`` (B, L) with ``raw_mask``;
    ``labels`` (B,); ``soft`` (B,) with NaN where DAS had no soft label; ``weights`` (B,) the examples'
    importance weights in training (the FM stage's ``weight``, ``model/delay.py``), or None for all 1."""

    ids: dict
    codes: torch.Tensor
    code_mask: torch.Tensor
    raw_ad: torch.Tensor
    raw_campaign: torch.Tensor
    raw_mask: torch.Tensor
    labels: torch.Tensor
    soft: torch.Tensor
    size: int = field(default=0)
    weights: torch.Tensor | None = None


class VMFeaturizer:
    """Column-wise, each distinct id string hashed once (``HashCache``, bounded by ``hash_cache``):
    bit for bit the batches of a per-element loop (``tests/model/test_features.py``)."""

    def __init__(self, cfg: VMConfig = VMConfig()):
        self.cfg = cfg
        self.cache = HashCache(cfg.hash_cache)

    def field_ids(self, ex: dict) -> dict[str, list[int]]:
        n, c = self.cfg.table_size, self.cache
        out = {}
        for f in self.cfg.fields:
            if f in ("ad", "campaign"):
                out[f] = c.ids(f, [ex[f]], n)
            else:
                out[f] = c.pairs(f, sorted((ex.get("attrs" if f == "attrs" else "features") or {}).items()), n)
        return out

    def batch(self, examples: list[dict], codes: list | None = None, raw: list | None = None) -> VMBatch:
        """``codes[i]``: float (n_i, C) LoopFM codes of the i-th example's user before its ts, oldest
        first; ``raw[i]``: raw events ``(ts, ad, campaign, kind)`` before its ts. Either may be None
        when the model does not read it."""
        B, n, cache = len(examples), self.cfg.table_size, self.cache
        ids = {}
        for f in self.cfg.fields:
            if f in ("ad", "campaign"):
                flat, offsets = cache.ids(f, [ex[f] for ex in examples], n), torch.arange(B)
            else:
                src = "attrs" if f == "attrs" else "features"
                maps = [ex.get(src) or _NO_PAIRS for ex in examples]
                if B and all(m is maps[0] for m in maps):
                    # one map for every example (POST /score/: the request's attrs, shared by all
                    # candidates): sorted and hashed once
                    one = cache.pairs(f, sorted(maps[0].items()), n)
                    flat = np.tile(np.asarray(one, np.int64), B)
                    offsets = torch.arange(0, len(one) * B, len(one)) if one else torch.zeros(B, dtype=torch.int64)
                else:
                    rows = [sorted(m.items()) for m in maps]
                    flat, lens = cache.pairs(f, [kv for r in rows for kv in r], n), list(map(len, rows))
                    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lens)[:-1]]) if B else [], dtype=torch.int64)
            # (lists through numpy: torch.tensor on a Python list is about 3x slower)
            ids[f] = (torch.from_numpy(np.asarray(flat, np.int64)), offsets)
        # One user's sequence for every candidate (``POST /score/`` passes the same list B times): made
        # once and repeated, instead of B lookups of the same L events
        cz, cm = self._codes(_once(codes), B)
        ra, rc, rm = self._raw(_once(raw), B)
        soft = [ex.get("soft_label") for ex in examples]
        weights = [ex.get("weight", 1.0) for ex in examples]
        cache.bound()
        return VMBatch(ids=ids, codes=torch.from_numpy(cz), code_mask=torch.from_numpy(cm),
                       raw_ad=torch.from_numpy(ra), raw_campaign=torch.from_numpy(rc), raw_mask=torch.from_numpy(rm),
                       labels=torch.from_numpy(np.fromiter([ex["label"] for ex in examples], np.float32, B)),
                       soft=torch.tensor([math.nan if s is None else float(s) for s in soft], dtype=torch.float32),
                       size=B, weights=None if all(w == 1.0 for w in weights) else
                       torch.tensor([float(w) for w in weights], dtype=torch.float32))

    def _codes(self, codes: list | None, B: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, L, C) codes, left-padded (the newest at L-1), and their mask; ``codes`` has B rows, or one
        row for all B."""
        L, C = self.cfg.seq_len, self.cfg.code_dim
        R = B if codes is None else len(codes)
        cz, cm = np.zeros((R, L, C), np.float32), np.zeros((R, L), bool)
        for i, c in enumerate(codes or ()):
            c = np.asarray(c, np.float32)[-L:]
            if len(c):
                assert c.shape[1] == C, f"code width {c.shape[1]} != code_dim {C}"
                cz[i, L - len(c):] = c
                cm[i, L - len(c):] = True
        return (cz, cm) if R == B else (np.repeat(cz, B, axis=0), np.repeat(cm, B, axis=0))

    def _raw(self, raw: list | None, B: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, L) raw-event ad and campaign ids, left-padded, and their mask; ``raw`` has B rows, or one
        row for all B."""
        L, n, cache = self.cfg.seq_len, self.cfg.table_size, self.cache
        R = B if raw is None else len(raw)
        ra, rc, rm = np.zeros((R, L), np.int64), np.zeros((R, L), np.int64), np.zeros((R, L), bool)
        if raw is not None:
            picked = [evs[-L:] for evs in raw]
            lens = np.fromiter(map(len, picked), np.int64, R)
            rows = np.repeat(np.arange(R), lens)
            cols = np.arange(len(rows)) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(L - lens, lens)
            evs = [e for p in picked for e in p]
            if evs:
                ra[rows, cols] = cache.pairs("raw-ad", [(e[3], e[1]) for e in evs], n, sep=":")
                rc[rows, cols] = cache.pairs("raw-campaign", [(e[3], e[2]) for e in evs], n, sep=":")
                rm[rows, cols] = True
        return (ra, rc, rm) if R == B else tuple(np.repeat(a, B, axis=0) for a in (ra, rc, rm))


_NO_PAIRS: dict = {}  # an absent attrs/features map, shared so that examples without one are the same map


def _once(rows: list | None) -> list | None:
    """``rows[:1]`` when every row is the same object (one user's sequence for all), else ``rows``."""
    return rows[:1] if rows is not None and len(rows) > 1 and all(r is rows[0] for r in rows) else rows


class _SeqEncoder(nn.Module):
    """Pools a (B, L, D) sequence into (B, d): masked mean or sum, or target attention."""

    def __init__(self, in_dim: int, d: int, kind: str):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(in_dim, d)
        if kind == "attention":
            self.query = nn.Linear(2 * d, d)

    def forward(self, seq, mask, target):  # (B, L, D), (B, L), (B, 2d) -> (B, d)
        keys = self.proj(seq)  # (B, L, d)
        m = mask.unsqueeze(-1).to(keys.dtype)
        if self.kind == "sum":
            return (keys * m).sum(1)
        if self.kind == "mean":
            return (keys * m).sum(1) / m.sum(1).clamp_min(1.0)
        q = self.query(target).unsqueeze(1)  # (B, 1, d)
        scores = (q * keys).sum(-1) / math.sqrt(keys.shape[-1])  # (B, L)
        scores = scores.masked_fill(~mask, float("-inf"))
        att = torch.softmax(scores, dim=1).nan_to_num(0.0)  # an empty history attends to nothing
        return (att.unsqueeze(-1) * keys).sum(1)


class VerticalModel(nn.Module):
    """DeepFM core: first-order terms + pairwise factorization-machine interactions + an MLP, over the
    field embeddings and the pooled sequences. ``forward`` returns the serving logit, and the
    distillation head's logit when ``distill == "ah"``."""

    def __init__(self, cfg: VMConfig):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.emb_dim, cfg.table_size
        self.bags = nn.ModuleDict({f: nn.EmbeddingBag(n, d, mode="mean") for f in cfg.fields})
        self.first = nn.ModuleDict({f: nn.EmbeddingBag(n, 1, mode="mean") for f in cfg.fields})
        self.encoders = nn.ModuleDict()
        if "fm" in cfg.uses:
            self.encoders["fm"] = _SeqEncoder(cfg.code_dim, d, cfg.history)
        if "raw" in cfg.uses:
            self.raw_ad = nn.Embedding(n, d)
            self.raw_campaign = nn.Embedding(n, d)
            self.encoders["raw"] = _SeqEncoder(d, d, cfg.history)
        n_fields = len(cfg.fields) + len(self.encoders)
        act, norm, bias = ("hardswish", "block", "none") if cfg.mods else ("relu", "none", "all")
        self.mlp = nn.Sequential(MLP([n_fields * d, *cfg.hidden], act=act, norm=norm, bias=bias),
                                 BlockNorm() if norm == "block" else nn.Identity(), activation(act))  # the backbone's last layer activated too
        width = cfg.hidden[-1]
        self.serving = nn.Linear(width, 1)
        self.distilling = None
        if cfg.distill == "ah":
            # drawn aside (the generator's state restored after), so a recipe with the Auxiliary Head starts
            # from the draws of the one without: before, its head shifted every embedding's initial draw,
            # and with beta = 0 AH was not base
            with torch.random.fork_rng():
                self.distilling = nn.Linear(width, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        # small initial embeddings: with N(0, 1) rows the pairwise term alone would have a standard
        # deviation of about sqrt(pairs * d) logits and the untrained model would be far off the base rate
        for bag in self.bags.values():
            nn.init.normal_(bag.weight, std=0.01)
        for bag in self.first.values():
            nn.init.zeros_(bag.weight)
        if "raw" in cfg.uses:
            nn.init.normal_(self.raw_ad.weight, std=0.01)
            nn.init.normal_(self.raw_campaign.weight, std=0.01)

    def target(self, b: VMBatch) -> torch.Tensor:  # (B, 2d): the attention query's input
        parts = [self.bags[f](*b.ids[f]) if f in self.bags else None for f in ("ad", "campaign")]
        parts = [p if p is not None else torch.zeros(b.size, self.cfg.emb_dim) for p in parts]
        return torch.cat(parts, dim=-1)

    def forward(self, b: VMBatch) -> dict:
        embs = [self.bags[f](*b.ids[f]) for f in self.cfg.fields]  # each (B, d)
        first = sum(self.first[f](*b.ids[f]) for f in self.cfg.fields).squeeze(-1)  # (B,)
        if self.encoders:
            tgt = self.target(b)
            if "fm" in self.encoders:
                embs.append(self.encoders["fm"](b.codes, b.code_mask, tgt))
            if "raw" in self.encoders:
                seq = self.raw_ad(b.raw_ad) + self.raw_campaign(b.raw_campaign)  # (B, L, d)
                embs.append(self.encoders["raw"](seq, b.raw_mask, tgt))
        e = torch.stack(embs, dim=1)  # (B, F, d)
        pairwise = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(-1)  # (B,): sum over i<j of <e_i, e_j>
        z = self.mlp(e.flatten(1))  # (B, h): the backbone output
        out = {"logit": self.serving(z).squeeze(-1) + pairwise + first + self.bias}
        if self.distilling is not None:
            out["distill_logit"] = self.distilling(grad_scale(z, self.cfg.ah_beta)).squeeze(-1)
        return out


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


class VMLearner:
    """One VM (and its Student Adapter): progressive validation with ``predict_many`` then
    ``learn_many``, snapshots through ``state_dict`` (tensors and plain values only)."""

    def __init__(self, cfg: VMConfig, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.model = VerticalModel(cfg)
        sparse, dense = split_params(self.model)
        # Adam with foreach: the same numbers as the single-tensor loop on CPU, less Python (model/trainer.py)
        first = {id(p) for p in self.model.first.parameters()}
        # the output intercept learns with the first-order rows, as every example's first-order row would:
        # under Adam it moved about lr_dense a step, and each VM's first day over-predicted by ~140
        # conversions while it came down from p = 0.5 (the FM's does the same: model/trainer.py)
        dense = [p for p in dense if p is not self.model.bias]
        rows = [{"params": [p for p in sparse if id(p) in first] + [self.model.bias], "lr": cfg.lr_first},
                {"params": [p for p in sparse if id(p) not in first]}]
        self.optimizers = [RowAdagrad(rows, lr=cfg.lr_sparse),
                           torch.optim.Adam(dense, lr=cfg.lr_dense, foreach=True)]
        self.adapter = StudentAdapter(cfg.adapter_hidden) if cfg.adapter else None
        self.adapter_opt = (torch.optim.Adam(self.adapter.parameters(), lr=cfg.adapter_lr, foreach=True)
                            if self.adapter else None)
        self.version = 0
        self.intercept_started = False  # set by the first step on examples of weight > 0 (_start_intercept)
        # the teacher gate's decayed log-loss sums (teacher, student) and the steps it closed (_gate)
        self.gate_sums = torch.zeros(2, dtype=torch.float64)
        self.gated_steps = 0
        self._shared_forward = mode_free(self.model)

    @torch.inference_mode()
    def predict_many(self, b: VMBatch) -> np.ndarray:
        """Serving predictions (the serving head only), without recording the graph for a backward."""
        self.model.eval()
        return torch.sigmoid(self.model(b)["logit"]).numpy().astype(np.float64)

    def step(self, b: VMBatch) -> tuple[np.ndarray, dict]:
        """Progressive validation: the serving predictions before this batch's update (what
        ``predict_many`` gives), then ``learn_many``; one forward pass serves both when the model has no
        mode-dependent module (``trainer.mode_free``): the training forward's logits are the eval ones
        bit for bit (``tests/model/test_features.py`` checks every variant)."""
        if not self._shared_forward:
            p = self.predict_many(b)
            return p, self.learn_many(b)
        losses, logit = self._learn(b)
        return torch.sigmoid(logit).numpy().astype(np.float64), losses

    def learn_many(self, b: VMBatch) -> dict:
        """One step: the adapter first (on fresh labels), then the VM. Returns the loss terms."""
        return self._learn(b)[0]

    def _learn(self, b: VMBatch) -> tuple[dict, torch.Tensor]:
        has_soft = ~torch.isnan(b.soft)
        soft = torch.nan_to_num(b.soft, nan=0.0)
        # importance weights (model/delay.py) weigh every term: each is an average over the same stream
        w = b.weights
        soft_w = has_soft if w is None else has_soft * w
        losses = {}
        sa_target = None
        if self.adapter is not None and bool(has_soft.any()):
            train_mode(self.adapter)
            sa_loss = soft_bce(self.adapter(_logit(soft)), b.labels, soft_w)
            self.adapter_opt.zero_grad(set_to_none=True)
            sa_loss.backward()
            self.adapter_opt.step()
            losses["adapter"] = float(sa_loss.detach())
            with torch.no_grad():  # stop-gradient: a target, not a path into the adapter
                sa_target = torch.sigmoid(self.adapter(_logit(soft)))
        train_mode(self.model)
        out = self.model(b)
        serving = F.binary_cross_entropy_with_logits(out["logit"], b.labels, weight=w)
        loss, distill = serving, torch.zeros(())
        logit = out["logit"].detach()  # the serving head before this update (the adapter is not in it)
        if self.cfg.distill != "none" and self.cfg.teacher_gate:
            soft_w = self._gate(logit, soft, b.labels, soft_w)
        if self.cfg.distill == "kd":
            distill = self.cfg.kd_weight * soft_bce(out["logit"], soft, soft_w)
            if sa_target is not None:
                distill = distill + self.cfg.adapter_weight * soft_bce(out["logit"], sa_target, soft_w)
        elif self.cfg.distill == "ah":
            distill = self.cfg.ah_weight * soft_bce(out["distill_logit"], aux_target(soft, self.cfg.ah_alpha), soft_w)
            if sa_target is not None:
                distill = distill + self.cfg.adapter_weight * soft_bce(out["distill_logit"], sa_target, soft_w)
        loss = serving + distill
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers[0].step(row_weight=self._row_weights(b))
        self.optimizers[1].step()
        if not self.intercept_started:
            self.intercept_started = self._start_intercept(b)
        self.version += 1
        losses.update(loss=float(loss.detach()), serving=float(serving.detach()),
                      distill=float(distill.detach()) if self.cfg.distill != "none" else 0.0)
        return losses, logit

    @torch.no_grad()
    def _gate(self, logit: torch.Tensor, soft: torch.Tensor, labels: torch.Tensor,
              soft_w: torch.Tensor) -> torch.Tensor:
        """The teacher gate: the distillation mask ``soft_w`` as is while the teacher's decayed log loss on
        the distilled examples is below the VM's (serving head, before this step), else all zero. Both
        sums see the same examples and weights, so the comparison holds whatever the label rate or the
        weights; a step without soft labels leaves them as they are."""
        m = soft_w.to(torch.float64)
        if not bool((m > 0).any()):
            return soft_w
        y = labels.to(torch.float64)
        teacher = F.binary_cross_entropy(soft.to(torch.float64).clamp(1e-7, 1 - 1e-7), y, reduction="none")
        student = F.binary_cross_entropy_with_logits(logit.to(torch.float64), y, reduction="none")
        self.gate_sums = self.cfg.gate_decay * self.gate_sums + torch.stack([(teacher * m).sum(),
                                                                             (student * m).sum()])
        if self.gate_sums[0] < self.gate_sums[1]:
            return soft_w
        self.gated_steps += 1
        return torch.zeros_like(soft_w)

    @torch.no_grad()
    def _start_intercept(self, b: VMBatch) -> bool:
        """After the first step on examples of weight > 0: shift the intercept so that the model's weighted
        mean prediction on that batch is the batch's label rate, ``(sum w y + 1/2) / (sum w + 1)`` (half
        a pseudo-positive, so a batch without positives still gives a finite log-odds). Returns whether
        it did. A VM starts at ``p = 0.5``; on a 4% stream Adagrad's scale-free steps took several
        batches to come down, every prediction on the way counted, and the synthetic stream's first day
        over-predicted by ~70 conversions. Once only: from then on the intercept learns as before."""
        w = torch.ones_like(b.labels) if b.weights is None else b.weights
        mass = float(w.sum())
        if not mass > 0:
            return False
        target = (float((w * b.labels).sum()) + 0.5) / (mass + 1.0)
        z = self.model(b)["logit"]
        lo, hi = -30.0, 30.0  # bisection: the weighted mean of sigmoid(z + c) increases with c
        for _ in range(40):
            c = 0.5 * (lo + hi)
            if float((w * torch.sigmoid(z + c)).sum()) / mass > target:
                hi = c
            else:
                lo = c
        self.model.bias += 0.5 * (lo + hi)
        return True

    def _row_weights(self, b: VMBatch) -> dict | None:
        """Each field table's mean importance weight per row over the batch's examples of weight > 0 (for
        ``RowAdagrad``: Adagrad's step ignores the scale of a row's gradient, so without it a new
        campaign's down-weighted positives move its rows at full speed; model/optim.py); None when the
        batch is unweighted."""
        w = b.weights
        if w is None:
            return None
        out, n = {}, self.cfg.table_size
        trains = (w > 0).to(w.dtype)
        for f in self.cfg.fields:
            flat, offsets = b.ids[f]
            lens = torch.diff(offsets, append=torch.tensor([flat.numel()]))
            mass = torch.zeros(n).index_add_(0, flat, w.repeat_interleave(lens))
            count = torch.zeros(n).index_add_(0, flat, trains.repeat_interleave(lens))
            out[self.model.bags[f].weight] = out[self.model.first[f].weight] = mass / count.clamp_min(1.0)
        return out

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                "adapter": self.adapter.state_dict() if self.adapter else None,
                "adapter_opt": self.adapter_opt.state_dict() if self.adapter_opt else None,
                "version": self.version, "intercept_started": self.intercept_started,
                "gate_sums": self.gate_sums.clone(), "gated_steps": self.gated_steps,
                "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.cfg).items()}}

    def load_state_dict(self, state: dict) -> None:
        with fitting_snapshot():
            self.model.load_state_dict(state["model"])
            load_optimizers(self.optimizers, state["optimizers"])
            if self.adapter is not None:
                self.adapter.load_state_dict(state["adapter"])
                self.adapter_opt.load_state_dict(state["adapter_opt"])
        self.version = int(state["version"])
        # (a snapshot from before the flag: a VM that has trained has an intercept learned already)
        self.intercept_started = bool(state.get("intercept_started", self.version > 0))
        if "gate_sums" in state:
            self.gate_sums = state["gate_sums"].clone().to(torch.float64)
            self.gated_steps = int(state["gated_steps"])
