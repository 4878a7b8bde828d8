"""The one exception tree of Loopline.

    LooplineError                 base: the CLI catches only this, prints ``Type: message``, exits 2
    ├── ConfigError               a bad setting or argument; the message names the field
    ├── InvalidEvent              an event that breaks the contract; carries a short ``reason`` code
    ├── InvalidMetricInput        scores or labels a metric refuses; the message names the argument
    ├── BrokerError               the embedded broker could not start, or a broker is unreachable
    └── DatasetError              a data set could not be fetched or read
"""

__all__ = ["LooplineError", "ConfigError", "InvalidEvent", "InvalidMetricInput", "BrokerError", "DatasetError"]


class LooplineError(Exception):
    """Base of every error Loopline raises on purpose."""


class ConfigError(LooplineError, ValueError):
    """A bad setting: the message starts with the field's name."""


class InvalidEvent(LooplineError, ValueError):
    """An event that breaks the contract. ``reason`` is a short, bounded code used for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class InvalidMetricInput(LooplineError, ValueError):
    """Scores or labels a metric refuses (not numbers, not finite, outside [0, 1], lengths that differ):
    the message starts with the argument's name (``p`` or ``y``)."""


class BrokerError(LooplineError, RuntimeError):
    """The broker could not be started or reached."""


class DatasetError(LooplineError, RuntimeError):
    """A data set could not be fetched or read."""
