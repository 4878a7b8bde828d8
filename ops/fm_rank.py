"""``loopline fm-rank``: one of the FM's ranks 1..N-1, started apart from rank 0 and joining it.

Public surface: ``FmRankCommand``, ``run_fm_rank``.

Rank 0 is ``loopline worker --role fm`` (or ``evaluate``) given ``--fm-ranks N --fm-join --fm-master
HOST:PORT``; each other rank runs ``loopline fm-rank --rank R --fm-ranks N --fm-master HOST:PORT`` on any
machine that reaches HOST:PORT. The rank builds the FM of the default config (the fm worker's), takes
rank 0's weights, trains its share of every micro-batch and exits 0 when rank 0 stops it; when rank 0
goes away it exits with the store's error. Without ``--fm-join``, rank 0 starts these processes itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from loopline.model.fm_settings import RanksConfig
from loopline.settings import argument, nested

__all__ = ["FmRankCommand", "run_fm_rank"]


@dataclass(frozen=True)
class FmRankCommand:
    """``loopline fm-rank``: which rank this process is, and where rank 0 is."""

    rank: int = argument(1, "this process's rank, 1..N-1 (rank 0 is the fm worker, or evaluate)")
    fm: RanksConfig = nested(RanksConfig, prefix="fm-")


def run_fm_rank(cfg: FmRankCommand, progress: bool = False) -> int:
    from loopline.model.fm import FMConfig
    from loopline.model.ranks import follow
    from loopline.model.trainer import TrainerConfig
    follow(FMConfig(), TrainerConfig(), replace(cfg.fm, join=True), cfg.rank)
    return 0
