"""The online trainer: progressive validation, learning, atomic snapshots and identical restores."""

import os

import numpy as np
import pytest
import torch

from loopline.errors import ConfigError
from loopline.model.baseline import LogisticBaseline
from loopline.model.features import Featurizer
from loopline.model.metrics import BinaryMetrics
from loopline.model.trainer import OnlineTrainer, TrainerConfig, latest_snapshot


def examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ad = f"a{rng.integers(0, 20)}"
        out.append({"id": f"i{i}", "user": f"u{rng.integers(0, 50)}", "ad": ad, "campaign": "c", "vertical": "v",
                    "ts": float(i), "label": int(rng.random() < (0.6 if ad in ("a1", "a2", "a3") else 0.05))})
    return out


def batches(exs, bs=64):
    f = Featurizer()
    return [f.batch(exs[i:i + bs], [[] for _ in exs[i:i + bs]]) for i in range(0, len(exs), bs)]


def test_progressive_predictions_come_before_learning_and_the_model_improves():
    t = OnlineTrainer(LogisticBaseline(), TrainerConfig(seed=0, lr_sparse=0.1))
    bs = batches(examples(4000))
    first = t.step(bs[0])
    assert np.allclose(first, 0.5)  # predicted with untouched weights
    early, late = BinaryMetrics(), BinaryMetrics()
    for i, b in enumerate(bs[1:]):
        (early if i < 10 else late).update(t.step(b), b.labels.numpy())
    assert late.report()["auc"] > 0.8 and late.report()["ne"] < early.report()["ne"]


def test_snapshot_restore_gives_identical_predictions_and_continues_identically(tmp_path):
    bs = batches(examples(1000, seed=1))
    a = OnlineTrainer(LogisticBaseline(), TrainerConfig(seed=0))
    for b in bs[:8]:
        a.step(b)
    path = a.save(str(tmp_path), meta={"offsets": {"examples": {"0": 123}}})
    b_ = OnlineTrainer(LogisticBaseline(), TrainerConfig(seed=0))
    meta = b_.restore(path)
    assert meta == {"offsets": {"examples": {"0": 123}}} and b_.version == a.version
    for batch in bs[8:]:
        assert np.array_equal(a.step(batch), b_.step(batch))  # optimizer state came back too


def test_snapshots_are_atomic_and_load_with_weights_only(tmp_path):
    t = OnlineTrainer(LogisticBaseline())
    t.step(batches(examples(64))[0])
    p1 = t.save(str(tmp_path))
    open(os.path.join(tmp_path, ".snapshot-x.tmp"), "wb").write(b"partial")  # a crashed writer's leftover
    t.step(batches(examples(64, seed=2))[0])
    p2 = t.save(str(tmp_path))
    assert latest_snapshot(str(tmp_path)) == p2 and p1 != p2
    state = torch.load(p2, weights_only=True)  # no pickled code needed
    assert state["version"] == 2


def test_bad_trainer_config_names_the_field():
    with pytest.raises(ConfigError, match="^lr_dense"):
        TrainerConfig(lr_dense=0)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["fm", "baseline"])
def test_step_reads_its_predictions_off_the_training_forward_bit_for_bit(kind):
    """``step`` makes one forward pass (and Adam loops in C++); its predictions and weights equal those of
    predict-then-learn with torch's single-tensor optimizers exactly."""
    from loopline.model.fm import FoundationModel

    from .test_fm import SMALL, make_batch
    make = (lambda: FoundationModel(SMALL)) if kind == "fm" else (lambda: LogisticBaseline(SMALL.features))
    torch.manual_seed(0)
    a = OnlineTrainer(make(), TrainerConfig(seed=0))
    torch.manual_seed(0)
    b = OnlineTrainer(make(), TrainerConfig(seed=0))
    for opt in b.optimizers:  # the reference: torch's default single-tensor loops
        opt.param_groups[0]["foreach"] = False
    assert a.shared_forward and _same_state(a.model, b.model)
    for seed in range(6):
        batch = make_batch(seed=seed)
        p = b.predict_many(batch)
        b.learn_many(batch)
        assert np.array_equal(a.step(batch), p)
    assert _same_state(a.model, b.model) and a.version == b.version == 6


def test_a_model_with_dropout_predicts_with_its_own_eval_pass():
    class Dropped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lr = LogisticBaseline()
            self.drop = torch.nn.Dropout(0.9)

        def forward(self, batch):
            return {"logit": self.drop(self.lr(batch)["logit"])}
    torch.manual_seed(0)
    t = OnlineTrainer(Dropped(), TrainerConfig(seed=0))
    assert not t.shared_forward
    b = batches(examples(64))[0]
    with torch.no_grad():
        t.model.lr.bias.fill_(2.0)
    p = t.step(b)  # eval mode: no dropout, every prediction is sigmoid(2)
    assert np.allclose(p, 1 / (1 + np.exp(-2.0)))


def test_zero_weight_examples_do_not_move_the_model():
    b = batches(examples(64, seed=4))[0]
    t = OnlineTrainer(LogisticBaseline(), TrainerConfig(seed=0))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.step(b._replace(weights=torch.zeros(b.size)))
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    t.step(b._replace(weights=torch.ones(b.size)))
    assert not all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def test_a_named_intercept_learns_with_the_rows_adagrad_not_adam():
    """The FM has no first-order rows; its head's bias takes Adagrad's first step, lr_sparse in size,
    where Adam's would have been lr_dense."""
    from loopline.model.fm import FoundationModel

    from .test_fm import SMALL, make_batch
    torch.manual_seed(0)
    t = OnlineTrainer(FoundationModel(SMALL), TrainerConfig(lr_sparse=0.4, lr_dense=1e-3))
    bias = t.model.head.bias
    assert any(bias is p for p in t.optimizers[0].param_groups[0]["params"])  # the Adagrad
    assert not any(bias is p for g in t.optimizers[1].param_groups for p in g["params"])
    before = float(bias)
    t.step(make_batch())
    assert abs(float(bias) - before) == pytest.approx(0.4, rel=1e-4)


def test_a_snapshot_of_another_layout_is_one_snapshot_error_line():
    """A snapshot of another model or optimizer layout (another version's, or config's) is refused with one
    line that says what to do, not torch's traceback."""
    from loopline.model.fm import FoundationModel
    from loopline.state.snapshots import SnapshotError

    from .test_fm import SMALL
    fm = OnlineTrainer(FoundationModel(SMALL))
    lr = OnlineTrainer(LogisticBaseline(SMALL.features))
    with pytest.raises(SnapshotError, match=r"^snapshot: does not fit this model \(.*\); it was written by another") as e:
        fm.load_state_dict(lr.state_dict())
    assert "\n" not in str(e.value)
    state = fm.state_dict()
    state["optimizers"][0]["param_groups"][0]["params"] = state["optimizers"][0]["param_groups"][0]["params"][:-1]
    with pytest.raises(SnapshotError, match="^snapshot: does not fit"):  # the optimizer's groups differ
        OnlineTrainer(FoundationModel(SMALL)).load_state_dict(state)
    state = fm.state_dict()
    with pytest.raises(SnapshotError, match="^snapshot: does not fit"):
        OnlineTrainer(FoundationModel(SMALL)).load_state_dict({**state, "optimizers": state["optimizers"][:1]})
