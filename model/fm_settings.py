"""The FM's settings that commands declare as flags, without torch (``loopline drift`` must not wait for
it): how its embedding tables are kept (``model/fm.py``) and where its ranks meet (``model/ranks.py``).

Public surface: ``RanksConfig``, ``UserTableConfig``.

>>> RanksConfig(ranks=2).port, RanksConfig(master="10.0.0.5:29500", join=True).host
(0, '10.0.0.5')
>>> UserTableConfig("managed", managed_rows=1_000_000).embeddings
'managed'
"""

from __future__ import annotations

from dataclasses import dataclass

from loopline.errors import ConfigError
from loopline.settings import setting

__all__ = ["RanksConfig", "UserTableConfig"]


@dataclass(frozen=True)
class UserTableConfig:
    """The FM's user table: hashed into ``table_sizes["user"]`` rows, or managed (``model/fm.py``)."""

    embeddings: str = setting("hashed", "FM user table: hashed (ids share rows by hash) or managed (a row per id "
                                        "while the eviction policy keeps it; TorchRec MCH)",
                              choices=("hashed", "managed"))
    managed_rows: int = setting(50_000, "FM managed user table: its rows (the last is shared by ids not yet "
                                        "admitted)")
    managed_eviction_interval: int = setting(1, "FM managed user table: training steps between admission and "
                                                "eviction rounds")

    def __post_init__(self):
        if self.embeddings not in ("hashed", "managed"):
            raise ConfigError(f"embeddings: must be hashed or managed, got {self.embeddings!r}")
        for name in ("managed_rows", "managed_eviction_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "managed_rows" else 1):
                raise ConfigError(f"{name}: must be an integer >= {2 if name == 'managed_rows' else 1}, got {v!r}")


@dataclass(frozen=True)
class RanksConfig:
    """Where the FM's ranks meet (``--fm-*`` flags of ``evaluate``, ``worker`` and ``fm-rank``)."""

    ranks: int = setting(1, "FM: torch.distributed ranks it trains over (1: this process alone)", env="FM_RANKS")
    master: str = setting("127.0.0.1:0", "FM ranks: HOST:PORT of rank 0's TCP store, which the other ranks join "
                                         "(port 0: a free one; only when rank 0 starts them)", env="FM_MASTER")
    join: bool = setting(False, "FM ranks: ranks 1..N-1 are started apart (loopline fm-rank) and join at "
                                "--fm-master; without it rank 0 starts them on its machine", env="FM_JOIN")
    backend: str = setting("gloo", "FM ranks: the torch.distributed backend (nccl: rank r on cuda:r mod GPUs)",
                           choices=("gloo", "nccl"), env="FM_BACKEND")
    timeout_s: float = setting(120.0, "FM ranks: seconds a collective may wait (a rank that died mid-step "
                                      "fails the step)", flag="timeout", env="FM_TIMEOUT")

    def __post_init__(self):
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int) or self.ranks < 1:
            raise ConfigError(f"fm_ranks: must be an integer >= 1, got {self.ranks!r}")
        host, _, port = str(self.master).rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"fm_master: must be HOST:PORT, got {self.master!r}")
        if int(port) == 0 and self.join:
            raise ConfigError("fm_master: ranks started apart (--fm-join) need a fixed port, got port 0")
        if self.backend not in ("gloo", "nccl"):
            raise ConfigError(f"fm_backend: must be gloo or nccl, got {self.backend!r}")
        if not self.timeout_s > 0:
            raise ConfigError(f"fm_timeout: must be > 0, got {self.timeout_s}")

    @property
    def host(self) -> str:
        return self.master.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.master.rpartition(":")[2])
