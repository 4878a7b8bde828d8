"""Dispatch follows its rule both ways (injected timings), a real measured run on this machine follows
its own measurements, and the table survives a snapshot round-trip and re-applies at load."""

import orjson
import pytest
import torch
from torch import nn

from loopline.errors import ConfigError
from loopline.kernels.dispatch import (CANDIDATES, HIGH_PRECISION, TABLE_KEY, DispatchConfig, DispatchLinear,
                                       apply_table, dispatch_model, load_table, save_table)
from loopline.kernels.fp8_gemm import triton_supported
from loopline.model.mods import MLP

EMULATED = ("emulated:tensor", "emulated:row", "emulated:block")


def _model(seed=0):
    torch.manual_seed(seed)
    return MLP([64, 128, 32, 1], act="hardswish", norm="block", bias="last")


def _calib(n=3, rows=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 64, generator=g).relu() * 2 for _ in range(n)]


def _timer(seconds: dict):
    """A fake clock: the baseline takes 1.0 s, candidate c takes seconds[c]."""
    return lambda fn, key: 1.0 if key[1] == HIGH_PRECISION else seconds[key[1]]


def _dispatch(seconds, **cfg):
    return dispatch_model(_model(), _calib(), DispatchConfig(candidates=EMULATED, samples=256, **cfg),
                          timer=_timer(seconds))


def test_the_fastest_accurate_candidate_wins_when_it_is_fast_enough():
    model, table = _dispatch({"emulated:tensor": 0.5, "emulated:row": 0.4, "emulated:block": 0.6})
    assert [r["choice"] for r in table["layers"]] == ["emulated:row"] * 3
    assert all(isinstance(m, DispatchLinear) and m.candidate == "emulated:row" for m in model.linears)
    assert table["summary"]["fp8"] == 3 and table["applied"]["swapped"] == ["linears.0", "linears.1", "linears.2"]
    row = table["layers"][0]
    assert {c["name"]: c["speedup"] for c in row["candidates"]} == {"emulated:tensor": 2.0, "emulated:row": 2.5,
                                                                     "emulated:block": 1.0 / 0.6}


def test_slower_fp8_keeps_high_precision_and_says_why():
    model, table = _dispatch({c: 2.0 for c in EMULATED})
    assert all(r["choice"] == HIGH_PRECISION for r in table["layers"])
    assert all(type(m) is nn.Linear for m in model.linears)
    assert "best speedup 0.50x" in table["layers"][0]["why"]


def test_speedup_must_be_strictly_above_the_minimum():
    _, table = _dispatch({c: 1.0 / 1.05 for c in EMULATED})  # exactly 1.05x
    assert all(r["choice"] == HIGH_PRECISION for r in table["layers"])
    _, table = _dispatch({c: 1.0 / 1.06 for c in EMULATED})
    assert all(r["choice"] != HIGH_PRECISION for r in table["layers"])


def test_a_fast_but_inaccurate_candidate_is_rejected():
    _, table = _dispatch({c: 0.1 for c in EMULATED}, threshold=1e-6)  # nothing in FP8 is that accurate
    for r in table["layers"]:
        assert r["choice"] == HIGH_PRECISION
        assert all(c["passes_speedup"] and not c["passes_mere"] for c in r["candidates"])
        assert "0 of 3" in r["why"]


def test_real_measured_run_follows_its_own_measurements():
    model, table = dispatch_model(_model(), _calib(), DispatchConfig(samples=256, repeats=5))
    assert orjson.loads(orjson.dumps(table)) == table  # plain, JSON-able data
    for r in table["layers"]:
        measured = [c for c in r["candidates"] if c["available"]]
        assert measured, "at least the emulated candidates run everywhere"
        for c in measured:
            assert c["seconds"] > 0 and c["passes_speedup"] == (c["speedup_q25"] > 1.05)
            assert c["speedup_q25"] <= c["speedup"]
            assert c["passes_mere"] == (c["mere_max"] < 0.2) and set(c["mere"]) == {"normal", "learned", "real"}
        passing = [c for c in measured if c["passes_mere"] and c["passes_speedup"]]
        if passing:
            assert r["choice"] == min(passing, key=lambda c: c["seconds"])["name"]
        else:
            assert r["choice"] == HIGH_PRECISION and "no candidate is both accurate and faster" in r["why"]
        if not triton_supported()[0]:
            assert {c["name"] for c in r["candidates"] if not c["available"]} >= {"triton:row", "scaled_mm:row"}
    swapped = {n for n, m in model.named_modules() if isinstance(m, DispatchLinear)}
    assert swapped == {r["name"] for r in table["layers"] if r["choice"] != HIGH_PRECISION}


def test_dispatch_linear_keeps_the_linear_state_and_tracks_weight_changes():
    lin = nn.Linear(64, 48)
    d = DispatchLinear(lin, "emulated:row")
    assert list(d.state_dict()) == list(lin.state_dict())
    x = torch.randn(5, 3, 64)
    with torch.no_grad():
        y, exact = d(x), lin(x)
    assert y.shape == (5, 3, 48)
    assert float((y - exact).norm() / exact.norm()) < 0.06
    with torch.no_grad():
        lin.weight.mul_(2.0)  # shared parameter: the prepared FP8 weight must follow
        torch.testing.assert_close(d(x) - lin.bias, 2 * (y - lin.bias), rtol=1e-5, atol=1e-5)


def test_dispatch_linear_trains_in_high_precision_and_serves_fp8():
    lin = nn.Linear(32, 16)
    d = DispatchLinear(lin, "emulated:row")
    x = torch.randn(8, 32)
    y_train = d(x)  # autograd records: plain Linear, exact gradients
    torch.testing.assert_close(y_train, lin(x))
    y_train.sum().backward()
    assert lin.weight.grad is not None
    with torch.no_grad():
        y_serve = d(x)
    assert not torch.equal(y_serve, y_train.detach())  # FP8-rounded
    assert float((y_serve - y_train.detach()).norm() / y_train.detach().norm()) < 0.06


def test_table_round_trips_with_a_snapshot_and_reapplies_at_load(tmp_path):
    served, table = _dispatch({"emulated:tensor": 0.5, "emulated:row": 0.7, "emulated:block": 0.9})
    snap = tmp_path / "snapshot.pt"
    torch.save({"model": served.state_dict(), TABLE_KEY: table}, snap)
    beside = save_table(str(tmp_path / "beside.pt"), table)
    assert load_table(str(snap)) == table == load_table(beside)

    state = torch.load(snap, weights_only=True)
    fresh = _model(seed=1)
    applied = apply_table(fresh, load_table(str(snap)))
    fresh.load_state_dict(state["model"])  # same keys as before the swap
    assert applied["swapped"] == ["linears.0", "linears.1", "linears.2"] and not applied["kept"]
    x = _calib(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), served(x))


def test_a_choice_this_machine_cannot_run_stays_high_precision():
    if triton_supported()[0]:
        pytest.skip("this machine runs the triton kernel")
    model = _model()
    table = {"layers": [{"name": "linears.0", "choice": "triton:row"}, {"name": "linears.1", "choice": HIGH_PRECISION}]}
    applied = apply_table(model, table)
    assert applied["swapped"] == [] and "cannot run here" in applied["kept"]["linears.0"]
    assert type(model.linears[0]) is nn.Linear


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="^candidates"):
        DispatchConfig(candidates=("cutlass:row",))
    with pytest.raises(ConfigError, match="^threshold"):
        DispatchConfig(threshold=0)
    with pytest.raises(ConfigError, match="^force"):
        DispatchConfig(force="emulated:fp4")
    with pytest.raises(ConfigError, match="^rows"):
        DispatchConfig(rows=0)


@pytest.mark.skipif(not triton_supported()[0], reason=f"FP8 GPU: {triton_supported()[1]}")
def test_gpu_dispatch_measures_the_fp8_kernels():
    torch.manual_seed(0)
    model = MLP([2048, 4096, 2048, 1]).cuda().bfloat16()
    calib = [torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    _, table = dispatch_model(model, calib, DispatchConfig(samples=512))
    big = table["layers"][0]
    assert {c["name"] for c in big["candidates"] if c["available"]} >= {"triton:row", "triton:block"}
    assert all(c in CANDIDATES for c in [r["choice"] for r in table["layers"] if r["choice"] != HIGH_PRECISION])


def test_force_serves_a_candidate_regardless_of_speed_for_quality_studies():
    model, table = dispatch_model(_model(), _calib(), DispatchConfig(force="emulated:row", samples=256),
                                  timer=_timer({"emulated:row": 10.0}))  # 10x slower, still chosen
    assert [r["choice"] for r in table["layers"]] == ["emulated:row"] * 3
    assert all("forced" in r["why"] for r in table["layers"])
    assert all(isinstance(m, DispatchLinear) for m in model.linears)
    _, strict = dispatch_model(_model(), _calib(), DispatchConfig(force="emulated:row", threshold=1e-6, samples=256),
                               timer=_timer({"emulated:row": 10.0}))
    assert all(r["choice"] == HIGH_PRECISION for r in strict["layers"])


def test_forcing_fp8_on_every_layer_of_a_trained_model_keeps_its_auc():
    from loopline.model.metrics import auc
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(32, generator=g)

    def data(n):
        x = torch.randn(n, 32, generator=g)
        y = (torch.rand(n, generator=g) < torch.sigmoid(x @ w_true / 3 + torch.sin(3 * x[:, 0]) - 1.5)).float()
        return x, y
    (xtr, ytr), (xte, yte) = data(8192), data(8192)
    model = MLP([32, 128, 64, 1])
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for i in range(0, 2 * len(xtr), 256):
        j = i % len(xtr)
        loss = nn.functional.binary_cross_entropy_with_logits(model(xtr[j:j + 256]).squeeze(-1), ytr[j:j + 256])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p32 = model(xte).squeeze(-1).numpy()
        served, table = dispatch_model(model, [xtr[:512]], DispatchConfig(force="emulated:row", samples=256, repeats=2))
        p8 = served(xte).squeeze(-1).numpy()
    assert table["summary"]["fp8"] == 3
    a32, a8 = auc(p32, yte.numpy()), auc(p8, yte.numpy())
    assert a32 > 0.75 and abs(a8 - a32) < 0.001, (a32, a8)
