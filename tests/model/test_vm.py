"""The VM learner's optimizers: first-order rows at their own Adagrad rate, and rates checked at config."""

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
