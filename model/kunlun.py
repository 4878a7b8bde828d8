"""Kunlun blocks for the FM's user-history encoder: GDPA, HSP, sliding-window attention, CompSkip.

Kunlun (Meta, arXiv 2602.10016) builds its sequence side from a few high-MFU blocks. This module
implements them at small scale in plain PyTorch (CPU, float32 or float64), batch-first.

Notation: B batch, L sequence length, D = ``d_model``, H = ``n_heads``, M = ``gdpa_slots``,
S = ``n_seeds``, T = ``n_out``, w = ``window``, D_s = ``summary_dim`` (the external non-sequence
summary), D_g = D_s + T*D (what the GDPA weight generator reads: the external summary and the
current HSP summary, flattened).

Padding. Every sequence comes with ``mask: (B, L) bool``, True = real token. Padded positions are set to
0 on entry (``torch.where``, so even NaN padding is harmless), every block's update is multiplied by the
mask, and every attention ignores padded keys. So a padded token's value never reaches an output, and a
fully padded row gives finite output: an attention row with no visible key returns 0 (the softmax is
taken with masked scores at the dtype's minimum and then multiplied by the mask, never 0/0).

GDPA, Generalized Dot-Product Attention, used as a *personalized feed-forward*::

    K = reshape(W_k LN(g), (B, M, D)),  V = reshape(W_v LN(g), (B, M, D))     per-sample weights, g (B, D_g)
    Q = W_q LN(x)                                                            (B, L, D)
    x <- x + mask * (act(Q K^T) * scale) V           (B, L, M) @ (B, M, D) -> (B, L, D)

No softmax: the M slots are the hidden units of an FFN D -> M -> D whose weights (K, V) are generated
per user from the summary, and ``act`` (gelu, silu, relu, hardswish) is the FFN's nonlinearity. Tokens
do not mix (each token's output reads only itself and the per-user K, V), which is why the op fuses
like flash attention. ``scale`` defaults to 1/sqrt(M) so the sum over M slots stays O(1). The bare op
is ``gdpa(q, k, v, activation, scale)``; the block ``GDPA`` adds the generator, pre-norm and residual.

HSP, Hierarchical Seed Pooling: S learnable seeds (S > T) attend over the sequence, then a
Kronecker-factored linear compresses the S seed tokens to T output tokens::

    H = MHA(LN(E_seed), LN(x), LN(x))          (B, S, D), padded keys ignored
    Y = A H W^T + b,  W = F1 kron F2          A (T, S), F1 (D1, D1), F2 (D2, D2), D = D1*D2 -> (B, T, D)

Flattened row-major, vec(Y) = (A kron F1 kron F2) vec(H) + b: one linear map (S*D) -> (T*D) with
T*S + D1^2 + D2^2 weights instead of the dense S*D*T*D (defaults: 16 + 16 + 64 = 96 against 16384).
It is applied without forming the matrix: A first (S rows -> T rows), then W on each row as
F1 X F2^T with the row viewed as X (D1, D2). F1 and F2 start orthogonal, so W starts norm-preserving.
The hierarchy: many seeds gather (attention), few outputs summarize (the factored linear).

Sliding-window self-attention (``SlidingWindowSelfAttention``): multi-head attention whose mask lets
query i see key j iff j is real and inside the window (causal: i-w < j <= i; symmetric:
|i-j| <= w//2), plus optional ``memory`` tokens (B, T, D) that every query sees (the encoder passes the
cached HSP summary there). Pre-norm, residual, update masked. The implementation forms the dense
(L, L+T) score matrix and masks it, which is the cheap choice at L ~ 50 on CPU; the FLOPs count below
is that of a banded kernel (only visible pairs).

CompSkip (``KunlunEncoder``, ``schedule="compskip"``): layers alternate. An even ("full") layer
recomputes the HSP summary z from the current tokens and runs GDPA with weights generated from
g = [summary, flatten(z)]; an odd ("skip") layer runs sliding-window attention over the tokens with the
cached z as memory tokens, skipping both the HSP recompute and the weight generation. A final readout
HSP pools the last tokens; its flattened (B, T*D) is the encoder's output. ``schedule="dense"`` is the
all-GDPA+HSP stack of the same depth (every layer full), the baseline CompSkip is measured against.

FLOPs (``flops_per_example``): multiply-adds of the matmuls for one unpadded example of length L.
Norms, activations, softmax, biases and residual adds are elementwise and not counted; the HSP seed
query projection (S*D^2) is computed once per batch, not per example, and is not counted either::

    GDPA  = 2*D_g*M*D  (generate K, V)  +  L*D^2  (Q)  +  2*L*M*D  (Q K^T, then @ V)
    HSP   = 2*L*D^2  (K, V)  +  2*S*L*D  (scores, mix)  +  S*D^2  (out proj)  +  T*S*D + T*D*(D1+D2)
    SWA   = 4*L*D^2  (Q, K, V, out)  +  2*T*D^2  (K, V of the memory)  +  2*P*D  (scores, mix),
            P = visible (query, key) pairs = window pairs + L*T memory pairs
    compskip = ceil(n/2)*(GDPA + HSP) + floor(n/2)*SWA + HSP(readout);   dense = n*(GDPA + HSP) + HSP

A skip layer saves (GDPA + HSP) - SWA. That is positive only while SWA's 4*L*D^2 projections stay
below what they replace (3*L*D^2 plus the generator's 2*D_g*M*D): at the defaults CompSkip is 2.5%
cheaper at L = 50 (631808 vs 647936), even at L ~ 75 and dearer beyond. Against layers that run all
three blocks (SWA + GDPA + HSP every layer, 1126144 at L = 50) it is 44% cheaper, the paper's order.

Event-level personalization (``MultiEventEncoder``): one ``KunlunEncoder`` per event type, each with its
own width, heads, window and depth; the outputs are concatenated in the order of ``configs``. Tokens of
each type arrive already at that type's ``d_model``: projecting raw event features to the type's width
is the FM's job, so the encoder never guesses a projection.

>>> cfg = KunlunConfig(d_model=32, summary_dim=16)
>>> enc = KunlunEncoder(cfg, seed=0)
>>> tokens, mask = torch.randn(4, 50, 32), torch.ones(4, 50, dtype=torch.bool)
>>> enc(tokens, mask, torch.randn(4, 16)).shape
torch.Size([4, 64])
>>> flops_per_example(cfg, 50) < flops_per_example(KunlunConfig(schedule="dense"), 50)
True
>>> multi = MultiEventEncoder({"impression": KunlunConfig(), "click": KunlunConfig(d_model=16, n_layers=1)})
>>> multi.out_dim
96
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from loopline.errors import ConfigError

__all__ = [
    "ACTIVATIONS", "SCHEDULES", "KunlunConfig", "gdpa", "GDPA", "HierarchicalSeedPooling",
    "SlidingWindowSelfAttention", "KunlunEncoder", "MultiEventEncoder", "block_flops",
    "flops_per_example", "param_count",
]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu, "silu": F.silu, "relu": F.relu, "hardswish": F.hardswish,
}
SCHEDULES = ("compskip", "dense")


@dataclass(frozen=True)
class KunlunConfig:
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2  # heads of the HSP and sliding-window attention (GDPA is single-head)
    window: int = 8  # causal: a token sees itself and the w-1 before it; symmetric: |i-j| <= w//2
    causal: bool = True  # causal keeps each token's state a function of its past, so states of an old
    # history stay valid when new events arrive (cacheable in a stream); the pooled output sees all
    n_seeds: int = 8  # S, HSP seeds; must exceed n_out (many seeds gather, few outputs summarize)
    n_out: int = 2  # T, tokens in the pooled summary; the encoder's output width is n_out * d_model
    gdpa_slots: int = 8  # M, hidden units of the personalized FFN; K and V are (M, D) per example
    activation: str = "gelu"  # GDPA's nonlinearity, a key of ACTIVATIONS
    gdpa_scale: float | None = None  # None -> 1/sqrt(gdpa_slots), keeps the sum over slots O(1)
    summary_dim: int = 16  # D_s, width of the external non-sequence summary the FM passes in
    kron_d1: int | None = None  # D1 of HSP's W = F1 (D1xD1) kron F2 (D2xD2), D = D1*D2;
    # None -> the largest divisor of d_model <= sqrt(d_model) (32 -> 4 x 8), the fewest weights
    schedule: str = "compskip"  # "compskip": even layers GDPA + HSP recompute, odd layers sliding-window
    # attention reusing the cached summary; "dense": every layer GDPA + HSP (the baseline)

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "window", "n_seeds", "n_out", "gdpa_slots",
                     "summary_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be an int >= 1, got {v!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads: must divide d_model ({self.d_model}), got {self.n_heads}")
        if self.n_seeds <= self.n_out:
            raise ConfigError(f"n_seeds: must exceed n_out ({self.n_out}), got {self.n_seeds}")
        if not isinstance(self.causal, bool):
            raise ConfigError(f"causal: must be a bool, got {self.causal!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation: must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        s = self.gdpa_scale
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)
                              or s <= 0):
            raise ConfigError(f"gdpa_scale: must be None or a finite number > 0, got {s!r}")
        d1 = self.kron_d1
        if d1 is not None and (isinstance(d1, bool) or not isinstance(d1, int) or d1 < 1 or self.d_model % d1):
            raise ConfigError(f"kron_d1: must be None or a divisor of d_model ({self.d_model}), got {d1!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: must be one of {list(SCHEDULES)}, got {self.schedule!r}")

    @property
    def out_dim(self) -> int:
        """Width of the encoder's output: n_out * d_model."""
        return self.n_out * self.d_model

    @property
    def gen_dim(self) -> int:
        """D_g: the GDPA generator reads [external summary, flattened HSP summary]."""
        return self.summary_dim + self.n_out * self.d_model

    @property
    def kron_factors(self) -> tuple[int, int]:
        """(D1, D2) with D1 * D2 == d_model."""
        d1 = self.kron_d1 or max(k for k in range(1, math.isqrt(self.d_model) + 1) if self.d_model % k == 0)
        return d1, self.d_model // d1

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Per layer, "full" (HSP recompute + GDPA) or "skip" (sliding-window attention, cached summary)."""
        if self.schedule == "dense":
            return ("full",) * self.n_layers
        return tuple("full" if i % 2 == 0 else "skip" for i in range(self.n_layers))


# --------------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Parameter init from ``seed`` without touching the global RNG (None: the global RNG as usual)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax attention; q (B, H, Lq, dh), k and v (B, H, Lk, dh), allowed (B, 1, Lq, Lk) bool.

    Rows with no allowed key return 0: masked scores get the dtype's minimum (so they underflow to an
    exact 0 next to any visible key) and the probabilities are multiplied by the mask afterwards.
    """
    assert allowed.dtype == torch.bool, f"allowed must be bool, got {allowed.dtype}"
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    p = torch.softmax(scores, dim=-1) * allowed  # (B, H, Lq, Lk), all-zero rows where nothing is visible
    return p @ v  # (B, H, Lq, dh)


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, n_heads, d // n_heads).transpose(1, 2)  # (B, H, N, dh)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)  # (B, N, D)


def _check_seq(name: str, tokens: torch.Tensor, mask: torch.Tensor, d_model: int) -> None:
    if tokens.dim() != 3 or tokens.shape[-1] != d_model:
        raise ConfigError(f"{name}: tokens must be (B, L, {d_model}), got {tuple(tokens.shape)}")
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ConfigError(f"{name}: mask must be bool {tuple(tokens.shape[:2])}, got {mask.dtype} "
                          f"{tuple(mask.shape)}")


# --------------------------------------------------------------------------------------------- GDPA

def gdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, activation: str = "gelu",
         scale: float = 1.0) -> torch.Tensor:
    """The bare GDPA op: act(q k^T) * scale @ v, no softmax. q (B, L, D), k (B, M, D), v (B, M, Dv).

    >>> gdpa(torch.ones(1, 3, 4), torch.ones(1, 2, 4), torch.ones(1, 2, 5), "relu", 0.5).shape
    torch.Size([1, 3, 5])
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation: must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    assert k.shape[:2] == v.shape[:2], f"k {tuple(k.shape)} and v {tuple(v.shape)} need the same (B, M)"
    h = ACTIVATIONS[activation](q @ k.transpose(-2, -1)) * scale  # (B, L, M)
    return h @ v  # (B, L, Dv)


class GDPA(nn.Module):
    """Personalized feed-forward: tokens through an FFN whose weights are generated per example.

    forward(x (B, L, D), mask (B, L), g (B, D_g)) -> (B, L, D) = x + mask * gdpa(W_q LN(x), K(g), V(g)).

    >>> blk = GDPA(d_model=8, gen_dim=4, slots=3)
    >>> blk(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 4)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(self, d_model: int, gen_dim: int, slots: int, activation: str = "gelu",
                 scale: float | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation: must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.d_model, self.slots, self.activation = d_model, slots, activation
        self.scale = float(scale) if scale is not None else slots ** -0.5
        self.norm = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.gen_norm = nn.LayerNorm(gen_dim)  # the external summary's scale is the caller's; normalize it
        self.k_gen = nn.Linear(gen_dim, slots * d_model)
        self.v_gen = nn.Linear(gen_dim, slots * d_model)

    def generate(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example K, V (B, M, D) from the summary g (B, D_g)."""
        gn = self.gen_norm(g)  # (B, D_g)
        k = self.k_gen(gn).view(g.shape[0], self.slots, self.d_model)  # (B, M, D)
        v = self.v_gen(gn).view(g.shape[0], self.slots, self.d_model)  # (B, M, D)
        return k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        assert x.shape[:2] == mask.shape, f"x {tuple(x.shape)} and mask {tuple(mask.shape)} disagree"
        k, v = self.generate(g)  # (B, M, D) each
        q = self.q_proj(self.norm(x))  # (B, L, D)
        out = gdpa(q, k, v, self.activation, self.scale)  # (B, L, D)
        return x + out * mask.unsqueeze(-1).to(out.dtype)  # padded tokens get no update


# --------------------------------------------------------------------------------------------- HSP

class HierarchicalSeedPooling(nn.Module):
    """S learnable seeds attend over the sequence; a Kronecker-factored linear compresses them to T tokens.

    forward(x (B, L, D), mask (B, L)) -> (B, T, D).

    >>> hsp = HierarchicalSeedPooling(d_model=8, n_heads=2, n_seeds=4, n_out=2)
    >>> hsp(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)).shape
    torch.Size([3, 2, 8])
    """

    def __init__(self, d_model: int, n_heads: int, n_seeds: int, n_out: int, kron_d1: int | None = None):
        super().__init__()
        d1, d2 = KunlunConfig(d_model=d_model, n_heads=n_heads, n_seeds=n_seeds, n_out=n_out,
                              kron_d1=kron_d1).kron_factors  # validates the arguments too
        self.d_model, self.n_heads, self.n_seeds, self.n_out, self.d1, self.d2 = (
            d_model, n_heads, n_seeds, n_out, d1, d2)
        self.seeds = nn.Parameter(torch.randn(n_seeds, d_model))  # E_seed (S, D)
        self.seed_norm = nn.LayerNorm(d_model)
        self.kv_norm = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.mix = nn.Parameter(torch.randn(n_out, n_seeds) * n_seeds ** -0.5)  # A (T, S)
        self.f1 = nn.Parameter(nn.init.orthogonal_(torch.empty(d1, d1)))  # F1 (D1, D1)
        self.f2 = nn.Parameter(nn.init.orthogonal_(torch.empty(d2, d2)))  # F2 (D2, D2)
        self.bias = nn.Parameter(torch.zeros(n_out, d_model))  # b (T, D)

    def gather(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """H = MHA(LN(E_seed), LN(x), LN(x)) with padded keys ignored: (B, S, D)."""
        b, l, _ = x.shape
        q = self.q_proj(self.seed_norm(self.seeds))  # (S, D), once per batch
        q = _split_heads(q.unsqueeze(0).expand(b, -1, -1), self.n_heads)  # (B, H, S, dh)
        xn = self.kv_norm(x)  # (B, L, D)
        k = _split_heads(self.k_proj(xn), self.n_heads)  # (B, H, L, dh)
        v = _split_heads(self.v_proj(xn), self.n_heads)  # (B, H, L, dh)
        allowed = mask[:, None, None, :].expand(b, 1, self.n_seeds, l)  # (B, 1, S, L)
        return self.out_proj(_merge_heads(_attend(q, k, v, allowed)))  # (B, S, D)

    def compress(self, h: torch.Tensor) -> torch.Tensor:
        """Y = A H (F1 kron F2)^T + b: (B, S, D) -> (B, T, D), without forming the Kronecker matrix."""
        b = h.shape[0]
        assert h.shape[1:] == (self.n_seeds, self.d_model), f"h must be (B, S, D), got {tuple(h.shape)}"
        y = self.mix @ h  # (T, S) @ (B, S, D) -> (B, T, D)
        y = y.view(b, self.n_out, self.d1, self.d2)  # (B, T, D1, D2), row-major like torch.kron
        y = self.f1 @ y @ self.f2.transpose(0, 1)  # (B, T, D1, D2): F1 X F2^T per token
        return y.reshape(b, self.n_out, self.d_model) + self.bias  # (B, T, D)

    def kron_matrix(self) -> torch.Tensor:
        """The dense (T*D, S*D) matrix the factored map equals (for tests and inspection only)."""
        return torch.kron(self.mix, torch.kron(self.f1, self.f2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.compress(self.gather(x, mask))  # (B, T, D)


# --------------------------------------------------------------------------------------------- SWA

class SlidingWindowSelfAttention(nn.Module):
    """Multi-head self-attention inside a window of width w, plus memory tokens every query sees.

    forward(x (B, L, D), mask (B, L), memory (B, T, D) | None) -> (B, L, D), pre-norm and residual.

    >>> swa = SlidingWindowSelfAttention(d_model=8, n_heads=2, window=3)
    >>> swa(torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.bool), memory=torch.randn(2, 2, 8)).shape
    torch.Size([2, 6, 8])
    >>> swa.window_mask(4).int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [0, 1, 1, 1]], dtype=torch.int32)
    """

    def __init__(self, d_model: int, n_heads: int, window: int, causal: bool = True):
        super().__init__()
        KunlunConfig(d_model=d_model, n_heads=n_heads, window=window, causal=causal)  # validates
        self.d_model, self.n_heads, self.window, self.causal = d_model, n_heads, window, causal
        self.norm = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def window_mask(self, length: int, device: torch.device | None = None) -> torch.Tensor:
        """(L, L) bool, True where query i may see key j (positions only; padding is added later)."""
        i = torch.arange(length, device=device)[:, None]
        j = torch.arange(length, device=device)[None, :]
        if self.causal:
            return (j <= i) & (i - j < self.window)
        return (i - j).abs() <= self.window // 2

    def forward(self, x: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        b, l, _ = x.shape
        assert mask.shape == (b, l), f"mask must be {(b, l)}, got {tuple(mask.shape)}"
        xn = self.norm(x)  # (B, L, D)
        allowed = self.window_mask(l, x.device)[None] & mask[:, None, :]  # (B, L, L)
        kv_in = xn
        if memory is not None:
            assert memory.shape[0] == b and memory.shape[-1] == self.d_model, (
                f"memory must be (B={b}, T, {self.d_model}), got {tuple(memory.shape)}")
            kv_in = torch.cat([self.norm(memory), xn], dim=1)  # (B, T + L, D)
            seen = torch.ones(b, l, memory.shape[1], dtype=torch.bool, device=x.device)  # (B, L, T)
            allowed = torch.cat([seen, allowed], dim=2)  # (B, L, T + L)
        q = _split_heads(self.q_proj(xn), self.n_heads)  # (B, H, L, dh)
        k = _split_heads(self.k_proj(kv_in), self.n_heads)  # (B, H, T + L, dh)
        v = _split_heads(self.v_proj(kv_in), self.n_heads)  # (B, H, T + L, dh)
        out = self.out_proj(_merge_heads(_attend(q, k, v, allowed.unsqueeze(1))))  # (B, L, D)
        return x + out * mask.unsqueeze(-1).to(out.dtype)


# --------------------------------------------------------------------------------------------- encoder

class KunlunEncoder(nn.Module):
    """User-history encoder: Kunlun layers under the CompSkip (or dense) schedule, HSP readout.

    forward(tokens (B, L, D), mask (B, L) bool, summary (B, D_s)) -> (B, n_out * D).
    ``seed`` fixes the parameter init without touching the global RNG.
    """

    def __init__(self, config: KunlunConfig, seed: int | None = None):
        super().__init__()
        if not isinstance(config, KunlunConfig):
            raise ConfigError(f"config: must be a KunlunConfig, got {type(config).__name__}")
        self.config = c = config
        with _seeded(seed):
            layers = []
            for kind in c.layer_kinds:
                if kind == "full":
                    layers.append(nn.ModuleDict({
                        "hsp": HierarchicalSeedPooling(c.d_model, c.n_heads, c.n_seeds, c.n_out, c.kron_d1),
                        "gdpa": GDPA(c.d_model, c.gen_dim, c.gdpa_slots, c.activation, c.gdpa_scale),
                    }))
                else:
                    layers.append(nn.ModuleDict({
                        "swa": SlidingWindowSelfAttention(c.d_model, c.n_heads, c.window, c.causal)}))
            self.layers = nn.ModuleList(layers)
            self.readout = HierarchicalSeedPooling(c.d_model, c.n_heads, c.n_seeds, c.n_out, c.kron_d1)

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        c = self.config
        _check_seq("tokens", tokens, mask, c.d_model)
        if tuple(summary.shape) != (tokens.shape[0], c.summary_dim):
            raise ConfigError(f"summary: must be (B={tokens.shape[0]}, summary_dim={c.summary_dim}), "
                              f"got {tuple(summary.shape)}")
        x = torch.where(mask.unsqueeze(-1), tokens, torch.zeros((), dtype=tokens.dtype))  # (B, L, D)
        z = None  # cached HSP summary (B, T, D)
        for kind, layer in zip(c.layer_kinds, self.layers):
            if kind == "full":
                z = layer["hsp"](x, mask)  # (B, T, D), recomputed
                g = torch.cat([summary, z.flatten(1)], dim=1)  # (B, D_g)
                x = layer["gdpa"](x, mask, g)  # (B, L, D)
            else:
                assert z is not None, "a skip layer needs a summary cached by an earlier full layer"
                x = layer["swa"](x, mask, memory=z)  # (B, L, D), summary reused
        return self.readout(x, mask).flatten(1)  # (B, T * D)


class MultiEventEncoder(nn.Module):
    """Event-level personalization: one ``KunlunEncoder`` per event type, outputs concatenated.

    forward(seqs {type: (tokens (B, L_t, D_t), mask (B, L_t))}, summary (B, D_s)) -> (B, out_dim), the
    per-type outputs in the order of ``configs``. Tokens come already at their type's d_model (the FM
    projects raw event features); all types share the external summary, so summary_dim must agree.
    """

    def __init__(self, configs: Mapping[str, KunlunConfig], seed: int | None = None):
        super().__init__()
        if not isinstance(configs, Mapping) or not configs:
            raise ConfigError("configs: must be a non-empty mapping of event type -> KunlunConfig")
        for name, cfg in configs.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ConfigError(f"configs: event type must be a non-empty str without '.', got {name!r}")
            if not isinstance(cfg, KunlunConfig):
                raise ConfigError(f"configs: {name!r} must map to a KunlunConfig, got {type(cfg).__name__}")
        dims = {name: cfg.summary_dim for name, cfg in configs.items()}
        if len(set(dims.values())) > 1:
            raise ConfigError(f"configs: summary_dim must agree across event types, got {dims}")
        self.event_types = tuple(configs)
        self.summary_dim = next(iter(dims.values()))
        with _seeded(seed):
            self.encoders = nn.ModuleDict({name: KunlunEncoder(cfg) for name, cfg in configs.items()})

    @property
    def out_dim(self) -> int:
        return sum(enc.out_dim for enc in self.encoders.values())

    def forward(self, seqs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], summary: torch.Tensor) -> torch.Tensor:
        if set(seqs) != set(self.event_types):
            raise ConfigError(f"seqs: event types must be {list(self.event_types)}, got {list(seqs)}")
        outs = [self.encoders[name](*seqs[name], summary) for name in self.event_types]  # (B, T_t * D_t) each
        return torch.cat(outs, dim=1)  # (B, out_dim)


# --------------------------------------------------------------------------------------------- counting

def _window_pairs(length: int, window: int, causal: bool) -> int:
    """Visible (query, key) position pairs of the window mask for an unpadded sequence."""
    if causal:
        return sum(min(i + 1, window) for i in range(length))
    r = window // 2
    return sum(min(i + r, length - 1) - max(i - r, 0) + 1 for i in range(length))


def block_flops(config: KunlunConfig, length: int) -> dict[str, int]:
    """Multiply-adds of one instance of each block for one example of length L (formulas in the module doc).

    >>> block_flops(KunlunConfig(), 50)
    {'gdpa': 117760, 'hsp': 137472, 'swa': 239104}
    """
    c, L = config, length
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ConfigError(f"length: must be an int >= 1, got {L!r}")
    D, M, S, T = c.d_model, c.gdpa_slots, c.n_seeds, c.n_out
    d1, d2 = c.kron_factors
    gdpa_f = 2 * c.gen_dim * M * D + L * D * D + 2 * L * M * D
    hsp_f = 2 * L * D * D + 2 * S * L * D + S * D * D + T * S * D + T * D * (d1 + d2)
    pairs = _window_pairs(L, c.window, c.causal) + L * T
    swa_f = 4 * L * D * D + 2 * T * D * D + 2 * pairs * D
    return {"gdpa": gdpa_f, "hsp": hsp_f, "swa": swa_f}


def flops_per_example(model: KunlunConfig | KunlunEncoder | MultiEventEncoder | Mapping[str, KunlunConfig],
                      length: int | Mapping[str, int]) -> int:
    """Analytic multiply-adds for one unpadded example; ``length`` per event type for a multi-event model.

    >>> flops_per_example(KunlunConfig(), 50), flops_per_example(KunlunConfig(schedule="dense"), 50)
    (631808, 647936)
    """
    if isinstance(model, MultiEventEncoder):
        model = {name: enc.config for name, enc in model.encoders.items()}
    if isinstance(model, KunlunEncoder):
        model = model.config
    if isinstance(model, Mapping):
        lengths = length if isinstance(length, Mapping) else {name: length for name in model}
        if set(lengths) != set(model):
            raise ConfigError(f"length: event types must be {list(model)}, got {list(lengths)}")
        return sum(flops_per_example(cfg, lengths[name]) for name, cfg in model.items())
    if not isinstance(model, KunlunConfig):
        raise ConfigError(f"model: must be a KunlunConfig, KunlunEncoder or MultiEventEncoder, got "
                          f"{type(model).__name__}")
    f = block_flops(model, length)
    kinds = model.layer_kinds
    n_full = kinds.count("full")
    return n_full * (f["gdpa"] + f["hsp"]) + (len(kinds) - n_full) * f["swa"] + f["hsp"]


def param_count(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters (trainable ones by default).

    >>> param_count(nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
