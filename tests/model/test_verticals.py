"""The VM stage: sequences read strictly before each example, the step clock that makes a worker match
evaluate, snapshots, variants and the FP8 twin."""

import random

import numpy as np
import pytest
import torch

from loopline.errors import ConfigError
from loopline.model.pipeline import FMStage, FMStageConfig
from loopline.model.trainer import TrainerConfig
from loopline.model.verticals import VARIANTS, StepInbox, VMStage, VMStageConfig, parse_variants, transfer_ratio
from loopline.state.history import HistoryStore

from .test_fm import SMALL
from .test_pipeline import examples


def run_both(tmp_path, variants=("base", "loopfm"), fp8=False, check=None):
    history = HistoryStore(str(tmp_path / "h"))
    fm = FMStage(history, FMStageConfig(fm=SMALL, trainer=TrainerConfig(batch_size=64), publish_every=3))
    vms = VMStage(history, VMStageConfig(variants=variants, fp8=fp8))
    seen = []

    def on_step(out):
        exs = out["augmented"]
        if check is not None:
            check(history, vms, exs)
        seen.extend(exs)
        vms.step(exs)
    fm.run(examples(), on_step=on_step)
    return history, fm, vms, seen


def test_the_sequence_never_includes_the_current_example(tmp_path):
    """When the VM trains on a step, the FM has just written that step's codes (the example's own code
    among them, at its own ts): the read stops strictly before the example's ts."""
    counts = {"own": 0, "read": 0}

    def check(history, vms, exs):
        codes, _ = vms.sequences(exs)
        for ex, c in zip(exs, codes):
            before = history.last_embeddings(ex["user"], ex["ts"], 500)
            upto = history.last_embeddings(ex["user"], ex["ts"] + 1e-3, 500)
            assert np.all(before["ts"] < ex["ts"])
            assert len(c) == min(len(before["ts"]), vms.configs["loopfm"].seq_len)
            assert np.array_equal(c, before["codes"][-len(c):]) if len(c) else True
            counts["own"] += len(upto["ts"]) - len(before["ts"])  # its own code is there, and not read
            counts["read"] += len(c)
    run_both(tmp_path, check=check)
    assert counts["own"] > 0 and counts["read"] > 0


def test_step_inbox_releases_the_same_steps_whatever_the_interleaving():
    items = [("ex", {"id": f"i{i}", "label_ts": float(i % 7), "fm_step": i // 10}) for i in range(40)]
    items += [("code", {"id": f"i{i}", "label_ts": float(i % 7), "step": i // 10}) for i in range(0, 40, 3)]
    parts = ["a/0", "a/1"]

    def run(seed):
        rng = random.Random(seed)
        order = items[:]
        rng.shuffle(order)
        box, out = StepInbox(parts), []
        for n, (kind, obj) in enumerate(order):
            (box.add_example if kind == "ex" else box.add_code)(obj)
            if n == 20:
                box.mark("a/0", 1)  # one partition ahead: nothing past step 1 may be released yet
                out += box.ready()
                assert all(s <= -1 for s, _, _ in out)
        for p in parts:
            box.mark(p, 3)
        out += box.ready()
        return [(s, [c["id"] for c in codes], [e["id"] for e in exs]) for s, codes, exs in out]

    first = run(0)
    assert [s for s, _, _ in first] == [0, 1, 2, 3]
    assert all(run(seed) == first for seed in range(1, 6))


def test_step_inbox_drops_steps_already_trained_on_and_duplicates():
    box = StepInbox(["a/0"], done=0)
    box.add_example({"id": "old", "label_ts": 1.0, "fm_step": 0})
    box.add_example({"id": "new", "label_ts": 2.0, "fm_step": 1})
    box.add_example({"id": "new", "label_ts": 2.0, "fm_step": 1})  # re-sent after an fm restart
    box.mark("a/0", 1)
    assert [(s, [e["id"] for e in exs]) for s, _, exs in box.ready()] == [(1, ["new"])]


def test_snapshot_round_trip_gives_the_same_predictions(tmp_path):
    history, _, vms, exs = run_both(tmp_path)
    state = vms.state_dict()
    path = tmp_path / "s.pt"
    torch.save(state, path)
    other = VMStage(history, vms.cfg)
    other.load_state_dict(torch.load(path, weights_only=True))
    exs = exs[-50:]
    for (vt, va), learner in vms.learners.items():
        sub = [e for e in exs if e["vertical"] == vt]
        codes, raw = vms.sequences(sub)
        b = vms.featurizers[va].batch(sub, codes, raw)
        assert np.array_equal(learner.predict_many(b), other.learners[(vt, va)].predict_many(b))
    assert other.report() == vms.report()


def test_fp8_twin_stays_close_to_high_precision(tmp_path):
    _, _, vms, _ = run_both(tmp_path, variants=("base",), fp8=True)
    r = vms.report()
    assert r["vm:base@fp8"]["n"] == r["vm:base"]["n"]
    assert abs(r["vm:base@fp8"]["auc"] - r["vm:base"]["auc"]) < 0.01
    assert all(t["fp8"] > 0 for t in vms.dispatch.values())  # layers really were swapped


def test_unknown_variant_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="^variants: unknown nope"):
        parse_variants("base,nope")
    with pytest.raises(ConfigError, match="^variants"):
        VMStageConfig(variants=())


def test_transfer_ratio_needs_an_fm_better_than_the_base():
    assert transfer_ratio(0.9, 0.85, 0.8) == 0.5
    assert transfer_ratio(0.8, 0.85, 0.9) is None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_vm_step_reads_its_predictions_off_the_training_forward_bit_for_bit(variant):
    """``VMLearner.step`` (one forward) equals ``predict_many`` then ``learn_many`` exactly, every variant."""
    from loopline.model.vm import VMFeaturizer, VMLearner
    cfg = VMStageConfig().config_of(variant)
    f, rng = VMFeaturizer(cfg), np.random.default_rng(0)
    a, b = VMLearner(cfg, seed=3), VMLearner(cfg, seed=3)
    for opt in b.optimizers + [b.adapter_opt] * (b.adapter_opt is not None):
        opt.param_groups[0]["foreach"] = False  # the reference: torch's single-tensor loops
    for step in range(5):
        exs = [dict(e, soft_label=None if step == 0 else float(rng.random())) for e in examples(48, seed=step)]
        codes = [rng.normal(size=(int(rng.integers(0, 25)), cfg.code_dim)).astype(np.float32) for _ in exs]
        raw = [[(1.0 + j, f"a{rng.integers(8)}", "c1", "impression") for j in range(int(rng.integers(0, 25)))]
               for _ in exs]
        batch = f.batch(exs, codes, raw)
        want = b.predict_many(batch)
        want_losses = b.learn_many(batch)
        got, losses = a.step(batch)
        assert np.array_equal(got, want) and losses == want_losses
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_variants_that_featurize_alike_share_one_featurizer(tmp_path):
    vms = VMStage(HistoryStore(str(tmp_path / "h")), VMStageConfig(variants=("base", "kd", "loopfm", "raw")))
    assert len({id(f) for f in vms.featurizers.values()}) == 1


def test_the_vm_stage_runs_torch_on_its_configured_threads(tmp_path):
    # a vm-only worker builds no FM trainer, whose config used to be the only one to set this
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        VMStage(HistoryStore(str(tmp_path / "h")), VMStageConfig(variants=("base",)))
        assert torch.get_num_threads() == 1
        VMStage(HistoryStore(str(tmp_path / "h2")), VMStageConfig(variants=("base",), threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match=r"^threads: must be an integer >= 1, got 0$"):
        VMStageConfig(threads=0)


def test_the_teacher_gate_report_counts_each_distilling_variants_closed_steps(tmp_path):
    _, _, vms, _ = run_both(tmp_path, variants=("base", "kd", "ah+sa"))
    report = vms.teacher_gate()
    assert set(report) == {"kd", "ah+sa"}  # base distils nothing
    for va, g in report.items():
        learners = [lr for (_, v), lr in vms.learners.items() if v == va]
        assert g == {"gated_steps": sum(lr.gated_steps for lr in learners), "steps": sum(lr.version for lr in learners)}
        assert 0 <= g["gated_steps"] <= g["steps"] > 0
