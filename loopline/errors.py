"""The one exception tree of Loopline, and the HTTP status of each kind of error.

    LooplineError           400  base: the CLI catches only this, prints ``Type: message``, exits 2
    ├── ConfigError         400  a bad setting, argument or request field; the message names the field
    │   ├── NotFound        404  a request names something that does not exist here (a vertical, a model)
    │   └── TooLarge        413  a request or argument over a size limit (candidates per request)
    ├── InvalidEvent        400  an event that breaks the contract; carries a short ``reason`` code
    ├── InvalidMetricInput  400  scores or labels a metric refuses; the message names the argument
    ├── Closed              503  a store or stage used after it was closed (a worker shutting down)
    ├── BrokerError         503  the embedded broker could not start, or a broker is unreachable
    ├── RanksError          503  the FM's ranks could not meet, or one died mid-step (``model/ranks.py``)
    ├── DatasetError        502  a data set could not be fetched (an upstream failed) or read
    └── KernelError         500  a kernel could not run on this machine (no tile configuration fits)

An HTTP handler catches the errors it expects and answers ``exc.http_status`` with the one-line message,
so the status comes from the type, never from the message's text. The bad-input classes also derive
from ``ValueError`` and the failures from ``RuntimeError``, so callers that catch the built-in kinds keep
working. ``Closed`` is 503 rather than 409: what is closed is the serving process's own store, not a
resource the client conflicts with, and another (or the restarted) worker can answer the same request.

>>> NotFound("vertical: no model for 'shop'").http_status
404
>>> isinstance(TooLarge("candidates: at most 1000 per request, got 1001"), ConfigError)
True
>>> raise TooLarge("candidates: at most 1000 per request, got 1001")
Traceback (most recent call last):
...
loopline.errors.TooLarge: candidates: at most 1000 per request, got 1001
"""

__all__ = ["LooplineError", "ConfigError", "NotFound", "TooLarge", "InvalidEvent", "InvalidMetricInput", "Closed",
           "BrokerError", "RanksError", "DatasetError", "KernelError"]


class LooplineError(Exception):
    """Base of every error Loopline raises on purpose."""

    http_status = 400


class ConfigError(LooplineError, ValueError):
    """A bad setting, argument or request field: the message starts with the field's name."""

    http_status = 400


class NotFound(ConfigError):
    """A request names something this process does not have: the message starts with the field."""

    http_status = 404


class TooLarge(ConfigError):
    """A request or argument over a size limit: the message starts with the field and says the limit."""

    http_status = 413


class InvalidEvent(LooplineError, ValueError):
    """An event that breaks the contract. ``reason`` is a short, bounded code used for counting."""

    http_status = 400

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class InvalidMetricInput(LooplineError, ValueError):
    """Scores or labels a metric refuses (not numbers, not finite, outside [0, 1], lengths that differ):
    the message starts with the argument's name (``p`` or ``y``)."""

    http_status = 400


class Closed(LooplineError, RuntimeError):
    """A store or stage used after it was closed: the message names it (``store: ...``)."""

    http_status = 503


class BrokerError(LooplineError, RuntimeError):
    """The broker could not be started or reached."""

    http_status = 503


class RanksError(LooplineError, RuntimeError):
    """The FM's torch.distributed ranks could not meet, or a collective failed (a rank died)."""

    http_status = 503


class DatasetError(LooplineError, RuntimeError):
    """A data set could not be fetched or read."""

    http_status = 502


class KernelError(LooplineError, RuntimeError):
    """A kernel could not run on this machine (e.g. no tile configuration fits the GPU's shared memory):
    the message starts with the kernel's name."""

    http_status = 500
