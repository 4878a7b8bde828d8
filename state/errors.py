"""The exception tree moved to :mod:`loopline.errors`; this module re-exports it, so imports from
``loopline.state.errors`` keep working and name the same classes."""

from loopline.errors import *  # noqa: F401,F403
from loopline.errors import __all__  # noqa: F401
