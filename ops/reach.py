"""``loopline reach``: reach estimates from running workers, the stream table, a sample file or an
event log.

Public surface: ``ReachCommand``, ``run_reach``, ``ask_workers``, ``ask_stream``, ``samples_from_log``,
``quality_adjusted``.

The sampler's flags (``--budget-users``, ``--epoch``, ``--horizon``, ``--min-per-stratum``) are
``ReachConfig``'s, the same settings as a worker's ``--reach-...`` flags (and environment variables).

* ``loopline reach QUERY --workers http://127.0.0.1:P1,http://127.0.0.1:P2`` asks every worker's
  ``GET /reach`` at once, each within ``--timeout`` seconds, and merges their per-stratum sums. A worker
  that does not answer in time (down, or hung) makes the answer partial: ``partial: true``, the worker
  under ``workers`` with the reason, and the partitions nobody answered for under
  ``missing_partitions``; the estimate then covers only the answered partitions. Never a hang.
* ``loopline reach QUERY --broker kafka://...`` uses the stream-table interface: it sends the query to
  every partition of ``reach.queries`` and reads the partitions' shares from the ``reach.answers``
  table's changelog, partial after ``--timeout`` as above.
* ``loopline reach QUERY --events FILE`` builds the samples in one pass over a log, offline, through the
  same ingest code and partitioning as the workers (``--save-sample FILE`` keeps them);
  ``--sample FILE`` answers from a saved sample. ``--queries FILE`` (one query per line; blank lines
  and ``#`` comments skipped) answers each line from the one sample and prints one JSON object per
  line, with the query text (a bad query gives an object with ``error``).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass

import orjson

from loopline.errors import ConfigError
from loopline.settings import argument, nested, same_as, setting
from loopline.state.reach import ReachConfig
from loopline.stream.app import WorkerConfig

__all__ = ["ReachCommand", "run_reach", "ask_workers", "ask_stream", "samples_from_log", "quality_adjusted"]


@dataclass(frozen=True)
class ReachCommand:
    """``loopline reach``: the query (or a file of them), where the answer comes from, and the sampler."""

    query: str | None = argument(None, 'e.g. "gender = F and age in (18-24, 25-34)"', positional=True)
    workers: str | None = argument(None, "running reach workers (http://127.0.0.1:PORT,...)", metavar="URL,...",
                                   exclusive="source", required=True)
    broker: str | None = argument(None, "ask through reach.queries / reach.answers (kafka://host:port)",
                                  metavar="URL", exclusive="source", required=True)
    events: str | None = argument(None, "build the sample offline from an event log", metavar="FILE",
                                  exclusive="source", required=True)
    sample: str | None = argument(None, "a sample file written by --save-sample", metavar="FILE",
                                  exclusive="source", required=True)
    queries: str | None = argument(None, "one query per line; prints one JSON object per line", metavar="FILE")
    save_sample: str | None = argument(None, "with --events: write the sample file", metavar="FILE")
    timeout_s: float = setting(2.0, "seconds to wait for workers (then: partial)", flag="timeout",
                               env="REACH_TIMEOUT")
    partitions: int = same_as(WorkerConfig, "partitions")
    app_id: str = same_as(WorkerConfig, "app_id")
    worker_role: str = setting("reach", "with --broker: the workers' role", choices=("reach", "all"))
    sampler: ReachConfig = nested(ReachConfig)
    quality: bool = setting(False, "adjust answers of rules naming a source's segment (seg.SOURCE.SEGMENT = yes) by "
                                   "that source's fitted quality: from the same --events log or the same --workers",
                            env="REACH_QUALITY")

    def __post_init__(self):
        if self.query is None and self.queries is None:
            raise ConfigError("query: give a query, or --queries FILE")
        if self.query is not None and self.queries is not None:
            raise ConfigError("queries: give either a query or --queries FILE, not both")


def samples_from_log(path: str, partitions: int, cfg, progress: bool = False) -> list:
    """Per-partition samples of a log: ingest as the workers do (validation, de-duplication), then
    each accepted impression to the sampler of its user's ``audience`` partition."""
    from loopline.state.reach import ReachSampler

    from .evaluate import ingest_outputs
    from .eventlog import partition_for, read_log
    try:
        records = read_log(path)
    except OSError as exc:
        raise ConfigError(f"events: cannot read {path!r}: {exc.strerror}") from None
    samplers = [ReachSampler(cfg, q, partitions) for q in range(partitions)]
    for o in ingest_outputs(records, partitions, progress="reach" if progress else None, audience=True):
        v = o.value
        if o.kind == "audience" and v.get("type") == "impression":
            samplers[partition_for(v["user"].encode(), b"", partitions)].observe(v["user"], v["ts"], v["attrs"])
        elif o.kind == "audience" and v.get("type") == "segment":
            samplers[partition_for(v["user"].encode(), b"", partitions)].assert_segment(
                v["user"], v["source"], v["segment"])
    return [s.snapshot() for s in samplers]


_POOL = None  # threads for the fan-out, kept between calls


def ask_workers(urls: list[str], query: str, timeout: float = 2.0, n_min: int = 30) -> dict:
    """Fan a query out to every worker's ``/reach`` and merge; partial (and saying so) when a worker
    does not answer within ``timeout`` seconds."""
    import urllib.error
    import urllib.parse
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from loopline.state.reach import finish, merge_stats
    from loopline.state.reach_query import parse_query

    q = parse_query(query)  # a bad query fails here, once, before any worker is asked

    def one(url: str):
        full = f"{url.rstrip('/')}/reach?q={urllib.parse.quote(q.text)}"
        try:
            with urllib.request.urlopen(full, timeout=timeout) as r:
                return url, orjson.loads(r.read()), None
        except urllib.error.HTTPError as exc:
            return url, None, f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            return url, None, f"no answer ({getattr(exc, 'reason', exc)})"

    global _POOL
    if _POOL is None or _POOL._max_workers < len(urls):
        _POOL = ThreadPoolExecutor(max_workers=max(8, len(urls)), thread_name_prefix="loopline-reach")
    t0 = time.perf_counter()
    futures = [_POOL.submit(one, u) for u in urls]  # each bounded by its own timeout: never a hang
    results = [f.result() for f in futures]
    workers, parts, answered, total = {}, [], set(), 0
    worker_ms = {}
    for url, body, err in results:
        if err is not None or body is None or "stats" not in body:
            workers[url] = err or "bad answer"
            continue
        workers[url] = "ok"
        worker_ms[url] = body.get("worker_ms")
        parts.append(body["stats"])
        answered.update(body["partitions"])
        total = max(total, int(body.get("partitions_total", 0)))
    merged = merge_stats(parts)
    missing = sorted(set(range(total)) - answered) if total else []
    down = [u for u, s in workers.items() if s != "ok"]
    out = finish(merged, q.text)
    out.update({"partial": bool(down or missing or not parts), "workers": workers,
                "partitions": sorted(answered), "missing_partitions": missing, "worker_ms": worker_ms,
                "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)})
    return out


async def ask_stream(bootstrap: str, query: str, partitions: int, app_id: str = "loopline",
                     timeout: float = 10.0, role: str = "reach") -> dict:
    """Send ``query`` to every partition of ``reach.queries``; merge the partitions' shares read from
    the ``reach.answers`` table's changelog; partial after ``timeout`` seconds."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from loopline.state.reach import finish, merge_stats
    from loopline.state.reach_query import parse_query
    from loopline.stream.app import WorkerConfig
    from loopline.stream.reach import changelog_topic

    q = parse_query(query)
    topic = changelog_topic(WorkerConfig(broker=bootstrap, app_id=app_id, role=role, partitions=partitions))
    qid = uuid.uuid4().hex
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await consumer.start()
    await producer.start()
    shares: dict[int, dict] = {}
    t0 = time.perf_counter()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end positions before the query goes out
            await consumer.position(tp)
        value = orjson.dumps({"id": qid, "q": q.text})
        for p in range(partitions):
            await producer.send_and_wait("reach.queries", value, key=qid.encode(), partition=p)
        while len(shares) < partitions and time.perf_counter() - t0 < timeout:
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                for m in msgs:
                    try:
                        v = orjson.loads(m.value)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(v, dict) and v.get("id") == qid:
                        shares[int(v["partition"])] = v
    finally:
        await producer.stop()
        await consumer.stop()
    errors = [s["error"] for s in shares.values() if "error" in s]
    if errors:
        raise ConfigError(errors[0])
    merged = merge_stats([s["stats"] for s in shares.values()])
    out = finish(merged, q.text)
    out.update({"partial": len(shares) < partitions, "query_id": qid, "partitions": sorted(shares),
                "missing_partitions": sorted(set(range(partitions)) - set(shares)),
                "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)})
    return out


def _query_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except OSError as exc:
        raise ConfigError(f"queries: cannot read {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"queries: {path!r} is not UTF-8 text") from None


def run_reach(cfg: ReachCommand, progress: bool = True) -> dict | list[dict]:
    """Run ``loopline reach``: one answer, or (with ``queries``) a list of one answer per line."""
    from loopline.state.reach import Sample, answer
    texts = _query_lines(cfg.queries) if cfg.queries else [cfg.query]
    n_min = cfg.sampler.min_per_stratum
    if cfg.workers or cfg.broker:
        if cfg.workers:
            urls = [u.strip() for u in cfg.workers.split(",") if u.strip()]
            if not urls:
                raise ConfigError("workers: give at least one URL")
            urls = [u if "://" in u else f"http://{u}" for u in urls]
            ask = lambda t: ask_workers(urls, t, cfg.timeout_s, n_min)  # noqa: E731
        else:
            import asyncio

            from loopline.settings import parse_broker_url
            bootstrap = parse_broker_url(cfg.broker)
            ask = lambda t: asyncio.run(ask_stream(bootstrap, t, cfg.partitions, cfg.app_id,  # noqa: E731
                                                   cfg.timeout_s, cfg.worker_role))
        outs = [_safe(ask, t) for t in texts] if cfg.queries else [ask(texts[0])]
    else:
        if cfg.events:
            samples = samples_from_log(cfg.events, cfg.partitions, cfg.sampler, progress=progress)
            sample = Sample.merge(samples)
            if cfg.save_sample:
                with open(cfg.save_sample, "wb") as f:
                    f.write(sample.to_bytes())
        else:
            try:
                with open(cfg.sample, "rb") as f:
                    sample = Sample.from_bytes(f.read())
            except OSError as exc:
                raise ConfigError(f"sample: cannot read {cfg.sample!r}: {exc.strerror}") from None
        if cfg.queries:
            outs = [_safe(lambda t: answer(sample, t, n_min), t) for t in texts]
        else:
            outs = [{**answer(sample, texts[0], n_min), "sample": sample.describe()}]
    if cfg.quality:
        report = _quality_report(cfg)
        outs = [quality_adjusted(o, report) for o in outs]
    return outs if cfg.queries else outs[0]


def _quality_report(cfg: ReachCommand) -> dict:
    from .quality import gather_worker_counts, quality_counts_from_records, quality_report
    if cfg.events:
        from .eventlog import read_log
        agg, _ = quality_counts_from_records(read_log(cfg.events), cfg.partitions)
    elif cfg.workers:
        agg, _ = gather_worker_counts([u.strip() for u in cfg.workers.split(",") if u.strip()], cfg.partitions)
    else:
        raise ConfigError("quality: needs --events FILE or --workers (the sources' fits come from there)")
    return quality_report(agg)


def quality_adjusted(out: dict, report: dict) -> dict:
    """A reach answer for a rule that names one source's segment label, plus ``quality_adjusted``: the
    expected users truly in the segment, from the source's fitted a (``not`` / ``!=``: b), with the
    interval widened by the fit's uncertainty (``ops/quality.adjusted_reach``)."""
    from loopline.state.reach import segment_attr

    from .quality import adjusted_reach
    text = out.get("query") or ""
    if "users" not in out:
        return out
    named = [(r["source"], r["segment"]) for r in report["sources"]
             if re.search(rf"(?<![\w.]){re.escape(segment_attr(r['source'], r['segment']))}(?![\w.])", text)]
    if not named:
        return out
    if len(named) > 1:
        return {**out, "quality_adjusted": {"error": "quality: a rule naming one source segment is adjusted; "
                                                     f"this one names {len(named)}"}}
    source, segment = named[0]
    attr = re.escape(segment_attr(source, segment))
    exclude = bool(re.search(rf"not\s+{attr}|{attr}\s*!=", text, flags=re.IGNORECASE))
    try:
        adj = adjusted_reach(report, source, segment, out["users"], out["users_ci"], exclude)
    except ConfigError as exc:
        adj = {"error": str(exc)}
    return {**out, "quality_adjusted": adj}


def _safe(fn, text: str) -> dict:
    try:
        return fn(text)
    except ConfigError as exc:
        return {"query": text, "error": str(exc)}
