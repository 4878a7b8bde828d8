"""The scaffold every role's agent runs in, written once: catch up, then stream; batches split by
partition; offsets fed at most once; the exception policy and health around all of it.

Public surface: ``role_agent``, ``run_role``, ``Msg``, ``Fed``, ``by_partition``, ``in_partition_of``,
``msgs_of_events``, ``msgs_of_records``.

A role (ingest, fm, vm, reach, quality, monitor) supplies what is its own: an optional ``start`` (load
a snapshot, rebuild a store, read its inputs from the stored offsets) and ``handle(batch)``. The
scaffold does the rest, the same way in every role:

* :func:`role_agent`: the role's Faust agent on its source topic, batched, supervised, run by
  :func:`run_role` (a role that reads its inputs with a consumer of its own, the fm, calls
  :func:`run_role` directly).
* :func:`run_role`: ``start`` then every batch, each inside :meth:`Health.busy` / :meth:`Health.done`
  (a batch that never finishes makes ``/healthz`` fail after ``stall_s``), ``ready`` once ``start``
  returned; inside :func:`~loopline.stream.supervise.supervised`, the exception policy (any unexpected
  error exits the process with one line; the role resumes from its durable state on restart).
* :class:`Msg`: one message as the roles read it, from a Faust event or an aiokafka record alike, so
  the catch-up (read with a consumer of its own) and the live stream go through one ``handle``.
* :class:`Fed`: the next offset not yet fed, per ``topic/partition``; a message below it was fed
  already (a redelivery after a rebalance, the overlap of catch-up and stream) and is skipped. What is
  sent again under a new offset (an outbox re-send) is dropped by id, with
  :class:`~loopline.state.dedup.RecentIds`, inside the role's state.
* :func:`by_partition`: a batch split by partition, in arrival order within each;
  :func:`in_partition_of` makes a Faust table read and write that partition's store while a group is
  handled (Faust picks a table's partition from the current event, and a batch mixes partitions).

Snapshots (save, rotate, verify, fall back) are :class:`~loopline.state.snapshots.SnapshotDir`; the
training thread is :func:`~loopline.stream.supervise.off_loop`.

>>> fed = Fed()
>>> batch = [Msg("a", 0, 5, [], b"x"), Msg("a", 0, 5, [], b"x"), Msg("a", 1, 0, [], b"y")]
>>> [m.offset for m in fed.take(batch)], fed.positions()
([5, 0], {'a/0': 6, 'a/1': 1})
>>> {p: [m.value for m in ms] for p, ms in by_partition(batch).items()}
{0: [b'x', b'x'], 1: [b'y']}
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, AsyncIterable, Awaitable, Callable, Iterable, NamedTuple

from faust.streams import _current_event  # the context Faust tables use to pick a partition

from .gaps import GapReader
from .supervise import Health, supervised

__all__ = ["role_agent", "run_role", "Msg", "Fed", "by_partition", "in_partition_of", "msgs_of_events",
           "msgs_of_records", "with_skipped"]


class Msg(NamedTuple):
    topic: str
    partition: int
    offset: int
    headers: Any
    value: bytes | None


def msgs_of_events(events: Iterable) -> list[Msg]:
    """Faust events (``stream.take_events``) as messages."""
    return [Msg(ev.message.topic, ev.message.partition, ev.message.offset, ev.headers, ev.value) for ev in events]


def msgs_of_records(records: Iterable) -> list[Msg]:
    """aiokafka consumer records (a catch-up, ``follow_topic``) as messages."""
    return [Msg(r.topic, r.partition, r.offset, r.headers, r.value) for r in records]


def by_partition(items: Iterable, partition_of: Callable[[Any], int] = lambda m: m.partition) -> dict[int, list]:
    """``items`` grouped by partition (a :class:`Msg`'s, or ``partition_of(item)``), each group in
    arrival order, partitions in order of first arrival."""
    out: dict[int, list] = {}
    for item in items:
        out.setdefault(partition_of(item), []).append(item)
    return out


@contextmanager
def in_partition_of(event):
    """Make table reads and writes go to ``event``'s partition (its RocksDB and changelog partition)."""
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class Fed:
    """The next offset not yet fed, per ``topic/partition`` (what a snapshot stores, and where a
    restart resumes); :meth:`take` passes each offset once."""

    def __init__(self, positions: dict[str, int] | None = None):
        self._next: dict[str, int] = dict(positions or {})

    def take(self, msgs: Iterable[Msg]) -> list[Msg]:
        """The messages not fed before, in order; their offsets count as fed from now on."""
        out = []
        for m in msgs:
            tp = f"{m.topic}/{m.partition}"
            if m.offset < self._next.get(tp, 0):
                continue
            self._next[tp] = m.offset + 1
            out.append(m)
        return out

    def fed(self, topic: str, partition: int, offset: int) -> bool:
        """Whether ``offset`` was fed already."""
        return offset < self._next.get(f"{topic}/{partition}", 0)

    def positions(self) -> dict[str, int]:
        return dict(self._next)

    def reset(self, positions: dict[str, int]) -> None:
        self._next = dict(positions)


async def run_role(name: str, health: Health, batches: AsyncIterable, handle: Callable[[Any], Awaitable[Any]],
                   start: Callable[[], Awaitable[Any]] | None = None) -> None:
    """Catch up (``start``), then ``handle`` every batch of ``batches``, reporting progress to ``health``.

    An empty batch (a poll that found nothing) is passed over without counting as progress."""
    if start is not None:
        health.busy(name)
        await start()
        health.done(name)
    health.ready(name)
    async for batch in batches:
        if not batch:
            continue
        health.busy(name)
        await handle(batch)
        health.done(name)


def role_agent(app, name: str, source, handle: Callable[[list], Awaitable[Any]], *, batch: int, within: float,
               start: Callable[[], Awaitable[Any]] | None = None, msgs: bool = False,
               positions: Callable[[], dict[str, int]] | None = None, gaps: GapReader | None = None):
    """Register role ``name``'s agent on ``source``: batches of at most ``batch`` events or ``within``
    seconds, handed to ``handle`` as Faust events (or as :class:`Msg` with ``msgs``), after ``start``;
    supervised, with progress in the app's health (``/healthz``, ``/readyz``). With ``msgs`` and
    ``positions`` (the role's next offset not yet applied, per ``topic/partition``), offsets Faust's
    consumer skipped are read from the broker into the batch (:func:`with_skipped`). The agent closes its
    gap reader's consumer when it stops (``gaps``: a reader ``handle`` uses itself, closed the same way)."""
    health: Health = app.loopline_health
    health.add(name)  # not ready before its agent has started and caught up
    url = app.conf.broker[0]
    reader = GapReader(f"{url.host}:{url.port}") if msgs and positions is not None else gaps

    @app.agent(source, name=name)
    @supervised(name, health)
    async def agent(stream):
        events = stream.take_events(batch, within=within)
        if not msgs:
            batches = events
        elif positions is None:
            batches = (msgs_of_events(evs) async for evs in events)
        else:
            batches = (await with_skipped(reader, msgs_of_events(evs), positions()) async for evs in events)
        try:
            await run_role(name, health, batches, handle, start)
        finally:
            if reader is not None:
                await reader.close()
    agent.loopline_gaps = reader
    return agent


async def with_skipped(reader: GapReader, msgs: list[Msg], positions: dict[str, int]) -> list[Msg]:
    """``msgs`` with the messages before or between them that the consumer skipped: for each
    ``topic/partition`` with a known position, the offsets from it to the first message, and between
    consecutive messages, read from the broker (``stream/gaps.py``). Offsets below a position were
    applied already and are left to :class:`Fed`."""
    out: list[Msg] = []
    expected = dict(positions)
    for m in msgs:
        tp = f"{m.topic}/{m.partition}"
        nxt = expected.get(tp)
        if nxt is not None:
            if m.offset > nxt:
                out.extend(msgs_of_records(await reader.read(m.topic, m.partition, nxt, m.offset)))
            expected[tp] = max(nxt, m.offset + 1)
        out.append(m)
    return out
