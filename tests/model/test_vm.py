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


def test_every_embedding_table_is_in_one_of_the_two_row_groups():
    learner = VMLearner(VMConfig(), seed=0)
    groups = learner.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == [0.4, 0.05]
    assert sum(len(g["params"]) for g in groups) == sum(
        1 for m in learner.model.modules() if isinstance(m, (torch.nn.EmbeddingBag, torch.nn.Embedding)))


def test_a_vm_snapshot_of_another_recipe_is_one_snapshot_error_line():
    from loopline.state.snapshots import SnapshotError
    ah = VMLearner(VMConfig(distill="ah"), seed=0)
    with pytest.raises(SnapshotError, match="^snapshot: does not fit this model"):
        VMLearner(VMConfig(), seed=0).load_state_dict(ah.state_dict())
