"""The exception policy and liveness (stream/supervise.py): an agent that fails ends its process with a
one-line reason and exit code 70; /healthz fails while a role is stuck inside a batch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import pytest

from loopline.stream.supervise import EXIT_AGENT_FAILED, Health, supervised


def test_a_failing_agent_ends_the_process_with_a_one_line_reason():
    script = textwrap.dedent("""
        import asyncio
        from loopline.stream.supervise import supervised

        @supervised("fm")
        async def body(stream):
            raise ValueError("history key packing failed")

        asyncio.run(body(None))
        print("still alive")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_AGENT_FAILED
    assert "still alive" not in r.stdout
    first = r.stderr.splitlines()[0]
    assert first.startswith("loopline worker: the fm agent failed (ValueError: history key packing failed")
    assert "exiting with 70" in first


async def test_cancellation_passes_through_and_a_failure_marks_the_role_stalled():
    import asyncio
    health = Health(["vm"])

    @supervised("vm", health, exit_on_error=False)
    async def cancelled(stream):
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await cancelled(None)
    assert health.report()["live"]

    @supervised("vm", health, exit_on_error=False)
    async def broken(stream):
        raise KeyError("label_ts")

    with pytest.raises(KeyError):
        await broken(None)
    assert not health.report()["live"] and health.report()["roles"]["vm"]["stalled"]


def test_a_role_stuck_in_one_batch_is_not_live_and_readiness_waits_for_every_role():
    h = Health(["ingest", "fm"], stall_s=30)
    h.ready("ingest")
    assert not h.report(now=0.0)["ready"]
    h.ready("fm")
    h.busy("fm", now=0.0)
    h.busy("fm", now=20.0)  # still the same batch: the clock does not restart
    assert h.report(now=29.0)["live"] and not h.report(now=31.0)["live"]
    h.done("fm", now=31.0)
    rep = h.report(now=40.0)
    assert rep["live"] and rep["ready"] and rep["roles"]["fm"]["batches"] == 1


@pytest.mark.integration
def test_healthz_and_readyz_through_a_worker(start_worker):
    w = start_worker("w", ready=False, extra=("--role", "reach"))

    def get(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{w.port}{path}", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    from tests.conftest import wait_for
    assert wait_for(lambda: get("/readyz") == 200, 90, "/readyz", proc=w)
    assert get("/healthz") == 200


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread is Linux's")
def test_training_and_role_threads_run_below_the_event_loop():
    # in a fresh process: the threads are made once per process, on first use
    code = textwrap.dedent("""
        import asyncio, os, threading
        from loopline.stream.supervise import background_nice, in_thread, off_loop
        def nice():
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        background_nice(7)
        async def main():
            print(nice(), await off_loop(nice), await in_thread("reach", nice))
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    loop, training, role = map(int, out.stdout.split())
    assert (training, role) == (min(19, loop + 7), min(19, loop + 7)) and loop < 19


async def test_call_in_thread_runs_in_the_roles_thread_and_directly_when_already_there():
    """A view thread reads a role's structures in the role's own thread (stream/reach.py); the role's
    thread calling it runs at once instead of waiting on itself."""
    import asyncio
    import threading

    from loopline.stream.supervise import call_in_thread, in_thread

    role_ident = await in_thread("test-role", threading.get_ident)
    seen = await asyncio.get_running_loop().run_in_executor(
        None, call_in_thread, "test-role", threading.get_ident)  # from another thread
    assert seen == role_ident != threading.get_ident()
    nested = await in_thread("test-role", call_in_thread, "test-role", threading.get_ident)
    assert nested == role_ident
