"""``loopline demo``: the main job end to end, on the embedded broker, matching evaluate."""

import pytest

from loopline.ops.demo import DemoConfig, run_demo

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end_and_matches_evaluate(tmp_path):
    out = run_demo(DemoConfig(users=120, days=2, workdir=str(tmp_path)), progress=False)
    assert out["matches_evaluate"] is True
    assert out["examples"] > 0 and out["deadlettered"] > 0 and out["accepted"] > out["examples"]
    assert out["worker_stop"] == "stopped on SIGTERM"
    assert (tmp_path / "tansu.log").exists()
