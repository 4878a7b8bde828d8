"""Broker resets are never silent: detect that the broker lost the data a worker's state describes.

Public surface: ``BrokerWatch``, ``BrokerReset``, ``RESET_POLICIES``, ``EXIT_BROKER_RESET``.

The embedded broker (Tansu, ``memory://``) keeps nothing across a restart: topics start again at
offset 0 while a worker's RocksDB still holds its positions (ingest's ``through``, the fm's ``fed``
offsets). Left alone, the worker would skip the new messages as redeliveries. Two signs of a reset:

* **The cluster id changed.** A worker records the broker's cluster id in its data directory
  (``broker-identity.json``) the first time it runs; a broker that lost its data is a new cluster
  (the embedded broker gets a fresh ``--cluster-id`` at every start, ``ops/broker.py``; a wiped Kafka
  cluster gets a new id too).
* **A topic is behind a stored position.** A partition whose end offset is below the next offset a
  role has stored for it was recreated or truncated under the worker (a real Kafka cluster whose
  topic was deleted and created again keeps its cluster id).

Checked at start-up (before the app starts) and every ``WorkerConfig.broker_check_s`` seconds. One
documented policy, ``WorkerConfig.on_broker_reset``:

* ``stop`` (default): one line on stderr naming the sign, exit code ``EXIT_BROKER_RESET`` (75). The
  worker's state is kept for an operator to look at; nothing is processed against the new broker.
* ``reset``: the same line, then the worker's data directory (its derived state: tables, history
  stores, snapshots) is emptied and the new identity recorded before the exit, so the supervisor's
  restart starts over from what the broker now holds.

>>> BrokerWatch.compare({"cluster_id": "a"}, {"cluster_id": "b"}, {}, {})
"the broker's cluster id changed from 'a' to 'b'"
>>> BrokerWatch.compare({"cluster_id": "a"}, {"cluster_id": "a"}, {"events/0": 120}, {"events/0": 7})
'events/0 ends at offset 7, but this worker had processed up to offset 120'
>>> BrokerWatch.compare({"cluster_id": "a"}, {"cluster_id": "a"}, {"events/0": 120}, {"events/0": 300}) is None
True
"""

from __future__ import annotations

import json
import os
import shutil
import sys

__all__ = ["BrokerWatch", "BrokerReset", "RESET_POLICIES", "EXIT_BROKER_RESET"]

RESET_POLICIES = ("stop", "reset")
EXIT_BROKER_RESET = 75  # EX_TEMPFAIL: the worker cannot go on against this broker as it is
IDENTITY_FILE = "broker-identity.json"
# The embedded broker (Tansu 0.6) reports a partition's end offset as the first offset of its last
# batch + 1, so a healthy partition can look up to a producer batch short of a stored position; on it
# the cluster id is the sign that counts. A recreated topic refilled past (position - slack) before
# the check runs is caught on a real Kafka cluster only if its cluster id changed too.
POSITION_SLACK = 10_000


class BrokerReset(Exception):
    """The broker lost data this worker's state describes (the message says which sign showed it)."""


class BrokerWatch:
    """The recorded identity of the broker a worker's state belongs to, and the checks against it."""

    def __init__(self, bootstrap: str, data_dir: str, policy: str = "stop"):
        if policy not in RESET_POLICIES:
            from loopline.errors import ConfigError
            raise ConfigError(f"on_broker_reset: must be one of {', '.join(RESET_POLICIES)}, got {policy!r}")
        self.bootstrap = bootstrap
        self.data_dir = data_dir
        self.policy = policy
        self.path = os.path.join(data_dir, IDENTITY_FILE)
        self._admin = self._consumer = None  # opened on first use, kept between checks

    # -- the pure comparison ---------------------------------------------------------------------------
    @staticmethod
    def compare(recorded: dict | None, current: dict, positions: dict, ends: dict, slack: int = 0) -> str | None:
        """Why the broker no longer holds this worker's data, or None. ``positions`` and ``ends`` map
        ``"topic/partition"`` to the next offset the worker stored and to the partition's end offset;
        an end up to ``slack`` below a position is tolerated (see ``POSITION_SLACK``)."""
        if recorded and recorded.get("cluster_id") != current.get("cluster_id"):
            return f"the broker's cluster id changed from {recorded.get('cluster_id')!r} to {current.get('cluster_id')!r}"
        for tp, pos in sorted(positions.items()):
            end = ends.get(tp)
            if end is not None and end + slack < pos:
                return f"{tp} ends at offset {end}, but this worker had processed up to offset {pos}"
        return None

    # -- the broker and the data directory -------------------------------------------------------------
    def recorded(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def record(self, identity: dict) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(identity, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    async def identity(self) -> dict:
        """The broker's identity now (its cluster id), over a client kept open between checks."""
        try:
            if self._admin is None:
                from aiokafka.admin import AIOKafkaAdminClient
                self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10000)
                await self._admin.start()
            return {"cluster_id": (await self._admin.describe_cluster()).get("cluster_id")}
        except Exception:
            await self.close()  # a fresh client next time (the broker may have restarted)
            raise

    async def ends(self, tps: list[str]) -> dict:
        """The end offset of each ``"topic/partition"``."""
        if not tps:
            return {}
        from aiokafka import TopicPartition
        try:
            if self._consumer is None:
                from aiokafka import AIOKafkaConsumer
                self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
                await self._consumer.start()
            parts = [TopicPartition(t, int(p)) for t, p in (tp.rsplit("/", 1) for tp in tps)]
            got = await self._consumer.end_offsets(parts)
            return {f"{tp.topic}/{tp.partition}": off for tp, off in got.items()}
        except Exception:
            await self.close()
            raise

    async def close(self) -> None:
        admin, consumer, self._admin, self._consumer = self._admin, self._consumer, None, None
        for client, stop in ((admin, "close"), (consumer, "stop")):
            if client is not None:
                try:
                    await getattr(client, stop)()
                except Exception:  # noqa: BLE001 - closing a client of a broker that went away
                    pass

    async def check(self, positions: dict | None = None) -> str | None:
        """Record the identity on first use; afterwards the reason the broker was reset, or None."""
        current = await self.identity()
        recorded = self.recorded()
        if recorded is None:
            self.record(current)
            return None
        positions = positions or {}
        return self.compare(recorded, current, positions, await self.ends(list(positions)), POSITION_SLACK)

    def wipe(self, identity: dict) -> None:
        """Empty the data directory (the worker's derived state) and record the broker it now belongs to."""
        for name in os.listdir(self.data_dir):
            full = os.path.join(self.data_dir, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                try:
                    os.remove(full)
                except OSError:
                    pass
        self.record(identity)

    def act(self, reason: str, identity: dict | None = None) -> None:
        """Apply the policy to a running worker: one line on stderr, then (``reset``) empty the data
        directory, and exit."""
        what = ("discarding this worker's state (--on-broker-reset reset) and exiting for a clean restart"
                if self.policy == "reset" else
                "stopping; the worker's state is kept (rerun with --on-broker-reset reset to discard it "
                "and start over from what the broker holds now)")
        print(f"loopline worker: broker reset detected: {reason}; {what}", file=sys.stderr, flush=True)
        if self.policy == "reset":
            self.wipe(identity or {})
        os._exit(EXIT_BROKER_RESET)
