"""The size bound on every value a worker stores or sends: one changelog or output message.

Public surface: ``MAX_VALUE_BYTES``, ``CHUNK_BYTES``, ``MAX_DEADLETTER_RAW``, ``size_of``.

Every table value becomes one message of its changelog topic, and every output one message of its
topic. A value larger than the broker accepts is refused on every retry: a changelog that can never be
written, a worker stuck re-sending. The bound is Kafka's broker default, ``message.max.bytes`` (1 MiB
and 12 bytes), well under the workers' producer limit (``producer_max_request_size``, 16 MiB, in
``stream/app.py``), so the state also fits a stock Kafka cluster.

How each value that grows with traffic stays under it:

* the ingest outbox (``state/ingest.py``): chunks of at most :data:`CHUNK_BYTES`, one key each, and a
  small index;
* the quality aggregate (``state/quality_counts.py``): its entries in chunks of at most
  16 KiB per section (smaller: a flush rewrites each chunk it touches), a small head with the counters;
* the attribution join's record chunks (``state/attribution.py``): at most ``CHUNK`` records and
  :data:`CHUNK_BYTES` per chunk, and a bounded number of conversions per impression;
* a dead letter keeps at most :data:`MAX_DEADLETTER_RAW` bytes of its line (a longer line keeps its
  first bytes, its length and its SHA-256).

A chunk takes entries while it is under :data:`CHUNK_BYTES`, so it holds at most that plus one entry;
every single entry (an output, a join record, an aggregate entry) is bounded well below
``MAX_VALUE_BYTES - CHUNK_BYTES`` by the event limits (``EventLimits``: 64 KiB lines, 256-character
strings) and :data:`MAX_DEADLETTER_RAW`.

Sizes are measured as the tables serialize them (``orjson``, which Faust's ``json`` codec uses when it
is installed, as it is here):

>>> size_of({"a": [1, 2]})
11
>>> MAX_DEADLETTER_RAW * 4 // 3 + CHUNK_BYTES < MAX_VALUE_BYTES  # a chunk and its largest entry
True
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["MAX_VALUE_BYTES", "CHUNK_BYTES", "MAX_DEADLETTER_RAW", "size_of"]

MAX_VALUE_BYTES = 1024 * 1024  # the largest value stored or sent (Kafka's broker default message.max.bytes)
# A chunk stops taking entries at this size: small enough that a chunk and one more entry stay under
# MAX_VALUE_BYTES, large enough that a batch writes a handful of keys, not thousands
CHUNK_BYTES = 256 * 1024
# The raw bytes a dead letter keeps (base64: 4/3 of it): whole for any line up to this size (the event
# limit is 64 KiB), the first bytes of a longer one
MAX_DEADLETTER_RAW = 512 * 1024


def size_of(value: Any) -> int:
    """Bytes of ``value`` as a table or a topic serializes it (JSON, UTF-8)."""
    return len(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS))
