"""The FM over torch.distributed ranks: the same numbers as one rank, snapshots in the one-rank layout."""

import numpy as np
import pytest
import torch

from loopline.errors import ConfigError
from loopline.model.features import Featurizer
from loopline.model.fm import FMConfig, FoundationModel
from loopline.model.ranks import RankedTrainer, RanksConfig, _pack, _share, _unpack, broadcast_state, share_bounds
from loopline.model.trainer import OnlineTrainer, TrainerConfig


def batches(n_batches, size, seed=0):
    """Featurized micro-batches with histories, attributes and importance weights (the last one short)."""
    rng = np.random.default_rng(seed)
    f = Featurizer()
    out = []
    for b in range(n_batches):
        n = size if b < n_batches - 1 else 1  # a last batch smaller than the ranks: one rank gets nothing
        exs, hists = [], []
        for i in range(n):
            ad = f"a{rng.integers(0, 30)}"
            exs.append({"user": f"u{rng.integers(0, 40)}", "ad": ad, "campaign": f"c{rng.integers(0, 5)}",
                        "vertical": "v", "ts": 1000.0 + b, "attrs": {"g": str(rng.integers(0, 3))},
                        "label": int(rng.random() < (0.5 if ad < "a1" else 0.1))})
            hists.append([(900.0 + k, f"a{rng.integers(0, 30)}", "c1", "impression" if k % 3 else "click")
                          for k in range(int(rng.integers(0, 12)))])
        batch = f.batch(exs, hists)
        out.append(batch._replace(weights=torch.from_numpy(rng.uniform(0.2, 1.0, n).astype(np.float32))))
    return out


def test_a_batch_crosses_the_wire_and_splits_into_disjoint_shares():
    b = batches(2, 7)[0]
    again = _unpack(*_pack(1, b))
    for k in b.sparse:
        assert all(torch.equal(x, y) for x, y in zip(b.sparse[k], again.sparse[k]))
    assert all(torch.equal(x, y) for t in b.seq for x, y in zip(b.seq[t], again.seq[t]))
    assert torch.equal(again.weights, b.weights) and torch.equal(again.labels, b.labels)
    shares = [_share(b, *share_bounds(7, r, 3)) for r in range(3)]
    assert [s.size for s in shares] == [2, 2, 3]
    for k in b.sparse:  # the shares' jagged ids, in order, are the batch's
        assert torch.equal(torch.cat([s.sparse[k][0] for s in shares]), b.sparse[k][0])
    assert torch.equal(torch.cat([s.labels for s in shares]), b.labels)


@pytest.mark.parametrize("bad, field", [({"ranks": 0}, "fm_ranks"), ({"master": "nohost"}, "fm_master"),
                                        ({"master": "127.0.0.1:0", "join": True}, "fm_master"),
                                        ({"backend": "mpi"}, "fm_backend")])
def test_a_bad_ranks_setting_names_its_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        RanksConfig(**bad)


def test_two_ranks_train_the_one_rank_model_and_snapshot_in_its_layout():
    """Rank 0 here, rank 1 launched: predictions and LoopFM codes match one rank's up to floating-point
    order; a one-rank snapshot loads onto the two ranks, and theirs (gathered from the shards) into a plain
    one-rank trainer that predicts what the two ranks predict. (Float order does show: an embedding
    element whose gradient is ~1e-8, a near-cancellation, takes Adagrad's first step of +-lr whatever its
    size, so the weights drift apart at about 1e-4 in the predictions over a dozen steps; a missing or
    doubled gradient moves them by 1e-2.)"""
    cfg = TrainerConfig(seed=0)
    torch.manual_seed(0)
    one = OnlineTrainer(FoundationModel(FMConfig()), cfg)
    torch.manual_seed(0)
    two = RankedTrainer.start(FoundationModel(FMConfig()), cfg, RanksConfig(ranks=2))
    try:
        assert set(two.plan) == {f"t_{k}" for k in ("user", "ad", "campaign", "vertical", "attrs", "feats")}
        for i, b in enumerate(batches(6, 48)):
            p1, o1 = one.step_outputs(b)
            p2, o2 = two.step_outputs(b)
            assert p2.shape == p1.shape and np.abs(p1 - p2).max() < (1e-7 if i == 0 else 2e-3)
            assert o2["code"].shape == o1["code"].shape and (o1["code"] - o2["code"]).abs().max() < 1e-2
        state = two.state_dict()
        two.load_state_dict(one.state_dict())  # a one-rank snapshot, scattered over the two ranks
        nxt = batches(3, 40, seed=9)
        p2, _ = two.step_outputs(nxt[0])
        after = two.state_dict()
    finally:
        two.close()
    assert state["version"] == 6 and after["version"] == 7
    p1, _ = one.step_outputs(nxt[0])
    assert np.abs(p1 - p2).max() < 2e-3
    resumed = OnlineTrainer(FoundationModel(FMConfig()), cfg)
    resumed.load_state_dict(after)  # the two-rank snapshot, on one rank
    with torch.no_grad():
        q1 = torch.sigmoid(one.model(nxt[1], aux=False)["logit"])
        q2 = torch.sigmoid(resumed.model(nxt[1], aux=False)["logit"])
    # (over 40 examples: a near-zero gradient's +-lr first step moves one by up to ~5e-3; a lost Adagrad
    # sum or weight moves every example)
    assert (q1 - q2).abs().mean() < 1e-3 and (q1 - q2).abs().max() < 1e-2
    # the tables' Adagrad sums came back from their shards
    for a, b in zip(one.state_dict()["optimizers"][0]["state"].values(), after["optimizers"][0]["state"].values()):
        assert torch.allclose(a["sum"], b["sum"], rtol=1e-2, atol=1e-4) and float(b["step"]) == 7


def test_broadcast_state_keeps_int_keys_and_tensors_on_one_rank(tmp_path):
    import torch.distributed as dist
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        got = broadcast_state({"state": {0: {"sum": torch.ones(2, 3)}}, "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]})
    finally:
        dist.destroy_process_group()
    assert list(got["state"]) == [0] and torch.equal(got["state"][0]["sum"], torch.ones(2, 3))
    assert got["groups"][0]["betas"] == [0.9, 0.99]


def test_a_rank_that_dies_fails_the_next_step_with_one_line_not_a_hang():
    from loopline.errors import RanksError
    torch.manual_seed(0)
    two = RankedTrainer.start(FoundationModel(FMConfig()), TrainerConfig(), RanksConfig(ranks=2, timeout_s=20))
    try:
        b = batches(1, 16)[0]
        two.step_outputs(b)
        two.procs[0].kill()
        two.procs[0].join(timeout=10)
        with pytest.raises(RanksError, match="^fm ranks: step_outputs failed") as err:
            two.step_outputs(b)
        assert "\n" not in str(err.value)
    finally:
        two.close()
