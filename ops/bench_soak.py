"""``loopline bench soak``: a long-lived worker under steady, ever-new traffic; does its memory stay flat?

Public surface: ``SoakConfig``, ``SoakTraffic``, ``bench_soak``, ``bound_counters``.

Why: a worker is meant to run for months, and every structure that grows with traffic must have a
bound (issue "Long-lived workers I"). A replay of a finite log cannot show a leak; this benchmark
drives traffic whose ids never repeat for ``minutes`` of wall time and watches the process.

What runs: an embedded broker, one worker of role ``all`` (ingest, fm, vm, reach, quality) and, unless
``monitor=False``, one of role ``monitor`` (``/metrics`` and ``/drift`` live only there), both started
as production workers (``evaluation=False``: no ``end_of_log``, nothing ever finishes). A producer
thread sends, at ``rate`` events/s of wall time:

* impressions ``i<n>`` by users of whom a fraction ``new_user_share`` are brand new ``u<n>`` (the rest
  return from a ring of the ``returning_pool`` latest users), from a rotating set of campaigns ``c<n>``
  (one retires and a new one starts every ``campaign_every`` impressions), on the three usual verticals
  or (``new_vertical_share``) on one of a rotating set of new ones, with attribute values of which some
  are new (a new ``geo`` or ``interest`` of a new user, a new attribute name on some impressions);
* clicks (and some purchases) keyed by their impression id, routed like ``loopline replay`` routes them
  (:func:`~loopline.ops.eventlog.partition_for`);
* at an event time that runs ``speedup`` times faster than the wall clock, so attribution windows close,
  de-duplication horizons and reach epochs roll over many times within the run (the default 3,000: ten
  minutes are about 21 days of event time, three times the reach horizon's seven days).

Every ``sample_every`` seconds it reads each worker's RSS (``/proc/<pid>/status``) and the size of
its data directory; a second thread times one request to every view as often (a view that blocks the
worker for seconds then delays only the next view request, not the RSS samples): ``/ingest/``,
``/fm/``, ``/vm/``, ``/reach`` (the summary) and a ``/reach?q=`` query, ``/quality``, ``POST
/score/`` once a VM serves, and the monitor's ``/metrics`` and ``/drift``. The numbers that say
whether a bound bit are read generically from whatever the views serve (:func:`bound_counters`), so a
new bound shows up without a change here.

Figures: ``rss_mb_warm`` is the median RSS of the samples within a twentieth of the run of its first
third (warm-up is the first third), ``rss_mb_end`` the median of the last tenth's samples,
``rss_growth_after_warmup`` their relative difference. Medians, because a snapshot's serialization
buffers lift RSS by tens of MB for the one sample that catches them (every 20 s or so at the default
speed-up), and a mean of three samples moved by 5% with whether one of them did; the highest sample is
``rss_mb_max_after_warmup``; ``views_p99_ms`` is each view's 99th percentile over the whole run (with one
request every 3 s, ten minutes give 200: the p99 is about the second-worst), ``..._after_warmup`` the
same without the first third. Whether the worker kept up: ``ingest_lag_*`` (events sent, not yet read)
and ``fm_lag_*`` (examples labelled, not yet trained on; two views read moments apart, so it can dip
below 0) after warm-up and at the end. ``data_dir_breakdown_mb`` says which store holds the bytes;
``event_loop``, how long the worker's event loop was held at most, and where (``stream/loop_watch.py``);
``rocksdb``, the memory RocksDB reports for each table's databases at the end (memtables, block cache).

>>> t = SoakTraffic(SoakConfig(seed=1))
>>> evs = t.tick(1_700_000_000.0, 1_700_000_600.0, 50)
>>> len([e for e in evs if e[2].startswith(b'{"type":"impression"')]), t.distinct_users > 0
(50, True)
>>> bound_counters({"0": {"stats": {"evicted": 3, "read": 9}}, "1": {"stats": {"evicted": 2}}})
{'*.stats.evicted': 5}
"""

from __future__ import annotations

import asyncio
import heapq
import http.client
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from loopline.errors import ConfigError
from loopline.settings import setting
from loopline.stream.app import TOPICS

from .broker import EmbeddedBroker, create_topics
from .eventlog import partition_for
from .generate import AGES, DEVICES, GENDERS, GEOS, INTERESTS
from .worker import WorkerProcess

__all__ = ["SoakConfig", "SoakTraffic", "bench_soak", "bound_counters"]

# a numeric field whose key contains one of these words counts how often a bound bit
BOUND_WORDS = ("evicted", "overflow", "pruned", "capped", "repeats", "dropped", "expired")
CORE_VERTICALS = ("feed", "stories", "search")
REACH_QUERY = "gender = F and age in (18-24, 25-34)"
ALL_VIEWS = ("/ingest/", "/fm/", "/vm/", "/reach", "/reach?q=" + urllib.parse.quote(REACH_QUERY), "/quality")
VIEW_NAMES = {"/reach?q=" + urllib.parse.quote(REACH_QUERY): "/reach?q=..."}  # short keys in the JSON
MONITOR_VIEWS = ("/metrics", "/drift")


@dataclass(frozen=True)
class SoakConfig:
    """One soak run. A bad field raises :class:`~loopline.errors.ConfigError` naming it."""

    # wall-clock length of the traffic (start-up of the workers not included)
    minutes: float = setting(10.0, "soak: minutes of traffic", env="SOAK_MINUTES")
    # events/s of wall time (impressions and conversions). Each impression becomes a training example of
    # the FM and two VMs in the same process: on the 2-core machine the role-all
    # worker kept up at 25/s for ten minutes (ingest lag ~90 events, fm lag under 300 examples
    # throughout) and fell behind at 40/s (with other jobs running); ingest_lag_* and fm_lag_* say
    rate: float = setting(25.0, "soak: events/s of wall time", env="SOAK_RATE")
    speedup: float = setting(3000.0, "soak: event-time seconds per wall second", env="SOAK_SPEEDUP")
    sample_every: float = 3.0  # seconds between two samples of RSS, data directory and views
    partitions: int = 4
    monitor: bool = True  # also run a role-monitor worker (the only one serving /metrics and /drift)
    seed: int = 0
    start_ts: float = 1_700_000_000.0  # event time of the first event
    new_user_share: float = 0.2  # impressions by a brand-new user (the rest: a recent user returns)
    returning_pool: int = 5000  # returning users are drawn from this many latest users
    campaign_every: int = 400  # impressions between two campaign rotations (30 campaigns live at once)
    new_vertical_share: float = 0.05  # impressions on a rotating, ever-new vertical
    vertical_every: int = 300  # impressions between two new verticals: at the default rate the VM's
    # vertical cap (16) bites within the warm-up, so later growth is not learners still being added
    new_attr_share: float = 0.08  # impressions carrying an attribute name never seen before (reach
    # encodes at most 64 names per partition: at the default rate this bites within the warm-up too)
    base_ctr: float = 0.05  # about this many impressions are clicked
    purchase_rate: float = 0.1  # clicks followed by a purchase

    def __post_init__(self):
        for name, lo in (("minutes", 0.0), ("rate", 0.0), ("speedup", 0.0), ("sample_every", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= lo:
                raise ConfigError(f"{name}: must be a finite number > {lo:g}, got {v!r}")
        for name in ("new_user_share", "new_vertical_share", "new_attr_share", "base_ctr", "purchase_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ConfigError(f"{name}: must be a number in [0, 1], got {v!r}")
        for name in ("partitions", "returning_pool", "campaign_every", "vertical_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {v!r}")


class SoakTraffic:
    """Generated events with ever-new ids; ``tick`` returns one stretch of event time, in ts order.

    Memory stays bounded on this side: the returning users' ring and the pending conversions only."""

    LIVE_CAMPAIGNS = 30
    LIVE_NEW_VERTICALS = 3

    def __init__(self, cfg: SoakConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.pool: list = []  # ring of (user, attrs) of the latest users
        self.pool_at = 0
        self.pending: list = []  # heap of (ts, seq, impression id, kind, value)
        self.seq = 0
        self.impressions = self.conversions = self.distinct_users = 0
        self.new_values = 0  # attribute values (and names) never sent before
        self.logit0 = math.log(cfg.base_ctr / (1 - cfg.base_ctr)) if 0 < cfg.base_ctr < 1 else -30.0

    # -- ids ----------------------------------------------------------------------------------------
    def _new_user(self) -> tuple:
        r, n = self.rng, self.distinct_users + 1
        self.distinct_users = n
        attrs = {"age": r.choice(AGES), "gender": r.choice(GENDERS), "device": r.choice(DEVICES),
                 "geo": r.choice(GEOS), "interest": r.choice(INTERESTS)}
        if r.random() < 0.05:
            attrs["geo"] = f"X-{n}"
            self.new_values += 1
        if r.random() < 0.02:
            attrs["interest"] = f"topic{n}"
            self.new_values += 1
        user = (f"u{n}", attrs)
        if len(self.pool) < self.cfg.returning_pool:
            self.pool.append(user)
        else:
            self.pool[self.pool_at] = user
            self.pool_at = (self.pool_at + 1) % self.cfg.returning_pool
        return user

    def _user(self) -> tuple:
        if not self.pool or self.rng.random() < self.cfg.new_user_share:
            return self._new_user()
        return self.pool[self.rng.randrange(len(self.pool))]

    def _campaign(self) -> int:
        return self.impressions // self.cfg.campaign_every + self.rng.randrange(self.LIVE_CAMPAIGNS)

    def _vertical(self) -> str:
        if self.rng.random() < self.cfg.new_vertical_share:
            return f"v{self.impressions // self.cfg.vertical_every + self.rng.randrange(self.LIVE_NEW_VERTICALS)}"
        return self.rng.choice(CORE_VERTICALS)

    @property
    def distinct_campaigns(self) -> int:
        return self.impressions // self.cfg.campaign_every + self.LIVE_CAMPAIGNS if self.impressions else 0

    @property
    def distinct_verticals(self) -> int:
        return len(CORE_VERTICALS) + self.impressions // self.cfg.vertical_every + self.LIVE_NEW_VERTICALS

    # -- events -------------------------------------------------------------------------------------
    def tick(self, sim_from: float, sim_to: float, n_impressions: int) -> list:
        """``n_impressions`` impressions spread over ``[sim_from, sim_to)`` and every conversion due
        before ``sim_to``, as ``(ts, key, raw)`` sorted by ts."""
        r, out = self.rng, []
        for ts in sorted(r.uniform(sim_from, sim_to) for _ in range(n_impressions)):
            self.impressions += 1
            iid = f"i{self.impressions}"
            user, attrs = self._user()
            if r.random() < self.cfg.new_attr_share:
                self.new_values += 1
                attrs = {**attrs, f"k{self.new_values}": "1"}
            c = self._campaign()
            ts = round(ts, 3)
            ev = {"type": "impression", "id": iid, "ts": ts, "user": user, "ad": f"a{c}_{r.randrange(4)}",
                  "campaign": f"c{c}", "vertical": self._vertical(), "attrs": attrs,
                  "features": {"slot": str(1 + r.randrange(6)), "hour": str(int(ts // 3600) % 24)}}
            out.append((ts, iid.encode(), orjson.dumps(ev)))
            # a learnable signal: interest x campaign affinity in [-1.5, 1.5]
            aff = (zlib.crc32(f"{attrs['interest']}|{c % 7}".encode()) % 1000) / 1000 * 3 - 1.5
            if r.random() < 1 / (1 + math.exp(-(self.logit0 + aff))):
                t_click = ts + 1 + r.expovariate(1 / 120)
                self._schedule(t_click, iid, "click", 0.0)
                if r.random() < self.cfg.purchase_rate:
                    self._schedule(t_click + 60 + r.expovariate(1 / 3600), iid, "purchase",
                                   round(r.uniform(1, 100), 2))
        while self.pending and self.pending[0][0] < sim_to:
            ts, _, iid, kind, value = heapq.heappop(self.pending)
            self.conversions += 1
            ev = {"type": "conversion", "id": f"v{self.conversions}", "ts": ts, "impression": iid, "kind": kind}
            if value:
                ev["value"] = value
            out.append((ts, iid.encode(), orjson.dumps(ev)))
        out.sort(key=lambda e: e[0])
        return out

    def _schedule(self, ts: float, iid: str, kind: str, value: float) -> None:
        self.seq += 1
        heapq.heappush(self.pending, (round(ts, 3), self.seq, iid, kind, value))

    @property
    def events_per_impression(self) -> float:
        return 1 + self.cfg.base_ctr * (1 + self.cfg.purchase_rate)


class _Producer(threading.Thread):
    """Sends the traffic at ``rate`` events/s of wall time in 0.1 s ticks, in its own event loop."""

    TICK_S = 0.1

    def __init__(self, bootstrap: str, cfg: SoakConfig, traffic: SoakTraffic):
        super().__init__(name="soak-producer", daemon=True)
        self.bootstrap, self.cfg, self.traffic = bootstrap, cfg, traffic
        self.stop_now = threading.Event()
        self.sent = 0
        self.sim_ts = cfg.start_ts
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - the main thread reports it
            self.error = exc

    async def _main(self) -> None:
        from aiokafka import AIOKafkaProducer
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, request_timeout_ms=30000)
        await producer.start()
        try:
            cfg, imp_rate = self.cfg, self.cfg.rate / self.traffic.events_per_impression
            t0 = last = time.monotonic()
            owed = 0.0
            while not self.stop_now.is_set():
                now = time.monotonic()
                owed += (now - last) * imp_rate
                n = int(owed)
                owed -= n
                sim_to = cfg.start_ts + (now - t0) * cfg.speedup
                evs = self.traffic.tick(self.sim_ts, sim_to, n)
                self.sim_ts, last = sim_to, now
                futs = [await producer.send("events", raw, key=key,
                                            partition=partition_for(key, raw, cfg.partitions))
                        for _ts, key, raw in evs]
                await asyncio.gather(*futs)
                self.sent += len(evs)
                await asyncio.sleep(max(0.0, self.TICK_S - (time.monotonic() - now)))
        finally:
            await producer.stop()


# -- sampling -----------------------------------------------------------------------------------------
def bound_counters(obj, path: str = "", words: tuple = BOUND_WORDS, out: dict | None = None) -> dict:
    """Every numeric field under ``obj`` whose key contains one of ``words``, keyed by its dotted path
    with partition-like (all-digit) parts written ``*`` and summed over them."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            k = str(k)
            p = f"{path}.{'*' if k.isdigit() else k}" if path else ("*" if k.isdigit() else k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if any(w in k.lower() for w in words) and math.isfinite(v):
                    out[p] = out.get(p, 0) + v
            else:
                bound_counters(v, p, words, out)
    elif isinstance(obj, list):
        for v in obj:
            bound_counters(v, f"{path}.*" if path else "*", words, out)
    return out


_PROM_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def _prometheus_bounds(text: str) -> dict:
    out: dict = {}
    for line in text.splitlines():
        m = _PROM_LINE.match(line)
        if m and any(w in m.group(1) for w in BOUND_WORDS):
            try:
                out[m.group(1)] = out.get(m.group(1), 0) + float(m.group(3))
            except ValueError:
                pass
    return out


def _rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """A process's resident memory in MiB: all of it (``VmRSS``), or its ``RssAnon`` part (the heaps:
    what a leak grows) or ``RssFile`` part (mapped files, mostly the shared libraries' pages: these grow
    as code paths run for the first time, and the kernel can drop them)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _dir_mb(path: str) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # RocksDB removed it meanwhile
                pass
    return total / 2**20


def _dir_breakdown(path: str) -> dict:
    """MB under each top-level entry of ``path`` (which store grows), largest first."""
    sizes = {}
    for entry in os.scandir(path):
        sizes[entry.name] = _dir_mb(entry.path) if entry.is_dir() else entry.stat().st_size / 2**20
    return {k: round(v, 2) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])}


def _request(port: int, path: str, body: bytes | None = None, timeout: float = 30.0):
    """(milliseconds, status, body) of one request on a fresh connection; status 0 when it failed."""
    t0 = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("POST" if body is not None else "GET", path, body=body,
                         headers={"Content-Type": "application/json"} if body is not None else {})
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
        finally:
            conn.close()
    except OSError:
        data, status = b"", 0
    return (time.perf_counter() - t0) * 1000, status, data


class _Prober(threading.Thread):
    """Times one request to every view every ``every`` seconds, in its own thread (a view that blocks
    for seconds must not delay the RSS samples), and keeps the latest bodies and bound counters."""

    def __init__(self, worker: WorkerProcess, monitor: WorkerProcess | None, traffic: SoakTraffic, every: float):
        super().__init__(name="soak-views", daemon=True)
        self.worker, self.monitor, self.traffic, self.every = worker, monitor, traffic, every
        self.t0 = time.monotonic()
        self.stop_now = threading.Event()
        self.latency: dict[str, list] = {}  # view -> [(seconds since t0, ms)]
        self.errors: dict[str, int] = {}
        self.bounds: dict[str, float] = {}
        self.latest: dict[str, dict] = {}  # the last JSON body of each view of the role-all worker
        self.rounds = 0

    def run(self) -> None:
        while not self.stop_now.is_set():
            t = time.monotonic()
            self.probe()
            self.stop_now.wait(max(0.0, self.every - (time.monotonic() - t)))

    def _time(self, name: str, port: int, path: str, body: bytes | None = None):
        t = time.monotonic() - self.t0
        ms, status, data = _request(port, path, body)
        if not 200 <= status < 300:
            self.errors[name] = self.errors.get(name, 0) + 1
            return None
        self.latency.setdefault(name, []).append((round(t, 2), round(ms, 2)))
        return data

    def percentiles(self, q: float, after: float = 0.0) -> dict:
        return {k: _pct([ms for t, ms in v if t >= after], q) for k, v in self.latency.items()
                if any(t >= after for t, _ in v)}

    def probe(self) -> None:
        """One request to each view (and one ``POST /score/`` once a VM serves). The order rotates: a
        worker whose event loop is blocked makes whichever view comes first wait."""
        self.rounds += 1
        k = self.rounds % len(ALL_VIEWS)
        for path in ALL_VIEWS[k:] + ALL_VIEWS[:k]:
            data = self._time(VIEW_NAMES.get(path, path), self.worker.port, path)
            if data is not None:
                self.latest[path] = body = orjson.loads(data)
                for k, v in bound_counters(body).items():
                    self.bounds[f"{path.split('?')[0]}:{k}"] = v
        serving = sorted(((self.latest.get("/vm/") or {}).get("serving") or {}).get("verticals") or [])
        if serving:
            req = {"user": f"u{max(1, self.traffic.distinct_users)}", "vertical": serving[0],
                   "attrs": {"age": "25-34", "gender": "F"},
                   "candidates": [{"ad": f"a{c}_0", "campaign": f"c{c}"} for c in range(20)]}
            self._time("POST /score/", self.worker.port, "/score/", orjson.dumps(req))
        if self.monitor is not None:
            for path in MONITOR_VIEWS:
                data = self._time(path, self.monitor.port, path)
                if data is None:
                    continue
                found = _prometheus_bounds(data.decode(errors="replace")) if path == "/metrics" \
                    else bound_counters(orjson.loads(data))
                for k, v in found.items():
                    self.bounds[f"{path}:{k}"] = v

    def counts(self) -> dict:
        """Progress of the pipeline, from the latest views: events read, examples labelled, trained."""
        parts = [v for k, v in (self.latest.get("/ingest/") or {}).items() if k.isdigit() and isinstance(v, dict)]
        return {"ingested": sum(v.get("read", 0) + v.get("redelivered", 0) for v in parts),
                "labelled": sum((v.get("stats") or {}).get(k, 0) for v in parts for k in ("positives", "negatives")),
                "fm_examples": ((self.latest.get("/fm/") or {}).get("counts") or {}).get("examples")}


def _sample(t: float, producer: "_Producer", prober: _Prober, data_dir: str) -> dict:
    row = {"t": round(t, 2), "events": producer.sent, "users": producer.traffic.distinct_users,
           "event_time": round(producer.sim_ts, 1), **prober.counts(),
           "rss_mb": _rss_mb(prober.worker.proc.pid), "rss_anon_mb": _rss_mb(prober.worker.proc.pid, "RssAnon"),
           "data_dir_mb": round(_dir_mb(data_dir), 2), **_heap_parts(prober.worker)}
    row["ingest_lag"] = row["events"] - row["ingested"]  # sent, not yet read by ingest
    row["fm_lag"] = row["labelled"] - (row["fm_examples"] or 0)  # labelled, not yet trained on
    if prober.monitor is not None:
        row["monitor_rss_mb"] = _rss_mb(prober.monitor.proc.pid)
    return row


def _heap_parts(worker: WorkerProcess) -> dict:
    """Where the worker's memory is, by its own ``/views``: what the program holds in malloc
    (``heap_in_use_mb``), what the allocator keeps free in its arenas (``heap_free_mb``: fragmentation),
    and RocksDB's memtables and block caches (allocated through malloc too, so part of the first)."""
    views = worker.view("/views") or {}
    usage = (views.get("_heap") or {}).get("usage") or {}
    rocks = sum(row.get(k, 0) for row in (views.get("_rocksdb") or {}).values()
                for k in ("memtables_mb", "block_cache_mb", "readers_mb"))
    return {"heap_in_use_mb": usage.get("in_use_mb"), "heap_free_mb": usage.get("free_mb"),
            "rocksdb_mb": round(rocks, 1) if views else None}


# -- the run ------------------------------------------------------------------------------------------
def _median_within(samples: list, lo: float, hi: float, key: str) -> float | None:
    """The median of ``key`` over the samples taken in [lo, hi], or the nearest one's value when none was
    (a short run samples less often than the stretch is long)."""
    vals = [s[key] for s in samples if lo <= s["t"] <= hi and s.get(key) is not None]
    if not vals:
        near = sorted((s for s in samples if s.get(key) is not None), key=lambda s: abs(s["t"] - (lo + hi) / 2))
        vals = [near[0][key]] if near else []
    return round(statistics.median(vals), 1) if vals else None


def _warm(samples: list, duration: float, key: str) -> float | None:
    """``key`` at the end of warm-up: the median of the samples within a twentieth of the run of its third."""
    return _median_within(samples, duration / 3 - duration / 20, duration / 3 + duration / 20, key)


def _growth(samples: list, duration: float, key: str) -> dict:
    """RSS after warm-up and at the end, each a median over a stretch of samples (module docstring)."""
    warm, end = _warm(samples, duration, key), _median_within(samples, samples[-1]["t"] - duration / 10,
                                                              samples[-1]["t"], key)
    after = [s[key] for s in samples if s["t"] >= duration / 3 and s.get(key) is not None]
    return {"rss_mb_warm": warm, "rss_mb_end": end,
            "rss_growth_after_warmup": round((end - warm) / warm, 4) if warm and end is not None else None,
            "rss_mb_max_after_warmup": round(max(after), 1) if after else None}


def _pct(xs: list, q: float) -> float:
    s = sorted(xs)
    i = (len(s) - 1) * q / 100
    lo, hi = math.floor(i), math.ceil(i)
    return round(s[lo] + (s[hi] - s[lo]) * (i - lo), 2)


def _plot(samples: list, latency: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [s["t"] / 60 for s in samples]
    fig, (ax1, ax2, ax4) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax1.plot(t, [s["rss_mb"] for s in samples], label="worker (role all)")
    ax1.plot(t, [s.get("rss_anon_mb") for s in samples], color="C0", ls="--", lw=0.8, label="its heaps (RssAnon)")
    for key, label in (("heap_in_use_mb", "malloc: in use"), ("heap_free_mb", "malloc: free in arenas"),
                       ("rocksdb_mb", "RocksDB buffers")):
        ax1.plot(t, [s.get(key) for s in samples], lw=0.8, label=label)
    if any(s.get("monitor_rss_mb") for s in samples):
        ax1.plot(t, [s.get("monitor_rss_mb") for s in samples], label="worker (role monitor)")
    ax1.axvline(samples[-1]["t"] / 60 / 3 if samples else 0, color="grey", ls=":", label="end of warm-up")
    ax1.set_ylabel("RSS (MB)")
    ax1.legend(loc="lower right")
    ax2.plot(t, [s["data_dir_mb"] for s in samples], color="C2", label="data directory (MB)")
    ax2.set_ylabel("data directory (MB)")
    ax3 = ax2.twinx()
    ax3.plot(t, [s["users"] for s in samples], color="C3", ls="--", label="distinct users")
    ax3.set_ylabel("distinct users")
    for name, pts in latency.items():
        ax4.plot([p[0] / 60 for p in pts], [p[1] for p in pts], lw=0.8, label=name)
    ax4.set_yscale("log")
    ax4.set_ylabel("view latency (ms)")
    ax4.legend(fontsize=7, ncol=3, loc="upper left")
    ax4.set_xlabel("minutes")
    fig.suptitle("loopline bench soak")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _clock(s: float) -> str:
    return f"{int(s // 60)}:{int(s % 60):02d}"


def bench_soak(cfg: SoakConfig = SoakConfig(), out_path: str | None = None, progress: bool = True,
               workdir: str | None = None) -> dict:
    """Run the soak and return (and with ``out_path`` write, beside a PNG plot) its figures."""
    duration = cfg.minutes * 60
    with tempfile.TemporaryDirectory(prefix="loopline-soak-") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        with EmbeddedBroker(log_path=str(work / "tansu.log")) as broker:
            create_topics(broker.bootstrap, {t: cfg.partitions for t in TOPICS})
            worker = WorkerProcess(broker.url, str(work / "worker"), cfg.partitions, evaluation=False).start()
            monitor = WorkerProcess(broker.url, str(work / "monitor"), cfg.partitions, evaluation=False,
                                    extra=("--role", "monitor")).start() if cfg.monitor else None
            producer = prober = None
            try:
                t_start = time.monotonic()
                worker.wait_ready(timeout=180)
                if monitor is not None:
                    _wait_view(monitor, "/drift", 180)
                startup_s = time.monotonic() - t_start
                if progress:
                    print(f"bench soak: workers up in {startup_s:.0f}s; {cfg.minutes:g} min of "
                          f"traffic at {cfg.rate:g} events/s, event time x{cfg.speedup:g}", file=sys.stderr, flush=True)
                traffic = SoakTraffic(cfg)
                producer = _Producer(broker.bootstrap, cfg, traffic)
                prober = _Prober(worker, monitor, traffic, cfg.sample_every)
                samples: list = []
                t0 = prober.t0 = time.monotonic()
                producer.start()
                prober.start()
                next_sample, next_line = t0, t0 + 10
                while True:
                    now = time.monotonic()
                    for w in (worker, monitor):
                        if w is not None and w.proc.poll() is not None:
                            raise RuntimeError(f"a worker exited with {w.proc.returncode}:\n{w.tail()}")
                    if producer.error is not None:
                        raise RuntimeError(f"the producer failed: {producer.error!r}")
                    if now >= next_sample:
                        samples.append(_sample(now - t0, producer, prober, str(work / "worker")))
                        next_sample = max(next_sample + cfg.sample_every, time.monotonic())
                    if progress and now >= next_line:
                        _progress(samples[-1], duration)
                        next_line = max(next_line + 10, time.monotonic())
                    if now - t0 >= duration:
                        break
                    time.sleep(max(0.0, min(next_sample, t0 + duration) - time.monotonic()))
                producer.stop_now.set()
                producer.join(60)
                elapsed = time.monotonic() - t0
                prober.stop_now.set()
                prober.join(120)
                prober.probe()  # after the last send
                samples.append(last := _sample(elapsed, producer, prober, str(work / "worker")))
                # where the event loop was held longest, and the heap trims (the worker's /views)
                internals = {k: v for k, v in (worker.view("/views") or {}).items() if k in ("_loop", "_heap", "_rocksdb")}
                monitor_dir = _dir_mb(str(work / "monitor")) if monitor else None
                breakdown = _dir_breakdown(str(work / "worker"))
            finally:
                for th in (producer, prober):
                    if th is not None:
                        th.stop_now.set()
                        th.join(60)
                t_stop = time.monotonic()
                with ThreadPoolExecutor(2) as pool:  # both stop at once: each may take its grace period
                    stopped = pool.map(lambda w: w.stop(), [w for w in (worker, monitor) if w is not None])
                    stops = dict(zip(("worker", "monitor"), stopped))
                stop_s = time.monotonic() - t_stop
    out = {
        "benchmark": "soak", "config": asdict(cfg), "seconds": round(elapsed, 1),
        "events": producer.sent, "events_per_s": round(producer.sent / elapsed, 1),
        "impressions": traffic.impressions, "conversions": traffic.conversions,
        "distinct_users": traffic.distinct_users, "distinct_campaigns": traffic.distinct_campaigns,
        "distinct_verticals": traffic.distinct_verticals, "new_attribute_values": traffic.new_values,
        "event_days": round((producer.sim_ts - cfg.start_ts) / 86400, 2),
        **_growth(samples, elapsed, "rss_mb"),
        # the same for the anonymous part alone (the heaps, without the libraries' pages)
        "rss_anon": {k.replace("rss_mb_", "mb_").replace("rss_", ""): v
                     for k, v in _growth(samples, elapsed, "rss_anon_mb").items()},
        # the same for malloc's figures: live allocations (RocksDB's among them) and free space in the arenas
        **{part: {k.replace("rss_mb_", "mb_").replace("rss_", ""): v for k, v in _growth(samples, elapsed, key).items()}
           for part, key in (("heap_in_use", "heap_in_use_mb"), ("heap_free", "heap_free_mb"),
                             ("rocksdb_buffers", "rocksdb_mb"))},
        "data_dir_mb": last["data_dir_mb"], "data_dir_breakdown_mb": breakdown,
        "ingested": last["ingested"], "labelled_examples": last["labelled"], "fm_examples": last["fm_examples"],
        # did the worker keep up? lags after warm-up and at the end (growing: the rate is too high)
        "ingest_lag_warm": _warm(samples, elapsed, "ingest_lag"), "ingest_lag_end": last["ingest_lag"],
        "fm_lag_warm": _warm(samples, elapsed, "fm_lag"), "fm_lag_end": last["fm_lag"],
        "views_p99_ms": prober.percentiles(99), "views_p50_ms": prober.percentiles(50),
        "views_max_ms": prober.percentiles(100),
        "views_p99_ms_after_warmup": prober.percentiles(99, after=elapsed / 3),
        "view_requests": {k: len(v) for k, v in prober.latency.items()},
        "view_latency_ms": prober.latency,  # view -> [[seconds into the run, ms], ...]
        "view_errors": prober.errors,
        "bounds": {k: v for k, v in sorted(prober.bounds.items()) if v},
        "event_loop": internals.get("_loop"), "heap": internals.get("_heap"), "rocksdb": internals.get("_rocksdb"),
        "bounds_watched": sorted(prober.bounds),
        "stops": stops, "startup_s": round(startup_s, 1), "stop_s": round(stop_s, 1), "samples": samples,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    if monitor is not None:
        m = _growth(samples, elapsed, "monitor_rss_mb")
        out["monitor"] = {**m, "data_dir_mb": round(monitor_dir, 2)}
    if out_path:
        p = Path(out_path)
        _plot(samples, prober.latency, p.with_suffix(".png"))
        out["plot"] = str(p.with_suffix(".png"))
        p.write_text(json.dumps(out, indent=2) + "\n")
    return out


def _wait_view(w: WorkerProcess, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if w.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {w.proc.returncode}:\n{w.tail()}")
        if _request(w.port, path, timeout=5)[1] == 200:
            return
        time.sleep(0.3)
    raise RuntimeError(f"worker not serving {path} after {timeout:.0f}s:\n{w.tail()}")


def _progress(s: dict, duration: float) -> None:
    t = s["t"]
    mon = f" (monitor {s['monitor_rss_mb']:.0f} MB)" if s.get("monitor_rss_mb") else ""
    print(f"bench soak: {_clock(t)}/{_clock(duration)} ETA {_clock(max(0.0, duration - t))}: {s['events']:,} events "
          f"({s['events'] / max(t, 1e-9):,.0f}/s), ingested {s['ingested']:,}, labelled {s['labelled']:,}, "
          f"fm trained {s['fm_examples'] or 0:,}, "
          f"users {s['users']:,}, rss {s['rss_mb'] or 0:.0f} MB{mon}, data {s['data_dir_mb']:.0f} MB",
          file=sys.stderr, flush=True)
