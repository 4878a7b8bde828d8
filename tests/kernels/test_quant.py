"""FP8 e4m3 recipes: error bounds from the format, scale shapes, saturation, finer groups on outliers."""

import pytest
import torch

from loopline.kernels.quant import E4M3_MAX, RECIPES, dequantize, quantize, quantize_blocks


def _x(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def _spread(q):
    """Each element's scale, (R, C)."""
    R, C = q.shape
    if q.recipe in ("tensor", "row"):
        return q.scale.expand(R, C) if q.scale.dim() else q.scale.reshape(1, 1).expand(R, C)
    br, bc = q.group
    return q.scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:R, :C]


@pytest.mark.parametrize("role", ["act", "weight"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_roundtrip_error_is_within_half_an_e4m3_step(recipe, role):
    x = _x((130, 200))  # partial 128-blocks on both axes
    q = quantize(x, recipe, role)
    err = (dequantize(q) - x).abs()
    s = _spread(q)
    # 3 mantissa bits: half a step is 2**-4 of the value for normals; subnormal steps are 2**-9 * s
    bound = torch.maximum(x.abs() * 2.0 ** -4, s * 2.0 ** -10) * (1 + 1e-6)
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_group_amax_maps_to_the_top_of_the_range(recipe):
    x = _x((64, 256), seed=1)
    q = quantize(x, recipe, "act")
    assert q.data.dtype == torch.float8_e4m3fn
    assert float(q.data.float().abs().max()) == E4M3_MAX
    assert torch.isfinite(q.data.float()).all()


def test_scale_shapes_follow_the_recipe_and_role():
    x = _x((130, 300))
    assert quantize(x, "tensor").scale.shape == ()
    assert quantize(x, "row").scale.shape == (130, 1)
    assert quantize(x, "block", "act").scale.shape == (130, 3)
    assert quantize(x, "block", "weight").scale.shape == (2, 3)


def test_a_static_scale_saturates_instead_of_overflowing():
    x = torch.tensor([[1.0, 500.0, -1e6, float(E4M3_MAX)]])
    q = quantize(x, "tensor", scale=torch.tensor(1.0))
    back = dequantize(q)
    assert torch.isfinite(back).all()
    assert back.tolist() == [[1.0, E4M3_MAX, -E4M3_MAX, E4M3_MAX]]


def test_an_all_zero_group_quantizes_to_exact_zeros():
    x = torch.zeros(4, 256)
    x[0, :128] = 1.0
    q = quantize_blocks(x, (1, 128))
    assert torch.isfinite(q.scale).all() and bool((q.scale > 0).all())
    assert torch.equal(dequantize(q), x)


def test_finer_groups_keep_small_rows_accurate_next_to_an_outlier_row():
    x = _x((64, 256), seed=2) * 0.01
    x[0] *= 1e5  # one loud row sets the per-tensor amax: the others fall below e4m3 subnormals
    rel = {r: float(((dequantize(quantize(x, r)) - x)[1:].norm() / x[1:].norm())) for r in RECIPES}
    assert rel["row"] < rel["tensor"] / 10
    assert rel["block"] <= rel["row"] * 1.01


def test_block_wise_beats_row_wise_when_one_k_block_is_loud():
    x = _x((32, 256), seed=3) * 0.01
    x[:, :128] *= 1e5  # the first 128 columns are loud: a per-row scale flushes the second block
    err = {r: float(((dequantize(quantize(x, r)) - x)[:, 128:].norm() / x[:, 128:].norm())) for r in ("row", "block")}
    assert err["block"] < err["row"] / 10


def test_bad_arguments_name_the_field():
    x = _x((4, 8))
    with pytest.raises(ValueError, match="^recipe"):
        quantize(x, "channel")
    with pytest.raises(ValueError, match="^scale"):
        quantize(x, "row", scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.zeros(2, 3, 4), "row")
