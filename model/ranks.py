"""The FM trained data-parallel over N torch.distributed ranks, its embedding tables sharded by TorchRec.

Public surface: ``RankedTrainer``, ``follow``, ``broadcast_state``, ``share_bounds``; ``RanksConfig`` (its
settings, declared torch-free in ``model/fm_settings.py``).

Rank 0 is the process that runs the FM stage (``loopline evaluate``, or the fm worker); ranks 1..N-1
run :func:`follow` and do what rank 0 tells them. Per canonical micro-batch of B examples:

1. rank 0 sends the featurized batch to every rank: its shapes with the command, through the store, then
   two broadcasts (the int64 ids; the float labels and weights);
2. rank r takes rows ``[r*B//N, (r+1)*B//N)``: a disjoint, contiguous share (``share_bounds``);
3. each rank runs the FM on its share through TorchRec's ``DistributedModelParallel``: the planner
   shards the six ``EmbeddingBagCollection`` tables over the ranks (table-wise on a few ranks), and a
   pooled embedding crosses ranks by all-to-all, forward and backward. The tables learn with FBGEMM's
   fused exact Adagrad, the same rule and ``eps`` as the one-rank trainer's ``RowAdagrad``;
4. every other parameter (the history-token tables, Kunlun, the MLP, the head, the LoopFM autoencoder)
   is replicated: its gradient is summed over the ranks with one all-reduce of a flat buffer, then the
   one-rank trainer's optimizers step it (``RowAdagrad`` for the token tables and the intercept, Adam
   for the rest). Each rank's loss is its share's *sum* over the whole batch's B (and the autoencoder's
   mean scaled by its share), so the summed gradient is the one-rank gradient: the model depends on which
   rank got which rows only up to floating-point order (``tests/model/test_ranks.py`` checks the
   numbers against one rank). DDP is not used: it averages, and expects every parameter in every rank's
   graph, which a rank with an empty share (a batch smaller than N) breaks;
5. rank 0 gathers every share's logit and LoopFM code: the stage's predictions, DAS soft labels and
   codes, in the batch's order.

Snapshots keep the one-rank layout (``OnlineTrainer.state_dict``): ``state_dict`` gathers the shards of
every table and of its Adagrad sums into a one-rank mirror of the model; ``load_state_dict`` loads into the
mirror and scatters. A snapshot therefore resumes on any number of ranks, 1 included.

Commands go through the process group's TCP store, data through collectives. A rank waiting for the
next command waits for as long as rank 0 is idle (a worker between events), and exits when rank 0's store
goes away; a collective that waits longer than ``timeout_s`` (a rank died mid-step) raises, so a worker
fails and restarts instead of hanging.

The process group is a trust boundary: TorchRec's planner sends its plan between ranks pickled, so the
master address must be reachable by the job's own machines only (the default binds 127.0.0.1).
Loopline's own traffic (batches, states, commands) is tensors, JSON and integers.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import json
import logging
import os
import threading
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F

from loopline.errors import ConfigError, LooplineError, RanksError

from .features import EVENT_TYPES, SPARSE_KEYS, Batch
from .fm import FMConfig, FoundationModel
from .optim import RowAdagrad
from .fm_settings import RanksConfig
from .trainer import OnlineTrainer, TrainerConfig, mode_free, train_mode

__all__ = ["RanksConfig", "RankedTrainer", "follow", "broadcast_state", "share_bounds"]

_STOP, _STEP, _EXPORT, _IMPORT = 0, 1, 2, 3
_HEADER = 4 + len(SPARSE_KEYS)  # [op, B, L, has weights, values per sparse key...]


def share_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a ``size``-row batch that ``rank`` of ``world`` trains on.

    >>> [share_bounds(5, r, 2) for r in range(2)], share_bounds(1, 1, 2)
    ([(0, 2), (2, 5)], (0, 1))
    """
    return rank * size // world, (rank + 1) * size // world


# -- a nested state (dicts, lists, tensors, JSON scalars) broadcast from rank 0, without pickle -----------
def _split(obj, tensors: list):
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"t": len(tensors) - 1}
    if isinstance(obj, dict):  # keys keep their type: an optimizer's state is keyed by int
        return {"d": [[k, _split(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"l": [_split(v, tensors) for v in obj]}
    return {"v": obj}


def _join(skel, tensors: list):
    if "t" in skel:
        return tensors[skel["t"]]
    if "d" in skel:
        return {k: _join(v, tensors) for k, v in skel["d"]}
    if "l" in skel:
        return [_join(v, tensors) for v in skel["l"]]
    return skel["v"]


def broadcast_state(obj=None):
    """Rank 0's ``obj`` on every rank: its structure as JSON, its tensors by ``dist.broadcast``."""
    tensors: list = []
    if dist.get_rank() == 0:
        meta = json.dumps({"s": _split(obj, tensors), "t": [[str(t.dtype)[6:], list(t.shape)] for t in tensors]})
        raw = torch.frombuffer(bytearray(meta.encode()), dtype=torch.uint8)
        n = torch.tensor([raw.numel()], dtype=torch.int64)
    else:
        n = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(n, 0)
    if dist.get_rank() != 0:
        raw = torch.empty(int(n), dtype=torch.uint8)
    dist.broadcast(raw, 0)
    meta = json.loads(bytes(raw.numpy()).decode())
    if dist.get_rank() != 0:
        tensors = [torch.empty(shape, dtype=getattr(torch, dtype)) for dtype, shape in meta["t"]]
    for t in tensors:
        dist.broadcast(t.contiguous() if t.is_contiguous() else t, 0)
    return _join(meta["s"], tensors)


# -- the micro-batch on the wire -------------------------------------------------------------------------
def _pack(op: int, batch: Batch | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[0] = op
    if batch is None:
        return header, None, None
    L = batch.seq[EVENT_TYPES[0]][0].shape[1]
    header[1:4] = torch.tensor([batch.size, L, batch.weights is not None])
    header[4:] = torch.tensor([batch.sparse[k][0].numel() for k in SPARSE_KEYS])
    ints = torch.cat([t.reshape(-1).long() for k in SPARSE_KEYS for t in batch.sparse[k]] +
                     [t.reshape(-1).long() for ty in EVENT_TYPES for t in batch.seq[ty]])
    floats = torch.cat([batch.labels.float()] + ([batch.weights.float()] if batch.weights is not None else []))
    return header, ints, floats


def _unpack(header: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor) -> Batch:
    B, L, has_w = (int(x) for x in header[1:4])
    counts = [int(x) for x in header[4:]]
    parts = ints.split([n for c in counts for n in (c, B)] + [B * L] * (4 * len(EVENT_TYPES)))
    sparse = {k: (parts[2 * i], parts[2 * i + 1]) for i, k in enumerate(SPARSE_KEYS)}
    rest = parts[2 * len(SPARSE_KEYS):]
    seq = {ty: tuple(rest[4 * i + j].view(B, L) if j < 3 else rest[4 * i + j].view(B, L).bool() for j in range(4))
           for i, ty in enumerate(EVENT_TYPES)}
    return Batch(sparse, seq, floats[:B], B, floats[B:] if has_w else None)


def _share(batch: Batch, lo: int, hi: int) -> Batch:
    sparse = {}
    for k, (values, lengths) in batch.sparse.items():
        start = int(lengths[:lo].sum())
        stop = start + int(lengths[lo:hi].sum())
        sparse[k] = (values[start:stop], lengths[lo:hi])
    seq = {ty: tuple(t[lo:hi] for t in ts) for ty, ts in batch.seq.items()}
    w = batch.weights[lo:hi] if batch.weights is not None else None
    return Batch(sparse, seq, batch.labels[lo:hi], hi - lo, w)


def _to(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    return Batch({k: (v.to(device), n.to(device)) for k, (v, n) in batch.sparse.items()},
                 {ty: tuple(t.to(device) for t in ts) for ty, ts in batch.seq.items()}, batch.labels.to(device),
                 batch.size, None if batch.weights is None else batch.weights.to(device))


@contextlib.contextmanager
def _quiet():
    """TorchRec's planner logs warnings about its own internals on every build (the topology's
    construction, storage estimates); they say nothing a user can act on."""
    log = logging.getLogger("torchrec")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        log.setLevel(level)


def _collective(fn):
    """Rank 0's entry points: a collective that fails (a rank died, timed out, or never came) is one
    ``RanksError`` line, not gloo's traceback. The group is then unusable: the caller exits and restarts."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as exc:
            if isinstance(exc, LooplineError):  # (a snapshot that does not fit, say: its own line already)
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise RanksError(f"fm ranks: {fn.__name__} failed, a rank died or cannot be reached ({first}); "
                             "restart every rank") from None
    return run


def _local(sharded, offsets) -> torch.Tensor:
    """This rank's shard of ``sharded`` that starts at ``offsets``."""
    return next(s.tensor for s in sharded.local_shards() if list(s.metadata.shard_offsets) == list(offsets))


class RankedTrainer:
    """:class:`~loopline.model.trainer.OnlineTrainer`'s surface for the FM stage (``step_outputs``,
    ``version``, ``model``, ``current_model``, ``state_dict``/``load_state_dict``), trained over the
    process group's ranks. Rank 0 constructs it with :meth:`start`; the other ranks run :func:`follow`.
    ``model`` is the one-rank mirror: its weights are current after ``state_dict`` or ``current_model``."""

    def __init__(self, model: FoundationModel, cfg: TrainerConfig, store: dist.Store, backend: str = "gloo"):
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed import collective_utils
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
        from torchrec.distributed.types import ShardingEnv

        if model.cfg.user_table.embeddings != "hashed":
            raise ConfigError("fm_ranks: a managed user table trains on one rank (its admission state is not "
                              "sharded here); use --embeddings hashed with --fm-ranks")
        if not mode_free(model):
            raise ConfigError("fm_ranks: the model has a train/eval-dependent module; ranks need one forward")
        torch.set_num_threads(cfg.threads)
        self.cfg, self.store = cfg, store
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = (torch.device("cuda", self.rank % torch.cuda.device_count()) if backend == "nccl"
                       else torch.device("cpu"))
        self.mirror = OnlineTrainer(model, cfg)  # the one-rank layout: snapshots, DAS copies, reports
        self.model = self.mirror.model
        self.shared_forward = True
        self.version = 0
        self._seq = 0  # commands sent (rank 0) or done (the others)
        # bytes through this rank's link per kind of traffic, over all steps (``loopline bench scale``); the
        # all-to-all inside TorchRec is counted from what crosses: a pooled row of a table held elsewhere
        self.traffic = {"batch_broadcast": 0, "dense_all_reduce": 0, "outputs_gather": 0, "embedding_all_to_all": 0}
        local = copy.deepcopy(model)
        # the tables' optimizer is fused into their backward (FBGEMM): exact Adagrad, RowAdagrad's numbers
        sharder = EmbeddingBagCollectionSharder(fused_params={
            "optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": cfg.lr_sparse, "eps": 1e-10})
        # (and the sharded forward's first call makes torch.fx warn about an API TorchRec uses)
        logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
        with _quiet():  # the planner warns about its own estimates, every run
            topology = Topology(world_size=self.world, compute_device=self.device.type)
            # sharded only: a data-parallel table would need DDP's gradient sync, which this trainer does not use
            sharded = {f"t_{k}": ParameterConstraints(sharding_types=["table_wise", "row_wise", "column_wise"])
                       for k in SPARSE_KEYS}
            plan = EmbeddingShardingPlanner(topology=topology, constraints=sharded).collective_plan(
                local, [sharder], dist.group.WORLD)
            self.plan = {name: str(p.sharding_type) for name, p in plan.plan["ebc"].items()}
            # DMP's first construction in a process runs a handshake with every rank and then skips it; a
            # process that builds a second group (one evaluate after another) must run it too, or its ranks'
            # collectives go out of step with a new rank's
            collective_utils._INITIALIZED = False
            self.dmp = DistributedModelParallel(local, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                                device=self.device, sharders=[sharder], plan=plan,
                                                init_data_parallel=False)
        self.net = self.dmp.module
        self.tables = [f"ebc.embedding_bags.t_{k}.weight" for k in SPARSE_KEYS]
        mine = dict(self.net.named_parameters())
        names = {id(p): n for n, p in self.model.named_parameters()}
        # the mirror's optimizers, without the sharded tables, over this rank's copies of the parameters
        self.groups = [[names[id(p)] for p in opt.param_groups[0]["params"] if names[id(p)] not in self.tables]
                       for opt in self.mirror.optimizers]
        self.optimizers = [RowAdagrad([mine[n] for n in self.groups[0]], lr=cfg.lr_sparse),
                           torch.optim.Adam([mine[n] for n in self.groups[1]], lr=cfg.lr_dense, foreach=True)]
        self.replicated = [mine[n] for group in self.groups for n in group]
        self._import()  # every rank starts from rank 0's weights

    # -- rank 0 ----------------------------------------------------------------------------------------
    @classmethod
    @_collective
    def start(cls, model: FoundationModel, cfg: TrainerConfig, ranks: RanksConfig) -> "RankedTrainer":
        """Rank 0: open the store, start ranks 1..N-1 here (or, with ``ranks.join``, wait for them),
        and build the sharded model."""
        store = dist.TCPStore(ranks.host, ranks.port, ranks.ranks, is_master=True,
                              timeout=datetime.timedelta(seconds=ranks.timeout_s), wait_for_workers=False)
        procs = []
        if not ranks.join:
            ctx = torch.multiprocessing.get_context("spawn")
            master = f"{ranks.host}:{store.port}"
            procs = [ctx.Process(target=_follow_here, args=(model.cfg, cfg, RanksConfig(
                ranks.ranks, master, True, ranks.backend, ranks.timeout_s), r, os.getpid()), daemon=True)
                for r in range(1, ranks.ranks)]
            for p in procs:
                p.start()
        dist.init_process_group(ranks.backend, store=store, rank=0, world_size=ranks.ranks,
                                timeout=datetime.timedelta(seconds=ranks.timeout_s))
        trainer = cls(model, cfg, store, ranks.backend)
        trainer.procs = procs
        return trainer

    def _command(self, op: int, batch: Batch | None = None) -> None:
        header, ints, floats = _pack(op, batch)
        if self._seq:  # every rank read the last command before its collectives, which are done
            self.store.delete_key(f"cmd/{self._seq - 1}")
        self.store.set(f"cmd/{self._seq}", ",".join(str(int(x)) for x in header))
        self._seq += 1
        if batch is not None:
            dist.broadcast(ints, 0)
            dist.broadcast(floats, 0)
            self.traffic["batch_broadcast"] += (ints.numel() * 8 + floats.numel() * 4) * (self.world - 1)

    @_collective
    def step_outputs(self, batch: Batch) -> tuple[np.ndarray, dict]:
        """Train on ``batch`` over the ranks; its predictions before the update, and the whole batch's
        ``logit`` and ``code`` (as ``OnlineTrainer.step_outputs``)."""
        self._command(_STEP, batch)
        logit, code = self._step(batch)
        return torch.sigmoid(logit).numpy().astype(np.float64), {"logit": logit, "code": code}

    @_collective
    def current_model(self) -> FoundationModel:
        self._command(_EXPORT)
        self._export()
        return self.model

    def state_dict(self) -> dict:
        self.current_model()
        return self.mirror.state_dict()

    @_collective
    def load_state_dict(self, state: dict) -> None:
        self.mirror.load_state_dict(state)  # (a snapshot that does not fit fails here, on rank 0 alone)
        self._command(_IMPORT)
        self._import()

    def close(self) -> None:
        """Stop the other ranks and leave the process group."""
        if dist.is_initialized():
            self._command(_STOP)
            dist.destroy_process_group()
        for p in getattr(self, "procs", []):
            p.join(timeout=30)

    # -- every rank ------------------------------------------------------------------------------------
    def _step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        B = batch.size
        lo, hi = share_bounds(B, self.rank, self.world)
        share = _to(_share(batch, lo, hi), self.device)
        train_mode(self.net)
        out = self.dmp(share)
        # this share's part of the one-rank loss: BCE summed over the share, over the whole batch's B
        loss = F.binary_cross_entropy_with_logits(out["logit"], share.labels, weight=share.weights,
                                                  reduction="sum") / B
        if hi > lo:  # the autoencoder's mean over the share, weighted by the share (empty: no term)
            loss = loss + out["aux_loss"] * ((hi - lo) / B)
        for p in self.replicated:
            p.grad = None
        loss.backward()  # the tables' fused Adagrad steps here
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.replicated]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)  # the sum over the ranks: the one-rank gradient
        # (a ring all-reduce sends 2 (N-1)/N of the buffer from each rank)
        self.traffic["dense_all_reduce"] += flat.numel() * 4 * 2 * (self.world - 1) // self.world
        # table-wise: this share's ids go to each table's rank, its pooled rows come back, and their
        # gradients go again, for the tables held elsewhere (about (N-1)/N of them)
        away = (self.world - 1) / self.world
        ids = sum(share.sparse[k][0].numel() + share.sparse[k][1].numel() for k in SPARSE_KEYS)
        pooled = (hi - lo) * len(SPARSE_KEYS) * self.net.cfg.emb_dim
        self.traffic["embedding_all_to_all"] += int(away * (ids * 8 + 2 * pooled * 4))
        for p, g in zip(self.replicated, flat.split([p.numel() for p in self.replicated])):
            p.grad = g.view_as(p)
        for opt in self.optimizers:
            opt.step()
        self.version += 1
        return self._gather(out["logit"].detach(), out["code"].detach(), B)

    def _gather(self, logit: torch.Tensor, code: torch.Tensor, B: int):
        width = -(-B // self.world)
        mine = torch.zeros(width, 1 + code.shape[1], device=logit.device)
        mine[:logit.shape[0], 0] = logit
        mine[:logit.shape[0], 1:] = code
        parts = [torch.empty_like(mine) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(mine, parts, dst=0)
        self.traffic["outputs_gather"] += mine.numel() * 4 * (self.world - 1 if self.rank == 0 else 1)
        if self.rank != 0:
            return None, None
        rows = torch.cat([p[:hi - lo] for p, (lo, hi) in
                          zip(parts, (share_bounds(B, r, self.world) for r in range(self.world)))]).cpu()
        return rows[:, 0].contiguous(), rows[:, 1:].contiguous()

    def _sharded(self):
        """(table name, its weight's ShardedTensor, its Adagrad sum's ShardedTensor) of every table."""
        weights = self.net.ebc.state_dict()
        fused = self.dmp.fused_optimizer.state_dict()["state"]
        for name in self.tables:
            short = name[len("ebc."):]
            table = name.split(".")[-2]
            sums = fused.get(name, {}).get(f"{table}.momentum1")
            yield name, weights[short], sums

    def _export(self) -> None:
        """Every table's shards (and their Adagrad sums) and rank 0's replicated state into rank 0's mirror:
        each shard goes from its rank to rank 0 alone (the others' mirrors are only ever overwritten)."""
        if self.rank != 0:
            for _, weight, sums in self._sharded():
                for meta in weight.metadata().shards_metadata:
                    if meta.placement.rank() == self.rank:
                        for st in (weight, sums):
                            dist.send(_local(st, meta.shard_offsets).detach().cpu().contiguous(), 0)
            return
        mirror = dict(self.model.named_parameters())
        sparse_opt = self.mirror.optimizers[0]
        with torch.no_grad():
            for name, weight, sums in self._sharded():
                # new tensors for the optimizer's state: the mirror's may be a loaded state dict's own
                full_w, full_s = mirror[name].data, torch.empty_like(mirror[name].data)
                for meta in weight.metadata().shards_metadata:
                    owner = meta.placement.rank()
                    idx = tuple(slice(o, o + s) for o, s in zip(meta.shard_offsets, meta.shard_sizes))
                    for full, st in ((full_w, weight), (full_s, sums)):
                        if owner == 0:
                            full[idx] = _local(st, meta.shard_offsets).detach().cpu()
                        else:
                            buf = torch.empty(meta.shard_sizes, dtype=full.dtype)
                            dist.recv(buf, owner)
                            full[idx] = buf
                sparse_opt.state[mirror[name]].update(sum=full_s, step=torch.tensor(float(self.version)))
            for opt, group, mirror_opt in zip(self.optimizers, self.groups, self.mirror.optimizers):
                for n, p in zip(group, opt.param_groups[0]["params"]):
                    mirror[n].data.copy_(p.detach().cpu())
                    if p in opt.state:
                        mirror_opt.state[mirror[n]] = {k: v.detach().cpu().clone() for k, v in opt.state[p].items()}
        self.mirror.version = self.version

    def _import(self) -> None:
        """Rank 0's mirror (weights and optimizer state) onto every rank: each takes its shards of the
        tables and its copy of the rest."""
        state = broadcast_state(self.mirror.state_dict() if self.rank == 0 else None)
        if self.rank != 0:
            self.mirror.load_state_dict(state)
        mirror = dict(self.model.named_parameters())
        sparse_opt = self.mirror.optimizers[0]
        with torch.no_grad():
            for name, weight, sums in self._sharded():
                full_s = sparse_opt.state[mirror[name]]["sum"]
                for full, st in ((mirror[name].data, weight), (full_s, sums)):
                    for shard in (st.local_shards() if st is not None else ()):
                        m = shard.metadata
                        shard.tensor.copy_(full[tuple(slice(o, o + s) for o, s in zip(m.shard_offsets,
                                                                                        m.shard_sizes))])
            for opt, group, mirror_opt in zip(self.optimizers, self.groups, self.mirror.optimizers):
                for n, p in zip(group, opt.param_groups[0]["params"]):
                    p.copy_(mirror[n].data)
                    if mirror[n] in mirror_opt.state:
                        opt.state[p] = {k: v.detach().clone().to(p.device if k != "step" else v.device)
                                        for k, v in mirror_opt.state[mirror[n]].items()}
        self.version = self.mirror.version

    def serve(self) -> None:
        """Ranks 1..N-1: do rank 0's commands until it stops (or goes away)."""
        while True:
            try:
                self.store.wait([f"cmd/{self._seq}"], datetime.timedelta(hours=1))
            except dist.DistStoreError as exc:
                if "wait timeout" in str(exc):
                    continue  # rank 0 is idle; a store that went away (rank 0 did) raises on
                raise
            header = torch.tensor([int(x) for x in self.store.get(f"cmd/{self._seq}").decode().split(",")])
            self._seq += 1
            op = int(header[0])
            if op == _STOP:
                return
            if op == _STEP:
                B, L, has_w = (int(x) for x in header[1:4])
                n_ints = sum(int(x) for x in header[4:]) + B * len(SPARSE_KEYS) + 4 * len(EVENT_TYPES) * B * L
                ints = torch.empty(n_ints, dtype=torch.int64)
                floats = torch.empty(B * (2 if has_w else 1), dtype=torch.float32)
                dist.broadcast(ints, 0)
                dist.broadcast(floats, 0)
                self._step(_unpack(header, ints, floats))
            elif op == _EXPORT:
                self._export()
            elif op == _IMPORT:
                self._import()


def follow(fm: FMConfig, cfg: TrainerConfig, ranks: RanksConfig, rank: int) -> None:
    """Rank ``rank`` (>= 1) of the FM: join rank 0's group at ``ranks.master`` and train until it stops.
    ``fm`` and ``cfg`` must be rank 0's (the weights come from rank 0; a different layout fails)."""
    if ranks.ranks < 2:
        raise ConfigError(f"fm_ranks: a rank that joins needs --fm-ranks of 2 or more, got {ranks.ranks}")
    if not 1 <= rank < ranks.ranks:
        raise ConfigError(f"rank: must be in [1, {ranks.ranks - 1}] (rank 0 is the fm worker), got {rank}")
    store = dist.TCPStore(ranks.host, ranks.port, ranks.ranks, is_master=False,
                          timeout=datetime.timedelta(seconds=ranks.timeout_s))
    dist.init_process_group(ranks.backend, store=store, rank=rank, world_size=ranks.ranks,
                            timeout=datetime.timedelta(seconds=ranks.timeout_s))
    try:
        RankedTrainer(FoundationModel(fm), cfg, store, ranks.backend).serve()
    finally:
        dist.destroy_process_group()


def _follow_here(fm: FMConfig, cfg: TrainerConfig, ranks: RanksConfig, rank: int, parent: int) -> None:
    """A rank that rank 0 launched on its machine: it also exits when rank 0's process is gone."""
    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(1)
            threading.Event().wait(1.0)
    threading.Thread(target=watch, daemon=True).start()
    follow(fm, cfg, ranks, rank)
