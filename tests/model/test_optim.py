"""RowAdagrad against torch's Adagrad: the same numbers, bit for bit, and the same state."""

import pytest
import torch

from loopline.model.optim import RowAdagrad


def sparse_grad(n, d, k, gen):
    """A table's gradient that reaches ``k`` random rows (some twice), of magnitudes 1e-30 to 10."""
    g = torch.zeros(n, d)
    rows = torch.randint(0, n, (k,), generator=gen)
    scale = 10.0 ** torch.randint(-30, 2, (k, 1), generator=gen).float()
    g[rows] = torch.randn(k, d, generator=gen) * scale
    return g


@pytest.mark.parametrize("n,d", [(4096, 1), (4096, 8), (1000, 16), (777, 3)])
@pytest.mark.parametrize("k", [1, 17, 300, 900])
def test_row_adagrad_moves_tables_exactly_as_torch_adagrad(n, d, k):
    gen = torch.Generator().manual_seed(n * 31 + d * 7 + k)
    w0, b0 = torch.randn(n, d, generator=gen), torch.randn(1, generator=gen)
    ours, theirs = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())], \
        [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    opt_ours = RowAdagrad([{"params": [ours[0]], "lr": 0.4}, {"params": [ours[1]]}], lr=0.05)
    opt_theirs = torch.optim.Adagrad([{"params": [theirs[0]], "lr": 0.4}, {"params": [theirs[1]]}], lr=0.05)
    for _ in range(5):
        g, gb = sparse_grad(n, d, k, gen), torch.randn(1, generator=gen)
        ours[0].grad, theirs[0].grad = g.clone(), g.clone()
        ours[1].grad, theirs[1].grad = gb.clone(), gb.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert torch.equal(opt_ours.state[a]["sum"], opt_theirs.state[b]["sum"])
        assert torch.equal(opt_ours.state[a]["step"], opt_theirs.state[b]["step"])
    assert not torch.equal(ours[0], w0)


def test_row_adagrad_state_loads_into_torch_adagrad_and_back():
    w = torch.nn.Parameter(torch.ones(50, 4))
    opt = RowAdagrad([w], lr=0.1)
    w.grad = torch.zeros(50, 4)
    w.grad[3] = 2.0
    opt.step()
    torch_opt = torch.optim.Adagrad([torch.nn.Parameter(torch.ones(50, 4))], lr=0.1)
    torch_opt.load_state_dict(opt.state_dict())
    back = RowAdagrad([torch.nn.Parameter(torch.ones(50, 4))], lr=0.1)
    back.load_state_dict(torch_opt.state_dict())
    assert torch.equal(next(iter(back.state.values()))["sum"], opt.state[w]["sum"])
    assert opt.state[w]["sum"][3, 0].item() == 4.0 and opt.state[w]["sum"][4].abs().sum().item() == 0.0


def test_a_parameter_without_a_gradient_is_left_alone():
    a, b = torch.nn.Parameter(torch.ones(10, 2)), torch.nn.Parameter(torch.ones(10, 2))
    opt = RowAdagrad([a, b], lr=0.1)
    a.grad = torch.ones(10, 2)
    opt.step()
    assert torch.equal(b, torch.ones(10, 2)) and not torch.equal(a, torch.ones(10, 2))


@pytest.mark.parametrize("k", [3, 900])  # the row path and the dense path
def test_row_weights_of_one_give_torch_adagrad_bit_for_bit(k):
    gen = torch.Generator().manual_seed(k)
    w0 = torch.randn(1000, 4, generator=gen)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_ours, opt_theirs = RowAdagrad([ours], lr=0.4), torch.optim.Adagrad([theirs], lr=0.4, eps=1e-10)
    for _ in range(3):
        g = sparse_grad(1000, 4, k, gen)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt_ours.step(row_weight={ours: (g != 0).any(1).float()})  # 1 where reached, 0 elsewhere
        opt_theirs.step()
    assert torch.equal(ours, theirs) and torch.equal(opt_ours.state[ours]["sum"], opt_theirs.state[theirs]["sum"])


@pytest.mark.parametrize("k", [3, 900])
@pytest.mark.parametrize("w", [0.04, 0.25, 1.0])
def test_a_row_trained_at_weight_w_steps_sqrt_w_as_far(k, w):
    """Adagrad alone steps lr * sign(g) first whatever the weight; with the row's mean weight it steps
    lr * sqrt(w), and it keeps that ratio over later steps of the same weight."""
    def run(weight):
        table = torch.nn.Parameter(torch.zeros(1000, 2))
        opt = RowAdagrad([table], lr=0.4)
        reached = torch.zeros(1000)
        reached[:k] = 1.0
        for _ in range(4):
            table.grad = torch.zeros(1000, 2)
            table.grad[:k] = weight * torch.tensor([0.3, -0.7])  # the weighted gradient of one example kind
            opt.step(row_weight={table: reached * weight})
        return table.detach()[:k].clone(), table.detach()[k:]
    moved, untouched = run(w)
    full, _ = run(1.0)
    assert torch.allclose(moved, full * w ** 0.5, rtol=1e-5)
    assert torch.equal(untouched, torch.zeros_like(untouched))  # no NaN from the rows of weight 0
