"""The VM learner's optimizers: first-order rows at their own Adagrad rate, rates checked at config, and
the intercept, started at the first weighted batch's label rate; the teacher gate, which distils only
from a teacher that beats the VM."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from loopline.errors import ConfigError
from loopline.model.vm import VMConfig, VMFeaturizer, VMLearner


def batch(cfg, n=64, seed=0):
    rng = np.random.default_rng(seed)
    exs = [{"ad": f"a{rng.integers(10)}", "campaign": f"c{rng.integers(3)}", "attrs": {"age": str(rng.integers(4))},
            "features": {}, "label": int(rng.random() < 0.1), "soft_label": None} for _ in range(n)]
    return VMFeaturizer(cfg).batch(exs)


def test_first_order_rows_step_at_lr_first_and_embeddings_at_lr_sparse():
    """Adagrad's first step on a row is lr * sign(gradient): the largest move of each table is its rate."""
    cfg = VMConfig(lr_first=0.4, lr_sparse=0.05)
    learner = VMLearner(cfg, seed=1)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    learner.learn_many(batch(cfg))
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in learner.model.named_parameters()}
    first = [n for n in moved if n.startswith("first.")]
    bags = [n for n in moved if n.startswith("bags.")]
    assert first and bags
    assert max(moved[n] for n in first) == pytest.approx(0.4, rel=1e-4)
    assert max(moved[n] for n in bags) == pytest.approx(0.05, rel=1e-4)


@pytest.mark.parametrize("field", ["lr_dense", "lr_sparse", "lr_first", "adapter_lr"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "0.1"])
def test_a_bad_learning_rate_is_a_one_line_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field}: must be a positive number"):
        VMConfig(**{field: value})


def test_every_embedding_table_and_the_intercept_are_in_the_two_row_groups():
    learner = VMLearner(VMConfig(), seed=0)
    groups = learner.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == [0.4, 0.05]
    assert sum(len(g["params"]) for g in groups) == 1 + sum(
        1 for m in learner.model.modules() if isinstance(m, (torch.nn.EmbeddingBag, torch.nn.Embedding)))
    assert any(p is learner.model.bias for p in groups[0]["params"])  # with the first-order rows, at their rate
    assert not any(p is learner.model.bias for g in learner.optimizers[1].param_groups for p in g["params"])


def test_a_vm_snapshot_of_another_recipe_is_one_snapshot_error_line():
    from loopline.state.snapshots import SnapshotError
    ah = VMLearner(VMConfig(distill="ah"), seed=0)
    with pytest.raises(SnapshotError, match="^snapshot: does not fit this model"):
        VMLearner(VMConfig(), seed=0).load_state_dict(ah.state_dict())


def _positives_of_a_new_campaign(cfg, weight):
    exs = [{"ad": f"a{i % 5}", "campaign": "c-new", "attrs": {}, "features": {}, "label": 1, "soft_label": None,
            "weight": weight} for i in range(32)]
    return VMFeaturizer(cfg).batch(exs)


@pytest.mark.parametrize("weight", [0.04, 0.25])
def test_down_weighted_positives_move_a_fresh_campaign_row_less(weight):
    """Adagrad's step ignores its gradient's scale: without the rows' mean weights, a new campaign's
    positives at weight 0.04 moved its rows as far as at weight 1 (model/optim.py)."""
    cfg = VMConfig()
    moves = {}
    for w in (weight, 1.0):
        learner = VMLearner(cfg, seed=0)
        row = learner.model.first["campaign"].weight
        b = _positives_of_a_new_campaign(cfg, w)
        before = row.detach().clone()
        moves[w] = []
        for _ in range(3):
            learner.learn_many(b)
            moves[w].append(float((row.detach() - before).abs().max()))
    assert moves[1.0][0] == pytest.approx(cfg.lr_first, rel=1e-4)  # Adagrad's first step: lr * sign(g)
    assert moves[weight][0] == pytest.approx(cfg.lr_first * weight ** 0.5, rel=1e-4)
    assert moves[weight][2] < 0.75 * moves[1.0][2]


def test_row_weights_are_each_rows_mean_over_the_examples_that_train_it():
    cfg = VMConfig(fields=("ad", "attrs"))
    learner = VMLearner(cfg, seed=0)
    exs = [{"ad": "a1", "attrs": {"age": "1"}, "label": 1, "weight": 0.5},
           {"ad": "a1", "attrs": {"age": "1", "geo": "x"}, "label": 0, "weight": 1.0},
           {"ad": "a2", "attrs": {}, "label": 1, "weight": 0.0}]  # weight 0: trains nothing, counts nothing
    b = VMFeaturizer(cfg).batch(exs)
    rw = learner._row_weights(b)
    ad = rw[learner.model.first["ad"].weight]
    assert rw[learner.model.bags["ad"].weight] is ad
    a1 = b.ids["ad"][0][0].item()
    assert ad[a1].item() == pytest.approx(0.75) and ad[b.ids["ad"][0][2]].item() == 0.0
    attrs, ids = rw[learner.model.first["attrs"].weight], b.ids["attrs"][0].tolist()
    assert attrs[ids[0]].item() == pytest.approx(0.75) and attrs[ids[2]].item() == pytest.approx(1.0)  # age=1; geo=x
    assert learner._row_weights(VMFeaturizer(cfg).batch([dict(e, weight=1.0) for e in exs])) is None  # unweighted


def _weighted(cfg, weights, seed=0, soft=None):
    rng = np.random.default_rng(seed)
    exs = [{"ad": f"a{rng.integers(10)}", "campaign": f"c{rng.integers(3)}", "attrs": {"age": str(rng.integers(4))},
            "features": {}, "label": int(rng.random() < 0.1), "soft_label": soft, "weight": float(w)}
           for w in weights]
    return VMFeaturizer(cfg).batch(exs)


def test_a_fresh_vm_starts_at_its_first_weighted_batchs_label_rate():
    """From p = 0.5, Adagrad's scale-free steps took several batches to reach a 4% base rate."""
    cfg = VMConfig()
    learner = VMLearner(cfg, seed=0)
    b = _weighted(cfg, [0.0] * 40 + [1.0, 0.5] * 30)  # the stream's first window weighs 0
    learner.learn_many(b)
    w, y = b.weights.numpy(), b.labels.numpy()
    p = learner.predict_many(b)
    assert learner.intercept_started
    assert float((w * p).sum() / w.sum()) == pytest.approx((float((w * y).sum()) + 0.5) / (w.sum() + 1.0), abs=1e-5)
    assert float(p.mean()) < 0.2  # one Adagrad step alone leaves it near 0.5 - 5 * lr_first


def test_a_batch_of_weight_zero_leaves_the_intercept_to_the_next_one():
    cfg = VMConfig()
    learner = VMLearner(cfg, seed=0)
    learner.learn_many(_weighted(cfg, [0.0] * 64))
    assert not learner.intercept_started and float(learner.model.bias.detach()) == 0.0
    learner.learn_many(_weighted(cfg, [1.0] * 64, seed=1))
    assert learner.intercept_started and float(learner.model.bias.detach()) < -1.0


def test_the_intercept_starts_once_and_then_learns_at_its_rate():
    cfg = VMConfig()
    learner = VMLearner(cfg, seed=0)
    learner.learn_many(_weighted(cfg, [1.0] * 64))
    started = float(learner.model.bias.detach())
    learner.learn_many(_weighted(cfg, [1.0] * 64, seed=2))  # another rate: not solved for again
    assert 0.0 < abs(float(learner.model.bias.detach()) - started) <= cfg.lr_first + 1e-6


def _distilled_pair(cfg, soft_a, soft_b):
    """Two copies of one started learner, after a step on the same examples with soft labels from
    ``soft_a(y)`` and ``soft_b(y)``."""
    first = VMLearner(cfg, seed=0)
    first.learn_many(_weighted(cfg, [1.0] * 64))
    second = VMLearner(cfg, seed=0)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    b = _weighted(cfg, [1.0] * 64, seed=1)
    first.learn_many(dataclasses.replace(b, soft=soft_a(b.labels)))
    second.learn_many(dataclasses.replace(b, soft=soft_b(b.labels)))
    return first, second


@pytest.mark.parametrize("distill", ["kd", "ah"])
def test_a_teacher_worse_than_the_vm_teaches_it_nothing(distill):
    """Soft labels of 0.9 and 0.5 on a 10% stream both lose to a VM at the label rate: the gate closes,
    and the two copies end bit for bit equal (the labels alone trained them)."""
    cfg = VMConfig(distill=distill)
    first, second = _distilled_pair(cfg, lambda y: torch.full_like(y, 0.9), lambda y: torch.full_like(y, 0.5))
    assert first.gated_steps == second.gated_steps == 1
    for p, q in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("distill", ["kd", "ah"])
def test_a_teacher_better_than_the_vm_is_distilled(distill):
    cfg = VMConfig(distill=distill)
    first, second = _distilled_pair(cfg, lambda y: 0.01 + 0.98 * y, lambda y: 0.05 + 0.9 * y)
    assert first.gated_steps == second.gated_steps == 0
    assert not all(torch.equal(p, q) for p, q in zip(first.model.parameters(), second.model.parameters()))


def test_without_the_gate_a_worse_teacher_still_teaches():
    cfg = VMConfig(distill="kd", teacher_gate=False)
    first, second = _distilled_pair(cfg, lambda y: torch.full_like(y, 0.9), lambda y: torch.full_like(y, 0.5))
    assert first.gated_steps == 0
    assert not torch.equal(first.model.serving.weight, second.model.serving.weight)


def test_the_gate_follows_the_recent_losses():
    """A teacher that was bad and then turns good opens the gate once its decayed loss falls below the
    VM's: a few steps, not never."""
    cfg = VMConfig(distill="kd", gate_decay=0.5)
    learner = VMLearner(cfg, seed=0)
    learner.learn_many(_weighted(cfg, [1.0] * 64))
    b = _weighted(cfg, [1.0] * 64, seed=1)
    learner.learn_many(dataclasses.replace(b, soft=torch.full_like(b.soft, 0.9)))
    assert learner.gated_steps == 1
    for _ in range(6):
        learner.learn_many(dataclasses.replace(b, soft=0.01 + 0.98 * b.labels))
    assert 2 <= learner.gated_steps < 7


@pytest.mark.parametrize("value", [-0.1, 1.0, True, "0.9"])
def test_gate_decay_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match="gate_decay"):
        VMConfig(gate_decay=value)


def test_a_restored_vm_keeps_its_started_intercept():
    cfg = VMConfig()
    learner = VMLearner(cfg, seed=0)
    learner.learn_many(_weighted(cfg, [1.0] * 64))
    state = copy.deepcopy(learner.state_dict())  # (in one process, a loaded optimizer shares its tensors)
    restored = VMLearner(cfg, seed=0)
    restored.load_state_dict(state)
    assert restored.intercept_started
    restored.learn_many(_weighted(cfg, [1.0] * 64, seed=3))
    learner.learn_many(_weighted(cfg, [1.0] * 64, seed=3))
    assert float(restored.model.bias.detach()) == float(learner.model.bias.detach())
    del state["intercept_started"]  # a snapshot from before the flag: a VM that trained has its intercept
    older = VMLearner(cfg, seed=0)
    older.load_state_dict(state)
    assert older.intercept_started


def test_a_restored_vm_keeps_its_teacher_gate():
    cfg = VMConfig(distill="kd")
    learner = VMLearner(cfg, seed=0)
    learner.learn_many(_weighted(cfg, [1.0] * 64, soft=0.9))  # a bad teacher: the gate closes
    restored = VMLearner(cfg, seed=0)
    restored.load_state_dict(copy.deepcopy(learner.state_dict()))
    assert restored.gated_steps == learner.gated_steps == 1
    assert torch.equal(restored.gate_sums, learner.gate_sums) and float(restored.gate_sums[0]) > 0
