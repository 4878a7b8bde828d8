"""Kunlun blocks against plain loop references; masking, gradients, determinism, FLOPs and config errors."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from loopline.errors import ConfigError
from loopline.model.kunlun import (GDPA, HierarchicalSeedPooling, KunlunConfig, KunlunEncoder,
                                   MultiEventEncoder, SlidingWindowSelfAttention, block_flops,
                                   flops_per_example, gdpa, param_count)

TOL = dict(rtol=1e-9, atol=1e-10)  # references run in float64

# Plain-math activations, independent of torch's implementations.
REF_ACT = {
    "gelu": lambda t: 0.5 * t * (1.0 + math.erf(t / math.sqrt(2.0))),
    "silu": lambda t: t / (1.0 + math.exp(-t)),
    "relu": lambda t: max(t, 0.0),
    "hardswish": lambda t: t * min(max(t + 3.0, 0.0), 6.0) / 6.0,
}


def padded_mask(lengths, length):
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)


def dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a.detach(), b.detach()))


def softmax(scores):
    m = max(scores)
    e = [math.exp(s - m) for s in scores]
    return [x / sum(e) for x in e]


def linear(x, lin):  # x (..., D_in) float64 with an nn.Linear's weights
    return x @ lin.weight.T + lin.bias


def layer_norm(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def attend_loops(q, k, v, visible):
    """q (Lq, D), k and v (Lk, D) for one (batch, head); visible(i) -> list of key indices."""
    out = torch.zeros(q.shape[0], v.shape[1], dtype=torch.float64)
    for i in range(q.shape[0]):
        keys = visible(i)
        if not keys:
            continue  # no visible key: the output row stays 0
        p = softmax([dot(q[i], k[j]) / math.sqrt(q.shape[1]) for j in keys])
        for pj, j in zip(p, keys):
            out[i] += pj * v[j]
    return out


# --------------------------------------------------------------------------------------------- GDPA

@pytest.mark.parametrize("activation", ["gelu", "silu", "relu", "hardswish"])
def test_gdpa_op_matches_explicit_loops_over_batch_tokens_and_slots(activation):
    g = torch.Generator().manual_seed(1)
    B, L, M, D = 2, 4, 3, 5
    q, k, v = (torch.randn(B, n, D, generator=g, dtype=torch.float64) for n in (L, M, M))
    out = gdpa(q, k, v, activation, scale=0.7)
    ref = torch.zeros(B, L, D, dtype=torch.float64)
    for b in range(B):
        for l in range(L):
            for m in range(M):
                a = REF_ACT[activation](dot(q[b, l], k[b, m])) * 0.7
                for d in range(D):
                    ref[b, l, d] += a * float(v[b, m, d])
    assert torch.allclose(out, ref, **TOL), f"max |diff| {(out - ref).abs().max():.3g}"


def test_gdpa_block_is_prenorm_residual_with_per_example_generated_weights():
    torch.manual_seed(0)
    B, L, D, Dg, M = 3, 5, 6, 4, 3
    blk = GDPA(D, Dg, M, "silu").double()
    x, s = torch.randn(B, L, D, dtype=torch.float64), torch.randn(B, Dg, dtype=torch.float64)
    mask = padded_mask([5, 2, 0], L)
    out = blk(x, mask, s)
    ref = x.clone()
    for b in range(B):
        gn = layer_norm(s[b], blk.gen_norm)
        kb = linear(gn, blk.k_gen).view(M, D)  # this example's own weights
        vb = linear(gn, blk.v_gen).view(M, D)
        for l in range(L):
            if not mask[b, l]:
                continue  # padded token: no update
            ql = linear(layer_norm(x[b, l], blk.norm), blk.q_proj)
            for m in range(M):
                ref[b, l] += REF_ACT["silu"](dot(ql, kb[m])) * M ** -0.5 * vb[m]
    assert torch.allclose(out, ref, **TOL), f"max |diff| {(out - ref).abs().max():.3g}"


# --------------------------------------------------------------------------------------------- SWA

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "symmetric"])
@pytest.mark.parametrize("with_memory", [False, True], ids=["no-memory", "memory"])
def test_sliding_window_attention_matches_per_position_softmax_over_the_window(causal, with_memory):
    torch.manual_seed(0)
    B, L, D, H, w, T = 3, 7, 6, 2, 3, 2
    swa = SlidingWindowSelfAttention(D, H, w, causal=causal).double()
    x = torch.randn(B, L, D, dtype=torch.float64)
    mem = torch.randn(B, T, D, dtype=torch.float64) if with_memory else None
    mask = padded_mask([7, 4, 0], L)
    out = swa(x, mask, memory=mem)
    dh = D // H
    ref = x.clone()
    for b in range(B):
        xn = layer_norm(x[b], swa.norm)
        kv_in = torch.cat([layer_norm(mem[b], swa.norm), xn]) if with_memory else xn
        n_mem = T if with_memory else 0
        q, k, v = linear(xn, swa.q_proj), linear(kv_in, swa.k_proj), linear(kv_in, swa.v_proj)

        def visible(i):
            in_window = [j for j in range(L) if mask[b, j]
                         and ((i - w < j <= i) if causal else abs(i - j) <= w // 2)]
            return list(range(n_mem)) + [n_mem + j for j in in_window]

        heads = [attend_loops(q[:, h * dh:(h + 1) * dh], k[:, h * dh:(h + 1) * dh], v[:, h * dh:(h + 1) * dh],
                              visible) for h in range(H)]
        upd = linear(torch.cat(heads, dim=1), swa.out_proj)
        ref[b] += upd * mask[b, :, None]
    assert torch.allclose(out, ref, **TOL), f"max |diff| {(out - ref).abs().max():.3g}"


def test_symmetric_window_sees_w_over_2_each_side():
    swa = SlidingWindowSelfAttention(4, 1, window=4, causal=False)
    m = swa.window_mask(6)
    assert m[3].tolist() == [False, True, True, True, True, True], m.int()
    assert torch.equal(m, m.T), "a symmetric window must be symmetric"


# --------------------------------------------------------------------------------------------- HSP

def test_hsp_kronecker_linear_equals_the_dense_torch_kron_matrix():
    torch.manual_seed(0)
    hsp = HierarchicalSeedPooling(d_model=12, n_heads=2, n_seeds=5, n_out=2, kron_d1=3).double()
    with torch.no_grad():
        hsp.bias.normal_()  # make the bias count in the comparison
    h = torch.randn(4, 5, 12, dtype=torch.float64)
    dense = torch.kron(hsp.mix, torch.kron(hsp.f1, hsp.f2))  # (T*D, S*D), built independently
    ref = (h.reshape(4, -1) @ dense.T).view(4, 2, 12) + hsp.bias
    assert torch.allclose(hsp.compress(h), ref, **TOL), f"max |diff| {(hsp.compress(h) - ref).abs().max():.3g}"
    assert torch.equal(hsp.kron_matrix(), dense)


def test_hsp_compression_has_kronecker_not_dense_parameter_count():
    hsp = HierarchicalSeedPooling(d_model=32, n_heads=2, n_seeds=8, n_out=2)
    assert (hsp.d1, hsp.d2) == (4, 8)
    factored = hsp.mix.numel() + hsp.f1.numel() + hsp.f2.numel()
    assert factored == 2 * 8 + 4 * 4 + 8 * 8 == 96, factored
    assert hsp.kron_matrix().numel() == 8 * 32 * 2 * 32 == 16384


def test_hsp_matches_per_seed_softmax_over_real_tokens_then_dense_kron():
    torch.manual_seed(0)
    B, L, D, H, S, T = 3, 6, 8, 2, 5, 2
    hsp = HierarchicalSeedPooling(D, H, S, T).double()
    x = torch.randn(B, L, D, dtype=torch.float64)
    mask = padded_mask([6, 3, 0], L)
    out = hsp(x, mask)
    assert out.shape == (B, T, D)
    dh = D // H
    q = linear(layer_norm(hsp.seeds, hsp.seed_norm), hsp.q_proj)  # (S, D)
    for b in range(B):
        xn = layer_norm(x[b], hsp.kv_norm)
        k, v = linear(xn, hsp.k_proj), linear(xn, hsp.v_proj)
        real = [j for j in range(L) if mask[b, j]]
        heads = [attend_loops(q[:, h * dh:(h + 1) * dh], k[:, h * dh:(h + 1) * dh], v[:, h * dh:(h + 1) * dh],
                              lambda i: real) for h in range(H)]
        hb = linear(torch.cat(heads, dim=1), hsp.out_proj)  # (S, D)
        ref = (hsp.kron_matrix() @ hb.reshape(-1)).view(T, D) + hsp.bias
        assert torch.allclose(out[b], ref, **TOL), f"row {b}: max |diff| {(out[b] - ref).abs().max():.3g}"


# --------------------------------------------------------------------------------------------- encoder

def inputs(cfg, lengths, L=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    return (torch.randn(B, L, cfg.d_model, generator=g, dtype=dtype), padded_mask(lengths, L),
            torch.randn(B, cfg.summary_dim, generator=g, dtype=dtype))


@pytest.mark.parametrize("schedule", ["compskip", "dense"])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_encoder_output_is_flattened_pooled_summary(schedule, n_layers):
    cfg = KunlunConfig(n_layers=n_layers, schedule=schedule)
    enc = KunlunEncoder(cfg, seed=0)
    out = enc(*inputs(cfg, [10, 4, 1]))
    assert out.shape == (3, cfg.n_out * cfg.d_model) == (3, enc.out_dim), out.shape
    kinds = [("swa" in layer) and "skip" or "full" for layer in enc.layers]
    assert kinds == list(cfg.layer_kinds)
    expected = ("full", "skip", "full")[:n_layers] if schedule == "compskip" else ("full",) * n_layers
    assert cfg.layer_kinds == expected, cfg.layer_kinds


def test_compskip_encoder_wires_blocks_full_skip_full_then_readout():
    cfg = KunlunConfig(n_layers=3)
    enc = KunlunEncoder(cfg, seed=1).double()
    x, mask, s = inputs(cfg, [10, 6], dtype=torch.float64)
    l0, l1, l2 = enc.layers
    h = x * mask[..., None]
    z0 = l0["hsp"](h, mask)
    h = l0["gdpa"](h, mask, torch.cat([s, z0.flatten(1)], 1))
    h = l1["swa"](h, mask, memory=z0)  # reuses z0
    z2 = l2["hsp"](h, mask)  # recomputed
    h = l2["gdpa"](h, mask, torch.cat([s, z2.flatten(1)], 1))
    ref = enc.readout(h, mask).flatten(1)
    assert torch.allclose(enc(x, mask, s), ref, **TOL)


@pytest.mark.parametrize("schedule", ["compskip", "dense"])
def test_changing_padded_tokens_does_not_change_outputs(schedule):
    cfg = KunlunConfig(n_layers=3, schedule=schedule)
    enc = KunlunEncoder(cfg, seed=0)
    x, mask, s = inputs(cfg, [10, 3, 0])
    out = enc(x, mask, s)
    junk = x.clone()
    junk[~mask] = torch.randn(int((~mask).sum()), cfg.d_model) * 1e3
    junk[2, 0, 0] = float("nan")  # even NaN in padding stays out
    assert torch.equal(enc(junk, mask, s), out), "padded tokens leaked into the output"


def test_fully_padded_row_gives_finite_output_and_gradients():
    cfg = KunlunConfig(n_layers=2)
    enc = KunlunEncoder(cfg, seed=0)
    x, mask, s = inputs(cfg, [0, 0])
    x.requires_grad_(True)
    out = enc(x, mask, s)
    assert torch.isfinite(out).all(), out
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
    assert torch.equal(x.grad, torch.zeros_like(x)), "padded tokens must get zero gradient"


@pytest.mark.parametrize("schedule,n_layers", [("compskip", 2), ("compskip", 3), ("dense", 2)])
def test_every_encoder_parameter_receives_a_gradient(schedule, n_layers):
    cfg = KunlunConfig(n_layers=n_layers, schedule=schedule)
    enc = KunlunEncoder(cfg, seed=0)
    enc(*inputs(cfg, [10, 5, 2])).square().sum().backward()
    dead = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"unused parameters: {dead}"


def test_seeded_construction_is_deterministic_and_leaves_the_global_rng_alone():
    cfg = KunlunConfig()
    state = torch.random.get_rng_state()
    a, b, c = KunlunEncoder(cfg, seed=7), KunlunEncoder(cfg, seed=7), KunlunEncoder(cfg, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state), "seeded init consumed the global RNG"
    batch = inputs(cfg, [10, 4])
    assert torch.equal(a(*batch), b(*batch))
    assert not torch.equal(a(*batch), c(*batch))
    assert torch.equal(a(*batch), a(*batch)), "forward must be deterministic"


# --------------------------------------------------------------------------------------------- multi-event

CONFIGS = {
    "impression": KunlunConfig(d_model=32, n_heads=2, window=8, n_layers=2),
    "click": KunlunConfig(d_model=16, n_heads=4, window=4, n_layers=3, n_out=3, causal=False),
}


def test_multi_event_encoder_concatenates_per_type_outputs_in_config_order():
    multi = MultiEventEncoder(CONFIGS, seed=0)
    assert multi.out_dim == 2 * 32 + 3 * 16 == 112
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 16, generator=g)
    seqs = {"click": (torch.randn(2, 5, 16, generator=g), padded_mask([5, 2], 5)),
            "impression": (torch.randn(2, 9, 32, generator=g), padded_mask([9, 0], 9))}
    out = multi(seqs, s)
    assert out.shape == (2, multi.out_dim)
    enc = multi.encoders
    ref = torch.cat([enc["impression"](*seqs["impression"], s), enc["click"](*seqs["click"], s)], dim=1)
    assert torch.equal(out, ref)
    assert multi.encoders["click"].layers[1]["swa"].window == 4 and not multi.encoders["click"].config.causal


def test_multi_event_encoder_rejects_missing_types_and_mixed_summary_dims():
    multi = MultiEventEncoder(CONFIGS, seed=0)
    with pytest.raises(ConfigError, match=r"^seqs: "):
        multi({"impression": (torch.randn(1, 3, 32), torch.ones(1, 3, dtype=torch.bool))}, torch.randn(1, 16))
    with pytest.raises(ConfigError, match=r"^configs: summary_dim"):
        MultiEventEncoder({"a": KunlunConfig(summary_dim=4), "b": KunlunConfig(summary_dim=5)})
    with pytest.raises(ConfigError, match=r"^configs: "):
        MultiEventEncoder({})
    with pytest.raises(ConfigError, match=r"^configs: event type"):
        MultiEventEncoder({"a.b": KunlunConfig()})


# --------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value", [
    ("d_model", 0), ("n_layers", 0), ("n_heads", 3), ("window", 0), ("n_seeds", 2), ("n_out", 0),
    ("gdpa_slots", -1), ("activation", "tanh"), ("gdpa_scale", 0.0), ("summary_dim", 1.5),
    ("kron_d1", 5), ("schedule", "sparse"), ("causal", "yes"),
])
def test_config_errors_start_with_the_field_name(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        KunlunConfig(**{field: value})


def test_encoder_rejects_inputs_of_the_wrong_shape_naming_the_argument():
    enc = KunlunEncoder(KunlunConfig(), seed=0)
    ok = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ConfigError, match=r"^tokens: "):
        enc(torch.randn(2, 4, 16), ok, torch.randn(2, 16))
    with pytest.raises(ConfigError, match=r"^tokens: mask"):
        enc(torch.randn(2, 4, 32), ok.float(), torch.randn(2, 16))
    with pytest.raises(ConfigError, match=r"^summary: "):
        enc(torch.randn(2, 4, 32), ok, torch.randn(2, 8))


# --------------------------------------------------------------------------------------------- FLOPs

def test_compskip_needs_fewer_flops_than_an_all_gdpa_hsp_stack_of_the_same_depth():
    cfg = KunlunConfig()
    skip, dense = flops_per_example(cfg, 50), flops_per_example(replace(cfg, schedule="dense"), 50)
    f = block_flops(cfg, 50)
    assert skip < dense, f"CompSkip {skip} MACs vs all-GDPA+HSP {dense} MACs at L=50 (blocks {f})"
    assert skip == 2 * f["hsp"] + f["gdpa"] + f["swa"] and dense == 3 * f["hsp"] + 2 * f["gdpa"], f


@pytest.mark.parametrize("schedule", ["compskip", "dense"])
def test_flops_formula_agrees_with_torch_flop_counter(schedule):
    """The counter sees the dense masked window and the per-batch seed projection; the formula does not."""
    cfg = KunlunConfig(n_layers=3, schedule=schedule)
    enc, L = KunlunEncoder(cfg, seed=0), 20
    with FlopCounterMode(display=False) as fc:
        enc(*inputs(cfg, [L], L=L))
    kinds = cfg.layer_kinds
    n_hsp, n_swa = kinds.count("full") + 1, kinds.count("skip")
    D = cfg.d_model
    window_pairs = sum(min(i + 1, cfg.window) for i in range(L))
    extra = n_hsp * cfg.n_seeds * D * D + n_swa * (L * L - window_pairs) * D * 2
    analytic = flops_per_example(cfg, L)
    assert fc.get_total_flops() == 2 * (analytic + extra), (fc.get_total_flops(), analytic, extra)


def test_multi_event_flops_sum_over_event_types_with_their_own_lengths():
    multi = MultiEventEncoder(CONFIGS, seed=0)
    total = flops_per_example(multi, {"impression": 50, "click": 10})
    assert total == flops_per_example(CONFIGS["impression"], 50) + flops_per_example(CONFIGS["click"], 10)
    with pytest.raises(ConfigError, match=r"^length: "):
        flops_per_example(multi, {"impression": 50})


def test_param_count_counts_every_trainable_parameter():
    enc = KunlunEncoder(KunlunConfig(), seed=0)
    assert param_count(enc) == sum(p.numel() for p in enc.parameters())
    enc.readout.seeds.requires_grad_(False)
    assert param_count(enc) == sum(p.numel() for p in enc.parameters()) - 8 * 32
    assert param_count(enc, trainable_only=False) == sum(p.numel() for p in enc.parameters())
