"""The reach half of the ``reach`` role: per-partition stratified samples of the audience, answered over
HTTP and through a stream table.

Public surface: ``register_reach``, ``changelog_topic``.

* An agent on ``audience`` (user-keyed; ingest writes accepted impressions there) feeds each
  partition's impressions and segment assertions (as ``seg.<source>.<segment> = yes`` attributes) to a
  :class:`~loopline.state.reach.ReachSampler`; truth reports (the quality agent's) are ignored.
* **Rebuild.** The samples live in memory. When a worker is assigned a partition it does not hold (at
  start, after a restart, or when it takes over a dead member's partitions) it rebuilds that
  partition's sample by replaying the partition from its first offset with its own consumer, then
  goes on with the stream, skipping offsets already applied. Faust's committed offsets are not
  trusted for this (they run ahead of a sample that died with its process). Rebuilding needs the
  ``audience`` topic to keep at least the horizon (retention), which the embedded broker does.
* ``GET /reach?q=QUERY`` answers for the partitions this worker holds: the answer plus the additive
  per-stratum sums (``stats``) that ``loopline reach --workers`` merges across workers, and the
  partitions it covered; each answer states the event-time ``range`` it covers and the
  ``sample_bytes``. Without ``q``: a summary of each partition's sample (users, bytes, the budget, the
  range) and the bytes in all (``sample_bytes`` frozen, ``memory_bytes`` streaming). A bad query gives HTTP 400 and ``{"error": "query: ..."}``. Each partition's frozen
  sample is rebuilt at most every ``REFRESH_S`` seconds while the stream changes it.
* **Stream table.** A query ``{"id", "q"}`` sent to every partition of ``reach.queries`` is answered,
  on each partition by the worker holding it, into the table ``reach.answers`` keyed by the query id:
  the value of that key in partition ``p`` is partition ``p``'s share (its sums), so a reader of the
  table's changelog (:func:`changelog_topic`) merges the shares of all partitions
  (``loopline reach --broker``). Answers are for the reader waiting on them: before answering, a
  partition deletes its answers older than ``ReachConfig.answers_ttl_s`` (wall-clock seconds) and,
  oldest first, any past ``max_answers`` (counted as ``answers_expired`` in ``/reach``'s stats), so
  the table and its changelog stay bounded. Faust assigns the same partition numbers of ``audience`` and
  ``reach.queries`` to the same worker (co-partitioned topics), so each share comes from the sample
  of its own partition.

Delivery is at least once; effects are exactly once: an impression re-sent after an ingest crash or
rebalance is dropped by its id (:class:`~loopline.state.dedup.RecentIds`, per partition, rebuilt with the
sample), so it counts once in its user's impressions.
"""

from __future__ import annotations

import asyncio
import logging
import time

import faust
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from loopline.errors import ConfigError
from loopline.state.dedup import RecentIds
from loopline.state.reach import ReachSampler, Sample, finish, merge_stats, query_stats
from loopline.state.reach_query import parse_query

from .app import CachedView, WorkerConfig, group_id, make_table
from .role import by_partition, role_agent
from .supervise import call_in_thread, in_thread

__all__ = ["register_reach", "changelog_topic"]

log = logging.getLogger("loopline.reach")

BATCH = 2000
BATCH_WITHIN_S = 0.1
REFRESH_S = 1.0  # a partition's frozen sample is at most this much older than its stream
ANSWERS = "reach.answers"


def changelog_topic(cfg: WorkerConfig) -> str:
    """The changelog topic of the ``reach.answers`` table (Faust names it after the app id)."""
    return f"{group_id(cfg)}-{ANSWERS}-changelog"


def _apply(sampler: ReachSampler, seen: RecentIds, value: bytes) -> bool:
    v = orjson.loads(value)
    if isinstance(v, dict) and v.get("type") == "segment":
        sampler.assert_segment(str(v["user"]), str(v["source"]), str(v["segment"]))
        return False  # True counts impressions only
    if not isinstance(v, dict) or v.get("type") != "impression":
        return False
    attrs = v.get("attrs") or {}
    if not isinstance(attrs, dict):
        raise TypeError("attrs is not an object")
    if "id" in v and not seen.first(str(v["id"]), float(v["ts"])):
        return False  # a re-sent impression (ingest's outbox after a restart) counts once
    sampler.observe(str(v["user"]), float(v["ts"]), attrs)
    return True


def _apply_all(sampler: ReachSampler, seen: RecentIds, msgs: list, stats: dict, p: int) -> int:
    """Apply ``(offset, value)`` messages in order (in the role's thread: a sample's re-stratification at
    an epoch boundary takes seconds of Python); the impressions applied. Unreadable values are counted
    and logged, never fatal."""
    n = 0
    for off, value in msgs:
        try:
            n += _apply(sampler, seen, value)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            stats["bad_values"] += 1
            log.warning("reach: unreadable audience value at %s/%s: %s", p, off, exc)
    return n


def register_reach(app: faust.App, cfg: WorkerConfig) -> None:
    rcfg = cfg.reach
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
               partitions=cfg.partitions)
    source = app.topic("audience", **raw)
    queries = app.topic("reach.queries", **raw)
    answer_table = make_table(app, cfg, ANSWERS)
    answered: dict[int, dict[str, float]] = {}  # partition -> query id -> answered at (wall clock), oldest first
    samplers: dict[int, ReachSampler] = {}
    seen: dict[int, RecentIds] = {}  # partition -> impression ids applied within the de-duplication horizon
    impressions: dict[int, int] = {}  # partition -> impressions applied to its sample (repeats excluded)
    applied: dict[int, int] = {}  # partition -> next offset not yet in its sampler
    rebuilding: dict[int, asyncio.Task] = {}
    snaps: dict[int, tuple] = {}  # partition -> (sampler version, built at, Sample)
    stats = {"values": 0, "impressions": 0, "impression_repeats": 0, "bad_values": 0, "rebuilds": 0, "rebuilt_messages": 0,
             "queries_http": 0, "queries_table": 0,
             "answers_expired": 0}

    async def rebuild(p: int) -> None:
        try:
            await _rebuild(p)
        except Exception as exc:  # noqa: BLE001 - retried by the next ensure(); a worker never dies of it
            log.warning("reach: rebuilding partition %d failed (%s); will retry", p, exc)

    async def _rebuild(p: int) -> None:
        sampler, ids = ReachSampler(rcfg, p, cfg.partitions), RecentIds()
        consumer = AIOKafkaConsumer(bootstrap_servers=cfg.broker, enable_auto_commit=False,
                                    max_partition_fetch_bytes=4 * 1024 * 1024)
        await consumer.start()
        nxt = n_impressions = 0
        try:
            tp = TopicPartition("audience", p)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            while True:
                batch = await consumer.getmany(tp, timeout_ms=300, max_records=5000)
                msgs = batch.get(tp, [])
                if msgs:
                    n_impressions += await in_thread("reach", _apply_all, sampler, ids,
                                                     [(m.offset, m.value) for m in msgs], stats, p)
                    nxt = msgs[-1].offset + 1
                stats["rebuilt_messages"] += len(msgs)
                if not msgs and await consumer.position(tp) >= end:
                    break
        finally:
            await consumer.stop()
        samplers[p], seen[p], applied[p], impressions[p] = sampler, ids, nxt, n_impressions
        stats["impressions"] = sum(impressions.values())
        stats["impression_repeats"] = sum(s.repeats for s in seen.values())
        snaps.pop(p, None)
        stats["rebuilds"] += 1
        log.info("reach: partition %d rebuilt from %d messages", p, nxt)

    def ensure(p: int) -> asyncio.Task | None:
        if p in samplers:
            return None
        task = rebuilding.get(p)
        if task is None or task.done():
            task = rebuilding[p] = asyncio.ensure_future(rebuild(p))
            task.add_done_callback(lambda t, p=p: rebuilding.pop(p, None) if rebuilding.get(p) is t else None)
        return task

    async def ready(p: int) -> None:
        """Wait until partition ``p``'s sample is rebuilt (retrying once a second if it fails)."""
        while p not in samplers:
            await asyncio.shield(ensure(p))
            if p not in samplers:
                await asyncio.sleep(1.0)

    async def on_assigned(app, tps, **kwargs):  # noqa: ANN001 - faust signal signature
        mine = {tp.partition for tp in tps if tp.topic == "audience"}
        for p in list(samplers):
            if p not in mine:  # moved to another worker: a later return must rebuild
                samplers.pop(p, None)
                snaps.pop(p, None)
                seen.pop(p, None)
                impressions.pop(p, None)
        for p in mine:
            ensure(p)

    app.on_partitions_assigned.connect(on_assigned)

    def positions() -> dict[str, int]:
        return {f"audience/{p}": n for p, n in applied.items()}

    app.loopline_positions["reach"] = positions

    async def handle(msgs) -> None:
        for p, ms in by_partition(msgs).items():
            await ready(p)
            todo = [(m.offset, m.value) for m in ms if m.offset >= applied.get(p, 0)]
            if not todo:
                continue
            sampler = samplers[p]
            stats["values"] += len(todo)
            n = await in_thread("reach", _apply_all, sampler, seen[p], todo, stats, p)
            if samplers.get(p) is sampler:  # not revoked meanwhile (a rebalance drops it for a rebuild)
                impressions[p] += n
                applied[p] = todo[-1][0] + 1
        stats["impressions"] = sum(impressions.values())
        stats["impression_repeats"] = sum(s.repeats for s in seen.values())

    # a partition's rebuild waits inside a batch (``ready``): a rebuild that hangs is a stall
    agent = role_agent(app, "reach", source, handle, batch=BATCH, within=BATCH_WITHIN_S, msgs=True,
                       positions=positions)

    def sample_of(p: int) -> Sample:
        sampler = samplers[p]
        snap = snaps.get(p)
        now = time.monotonic()
        if snap is None or (snap[0] != sampler.version and now - snap[1] >= REFRESH_S):
            snap = snaps[p] = (sampler.version, now, sampler.snapshot())
        return snap[2]

    def held() -> list[int]:
        return sorted(p for p in samplers if p not in rebuilding)

    @app.agent(queries, name="reach-queries")
    async def reach_queries(stream):
        async for ev in stream.events():
            p = ev.message.partition
            try:
                v = orjson.loads(ev.value)
                qid, text = str(v["id"]), str(v["q"])
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                log.warning("reach: unreadable query at %s/%s: %s", p, ev.message.offset, exc)
                continue
            stats["queries_table"] += 1
            expire(p)
            out = {"id": qid, "q": text, "partition": p, "answered_at": time.time()}
            await ready(p)
            try:  # in the reach thread: a fresh sample is frozen there, beside the sampler's updates
                out["stats"] = await in_thread("reach", lambda: query_stats(sample_of(p), parse_query(text),
                                                                            rcfg.min_per_stratum))
            except ConfigError as exc:
                out["error"] = str(exc)
            answer_table[qid] = out
            answered[p].pop(qid, None)
            answered[p][qid] = out["answered_at"]

    def expire(p: int) -> None:
        """Delete partition ``p``'s answers older than ``answers_ttl_s`` and, oldest first, those past
        ``max_answers`` (room for the one about to be written). Runs inside the query agent, on an
        event of partition ``p``: Faust writes the deletion (a tombstone) to that changelog partition."""
        idx = answered.get(p)
        if idx is None:  # first query here since start: the answers recovered from the changelog
            found = [(float(v.get("answered_at", 0.0)), k) for k, v in list(answer_table.items())
                     if isinstance(v, dict) and v.get("partition") == p]
            idx = answered[p] = {k: t for t, k in sorted(found)}
        now = time.time()
        while idx:
            qid, at = next(iter(idx.items()))
            if now - at <= rcfg.answers_ttl_s and len(idx) < rcfg.max_answers:
                break
            del idx[qid]
            try:
                del answer_table[qid]
            except KeyError:  # another partition's expiry removed the local copy; the tombstone went out
                pass
            stats["answers_expired"] += 1

    # computed in a thread, never on the agents' loop; one cached answer per query text (LRU-bounded)
    answers = CachedView.of("reach", cfg)

    # A view's computation (in a view thread) freezes and reads the samplers in the reach thread, which
    # changes them: frozen beside the reach thread's updates, a sample raised ("dictionary changed size")
    # until CachedView ran it on the event loop, which the soak saw held 338 ms (reach_strata q_codes)
    def summary() -> dict:
        parts = held()
        out = {"partitions": parts, "partitions_total": cfg.partitions, "stats": dict(stats),
               "gaps_read": dict(agent.loopline_gaps.counts), "rebuilding": sorted(rebuilding),
               "budget_users": rcfg.budget_users, "samples": {}}

        def described(p: int) -> dict:
            return {**sample_of(p).describe(), "memory": samplers[p].memory(),
                    "counts": dict(samplers[p].counts), "bounds": samplers[p].bounds()}
        for p in parts:
            out["samples"][str(p)] = call_in_thread("reach", described, p)
        # the bytes this worker's samples take: frozen (what queries read) and streaming (what the sampler holds)
        out["sample_bytes"] = sum(v["bytes"] for v in out["samples"].values())
        out["memory_bytes"] = sum(v["memory"]["bytes"] for v in out["samples"].values())
        return out

    def answer(q) -> dict:
        t0 = time.perf_counter()
        parts = held()
        merged = merge_stats([query_stats(call_in_thread("reach", sample_of, p), q, rcfg.min_per_stratum)
                              for p in parts])
        return {**finish(merged, q.text), "partitions": parts, "partitions_total": cfg.partitions,
                "stats": merged, "worker_ms": round((time.perf_counter() - t0) * 1000, 3)}

    @app.page("/reach")
    async def reach_view(web, request):
        text = request.query.get("q")
        if text is None:
            return await answers.respond(web, summary)
        stats["queries_http"] += 1
        try:
            q = parse_query(text)
            return await answers.respond(web, lambda: answer(q), key=text)
        except ConfigError as exc:
            return web.json({"error": str(exc)}, status=exc.http_status)
