"""The models part of ``evaluate`` (``model/loop.py``) against the vm role's path, step by step."""

import pytest

from loopline.errors import ConfigError
from loopline.model.loop import ModelLoop, ModelLoopConfig
from loopline.model.pipeline import FMStage, FMStageConfig
from loopline.model.trainer import TrainerConfig
from loopline.model.verticals import VMStage, VMStageConfig
from loopline.state.history import HistoryStore

from .test_fm import SMALL
from .test_pipeline import examples

# batches of 4 over 600 examples: 150 FM steps against the run's 100 progress ticks, so several steps
# fall between two ticks; labels come 5 s (positives) or 100 s (negatives) after impressions 10 s apart,
# so a later step holds older impressions of the same users than an earlier one
FM_CFG = FMStageConfig(fm=SMALL, trainer=TrainerConfig(batch_size=4))
VM_CFG = VMStageConfig(variants=("base", "loopfm", "loopfm+kd"))


def vm_role_path(tmp_path) -> tuple[dict, dict]:
    """What a vm worker does (``stream/vm.py``): the VM stage on a store of its own, given each FM step's
    codes right before it trains on that step."""
    fm = FMStage(HistoryStore(str(tmp_path / "fm")), FM_CFG)
    outs = []
    fm.run(examples(), on_step=outs.append)
    vms = VMStage(HistoryStore(str(tmp_path / "vm")), VM_CFG)
    rows = {r["id"]: r for out in outs for r in out["scores"]}
    for out in outs:
        vms.history.append_embeddings(out["embeddings"])
        for r in vms.step(out["augmented"]):
            rows[r["id"]]["scores"].update(r["scores"])
    return rows, vms.report()


@pytest.mark.parametrize("threaded", [True, False])
def test_the_loop_gives_the_vm_roles_numbers_with_many_steps_between_progress_ticks(tmp_path, threaded):
    want_rows, want_report = vm_role_path(tmp_path / "role")
    history = HistoryStore(str(tmp_path / "loop"))
    vms = VMStage(history, VM_CFG)
    loop = ModelLoop(FMStage(history, FM_CFG), vms, ModelLoopConfig(threaded=threaded, depth=2))
    rows = loop.run(examples())
    assert vms.report() == want_report and vms.report()["vm:loopfm"]["n"] == 600
    assert rows == want_rows
    assert loop.max_waiting <= 2


def test_each_step_is_handed_over_before_the_next_writes_its_codes(tmp_path):
    history = HistoryStore(str(tmp_path / "h"))
    fm = FMStage(history, FM_CFG)
    newest = []

    def on_step(out):
        users = {e["user"] for e in out["augmented"]}
        newest.append((out["step"], max(max(history.last_embeddings(u, 1e5, 1000)["versions"], default=-1)
                                        for u in users)))
    fm.run(examples(), on_step=on_step)
    assert len(newest) == 150 and all(v <= step for step, v in newest)


def test_a_bad_depth_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"^depth: must be an integer >= 1, got 0$"):
        ModelLoopConfig(depth=0)
