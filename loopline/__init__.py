"""Loopline: streaming online learning for ads.

Subpackages (top-level folders of the repository, mapped in pyproject.toml):
``loopline.state`` (event contract, attribution join, stores), ``loopline.model``, ``loopline.kernels``,
``loopline.stream`` (the Faust app), ``loopline.ops`` (CLI, broker, replay, evaluation).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
