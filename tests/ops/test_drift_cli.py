"""``loopline drift``: bad or unreachable workers are one-line errors with exit code 2."""

import subprocess
import sys

from loopline.ops.broker import free_port


def _drift(*args):
    return subprocess.run([sys.executable, "-m", "loopline.ops.cli", "drift", *args], capture_output=True,
                          text=True, timeout=60)


def test_drift_without_a_worker_says_so_in_one_line():
    r = _drift("--worker", f"http://127.0.0.1:{free_port()}", "--json")
    assert r.returncode == 2
    assert r.stderr.startswith("BrokerError: worker") and r.stderr.count("\n") == 1


def test_drift_rejects_a_url_that_is_not_http():
    r = _drift("--worker", "file:///etc/passwd")
    assert r.returncode == 2 and r.stderr.startswith("ConfigError: worker:")
