"""The Mods: BlockNorm's blocks (partial and narrow widths), the activation factory, bias="last"."""

import pytest
import torch
from torch import nn

from loopline.errors import ConfigError
from loopline.model.mods import MLP, BlockNorm, activation


def _rms(t):
    return t.pow(2).mean(dim=-1).sqrt()


@pytest.mark.parametrize("width", [512, 600, 100], ids=["two-blocks", "partial-tail", "narrower-than-a-block"])
def test_blocknorm_gives_every_block_unit_rms(width):
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 50, width)
    y = BlockNorm(256)(x)
    for start in range(0, width, 256):
        torch.testing.assert_close(_rms(y[:, start:start + 256]), torch.ones(4), rtol=1e-4, atol=1e-4)
    # the direction inside a block is kept (it is a per-block rescale)
    torch.testing.assert_close(y[:, :10] / x[:, :10], (y[:, :10] / x[:, :10])[:, :1].expand(4, 10), rtol=1e-4,
                               atol=1e-5)


def test_blocknorm_has_no_parameters_and_keeps_dtype_and_leading_dims():
    n = BlockNorm()
    assert list(n.parameters()) == []
    x = torch.randn(2, 3, 300, dtype=torch.bfloat16)
    assert n(x).shape == (2, 3, 300) and n(x).dtype == torch.bfloat16


@pytest.mark.parametrize("name,cls", [("hardswish", nn.Hardswish), ("silu", nn.SiLU), ("swish", nn.SiLU),
                                      ("relu", nn.ReLU)])
def test_activation_factory(name, cls):
    assert isinstance(activation(name), cls)


def test_hardswish_is_x_relu6_x_plus_3_over_6():
    x = torch.linspace(-5, 5, 41)
    torch.testing.assert_close(activation("hardswish")(x), x * torch.clamp(x + 3, 0, 6) / 6)


@pytest.mark.parametrize("bias,expected", [("last", [False, False, True]), ("all", [True, True, True]),
                                           ("none", [False, False, False])])
def test_mlp_bias_modes(bias, expected):
    m = MLP([16, 32, 8, 1], bias=bias)
    assert [lin.bias is not None for lin in m.linears] == expected


def test_mlp_hidden_layers_are_act_of_norm_of_linear_and_the_last_is_plain():
    torch.manual_seed(0)
    m = MLP([16, 300, 1], act="hardswish", norm="block", bias="last")
    x = torch.randn(5, 16)
    h = nn.functional.hardswish(BlockNorm(256)(m.linears[0](x)))
    torch.testing.assert_close(m(x), m.linears[1](h))
    plain = MLP([16, 300, 1], act="relu", norm="none", bias="all")
    assert isinstance(plain.norm, nn.Identity) and isinstance(plain.act, nn.ReLU)


@pytest.mark.parametrize("kwargs,field", [(dict(dims=[8]), "dims"), (dict(dims=[8, 1], act="gelu"), "act"),
                                          (dict(dims=[8, 1], norm="layer"), "norm"),
                                          (dict(dims=[8, 1], bias="first"), "bias")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        MLP(**kwargs)
