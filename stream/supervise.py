"""The exception policy and liveness of every role's agent: a worker is never alive but stalled.

Public surface: ``Health``, ``supervised``, ``EXIT_AGENT_FAILED``, ``off_loop``, ``in_thread``, ``call_in_thread``,
``background_nice``.

* **Exception policy.** An agent body wrapped in :func:`supervised` that raises anything unexpected
  makes the whole process exit with ``EXIT_AGENT_FAILED`` (70) after one line on stderr naming the role
  and the error. Faust's own policy would restart the agent in the same process, where it fails again
  (the fm's history store stays locked by the dead agent: ``lock hold by current process``) while the
  worker keeps answering; a supervisor (systemd, Kubernetes, the tests) restarts a process that exits,
  and every role resumes from its newest durable state (RocksDB, changelogs, snapshots), as after a
  ``kill -9``. The exit is ``os._exit``: stores are not flushed, which is the crash the roles already
  recover from, and nothing half-written is flushed over good state.
* **Liveness.** Each role reports when it starts handling a batch (:meth:`Health.busy`) and when it is
  done (:meth:`Health.done`). ``/healthz`` fails (HTTP 503) when a role has been inside one batch for
  longer than ``stall_s``: input is pending and no progress is made. ``/readyz`` is 200 once every role
  has finished its start-up (catch-up, rebuilds: :meth:`Health.ready`), 503 before.

>>> h = Health(["fm"], stall_s=60)
>>> h.report(now=0.0)["live"], h.report(now=0.0)["ready"]
(True, False)
>>> h.ready("fm"); h.busy("fm", now=10.0)
>>> h.report(now=100.0)["live"]
False
>>> h.done("fm", now=101.0); h.report(now=102.0)["live"]
True
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import traceback

__all__ = ["Health", "supervised", "EXIT_AGENT_FAILED", "off_loop", "in_thread", "call_in_thread", "background_nice"]

EXIT_AGENT_FAILED = 70  # EX_SOFTWARE: an internal error; the supervisor restarts the process


class Health:
    """Per-role progress clocks behind ``/healthz`` and ``/readyz``."""

    def __init__(self, roles, stall_s: float = 300.0):
        self.stall_s = stall_s
        self.roles = {r: {"ready": False, "busy_since": None, "batches": 0, "last_done": None} for r in roles}

    def add(self, role: str) -> None:
        self.roles.setdefault(role, {"ready": False, "busy_since": None, "batches": 0, "last_done": None})

    def ready(self, role: str) -> None:
        self.add(role)
        self.roles[role]["ready"] = True

    def busy(self, role: str, now: float | None = None) -> None:
        self.add(role)
        r = self.roles[role]
        if r["busy_since"] is None:
            r["busy_since"] = time.monotonic() if now is None else now

    def done(self, role: str, now: float | None = None) -> None:
        self.add(role)
        r = self.roles[role]
        r["busy_since"], r["batches"] = None, r["batches"] + 1
        r["last_done"] = time.monotonic() if now is None else now

    def failed(self, role: str) -> None:
        """The role's agent is dead: it stays stalled (should the process not exit)."""
        self.add(role)
        self.roles[role]["busy_since"] = float("-inf")

    def report(self, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        roles = {}
        for name, r in self.roles.items():
            stuck = None if r["busy_since"] is None else now - r["busy_since"]
            roles[name] = {"ready": r["ready"], "batches": r["batches"],
                           "busy_s": None if stuck is None else round(stuck, 3),
                           "stalled": stuck is not None and stuck > self.stall_s}
        return {"live": not any(v["stalled"] for v in roles.values()),
                "ready": all(v["ready"] for v in roles.values()), "stall_s": self.stall_s, "roles": roles}


_NICE = [0]  # how much lower the background threads run than the event loop


def background_nice(n: int) -> None:
    """Run the training and role threads made from now on ``n`` nice levels below the event loop (0:
    as the loop). On Linux a nice value is a thread's own, and the threads a thread starts (torch's
    intra-op pool) inherit it. On two cores the training thread and its intra-op threads left the loop
    a third of a core: a 20-candidate forward beside a training loop took p99 15.5 ms, and 9.5 ms with
    the trainer at nice 10, whose steps/s moved from 41.6 to 39.8."""
    _NICE[0] = max(0, int(n))


def _lower_priority() -> None:
    """An executor's initializer: the calling thread (not the process) ``_NICE`` levels lower."""
    if _NICE[0] <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + _NICE[0]))
    except OSError:  # not permitted here: the threads keep the loop's priority
        pass


async def off_loop(fn, *args):
    """Run a training step in the fm's training thread, so the event loop keeps serving views, timers
    and heartbeats while torch computes (it releases the GIL in its kernels). One thread: the stage's
    steps stay in order and never run concurrently. (The vm trains in a thread of its own,
    ``in_thread("vm", ...)``, so the two stages' steps overlap on two cores.)"""
    return await in_thread("train", fn, *args)


_THREADS: dict = {}  # role -> its one worker thread, made on first use
_IDENTS: dict = {}  # role -> that thread's ident


def _role_thread(role: str):
    if role not in _THREADS:
        from concurrent.futures import ThreadPoolExecutor

        def init():
            _IDENTS[role] = threading.get_ident()
            _lower_priority()
        _THREADS[role] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"loopline-{role}", initializer=init)
    return _THREADS[role]


async def in_thread(role: str, fn, *args):
    """Run ``fn(*args)`` in ``role``'s own worker thread (one per role, so the role's work stays in order)
    while the event loop serves views, heartbeats and the other roles: for Python-heavy work that would
    hold the loop for long (reach's re-stratification at an epoch boundary took seconds)."""
    import asyncio
    return await asyncio.get_running_loop().run_in_executor(_role_thread(role), fn, *args)


def call_in_thread(role: str, fn, *args):
    """``fn(*args)`` run in ``role``'s thread, waited for: from a view's thread (never the event loop's),
    to read what that thread changes without meeting it half-changed (at once when called there)."""
    if _IDENTS.get(role) == threading.get_ident():
        return fn(*args)
    return _role_thread(role).submit(fn, *args).result()


def _fail(role: str, exc: BaseException) -> None:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {os.path.basename(where.filename)}:{where.lineno}" if where else ""
    detail = " ".join(str(exc).split())[:300]
    print(f"loopline worker: the {role} agent failed ({type(exc).__name__}: {detail}{at}); exiting with "
          f"{EXIT_AGENT_FAILED} for a supervisor to restart it", file=sys.stderr, flush=True)
    traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.flush()
    os._exit(EXIT_AGENT_FAILED)


def supervised(role: str, health: Health | None = None, exit_on_error: bool = True):
    """Wrap an agent body: an unexpected exception ends the process (see the module docstring).
    Cancellation (a rebalance, a shutdown) passes through untouched."""
    import asyncio

    def wrap(fn):
        @functools.wraps(fn)
        async def body(*args):
            try:
                await fn(*args)
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - the policy: any unexpected error ends the process
                if health is not None:
                    health.failed(role)
                if not exit_on_error:
                    raise
                _fail(role, exc)
        return body
    return wrap
