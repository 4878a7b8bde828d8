"""The Probe's streaming statistics against numpy on the recorded activations, its cadence, reservoir,
sampling, merge, overhead accounting; MERE."""

import numpy as np
import pytest
import torch
from torch import nn

from loopline.errors import ConfigError
from loopline.kernels.probe import Probe, ProbeConfig, WelfordStats, mere


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(12, 12, generator=g)
    return [torch.randn(b, 12, generator=g) @ mix + 5.0 for b in sizes]  # correlated, off-centre


def _recorder(model):
    """A plain hook recording every layer's actual inputs (the batch reference)."""
    seen = {"0": [], "2": []}
    for n in seen:
        model[int(n)].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].detach().clone()))
    return seen


def _as_np(chunks):
    return torch.cat(chunks).double().numpy()


def test_statistics_match_numpy_after_every_batch():
    model, batches = _model(), _batches([7, 1, 30, 64, 2])
    seen = _recorder(model)
    probe = Probe(model, ProbeConfig(every=1))
    with probe, torch.no_grad():
        for b in batches:
            model(b)
            for name, chunks in seen.items():
                x, s = _as_np(chunks), probe.stats[name]
                assert s.n == len(x)
                np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-5, atol=1e-4)
                if len(x) > 1:
                    np.testing.assert_allclose(s.cov.numpy(), np.cov(x, rowvar=False), rtol=1e-4, atol=1e-3)
                assert float(s.amax) == pytest.approx(np.abs(x).max(), rel=1e-6)


def test_cadence_folds_in_every_nth_forward_pass_only():
    model, batches = _model(), _batches([4] * 10)
    probe = Probe(model, ProbeConfig(every=3))
    with probe, torch.no_grad():
        for b in batches:
            model(b)
    assert probe.steps == 10 and probe.sampled_steps == 3  # passes 2, 5, 8: the last of each period of 3
    ref = torch.cat([batches[i] for i in (2, 5, 8)]).double().numpy()  # layer 0 sees the raw input
    assert probe.stats["0"].n == len(ref)
    np.testing.assert_allclose(probe.stats["0"].mean.numpy(), ref.mean(0), rtol=1e-5, atol=1e-4)


def test_merging_two_probes_equals_one_probe_over_both_streams():
    a, b, both = WelfordStats(12), WelfordStats(12), WelfordStats(12)
    xs = _batches([10, 20, 5, 33])
    for x in xs[:2]:
        a.update(x)
    for x in xs[2:]:
        b.update(x)
    for x in xs:
        both.update(x)
    a.merge(b)
    assert a.n == both.n
    torch.testing.assert_close(a.mean, both.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.cov, both.cov, rtol=1e-4, atol=1e-4)
    assert float(a.amax) == float(both.amax)


def test_reservoir_keeps_real_rows_up_to_its_size():
    model, batches = _model(), _batches([50, 50, 50])
    probe = Probe(model, ProbeConfig(every=1, record_rows=40))
    with probe, torch.no_grad():
        for b in batches:
            model(b)
    rec = probe.recorded("0")
    assert rec.shape == (40, 12)
    everything = torch.cat(batches)
    assert all(bool((everything == r).all(dim=1).any()) for r in rec)  # every kept row is a real input row
    assert probe.max_rows["0"] == 50


def test_samples_follow_the_learned_gaussian():
    s = WelfordStats(12)
    for x in _batches([500, 500]):
        s.update(x)
    draw = s.sample(20000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(draw.mean(0), s.mean, rtol=0.05, atol=0.15)
    torch.testing.assert_close(torch.cov(draw.T), s.cov, rtol=0.1, atol=0.3)


def test_overhead_is_measured_and_hooks_come_off():
    model, batches = _model(), _batches([16] * 5)
    probe = Probe(model, ProbeConfig(every=1))
    with probe, torch.no_grad():
        for b in batches:
            model(b)
    assert 0 < probe.hook_s < probe.forward_s and probe.overhead() > 0
    n = probe.stats["0"].n
    model(batches[0])  # detached: nothing more is folded in
    assert probe.stats["0"].n == n


def test_mere_is_the_mean_relative_error_with_a_floor_for_zeros():
    ref = torch.tensor([1.0, -2.0, 4.0, 0.0])
    assert float(mere(ref, ref)) == 0.0
    out = ref + torch.tensor([0.1, 0.2, -0.4, 0.0])
    assert float(mere(out, ref)) == pytest.approx((0.1 + 0.1 + 0.1 + 0.0) / 4, rel=1e-5)
    assert torch.isfinite(mere(ref + 0.01, ref))  # a zero reference element does not blow up


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="^every"):
        ProbeConfig(every=0)
    with pytest.raises(ConfigError, match="^layers"):
        Probe(_model(), ProbeConfig(layers=("nope",)))
