"""Offsets a Faust agent never got, read back from the broker.

Public surface: ``GapReader``.

Faust's consumer can skip messages around a rebalance that leaves a partition with the same member:
the fetch loop goes on through records fetched before the revocation (setting its read offset past
messages it then drops from the agents' queues), and after the re-assignment it counts the missing
offsets as a gap, acknowledged and committed though no agent saw them (found by
``tests/stream/test_exactly_once_integration.py`` under load: five consecutive events of one
partition never reached the ingest core, and their impressions never became examples). A role whose
state records the last offset it applied (the ingest core's ``through``) knows where its next message
must start; when a batch starts later, :meth:`GapReader.read` fetches the offsets in between with a
consumer of its own. Offsets with no message (a transactional producer's commit markers, a compacted
topic) legitimately come back empty.
"""

from __future__ import annotations

import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition

__all__ = ["GapReader"]

log = logging.getLogger("loopline.gaps")


class GapReader:
    """Reads ranges of offsets directly (a consumer without a group, started on first use).
    ``counts``: ranges read, messages recovered, offsets without a message."""

    def __init__(self, bootstrap: str, timeout_s: float = 30.0):
        self.bootstrap, self.timeout_s = bootstrap, timeout_s
        self._consumer: AIOKafkaConsumer | None = None
        self.counts = {"ranges": 0, "recovered": 0, "empty_offsets": 0}

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            c = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                 auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024)
            await c.start()
            self._consumer = c
        return self._consumer

    async def read(self, topic: str, partition: int, start: int, end: int) -> list:
        """The messages at offsets ``start`` (inclusive) to ``end`` (exclusive) of ``topic/partition``, in
        order (aiokafka records). Raises ``TimeoutError`` when the broker does not deliver them within
        ``timeout_s``: the caller's batch then fails rather than skip them."""
        if end <= start:
            return []
        consumer = await self._started()
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)  # before the log's start (retention): reset to the earliest offset
        out: list = []
        deadline = time.monotonic() + self.timeout_s
        while await consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}/{partition}: offsets {start}..{end - 1} not delivered "
                                   f"within {self.timeout_s:g}s")
            got = await consumer.getmany(tp, timeout_ms=200, max_records=max(1, end - start))
            out.extend(r for r in got.get(tp, ()) if start <= r.offset < end)
        self.counts["ranges"] += 1
        self.counts["recovered"] += len(out)
        self.counts["empty_offsets"] += (end - start) - len(out)
        if out:  # (a range without messages is a transaction's markers: nothing to say)
            log.warning("%s/%s: offsets %s..%s were skipped by the consumer; read %d messages from the broker",
                        topic, partition, start, end - 1, len(out))
        return out

    async def close(self) -> None:
        """Stop the consumer (a later :meth:`read` starts another)."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

