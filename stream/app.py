"""The Faust app: settings, topics and tables shared by every role.

Public surface: ``WorkerConfig``, ``TOPICS``, ``build_app``.

Thin by design: agents (``stream/ingest.py``) call into ``loopline.state``; nothing here computes.
Topics are created explicitly with the configured partition count before the worker starts
(``ops.broker.create_topics``): Tansu would otherwise auto-create them with 4 partitions and a table's
changelog could disagree with its source topic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import faust
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from loopline.state.attribution import AttributionConfig
from loopline.state.errors import ConfigError
from loopline.state.reach import ReachConfig

__all__ = ["WorkerConfig", "TOPICS", "build_app", "CONTROL_HEADER", "OutputTopic", "read_topic", "control_of", "group_id"]

# name -> what it carries. Keys: events by impression id; examples by user.
TOPICS = {
    "events": "raw JSONL lines (bytes), keyed by impression id; control messages carry CONTROL_HEADER",
    "examples": "labelled examples (JSON), keyed by user",
    "deadletter": "rejected input: reason, detail, raw bytes (base64), source partition/offset",
    "ingest.status": "per-partition counts, sent when an end-of-log control message is processed",
    "history.events": "raw events for the FM's user history, at event time, keyed by user",
    "examples.augmented": "examples with the published FM snapshot's soft label and version (DAS)",
    "fm.embeddings": "LoopFM codes: user, ts, FM version, code, example id, FM step; keyed by user",
    "model.scores": "score rows: each labelled example's predictions by one stage's models; keyed by user",
    "audience": "for reach and quality (JSON): accepted impressions and segment assertions keyed by user, "
                "truth reports keyed by campaign",
    "reach.queries": "reach queries {id, q} (JSON), one copy to every partition; answers: table reach.answers",
}
CONTROL_HEADER = "loopline-control"  # b"end_of_log:<run id>" closes every window of that partition;
# to the fm role, ingest also sends b"watermark:<ingest partition>:<time>" (and end_of_log) to every
# partition of `examples` and `history.events`; after each training step's outputs, fm sends
# b"fmstep:<step>" to every partition of `examples.augmented` and `fm.embeddings` (the vm role's clock)

ROLES = ("all", "ingest", "fm", "vm", "reach", "monitor")
# Roles whose input topics another role also reads get a consumer group of their own (see group_id).
OWN_GROUP_ROLES: tuple = ("monitor", "reach", "vm")


def group_id(cfg: "WorkerConfig") -> str:
    """The Faust app id (= Kafka consumer group) of a worker. Members of one group split every topic
    they subscribe to, so a role that reads a topic another role also reads (vm and monitor both read
    ``examples.augmented``) runs as ``<app id>-<role>``: it then sees every partition of that topic, and
    several members of that one role still split the partitions among themselves."""
    return f"{cfg.app_id}-{cfg.role}" if cfg.role in OWN_GROUP_ROLES else cfg.app_id


def control_of(headers) -> str | None:
    """The control mark a message carries (``CONTROL_HEADER``), or None for a data message. Headers
    come as a list of pairs (aiokafka) or a mapping (Faust)."""
    if not headers:
        return None
    for k, v in (headers.items() if hasattr(headers, "items") else headers):
        if k == CONTROL_HEADER:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


@dataclass
class WorkerConfig:
    """Settings of one worker; each maps to a ``loopline worker`` flag."""

    broker: str = "127.0.0.1:9092"  # host:port (``--broker kafka://host:port``)
    app_id: str = "loopline"  # Faust app id = consumer group; tables' changelogs are prefixed with it
    role: str = "all"  # which agents run: all | ingest | fm
    partitions: int = 4  # partitions of every Loopline topic (and table changelog)
    data_dir: str = ".loopline-data"  # RocksDB tables live here; one folder per worker
    store: str = "rocksdb://"  # table store; memory:// for quick unit tests
    web_port: int = 6066  # HTTP views, bound to web_host
    web_host: str = "127.0.0.1"
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    session_timeout_s: float = 10.0  # short, so a killed member's partitions move quickly
    reach: ReachConfig = field(default_factory=ReachConfig)  # the reach sampler (``--reach-*`` flags)
    vm_variants: tuple = ("base", "loopfm+kd")  # the vm role's VM variants (model/verticals.py VARIANTS)
    vm_serve: str = "loopfm+kd"  # the variant ``POST /score/`` answers with
    loglevel: str = "warn"

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConfigError(f"role: must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.partitions, int) or not 1 <= self.partitions <= 256:
            raise ConfigError(f"partitions: must be an integer in 1..256, got {self.partitions!r}")
        if not 0 < self.web_port < 65536:
            raise ConfigError(f"web_port: must be in 1..65535, got {self.web_port}")

    def topic_partitions(self) -> dict[str, int]:
        return {name: self.partitions for name in TOPICS}


class OutputTopic:
    """Produce JSON values straight through the app's Kafka producer.

    Faust's ``Topic.send`` spends about 200 us of bookkeeping per message on this machine; this path
    about a tenth of that (``loopline bench ingest``). Returns the producer's delivery future."""

    def __init__(self, app: faust.App, name: str):
        self.app = app
        self.name = name

    async def send(self, key: str | None = None, value=None, partition: int | None = None,
                   headers: list | None = None):
        return await self.app.producer.send(self.name, key.encode() if key is not None else None,
                                            orjson.dumps(value), partition, None, headers)


async def read_topic(bootstrap: str, topic: str, partitions: int, quiet_ms: int = 400) -> list:
    """Every message of ``topic`` from the beginning.

    Reads past the reported end offsets until a poll comes back empty: Tansu was seen to report a
    partition's end offset one short of its last message."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out = []

        async def behind() -> bool:
            for tp in tps:
                if await consumer.position(tp) < end[tp]:
                    return True
            return False

        while True:
            batch = await consumer.getmany(timeout_ms=quiet_ms, max_records=10000)
            for msgs in batch.values():
                out.extend(msgs)
            if not batch and not await behind():
                return out
    finally:
        await consumer.stop()


def build_app(cfg: WorkerConfig) -> faust.App:
    """A configured Faust app with Loopline's topics and the role's agents registered."""
    os.makedirs(cfg.data_dir, exist_ok=True)
    app = faust.App(
        group_id(cfg),
        broker=f"kafka://{cfg.broker}",
        store=cfg.store,
        datadir=cfg.data_dir,
        topic_partitions=cfg.partitions,
        topic_replication_factor=1,
        web_host=cfg.web_host,
        web_bind=cfg.web_host,
        web_port=cfg.web_port,
        web_in_thread=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=cfg.session_timeout_s,
        broker_heartbeat_interval=max(1.0, cfg.session_timeout_s / 5),
        broker_rebalance_timeout=cfg.session_timeout_s * 2,
        producer_max_request_size=16 * 1024 * 1024,  # a dead-lettered 1 MB line is ~1.4 MB in base64
        consumer_max_fetch_size=4 * 1024 * 1024,
        table_cleanup_interval=3600.0,
        # Tansu 0.6 reports a partition's end offset as the first offset of its last batch + 1, so a
        # changelog's "highwater" can be short of the offset a table persisted; the ingest core keeps
        # its own consistency (state/ingest.py), and Faust's check would crash-loop the worker.
        recovery_consistency_check=False,
    )
    app.loopline_topics = {
        "events": app.topic("events", key_type=bytes, value_type=bytes, key_serializer="raw",
                            value_serializer="raw", partitions=cfg.partitions),
        **{name: OutputTopic(app, name) for name in TOPICS if name != "events"},
    }
    if cfg.role in ("all", "ingest"):
        from .ingest import register_ingest
        register_ingest(app, cfg)
    if cfg.role in ("all", "fm"):
        from .fm import register_fm
        register_fm(app, cfg)
    if cfg.role in ("all", "vm"):
        from .vm import register_vm
        register_vm(app, cfg)
    if cfg.role in ("all", "reach"):
        from .quality import register_quality
        register_quality(app, cfg)
        from .reach import register_reach
        register_reach(app, cfg)
    if cfg.role == "monitor":  # not in "all": a role of its own, in a consumer group of its own
        from .monitor import register_monitor
        register_monitor(app, cfg)
    return app
