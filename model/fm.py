"""The foundation model (FM): TorchRec embeddings, a Kunlun user-history encoder, an interaction MLP and
a head; and the LoopFM autoencoder that compresses its activations into the code VMs read.

Public surface: ``FMConfig``, ``FoundationModel``, ``LoopFMAutoencoder``.

Layout of one forward pass (B examples):

    sparse ids --EmbeddingBagCollection (sum)--> 6 x (B, E) --concat--> x_sparse (B, 6E)
    x_sparse --Linear--> summary (B, S)                      the non-sequence summary Kunlun needs
    history per event type (ad, campaign, time gap) --embed--> tokens (B, L, D_type)
    tokens, mask, summary --MultiEventEncoder (Kunlun: GDPA / HSP / sliding window, CompSkip)--> (B, H_k)
    the newest ``recent`` tokens of each type --masked mean--> (B, D_type) each; with H_k: H (B, H)
    [x_sparse, H] --MLP--> a1 (B, h1) --> a2 (B, h2) --head--> logit (B,)

Why the recent mean beside Kunlun. Kunlun's seed pooling summarizes the whole window of ``seq_len``
events; on MovieLens, where the last few ratings (the session under way) carry most of the signal, the
FM lost to a small VM attending over 20 raw events (AUC 0.7137 against 0.7161). A shorter window lifted
it to 0.716 but cost the synthetic stream's long-memory interests 0.03 AUC; the mean of the newest 8
tokens per type, beside the 32-event encoder, gives 0.7207 on MovieLens (docs/transfer.md).

Embeddings, hashed or managed. Every sparse id is hashed into a fixed-size table by default: at a million
users, the 50,000-row user table puts 20 users on each row. With ``user_table.embeddings="managed"`` the
user table is a managed-collision table (TorchRec's ``MCHManagedCollisionModule`` with
``DistanceLFU_EvictionPolicy``): each user's 62-bit id (``features.raw_id``) gets a row of its own while it
is among the ``managed_rows - 1`` ids the policy keeps (frequent and recent ones); the others share the last
row until admitted. Every ``managed_eviction_interval`` training steps the ids seen since are admitted in
place of the lowest-scored ones. A row given to a new id starts from zero, and the trainer zeroes its
Adagrad sum (``take_fresh_rows``), so the new user does not inherit the evicted one's embedding. (TorchRec's
own ``ManagedCollisionEmbeddingBagCollection`` leaves evicted rows as they were, and needs every table of
its collection managed: the user table is its own collection here.) ``managed_counts`` (admitted, evicted)
is a buffer, so it survives snapshots. On MovieLens with 512 user rows for 943 users, managed beats hashed
by 0.005 AUC at the same memory (``docs/benchmarks.md``).

LoopFM (papers.md section 1): the activations of a shallow layer (``a1``) and the history encoder
output ``H`` are concatenated and compressed by an autoencoder trained beside the FM with a stop-gradient
(the FM never bends to make its activations easy to compress). The encoder ends in tanh, so the code
``z`` is in [-1, 1] and quantizes to int8/int4 with a known error bound (``state/codes.py``). With
``matryoshka`` prefixes, the decoder also learns from ``z`` with all but its first k dimensions zeroed, so
every such prefix is a usable smaller code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.mc_modules import (DistanceLFU_EvictionPolicy, ManagedCollisionCollection,
                                         MCHManagedCollisionModule)

from loopline.errors import ConfigError

from .features import EVENT_TYPES, SPARSE_KEYS, Batch, FeatureConfig
from .fm_settings import UserTableConfig
from .kunlun import KunlunConfig, MultiEventEncoder, flops_per_example

__all__ = ["FMConfig", "FoundationModel", "LoopFMAutoencoder"]


def _default_seq() -> dict:
    # event-level personalization (Kunlun): impressions are many and carry the broad interest, clicks
    # are few and sharp; each type gets its own width, depth and window
    return {"impression": {"d_model": 32, "n_layers": 2, "n_heads": 2, "window": 8},
            "click": {"d_model": 16, "n_layers": 1, "n_heads": 1, "window": 4}}


@dataclass(frozen=True)
class FMConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    emb_dim: int = 16  # width of every sparse embedding table
    summary_dim: int = 32  # the non-sequence summary that personalizes GDPA
    seq: dict = field(default_factory=_default_seq)  # per event type: KunlunConfig fields
    hidden: tuple = (128, 64)  # interaction MLP
    recent: int = 8  # newest history tokens per type whose mean joins the encoder's output; 0: none
    code_dim: int = 16  # LoopFM code width (16-32 in the paper's range)
    matryoshka: tuple = (4, 8)  # prefix widths also trained to reconstruct; () turns it off
    ae_hidden: int = 64
    ae_weight: float = 1.0  # weight of the reconstruction loss in the trainer's total
    # the user table: hashed into its rows, or managed (``--embeddings``; see the module doc)
    user_table: UserTableConfig = field(default_factory=UserTableConfig)

    def __post_init__(self):
        if self.user_table.embeddings == "managed" and "user" not in self.features.managed:
            # the raw ids the managed table remaps come with every batch
            object.__setattr__(self, "features", replace(self.features, managed=("user",)))
        if set(self.seq) != set(EVENT_TYPES):
            raise ConfigError(f"seq: needs one entry per event type {EVENT_TYPES}, got {sorted(self.seq)}")
        if not self.hidden:
            raise ConfigError("hidden: needs at least one layer")
        if isinstance(self.recent, bool) or not isinstance(self.recent, int) or self.recent < 0:
            raise ConfigError(f"recent: must be an integer >= 0, got {self.recent!r}")
        if any(not 0 < k < self.code_dim for k in self.matryoshka):
            raise ConfigError(f"matryoshka: prefixes must be in 1..code_dim-1, got {self.matryoshka}")


def _recent_mean(tokens: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Masked mean of the newest ``k`` tokens (sequences are left-padded, newest last): (B, L, D) -> (B, D);
    a user with no history gets zeros."""
    tokens, m = tokens[:, -k:], mask[:, -k:].unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


class LoopFMAutoencoder(nn.Module):
    def __init__(self, in_dim: int, code_dim: int, hidden: int = 64, matryoshka: tuple = ()):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, code_dim), nn.Tanh())
        self.decoder = nn.Sequential(nn.Linear(code_dim, hidden), nn.ReLU(), nn.Linear(hidden, in_dim))
        self.code_dim = code_dim
        self.matryoshka = tuple(matryoshka)

    def encode(self, acts: torch.Tensor) -> torch.Tensor:
        return self.encoder(acts)  # (B, C) in [-1, 1]

    def loss(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squared reconstruction error of the full code plus each Matryoshka prefix; and z."""
        z = self.encode(acts)
        loss = nn.functional.mse_loss(self.decoder(z), acts)
        for k in self.matryoshka:
            prefix = torch.cat([z[:, :k], torch.zeros_like(z[:, k:])], dim=1)
            loss = loss + nn.functional.mse_loss(self.decoder(prefix), acts)
        return loss / (1 + len(self.matryoshka)), z


class FoundationModel(nn.Module):
    def __init__(self, cfg: FMConfig = FMConfig()):
        super().__init__()
        self.cfg = cfg
        sizes, E = cfg.features.table_sizes, cfg.emb_dim
        managed = cfg.user_table.embeddings == "managed"
        self.hashed_keys = [k for k in SPARSE_KEYS if not (k == "user" and managed)]
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=f"t_{k}", embedding_dim=E, num_embeddings=sizes[k], feature_names=[k])
                    for k in self.hashed_keys], device=torch.device("cpu"))
        if managed:
            user = EmbeddingBagConfig(name="t_user", embedding_dim=E, num_embeddings=cfg.user_table.managed_rows,
                                      feature_names=["user"])
            self.user_ebc = EmbeddingBagCollection(tables=[user], device=torch.device("cpu"))
            mch = MCHManagedCollisionModule(
                zch_size=cfg.user_table.managed_rows, device=torch.device("cpu"),
                eviction_policy=DistanceLFU_EvictionPolicy(), input_hash_size=2 ** 62,
                eviction_interval=cfg.user_table.managed_eviction_interval)
            self.user_mc = ManagedCollisionCollection({"t_user": mch}, embedding_configs=[user])
            self.register_buffer("managed_counts", torch.zeros(2, dtype=torch.int64))  # admitted, evicted
            self._fresh: torch.Tensor | None = None  # rows given to new ids in the last training forward
        self.summary = nn.Linear(len(SPARSE_KEYS) * E, cfg.summary_dim)
        kcfgs = {t: KunlunConfig(summary_dim=cfg.summary_dim, **cfg.seq[t]) for t in EVENT_TYPES}
        self.tok_ad = nn.ModuleDict({t: nn.Embedding(sizes["ad"], kcfgs[t].d_model) for t in EVENT_TYPES})
        self.tok_campaign = nn.ModuleDict({t: nn.Embedding(sizes["campaign"], kcfgs[t].d_model) for t in EVENT_TYPES})
        self.tok_gap = nn.ModuleDict({t: nn.Embedding(cfg.features.gap_buckets, kcfgs[t].d_model) for t in EVENT_TYPES})
        self.encoder = MultiEventEncoder(kcfgs)
        self.history_dim = self.encoder.out_dim + (sum(k.d_model for k in kcfgs.values()) if cfg.recent else 0)
        dims = [len(SPARSE_KEYS) * E + self.history_dim, *cfg.hidden]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], 1)
        self.loop_in_dim = cfg.hidden[0] + self.history_dim
        self.autoencoder = LoopFMAutoencoder(self.loop_in_dim, cfg.code_dim, cfg.ae_hidden, cfg.matryoshka)

    @property
    def intercept(self) -> nn.Parameter:
        """The head's bias: with no first-order rows, the one fast path to the base rate, so the trainer
        gives it the rows' Adagrad (``OnlineTrainer``)."""
        return self.head.bias

    def flops_per_example(self) -> int:
        """Multiply-adds for one example with full histories: the Kunlun encoders (their analytic
        count) plus every dense layer (the summary, MLP, head and LoopFM autoencoder); embedding
        look-ups and pooling are not multiplies and are left out."""
        L = self.cfg.features.seq_len
        dense = sum(m.in_features * m.out_features for name, m in self.named_modules()
                    if isinstance(m, nn.Linear) and not name.startswith("encoder."))
        return flops_per_example(self.encoder, {t: L for t in EVENT_TYPES}) + dense

    def _sparse(self, batch: Batch) -> torch.Tensor:
        keys = self.hashed_keys
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=torch.cat([batch.sparse[k][0] for k in keys]),
            lengths=torch.cat([batch.sparse[k][1] for k in keys]))
        pooled = self.ebc(kjt)
        parts = {k: pooled[k] for k in keys}
        if self.cfg.user_table.embeddings == "managed":
            parts["user"] = self._managed_user(*batch.sparse["user_raw"])
        return torch.cat([parts[k] for k in SPARSE_KEYS], dim=1)  # (B, 6E)

    def _managed_user(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The user rows through the managed-collision table: admission and eviction (in training), then
        the remapped ids' rows; a row just given to a new id is zeroed first."""
        mch = self.user_mc._managed_collision_modules["t_user"]
        open_before = int(mch.open_slots())
        remapped = self.user_mc(KeyedJaggedTensor.from_lengths_sync(keys=["user"], values=ids, lengths=lengths))
        fresh = self.user_mc.evict().get("t_user")
        if fresh is not None and fresh.numel():
            table = self.user_ebc.embedding_bags["t_user"].weight
            with torch.no_grad():
                table[fresh] = 0.0
            # an empty slot filled is an admission; a slot that held an id is also an eviction
            filled = open_before - int(mch.open_slots())
            self.managed_counts += torch.tensor([fresh.numel(), fresh.numel() - filled])
            self._fresh = fresh if self._fresh is None else torch.cat([self._fresh, fresh])
        return self.user_ebc(remapped)["user"]

    def take_fresh_rows(self) -> dict:
        """{table parameter: rows} given to new ids since the last call (the trainer resets their
        optimizer state); empty for hashed tables."""
        if getattr(self, "_fresh", None) is None:
            return {}
        rows, self._fresh = self._fresh, None
        return {self.user_ebc.embedding_bags["t_user"].weight: rows}

    def embedding_report(self) -> dict:
        """The tables' kind, rows and bytes (with their Adagrad sums: twice the weights), and for a managed
        user table its admissions, evictions and open rows."""
        rows = sum(c.num_embeddings for c in self.ebc.embedding_bag_configs())
        out = {"embeddings": self.cfg.user_table.embeddings}
        if self.cfg.user_table.embeddings == "managed":
            mch = self.user_mc._managed_collision_modules["t_user"]
            rows += self.cfg.user_table.managed_rows
            # the MCH's own state: sorted raw ids, the row map, and the policy's counts and last access
            mch_bytes = sum(b.numel() * b.element_size() for b in self.user_mc.buffers())
            out.update(managed_rows=self.cfg.user_table.managed_rows, admitted=int(self.managed_counts[0]),
                       evicted=int(self.managed_counts[1]), open_rows=int(mch.open_slots()), mch_bytes=mch_bytes)
        else:
            out["mch_bytes"] = 0
        out["table_rows"] = rows
        out["table_bytes"] = 2 * rows * self.cfg.emb_dim * 4 + out["mch_bytes"]
        return out

    def forward(self, batch: Batch, aux: bool = True) -> dict:
        """``logit`` and the LoopFM ``code``; with ``aux`` (training) also the autoencoder's losses.
        Without it (scoring with a snapshot) the decoders are skipped: the code is the same encoder
        output either way."""
        x = self._sparse(batch)  # (B, 6E)
        summary = self.summary(x)  # (B, S)
        seqs = {}
        for t in EVENT_TYPES:
            ad, camp, gap, mask = batch.seq[t]  # each (B, L)
            tokens = self.tok_ad[t](ad) + self.tok_campaign[t](camp) + self.tok_gap[t](gap)  # (B, L, D_t)
            seqs[t] = (tokens, mask)
        h = self.encoder(seqs, summary)  # (B, H_k)
        if self.cfg.recent:
            h = torch.cat([h, *(_recent_mean(*seqs[t], self.cfg.recent) for t in EVENT_TYPES)], dim=1)  # (B, H)
        a = torch.cat([x, h], dim=1)
        acts = []
        for layer in self.mlp:
            a = torch.relu(layer(a))
            acts.append(a)
        logit = self.head(a).squeeze(-1)  # (B,)
        # LoopFM: shallow activations + history encoding, stop-gradient into the FM
        loop_in = torch.cat([acts[0], h], dim=1).detach()  # (B, h1 + H)
        if not aux:
            return {"logit": logit, "code": self.autoencoder.encode(loop_in)}
        ae_loss, code = self.autoencoder.loss(loop_in)
        return {"logit": logit, "code": code, "aux_loss": self.cfg.ae_weight * ae_loss, "ae_loss": ae_loss}
