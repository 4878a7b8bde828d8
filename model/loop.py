"""The models part of ``loopline evaluate``: the FM stage, with the VM stage trailing it in a thread.

Public surface: ``ModelLoopConfig``, ``ModelLoop``.

After each FM step the VM stage reads what that step's examples need from the history store
(:meth:`~loopline.model.verticals.VMStage.prepare`: at that moment the store holds the codes of that step
and the earlier ones, as a vm worker's store does), then trains on them
(:meth:`~loopline.model.verticals.VMStage.train`) in a thread of its own while the FM goes on with its
next steps. On two cores the small VM steps overlap the FM's, as the fm and vm roles of a role ``all``
worker do (``stream/vm.py``; torch's ops release the GIL, and a process instead of the thread measured
the same). The VM stage still
trains the steps one after another in step order, so the numbers are those of a sequential run (tested);
at most ``depth`` prepared steps wait for it, which bounds their memory.

>>> ModelLoopConfig(depth=0)
Traceback (most recent call last):
...
loopline.errors.ConfigError: depth: must be an integer >= 1, got 0
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from loopline.errors import ConfigError

__all__ = ["ModelLoopConfig", "ModelLoop"]


@dataclass(frozen=True)
class ModelLoopConfig:
    threaded: bool = True  # VM steps in their own thread; False trains each right after its FM step
    depth: int = 4  # prepared VM steps that may wait for the VM thread (each holds one micro-batch)

    def __post_init__(self):
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise ConfigError(f"depth: must be an integer >= 1, got {self.depth!r}")
        if not isinstance(self.threaded, bool):
            raise ConfigError(f"threaded: must be True or False, got {self.threaded!r}")


class ModelLoop:
    """Runs an :class:`~loopline.model.pipeline.FMStage` over a finite list of examples, and a
    :class:`~loopline.model.verticals.VMStage` (or none) on each step's augmented examples.

    ``run`` returns the score rows by example id: the FM's and the baseline's predictions, with every
    VM variant's merged in."""

    def __init__(self, stage, vms=None, cfg: ModelLoopConfig = ModelLoopConfig()):
        self.stage, self.vms, self.cfg = stage, vms, cfg
        self.rows: dict[str, dict] = {}
        self.max_waiting = 0  # the most VM steps that waited at once (bounded by cfg.depth)

    def _merge(self, vm_rows: list[dict]) -> None:
        for r in vm_rows:
            self.rows[r["id"]]["scores"].update(r["scores"])

    def run(self, examples: list[dict], progress=None) -> dict[str, dict]:
        vms, waiting = self.vms, deque()
        pool = ThreadPoolExecutor(1, thread_name_prefix="loopline-vm") if vms and self.cfg.threaded else None

        def on_step(out: dict) -> None:
            for r in out["scores"]:
                self.rows[r["id"]] = r
            if vms is None:
                return
            work = vms.prepare(out["augmented"])  # now: the store holds codes of this step and earlier
            if pool is None:
                self._merge(vms.train(work))
                return
            waiting.append(pool.submit(vms.train, work))
            while len(waiting) > self.cfg.depth or (waiting and waiting[0].done()):
                self._merge(waiting.popleft().result())
            self.max_waiting = max(self.max_waiting, len(waiting))

        try:
            self.stage.run(examples, progress=progress, on_step=on_step)
            while waiting:
                self._merge(waiting.popleft().result())
        finally:
            if pool is not None:
                for f in waiting:
                    f.cancel()
                pool.shutdown(wait=True)
        return self.rows
