"""Loopline: streaming online learning for ads.

Subpackages (top-level folders of the repository, mapped in pyproject.toml):
``loopline.state`` (event contract, attribution join, stores), ``loopline.model``, ``loopline.kernels``,
``loopline.stream`` (the Faust app), ``loopline.ops`` (CLI, broker, replay, evaluation).

Importing any of them first imports this package, which makes torch's OpenMP threads sleep rather than
spin while they wait (``OMP_WAIT_POLICY=PASSIVE``, unless the environment already sets it; libgomp reads
it once, when torch loads it). Workers share two cores with RocksDB, Faust and each other: a spinning
thread holds a core the other thread of the same op needs, and each small op waits out a scheduler slice.
Measured on the 2-core machine under load (``loopline bench stage``): the model stage and the bare trainer
ran 5-30x slower, erratically, with spinning. The policy changes only how threads wait, never how work is
split, so every number is the same either way.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # also inherited by the processes this one starts

__version__ = "0.1.0"
__all__ = ["__version__"]
