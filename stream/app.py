"""The Faust app: settings, topics and tables shared by every role.

Public surface: ``WorkerConfig``, ``TOPICS``, ``build_app``, ``CachedView``.

Thin by design: agents (``stream/ingest.py``) call into ``loopline.state``; nothing here computes.
HTTP views answer through :class:`CachedView`: computed in a worker thread, never on the agents' event
loop, and reused for ``view_cache_s``. Faust's own ``/table/...`` and ``/router/`` endpoints (table
contents: user ids, attributes, segment labels; the cluster's addresses) are off unless
``web_tables`` asks for them.
Topics are created explicitly with the configured partition count before the worker starts
(``ops.broker.create_topics``): Tansu would otherwise auto-create them with 4 partitions and a table's
changelog could disagree with its source topic.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import faust
import orjson
from faust.utils import json as faust_json
from aiokafka import AIOKafkaConsumer, TopicPartition

from loopline.state.attribution import AttributionConfig
from loopline.state.events import key_partition
from loopline.errors import ConfigError, LooplineError
from loopline.model.fm_settings import RanksConfig, UserTableConfig
from loopline.settings import nested, parse_broker_url, setting
from loopline.state.reach import ReachConfig

from .broker_watch import RESET_POLICIES, BrokerWatch
from .heap import HeapKeeper
from .gc_watch import GcWatch
from .loop_watch import LoopWatch
from .supervise import Health, background_nice

__all__ = ["WorkerConfig", "TOPICS", "STATUS_TOPIC", "build_app", "make_table", "CONTROL_HEADER", "OutputTopic", "OutputBatch", "read_topic", "iter_topic", "follow_topic", "control_of", "group_id",
           "CachedView"]

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
# the fm and vm roles announce themselves here when they start and publish their models' metrics when
# an evaluation run ends (``replay --wait`` reads them: ops/replay.py collect_models); one partition
STATUS_TOPIC = "models.status"
CONTROL_HEADER = "loopline-control"  # b"end_of_log:<run id>" closes every window of that partition;
# to the fm role, ingest also sends b"watermark:<ingest partition>:<time>" (and end_of_log) to every
# partition of `examples` and `history.events`; after each training step's outputs, fm sends
# b"fmstep:<step>" to every partition of `examples.augmented` and `fm.embeddings` (the vm role's clock),
# and b"fmdone:<last step>:<id>" after the last step of an evaluation run

ROLES = ("all", "ingest", "fm", "vm", "reach", "monitor")
# Every single role gets a consumer group of its own (see group_id); role ``all`` keeps the app id.
OWN_GROUP_ROLES: tuple = ("ingest", "fm", "monitor", "reach", "vm")


def group_id(cfg: "WorkerConfig") -> str:
    """The Faust app id (= Kafka consumer group) of a worker. Members of one group split every topic
    they subscribe to, so a role that reads a topic another role also reads (vm and monitor both read
    ``examples.augmented``) runs as ``<app id>-<role>``: it then sees every partition of that topic, and
    several members of that one role still split the partitions among themselves. Ingest and fm have
    groups of their own too: in one group with members of another role, a second ingest member joining
    made Faust's assignor fail (``InconsistentGroupProtocolError`` for the fm member, seen on the
    embedded broker), so a role-split deployment could not scale ingest. A role ``all`` worker and a
    role ``ingest`` worker hold different tables (``<group>-attribution-changelog``): do not mix the two
    in one deployment."""
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


def _variants(text: str) -> tuple:
    from loopline.model.verticals import parse_variants  # torch: only when the flag is given
    return parse_variants(text)


@dataclass
class WorkerConfig:
    """Settings of one worker; those declared with ``setting`` are ``loopline worker`` flags (and
    environment variables, ``loopline/settings.py``)."""

    # host:port for aiokafka; the flag also takes kafka://host:port
    broker: str = setting("127.0.0.1:9092", "the Kafka broker, kafka://host:port", parse=parse_broker_url,
                          metavar="URL")
    # Faust app id = consumer group; tables' changelogs are prefixed with it
    app_id: str = setting("loopline", "the Faust app id (consumer group; prefix of the tables' changelogs)")
    role: str = setting("all", "which agents run: " + " | ".join(ROLES))
    partitions: int = setting(4, "partitions of every Loopline topic (and table changelog)")
    data_dir: str = setting(".loopline-data", "RocksDB tables and the history store live here; one folder per "
                                              "worker")
    store: str = "rocksdb://"  # table store; memory:// for quick unit tests
    # RocksDB memory of each Faust table, per partition (``make_table``): Faust's own defaults are three
    # 64 MiB memtables and a 2 GiB block cache per partition's database, so a worker's RSS kept growing
    # for hours under traffic (``loopline bench soak``) before reaching a bound of several GiB
    table_write_buffer_mb: int = 4
    table_block_cache_mb: int = 8
    web_port: int = setting(6066, "port of the HTTP views")
    web_host: str = setting("127.0.0.1", "address the HTTP views bind to (loopback by default)")
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    session_timeout_s: float = 10.0  # short, so a killed member's partitions move quickly
    reach: ReachConfig = nested(ReachConfig, prefix="reach-")  # the reach sampler (``--reach-*`` flags)
    # fm role: the FM over torch.distributed ranks (``--fm-ranks``, ``--fm-master``...; model/ranks.py)
    fm: RanksConfig = nested(RanksConfig, prefix="fm-")
    user_table: UserTableConfig = nested(UserTableConfig)  # fm role: its user table (``--embeddings``)
    # the vm role's VM variants (model/verticals.py VARIANTS)
    vm_variants: tuple = setting(("base", "loopfm+kd"), "vm role: the VM variants trained (comma-separated)",
                                 flag="variants", env="WORKER_VARIANTS", parse=_variants)
    vm_serve: str = setting("loopfm+kd", "vm role: the variant POST /score/ answers with", flag="serve")
    loglevel: str = setting("warn", "Faust's log level", choices=("crit", "error", "warn", "info", "debug"))
    # Started for evaluation (``replay``-driven runs, the demo, the tests): only then does an
    # ``end_of_log`` control message close windows and finish the fm stage. A production worker counts
    # the header and ignores it, so nobody who can write to ``events`` can end event time for good.
    evaluation: bool = setting(False, "honour end_of_log control messages (replay-driven evaluation runs); a "
                                      "production worker counts and ignores them")
    # HTTP views are computed in a worker thread (never on the agents' event loop) and each answer is
    # reused this long (``--view-cache``): a scraper polling every 100 ms costs one computation a second
    view_cache_s: float = setting(1.0, "seconds an HTTP view's answer is reused (computed off the event loop; 0: "
                                       "every request)", flag="view-cache")
    # an expired answer this young is served at once while a new one is computed (``--view-stale``; 0:
    # every expired answer waits for its computation)
    view_stale_s: float = setting(30.0, "seconds an expired answer is still served at once while a new one is "
                                        "computed (0: wait for it)", flag="view-stale")
    view_cache_keys: int = 64  # answers kept per view (one per query string, ``/reach?q=``); LRU beyond
    # Faust's /table/... (table contents: user ids, attributes, segment labels) and /router/ (every
    # worker's address) endpoints; off unless asked for (``--web-tables``)
    web_tables: bool = setting(False, "serve Faust's /table/... and /router/ endpoints (table contents; off by "
                                      "default)")
    # a role inside one batch this long is stalled: /healthz answers 503 (``--stall``)
    stall_s: float = setting(300.0, "seconds one batch may take before /healthz reports the role stalled (503)",
                             flag="stall")
    # what a worker does when the broker lost the data its state describes (stream/broker_watch.py):
    # stop (exit 75, state kept) or reset (empty the data dir, exit 75 for a clean restart)
    on_broker_reset: str = setting("stop", "when the broker lost the data this worker's state describes: stop "
                                           "(exit 75, state kept) or reset (empty the data dir, exit 75 for a "
                                           "clean restart)", choices=RESET_POLICIES)
    broker_check_s: float = 10.0  # seconds between checks of the broker's identity and end offsets
    # the C heap (stream/heap.py): at most this many malloc arenas, free pages given back every trim
    # seconds (0: never); without them RSS crept up under steady traffic while every structure was bounded
    heap_arenas: int = 2
    heap_trim_s: float = 30.0
    # how long a thread holds the GIL while another waits (``sys.setswitchinterval``; Python's default is
    # 5 ms). A torch forward on the event loop (``POST /score/``) gives the GIL up at every op and waits
    # up to this long to get it back whenever the training, reach or view thread runs Python: beside one
    # busy thread a 20-op forward took p90 89 ms at 5 ms and 3.8 ms at 1 ms (p99 144 / 28 ms). Beside
    # two training threads (fm and vm) in `bench soak`, a 20-candidate request still spent 40-90 ms in
    # its handler for 5-14 ms of its own CPU at 1 ms; at 0.2 ms, 10-50 ms (2-minute soaks, POST /score/
    # p99 130 -> 73 ms), with `bench e2e`'s worker time unchanged (44.0-45.7 s against 45.6-50.1 s)
    gil_switch_ms: float = 0.2
    # once every role is ready, freeze the objects start-up built out of the garbage collector's full
    # passes (stream/gc_watch.py): each pass walks every object and holds every thread meanwhile
    gc_freeze: bool = True
    # objects allocated (less freed) before the collector's young pass; Python's default is 700. A role
    # all worker on `bench e2e`'s 10,000 events made 1,621 young passes, 146 middle and 14 full ones,
    # 3.2 s with every thread held; at 20,000: 31, 2 and 4, 1.3 s (worker 41.9 s against 46.5)
    gc_young: int = 20_000
    # the training and reach threads run this many nice levels below the event loop (ingest, views,
    # ``POST /score/``), which then waits less for a core (stream/supervise.py ``background_nice``)
    background_nice: int = 10
    # how long the producer holds a message to batch it with the next ones (Faust's default: 0, so a
    # role writing a table sends nearly one produce request per changelog message; in `chaos
    # view_load` the reach worker spent 13% of its time in those requests' socket writes)
    producer_linger_ms: float = 5.0

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConfigError(f"role: must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.partitions, int) or not 1 <= self.partitions <= 256:
            raise ConfigError(f"partitions: must be an integer in 1..256, got {self.partitions!r}")
        if not 0 < self.web_port < 65536:
            raise ConfigError(f"web_port: must be in 1..65535, got {self.web_port}")
        if self.on_broker_reset not in RESET_POLICIES:
            raise ConfigError(f"on_broker_reset: must be one of {', '.join(RESET_POLICIES)}, got {self.on_broker_reset!r}")
        if not isinstance(self.broker_check_s, (int, float)) or not self.broker_check_s > 0:
            raise ConfigError(f"broker_check_s: must be a positive number of seconds, got {self.broker_check_s!r}")
        if not isinstance(self.stall_s, (int, float)) or not self.stall_s > 0:
            raise ConfigError(f"stall_s: must be a positive number of seconds, got {self.stall_s!r}")
        if not isinstance(self.view_cache_s, (int, float)) or not 0 <= self.view_cache_s <= 3600:
            raise ConfigError(f"view_cache_s: must be a number of seconds in 0..3600, got {self.view_cache_s!r}")
        for name in ("table_write_buffer_mb", "table_block_cache_mb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096:
                raise ConfigError(f"{name}: must be an integer number of MiB in 1..4096, got {v!r}")
        if isinstance(self.heap_arenas, bool) or not isinstance(self.heap_arenas, int) or self.heap_arenas < 0:
            raise ConfigError(f"heap_arenas: must be an integer >= 0 (0: glibc's default), got {self.heap_arenas!r}")
        if not isinstance(self.heap_trim_s, (int, float)) or not 0 <= self.heap_trim_s <= 86400:
            raise ConfigError(f"heap_trim_s: must be a number of seconds in 0..86400, got {self.heap_trim_s!r}")
        if isinstance(self.producer_linger_ms, bool) or not isinstance(self.producer_linger_ms, (int, float)) \
                or not 0 <= self.producer_linger_ms <= 1000:
            raise ConfigError(f"producer_linger_ms: must be a number of milliseconds in 0..1000, got {self.producer_linger_ms!r}")
        if isinstance(self.background_nice, bool) or not isinstance(self.background_nice, int) \
                or not 0 <= self.background_nice <= 19:
            raise ConfigError(f"background_nice: must be an integer in 0..19, got {self.background_nice!r}")
        if isinstance(self.gil_switch_ms, bool) or not isinstance(self.gil_switch_ms, (int, float)) \
                or not 0.05 <= self.gil_switch_ms <= 100:
            raise ConfigError(f"gil_switch_ms: must be a number of milliseconds in 0.05..100, got {self.gil_switch_ms!r}")
        if isinstance(self.gc_young, bool) or not isinstance(self.gc_young, int) or not 100 <= self.gc_young <= 10_000_000:
            raise ConfigError(f"gc_young: must be an integer number of objects in 100..10000000, got {self.gc_young!r}")
        if not isinstance(self.gc_freeze, bool):
            raise ConfigError(f"gc_freeze: must be true or false, got {self.gc_freeze!r}")
        if not isinstance(self.view_stale_s, (int, float)) or not 0 <= self.view_stale_s <= 86400:
            raise ConfigError(f"view_stale_s: must be a number of seconds in 0..86400, got {self.view_stale_s!r}")
        if not isinstance(self.view_cache_keys, int) or self.view_cache_keys < 1:
            raise ConfigError(f"view_cache_keys: must be an integer >= 1, got {self.view_cache_keys!r}")

    def topic_partitions(self) -> dict[str, int]:
        # fm.lease: one partition, held by the active fm member (stream/fm.py); models.status: one
        # partition, so a reader sees the roles' announcements and reports in the order they were sent
        return {**{name: self.partitions for name in TOPICS}, "fm.lease": 1, STATUS_TOPIC: 1}


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


class OutputBatch:
    """JSON messages for Loopline's own topics, gathered into one aiokafka batch per (topic, partition)
    and handed to the producer with ``send_batch``: about 9 us a message against 24-29 us through
    ``send`` (20,000 messages to the embedded broker), whose per-message future, partitioner call and
    accumulator entry a role publishing hundreds of outputs per step paid on the event loop. Within a
    partition the messages keep the order they were added in (a control mark after a step's outputs
    stays after them). ``send`` returns the batches' delivery futures.
    """

    def __init__(self, producer, partitions: dict[str, int]):
        self.producer = producer  # an aiokafka producer (a worker's: ``app.producer._ensure_producer()``)
        self.partitions = partitions
        self._open: dict[tuple[str, int], Any] = {}
        self._full: list[tuple[str, int, Any]] = []

    def add(self, topic: str, key: str | None = None, value=None, partition: int | None = None,
            headers: list | None = None) -> None:
        k = key.encode() if key is not None else None
        if partition is None:
            if k is None:
                raise ValueError(f"{topic}: a message needs a key or a partition")
            partition = key_partition(k, self.partitions[topic])
        v = orjson.dumps(value)
        batch = self._open.get((topic, partition))
        if batch is None:
            batch = self._open[(topic, partition)] = self.producer.create_batch()
        if batch.append(key=k, value=v, timestamp=None, headers=headers or []) is None:  # full
            self._full.append((topic, partition, batch))
            batch = self._open[(topic, partition)] = self.producer.create_batch()
            batch.append(key=k, value=v, timestamp=None, headers=headers or [])

    async def send(self) -> list:
        pending, self._full = self._full, []
        pending.extend((t, p, b) for (t, p), b in self._open.items())
        self._open = {}
        return [await self.producer.send_batch(b, t, partition=p) for t, p, b in pending]


async def iter_topic(bootstrap: str, topics: tuple | str, partitions: int, start: dict | None = None,
                     quiet_ms: int = 400, chunk: int = 5000):
    """The messages of ``topics`` from ``start`` (``{"topic/partition": offset}``; the beginning where
    absent) up to their current end, in chunks of at most ``chunk`` messages: a catch-up at start-up
    holds one chunk in memory, never a whole topic.

    Reads past the reported end offsets until a poll comes back empty: Tansu was seen to report a
    partition's end offset one short of its last message."""
    names = (topics,) if isinstance(topics, str) else tuple(topics)
    start = start or {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in names for p in range(partitions)]
        consumer.assign(tps)
        for tp in tps:
            at = start.get(f"{tp.topic}/{tp.partition}", 0)
            if at > 0:
                consumer.seek(tp, at)
            else:
                await consumer.seek_to_beginning(tp)
        end = await consumer.end_offsets(tps)

        async def behind() -> bool:
            for tp in tps:
                if await consumer.position(tp) < end[tp]:
                    return True
            return False

        while True:
            batch = await consumer.getmany(timeout_ms=quiet_ms, max_records=chunk)
            if batch:
                yield [m for msgs in batch.values() for m in msgs]
            elif not await behind():
                return
    finally:
        await consumer.stop()


async def follow_topic(bootstrap: str, topics: tuple, partitions: int, start: dict | None = None,
                       max_records: int = 4000, timeout_ms: int = 100):
    """Every message of ``topics`` from ``start`` on, for ever: chunks of at most ``max_records`` (an
    empty chunk after ``timeout_ms`` without data). For a role that reads every partition itself
    rather than the share a consumer group assigns it (the active fm)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        consumer.assign(tps)
        for tp in tps:
            at = (start or {}).get(f"{tp.topic}/{tp.partition}", 0)
            if at > 0:
                consumer.seek(tp, at)
            else:
                await consumer.seek_to_beginning(tp)
        while True:
            batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
            yield [m for msgs in batch.values() for m in msgs]
    finally:
        await consumer.stop()


async def read_topic(bootstrap: str, topic: str, partitions: int, quiet_ms: int = 400) -> list:
    """Every message of ``topic`` from the beginning (for finite reads: results, tests)."""
    out = []
    async for msgs in iter_topic(bootstrap, topic, partitions, quiet_ms=quiet_ms):
        out.extend(msgs)
    return out


_view_log = logging.getLogger("loopline.views")
_VIEW_THREADS: list = []  # the process's view executor, made on first use
_VIEW_THREADS_LOCK = threading.Lock()
_VIEWS: dict = {}  # name -> the process's CachedView of that name (served at /views)


def _view_executor() -> ThreadPoolExecutor:
    with _VIEW_THREADS_LOCK:
        if not _VIEW_THREADS:  # two threads: a slow fit does not hold every other view up
            _VIEW_THREADS.append(ThreadPoolExecutor(max_workers=2, thread_name_prefix="loopline-view"))
        return _VIEW_THREADS[0]


class CachedView:
    """One HTTP view's answers, computed off the event loop and reused for a moment.

    A view reads what the agents build (metrics over many predictions, a quality fit, the Prometheus
    text); on realistic state one took about 2 s, and on the agents' event loop that stalls consumption
    as long. ``await view.respond(web, compute, key)`` runs ``compute()`` and serializes its answer in a
    worker thread, shares one computation among concurrent requests for the same ``key``, and answers
    from the cache while the answer is younger than ``ttl_s``. At most ``max_keys`` answers are kept
    (least recently used go first, counted in ``evicted``).

    An expired answer younger than ``stale_s`` is still answered at once (``stale``, with its ``Age``
    header) while its recomputation runs in the background: a request never waits for a computation
    that takes longer than the poll interval (``/reach`` over a large sample, ``/quality``'s fit), so a
    view's latency is that of reading bytes, whatever the state's size. The next request gets the new
    answer. Only a key nobody asked for within ``stale_s`` waits for its computation.

    ``compute`` reads structures the loop keeps changing. The GIL keeps each single read whole, but
    iterating a dict while the loop adds to it raises (``dictionary changed size during iteration``):
    a computation that raises is retried in the thread (``retried``), and after ``retries`` tries run
    once on the loop (``on_loop``), where nothing changes under it; an error there is a real one.
    Loopline's own errors (``LooplineError``: a bad query) belong to the request and propagate at once.
    What must not be read from another thread (a Faust table: its store picks a partition from the
    loop's current event) is read by ``prepare`` on the loop, then ``compute(*prepare())`` in the thread.

    >>> calls = []
    >>> v = CachedView("demo", ttl_s=60.0)
    >>> async def twice():
    ...     return [await v.get(lambda: calls.append(1) or len(calls)) for _ in range(2)]
    >>> asyncio.run(twice()), v.stats["computed"], v.stats["cached"]
    ([b'1', b'1'], 1, 1)
    """

    def __init__(self, name: str, ttl_s: float = 1.0, max_keys: int = 64, retries: int = 3,
                 content_type: str = "application/json", stale_s: float = 0.0):
        self.name = name
        self.ttl_s = ttl_s
        self.stale_s = stale_s
        self.max_keys = max_keys
        self.retries = retries
        self.content_type = content_type  # JSON answers are serialized in the thread; others are bytes
        self._answers: OrderedDict = OrderedDict()  # key -> (monotonic time, answer)
        self._pending: dict = {}  # key -> the computation in flight (shared by concurrent requests)
        self.stats = {"computed": 0, "cached": 0, "stale": 0, "retried": 0, "on_loop": 0, "evicted": 0,
                      "ms_last": 0.0, "ms_max": 0.0}

    @classmethod
    def of(cls, name: str, cfg: "WorkerConfig", **kw) -> "CachedView":
        """A view cache with the worker's ``view_cache_s`` and ``view_cache_keys``, listed at ``/views``."""
        view = _VIEWS[name] = cls(name, ttl_s=cfg.view_cache_s, max_keys=cfg.view_cache_keys,
                                  stale_s=cfg.view_stale_s, **kw)
        return view

    async def respond(self, web, compute: Callable[..., Any], key: Any = None,
                      prepare: Callable[[], tuple] | None = None):
        """The view's HTTP response (``web``: the Faust view handling the request)."""
        answer, age = await self._lookup(compute, key, prepare)
        return web.bytes(answer, content_type=self.content_type, headers={"Age": str(int(age))})

    async def get(self, compute: Callable[..., Any], key: Any = None,
                  prepare: Callable[[], tuple] | None = None) -> Any:
        """``compute(*prepare())``'s answer (serialized when the view is JSON), at most ``ttl_s`` old, or
        at most ``stale_s`` while a newer one is being computed."""
        return (await self._lookup(compute, key, prepare))[0]

    async def _lookup(self, compute, key, prepare) -> tuple:
        """(answer, its age in seconds)."""
        hit = self._answers.get(key)
        age = None if hit is None else time.monotonic() - hit[0]
        if age is not None and age < self.ttl_s:
            self._answers.move_to_end(key)
            self.stats["cached"] += 1
            return hit[1], age
        fut = self._pending.get(key)
        if fut is None:
            fut = self._pending[key] = asyncio.ensure_future(self._compute(key, compute, prepare))
            fut.add_done_callback(lambda f, key=key: self._done(key, f))
        if age is not None and age < self.stale_s:
            self._answers.move_to_end(key)
            self.stats["stale"] += 1
            return hit[1], age
        # a client that goes away does not cancel the others' answer
        return await asyncio.shield(fut), 0.0

    def _done(self, key: Any, fut: asyncio.Future) -> None:
        if self._pending.get(key) is fut:
            del self._pending[key]
        if not fut.cancelled():
            fut.exception()  # retrieved: every waiter has it already

    def _run(self, compute: Callable[..., Any], args: tuple) -> Any:
        answer = compute(*args)
        if self.content_type == "application/json":
            answer = faust_json.dumps(answer)  # what Faust's web.json would send, made in the thread
            answer = answer if isinstance(answer, bytes) else answer.encode()
        return answer

    async def _compute(self, key: Any, compute: Callable[..., Any], prepare) -> Any:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for attempt in range(self.retries + 1):
            args = prepare() if prepare is not None else ()
            if attempt == self.retries:  # collided every time: on the loop, where nothing moves
                self.stats["on_loop"] += 1
                _view_log.warning("view %s: computed on the event loop after %d collisions", self.name, attempt)
                answer = self._run(compute, args)
                break
            try:
                answer = await loop.run_in_executor(_view_executor(), self._run, compute, args)
                break
            except LooplineError:
                raise
            except Exception as exc:  # noqa: BLE001 - a read that collided with the agents' writes
                self.stats["retried"] += 1
                _view_log.debug("view %s: retrying after %r", self.name, exc)
        ms = (time.perf_counter() - t0) * 1000
        self.stats["computed"] += 1
        self.stats["ms_last"] = round(ms, 3)
        self.stats["ms_max"] = round(max(self.stats["ms_max"], ms), 3)
        self._answers[key] = (time.monotonic(), answer)
        self._answers.move_to_end(key)
        while len(self._answers) > self.max_keys:
            self._answers.popitem(last=False)
            self.stats["evicted"] += 1
        return answer


def make_table(app: faust.App, cfg: WorkerConfig, name: str) -> faust.Table:
    """A role's Faust table (str keys, JSON values, ``None`` default), with bounded RocksDB memory: at
    most two memtables of ``table_write_buffer_mb`` and a ``table_block_cache_mb`` block cache per
    partition's database."""
    mb = 1 << 20
    return app.Table(name, default=None, partitions=cfg.partitions,
                     options={"write_buffer_size": cfg.table_write_buffer_mb * mb, "max_write_buffer_number": 2,
                              "block_cache_size": cfg.table_block_cache_mb * mb,
                              "block_cache_compressed_size": cfg.table_block_cache_mb * mb})


_ROCKSDB_MEMORY = {"memtables_mb": "rocksdb.cur-size-all-mem-tables", "block_cache_mb": "rocksdb.block-cache-usage",
                   "readers_mb": "rocksdb.estimate-table-readers-mem"}


def _int_property(db, prop: str) -> int:
    try:
        return db.property_int_value(prop) or 0
    except Exception:  # noqa: BLE001 - a database closed meanwhile (a store reopened) reports nothing
        return 0


def rocksdb_memory(app: faust.App) -> dict:
    """Per table, and per history store the roles registered in ``app.loopline_stores``: its open
    RocksDB databases and the memory RocksDB reports for them (MiB)."""
    out = {}
    named = [(name, list(getattr(table.data, "_dbs", {}).values())) for name, table in app.tables.items()]
    named += [(name, [db] if (db := getattr(store, "_db", None)) is not None else [])
              for name, store in getattr(app, "loopline_stores", {}).items()]
    for name, dbs in sorted(named):
        row = {"dbs": len(dbs)}
        for key, prop in _ROCKSDB_MEMORY.items():
            row[key] = round(sum(_int_property(db, prop) for db in dbs) / (1 << 20), 2)
        out[name] = row
    return out


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
        # Faust's /table/... and /router/ endpoints show table contents and the cluster's addresses
        web_tables_enabled=cfg.web_tables,
        web_router_enabled=cfg.web_tables,
        web_stats_enabled=False,
        web_graph_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=cfg.session_timeout_s,
        broker_heartbeat_interval=max(1.0, cfg.session_timeout_s / 5),
        broker_rebalance_timeout=cfg.session_timeout_s * 2,
        producer_linger=cfg.producer_linger_ms / 1000.0,
        producer_max_batch_size=256 * 1024,  # per partition: a batch's table writes in a few requests
        producer_max_request_size=16 * 1024 * 1024,  # a batch of messages; each one is <= 1 MiB (state/sizes.py)
        consumer_max_fetch_size=4 * 1024 * 1024,
        table_cleanup_interval=3600.0,
        # Tansu 0.6 reports a partition's end offset as the first offset of its last batch + 1, so a
        # changelog's "highwater" can be short of the offset a table persisted; the ingest core keeps
        # its own consistency (state/ingest.py), and Faust's check would crash-loop the worker.
        recovery_consistency_check=False,
        # No standby replicas: with two members of one role, Faust's assignor hands out standby
        # changelog partitions and then fails its own check (``AssertionError`` in ``on_assignment``,
        # seen with a second ingest member joining), killing the coordinator. Every role here rebuilds
        # its state from its changelog or topics when it takes a partition over.
        table_standby_replicas=0,
    )
    # every role's progress clock (stream/supervise.py): /healthz fails when one is stalled
    app.loopline_health = Health([], stall_s=cfg.stall_s)

    @app.page("/healthz")
    async def healthz(web, request):
        rep = app.loopline_health.report()
        return web.json(rep, status=200 if rep["live"] else 503)

    @app.page("/readyz")
    async def readyz(web, request):
        rep = app.loopline_health.report()
        return web.json(rep, status=200 if rep["ready"] else 503)

    heap = HeapKeeper(cfg.heap_arenas)
    sys.setswitchinterval(cfg.gil_switch_ms / 1000.0)
    gc.set_threshold(cfg.gc_young, *gc.get_threshold()[1:])
    background_nice(cfg.background_nice)
    loop_watch = LoopWatch(stall_ms=100.0)
    gc_watch = GcWatch().start()

    @app.task
    async def watch_loop() -> None:
        loop_watch.start()
        if not cfg.gc_freeze:
            return
        while not app.loopline_health.report()["ready"]:
            await asyncio.sleep(1.0)
        gc_watch.freeze()

    if cfg.heap_trim_s > 0:
        @app.timer(cfg.heap_trim_s)
        async def trim_heap() -> None:
            await asyncio.get_running_loop().run_in_executor(_view_executor(), heap.trim)

    @app.page("/views")
    async def views_view(web, request):
        """Each view's computations: how many, how long (``ms_max``), cache hits, collisions, evictions;
        the heap trims (``_heap``); how long the event loop was held, and where (``_loop``)."""
        out = {name: dict(v.stats, cached_keys=len(v._answers)) for name, v in sorted(_VIEWS.items())}
        # mallinfo2 walks every free chunk of the arenas (32 ms for 200,000 of them): in a view thread
        usage = await asyncio.get_running_loop().run_in_executor(_view_executor(), heap.usage)
        return web.json({**out, "_heap": {**heap.counts, "usage": usage}, "_loop": loop_watch.report(),
                         "_gc": gc_watch.report(), "_rocksdb": rocksdb_memory(app)})

    app.loopline_stores = {}  # name -> a role's own RocksDB store (a history store), for /views _rocksdb
    # every role's stored input positions ("topic/partition" -> next offset), for the broker watch
    app.loopline_positions = {}
    watch = BrokerWatch(cfg.broker, cfg.data_dir, cfg.on_broker_reset)

    @app.timer(cfg.broker_check_s)
    async def broker_check() -> None:
        positions = {tp: off for fn in app.loopline_positions.values() for tp, off in fn().items()}
        try:
            reason = await watch.check(positions)
        except Exception as exc:  # noqa: BLE001 - an unreachable broker is the client's to retry, not a reset
            _view_log.warning("broker check failed (%s: %s); will retry", type(exc).__name__, exc)
            return
        if reason is not None:
            watch.act(reason, await watch.identity())

    app.loopline_topics = {
        "events": app.topic("events", key_type=bytes, value_type=bytes, key_serializer="raw",
                            value_serializer="raw", partitions=cfg.partitions),
        **{name: OutputTopic(app, name) for name in (*TOPICS, STATUS_TOPIC) if name != "events"},
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
