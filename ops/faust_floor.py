"""The floor of a Faust stream processor: a worker whose one agent takes the ingest role's batches and
produces one output per input, and does nothing else.

Public surface: ``run_floor``, ``SOURCE``, ``SINK``.

``loopline bench ingest`` times this beside raw aiokafka consume-and-produce and the ingest worker, on
the same backlog and broker. The agent reads ``raw.in`` with ``take_events`` (up to 2,000 events or
50 ms: the ingest role's batches), sends each message's key and value unchanged to ``raw.out`` with
Faust's ``send`` (the ingest role's path for its outputs) and waits for the batch's acknowledgements.
Nothing is parsed, validated, joined or stored, so its rate is the most any Faust agent that keeps
Faust's delivery and sends can reach here, and ``faust_ratio`` (its rate over raw consume-and-produce)
bounds what ingest's ``ratio`` can become without leaving them.

The worker runs in its own process (``python -m loopline.ops.faust_floor``, configured by the
environment: ``LOOPLINE_FLOOR_BROKER`` host:port, ``LOOPLINE_FLOOR_DIR`` a data dir); after every batch
it writes the number of messages it has forwarded to ``<dir>/forwarded``, which the benchmark polls.
"""

from __future__ import annotations

import os
import sys

import faust

from .worker import service_worker_class

__all__ = ["run_floor", "SOURCE", "SINK"]

SOURCE, SINK = "raw.in", "raw.out"
BATCH, WITHIN_S = 2000, 0.05  # the ingest role's (stream/ingest.py)


def _app(broker: str, data_dir: str) -> faust.App:
    app = faust.App(f"loopline-floor-{os.getpid()}", broker=f"kafka://{broker}", store="memory://",
                    datadir=data_dir, web_enabled=False, consumer_auto_offset_reset="earliest",
                    topic_replication_factor=1, producer_linger=0.005,  # the worker's (WorkerConfig)
                    producer_max_batch_size=256 * 1024, producer_max_request_size=16 * 1024 * 1024,
                    consumer_max_fetch_size=4 * 1024 * 1024)
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    source, sink = app.topic(SOURCE, **raw), app.topic(SINK, **raw)
    counter = os.path.join(data_dir, "forwarded")
    forwarded = [0]

    @app.agent(source)
    async def forward(stream):
        async for events in stream.take_events(BATCH, within=WITHIN_S):
            pending = [await sink.send(key=e.message.key, value=e.message.value) for e in events]
            for f in pending:
                await f
            forwarded[0] += len(events)
            with open(counter + ".tmp", "w") as fh:
                fh.write(str(forwarded[0]))
            os.replace(counter + ".tmp", counter)
    return app


def run_floor() -> None:
    broker, data_dir = os.environ["LOOPLINE_FLOOR_BROKER"], os.environ["LOOPLINE_FLOOR_DIR"]
    os.makedirs(data_dir, exist_ok=True)

    sys.argv = [sys.argv[0], "worker"]
    worker = service_worker_class()(_app(broker, data_dir), loglevel="warning", quiet=True)
    worker.execute_from_commandline()


if __name__ == "__main__":
    run_floor()
