"""The foundation model: shapes, the LoopFM autoencoder (stop-gradient, falling reconstruction error,
Matryoshka prefixes), and snapshot/restore giving identical predictions."""

import dataclasses

import numpy as np
import pytest
import torch

from loopline.errors import ConfigError
from loopline.model.features import FeatureConfig, Featurizer
from loopline.model.fm import FMConfig, FoundationModel, LoopFMAutoencoder, _recent_mean
from loopline.model.kunlun import flops_per_example, param_count
from loopline.model.trainer import OnlineTrainer, TrainerConfig

SMALL = FMConfig(features=FeatureConfig(table_sizes={"user": 200, "ad": 100, "campaign": 20, "vertical": 8,
                                                     "attrs": 64, "feats": 64}, seq_len=8))


def make_batch(n=64, seed=0):
    rng = np.random.default_rng(seed)
    exs, hists = [], []
    for i in range(n):
        ad = f"a{rng.integers(0, 10)}"
        exs.append({"id": f"i{i}", "user": f"u{rng.integers(0, 30)}", "ad": ad, "campaign": f"c{rng.integers(0, 3)}",
                    "vertical": "feed", "ts": 1000.0 + i, "attrs": {"age": "25-34"}, "features": {"slot": "1"},
                    "label": int(ad in ("a1", "a2"))})
        hists.append([(900.0 + j, f"a{rng.integers(0, 10)}", "c0", rng.choice(["impression", "click"]))
                      for j in range(int(rng.integers(0, 12)))])
    return Featurizer(SMALL.features).batch(exs, hists)


def test_forward_gives_a_logit_per_example_and_a_bounded_code():
    torch.manual_seed(0)
    out = FoundationModel(SMALL)(make_batch())
    assert out["logit"].shape == (64,) and out["code"].shape == (64, SMALL.code_dim)
    assert out["code"].abs().max() <= 1.0 and torch.isfinite(out["aux_loss"])


def test_autoencoder_loss_does_not_reach_the_fm():
    torch.manual_seed(0)
    m = FoundationModel(SMALL)
    m(make_batch())["aux_loss"].backward()
    fm_grads = [p.grad for n, p in m.named_parameters() if not n.startswith("autoencoder.") and p.grad is not None]
    ae_grads = [p.grad for n, p in m.named_parameters() if n.startswith("autoencoder.")]
    assert fm_grads == [] or all(float(g.abs().sum()) == 0 for g in fm_grads)  # stop-gradient
    assert all(g is not None and float(g.abs().sum()) > 0 for g in ae_grads)


def test_reconstruction_error_falls_while_the_fm_trains():
    """Relative to the activations' own size: as the FM learns they grow (fivefold here, 40 passes over
    4 batches with the rows at Adagrad 0.4), so the absolute error can grow while the fit improves."""
    torch.manual_seed(0)
    t = OnlineTrainer(FoundationModel(SMALL), TrainerConfig(lr_dense=3e-3))
    batches = [make_batch(seed=s) for s in range(4)]
    seen = []
    t.model.autoencoder.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))

    def relative_errors():
        out = []
        with torch.no_grad():
            for b in batches:
                seen.clear()
                loss = float(t.model(b)["ae_loss"])
                out.append(loss / float(seen[0].pow(2).mean()))
        return out
    first = relative_errors()
    for _ in range(40):
        for b in batches:
            t.learn_many(b)
    last = relative_errors()
    # the target moves too (the FM's activations change as it learns), so the drop is partial
    assert np.mean(last) < 0.75 * np.mean(first), (first, last)


def test_matryoshka_prefixes_are_trained_to_reconstruct():
    torch.manual_seed(0)
    ae = LoopFMAutoencoder(12, 8, 32, matryoshka=(2, 4))
    x = torch.randn(256, 12)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        ae.loss(x)[0].backward()
        opt.step()
    z = ae.encode(x)
    errs = {k: float(torch.nn.functional.mse_loss(ae.decoder(torch.cat([z[:, :k], torch.zeros_like(z[:, k:])], 1)), x))
            for k in (2, 4, 8)}
    assert errs[8] < errs[4] < errs[2] < float(x.var())  # each prefix is a usable, coarser code


def test_snapshot_restore_gives_identical_fm_predictions(tmp_path):
    torch.manual_seed(0)
    a = OnlineTrainer(FoundationModel(SMALL))
    for s in range(3):
        a.step(make_batch(seed=s))
    path = a.save(str(tmp_path))
    torch.manual_seed(123)  # a different initialization, overwritten by the restore
    b = OnlineTrainer(FoundationModel(SMALL))
    b.restore(path)
    probe = make_batch(seed=9)
    assert np.array_equal(a.predict_many(probe), b.predict_many(probe))


def test_flops_and_parameters_are_reported():
    m = FoundationModel(SMALL)
    flops = flops_per_example(m.encoder, {"impression": 8, "click": 8})
    assert flops > 0 and param_count(m) > param_count(m.encoder) > 0
    assert m.flops_per_example() > flops  # the dense layers come on top of the history encoder


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="^seq"):
        FMConfig(seq={"impression": {}})
    with pytest.raises(ConfigError, match="^matryoshka"):
        FMConfig(matryoshka=(40,))
    with pytest.raises(ConfigError, match="^recent"):
        FMConfig(recent=-1)


def test_recent_mean_averages_only_the_newest_real_tokens():
    tokens = torch.arange(1.0, 7.0).reshape(1, 6, 1).repeat(3, 1, 2)  # values 1..6, newest last
    mask = torch.tensor([[True] * 6, [False, False, False, False, True, True], [False] * 6])
    out = _recent_mean(tokens, mask, 3)
    assert out[:, 0].tolist() == [5.0, 5.5, 0.0]  # mean of 4, 5, 6; of the two real (5, 6); no history: 0


def test_recent_history_reaches_the_logit_beside_the_encoder():
    torch.manual_seed(0)
    with_recent, without = FoundationModel(SMALL), FoundationModel(dataclasses.replace(SMALL, recent=0))
    widths = sum(SMALL.seq[t]["d_model"] for t in SMALL.seq)
    assert with_recent.history_dim == without.encoder.out_dim + widths
    assert with_recent.mlp[0].in_features == without.mlp[0].in_features + widths
    b = make_batch()
    ad, camp, gap, mask = b.seq["click"]
    newest = ad.clone()
    newest[:, -1] = (newest[:, -1] + 1) % SMALL.features.table_sizes["ad"]  # another ad as the newest click
    changed = b._replace(seq={**b.seq, "click": (newest, camp, gap, mask)})
    moved = {}
    for name, m in (("recent", with_recent), ("encoder only", without)):
        m.eval()
        # the Kunlun encoder silenced: whatever still moves the logit came by the recent mean
        m.encoder.forward = lambda seqs, summary, width=m.encoder.out_dim: torch.zeros(len(summary), width)
        with torch.no_grad():
            moved[name] = (m(b)["logit"] - m(changed)["logit"]).abs()
    assert (moved["recent"][mask[:, -1]] > 0).all() and (moved["recent"][~mask.any(1)] == 0).all()
    assert (moved["encoder only"] == 0).all()


def test_scoring_without_the_autoencoder_losses_gives_the_same_logit_and_code():
    torch.manual_seed(0)
    m = FoundationModel(SMALL).eval()
    b = make_batch()
    with torch.no_grad():
        full, lean = m(b), m(b, aux=False)
    assert torch.equal(full["logit"], lean["logit"]) and torch.equal(full["code"], lean["code"])
    assert set(lean) == {"logit", "code"}


# -- managed-collision user table (issue 15) ----------------------------------------------------------
def _users_batch(f, users):
    return f.batch([{"user": u, "ad": "a", "campaign": "c", "vertical": "v", "ts": 1.0, "label": i % 2}
                    for i, u in enumerate(users)], [[] for _ in users])


def test_a_managed_user_table_gives_users_that_share_a_hashed_row_rows_of_their_own():
    from loopline.model.features import hash_id
    from loopline.model.fm_settings import UserTableConfig
    users = [f"u{i}" for i in range(200)]
    by_row = {}
    for u in users:  # two users the 8-row hashed table puts on one row
        by_row.setdefault(hash_id("user", u, 8), []).append(u)
    a, b = next(us for us in by_row.values() if len(us) > 1)[:2]
    sizes = dict(FeatureConfig().table_sizes, user=8)
    hashed = FMConfig(features=FeatureConfig(table_sizes=sizes))
    managed = FMConfig(features=FeatureConfig(table_sizes=sizes), user_table=UserTableConfig("managed", managed_rows=8))
    assert managed.features.managed == ("user",)  # the raw ids come with the batch
    for cfg, shared in ((hashed, True), (managed, False)):
        torch.manual_seed(0)
        t = OnlineTrainer(FoundationModel(cfg), TrainerConfig())
        f = Featurizer(cfg.features)
        for _ in range(3):
            t.step(_users_batch(f, [a, b]))  # a clicks, b does not: own rows must part
        t.model.eval()
        x = t.model._sparse(_users_batch(f, [a, b]))[:, :cfg.emb_dim]  # the user columns
        assert torch.equal(x[0], x[1]) is shared


def test_evicted_rows_start_from_zero_with_a_fresh_adagrad_sum_and_are_counted():
    from loopline.model.fm_settings import UserTableConfig
    cfg = FMConfig(user_table=UserTableConfig("managed", managed_rows=5))  # 4 rows for ids, 1 shared by the rest
    torch.manual_seed(0)
    t = OnlineTrainer(FoundationModel(cfg), TrainerConfig())
    f = Featurizer(cfg.features)
    table = t.model.user_ebc.embedding_bags["t_user"].weight
    for step in range(6):
        before = table.detach().clone()
        t.model.train()
        t.model._sparse(_users_batch(f, [f"s{step}-{i}" for i in range(3)]))  # new users every step
        fresh = t.model.take_fresh_rows()[table]
        assert torch.all(table[fresh] == 0) and not torch.equal(before[fresh], table[fresh].detach())
        t.step(_users_batch(f, [f"s{step}-{i}" for i in range(3)]))
        sums = t.optimizers[0].state[table]["sum"]
        assert torch.count_nonzero(sums[fresh]) > 0  # this step's gradient only: reset before it
    report = t.model.embedding_report()
    assert report["embeddings"] == "managed" and report["open_rows"] == 0
    assert report["admitted"] >= report["evicted"] > 0 and report["admitted"] - report["evicted"] == 4
    # the admission state and the counts are buffers: a snapshot carries them
    again = OnlineTrainer(FoundationModel(cfg), TrainerConfig())
    again.load_state_dict(t.state_dict())
    assert again.model.embedding_report()["evicted"] == report["evicted"]
    again.model.eval(), t.model.eval()
    b = _users_batch(f, ["s5-0", "s0-0", "nobody"])
    assert torch.equal(again.model(b, aux=False)["logit"], t.model(b, aux=False)["logit"])


@pytest.mark.parametrize("bad, field", [({"embeddings": "lru"}, "embeddings"), ({"managed_rows": 1}, "managed_rows"),
                                        ({"managed_eviction_interval": 0}, "managed_eviction_interval")])
def test_a_bad_embeddings_setting_names_its_field(bad, field):
    from loopline.model.fm_settings import UserTableConfig
    with pytest.raises(ConfigError, match=field):
        UserTableConfig(**bad)
