"""The Auxiliary Head and the Student Adapter: beta scales only the distillation gradient into the backbone,
the serving head never learns from the FM's label, and the adapter's target is stop-gradient."""

import numpy as np
import torch

from loopline.model.distill import aux_target, grad_scale, soft_bce
from loopline.model.vm import VerticalModel, VMConfig, VMFeaturizer, VMLearner


def batch(cfg, n=32, seed=0, soft=None):
    rng = np.random.default_rng(seed)
    exs = [{"ad": f"a{rng.integers(10)}", "campaign": f"c{rng.integers(3)}", "attrs": {"age": str(rng.integers(4))},
            "features": {}, "label": int(rng.random() < 0.3),
            "soft_label": float(rng.random()) if soft is None else soft} for _ in range(n)]
    return VMFeaturizer(cfg).batch(exs, codes=[rng.normal(size=(3, cfg.code_dim)).astype(np.float32)] * n, raw=None)


def distill_grads(beta: float) -> dict:
    cfg = VMConfig(distill="ah", ah_beta=beta, history="attention")
    torch.manual_seed(0)
    model = VerticalModel(cfg)
    b = batch(cfg)
    out = model(b)
    soft_bce(out["distill_logit"], aux_target(b.soft, cfg.ah_alpha)).backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def test_beta_scales_the_distillation_gradient_into_the_backbone_and_not_the_head():
    full, quarter = distill_grads(1.0), distill_grads(0.25)
    backbone = [n for n in full if n.startswith("mlp.")]
    assert backbone
    for n in backbone:
        assert torch.allclose(quarter[n], 0.25 * full[n], atol=1e-7), n
    # the distillation head's own weights get the full gradient either way
    assert torch.allclose(quarter["distilling.weight"], full["distilling.weight"])
    # and the serving head gets none from the distillation loss
    assert full["serving.weight"] is None or not full["serving.weight"].any()


def test_serving_head_never_receives_the_fm_label():
    """Two learners that differ only in the FM's soft labels: after a step their serving heads are equal
    (their backbones are not, since the distillation head trains it). Both teachers are worse than the
    VM, so the teacher gate (tests/model/test_vm.py) is off here."""
    cfg = VMConfig(distill="ah", adapter=False, teacher_gate=False)
    a, b = VMLearner(cfg, seed=3), VMLearner(cfg, seed=3)
    a.learn_many(batch(cfg, soft=0.05))
    b.learn_many(batch(cfg, soft=0.95))
    assert torch.equal(a.model.serving.weight, b.model.serving.weight)
    assert not torch.equal(a.model.distilling.weight, b.model.distilling.weight)
    assert not torch.equal(a.model.mlp[0].linears[0].weight, b.model.mlp[0].linears[0].weight)


def test_plain_kd_does_reach_the_serving_head():
    cfg = VMConfig(distill="kd", teacher_gate=False)
    a, b = VMLearner(cfg, seed=3), VMLearner(cfg, seed=3)
    a.learn_many(batch(cfg, soft=0.05))
    b.learn_many(batch(cfg, soft=0.95))
    assert not torch.equal(a.model.serving.weight, b.model.serving.weight)


def test_adapter_target_is_stop_gradient_and_the_adapter_learns_from_labels_only():
    cfg = VMConfig(distill="ah", adapter=True, adapter_weight=5.0)
    learner = VMLearner(cfg, seed=1)
    b = batch(cfg)
    before = {n: p.detach().clone() for n, p in learner.adapter.named_parameters()}
    learner.learn_many(b)
    # the gradient the adapter holds is exactly that of its own label loss at its old weights
    ref = VMLearner(cfg, seed=1).adapter
    ref.load_state_dict(before)
    p = b.soft.clamp(1e-6, 1 - 1e-6)
    soft_bce(ref(torch.log(p) - torch.log1p(-p)), b.labels).backward()
    for (n, q), (_, r) in zip(learner.adapter.named_parameters(), ref.named_parameters()):
        assert torch.allclose(q.grad, r.grad, atol=1e-7), n


def test_missing_soft_labels_give_no_distillation_signal():
    cfg = VMConfig(distill="kd")
    b = batch(cfg, soft=None)
    b.soft[:] = float("nan")
    losses = VMLearner(cfg, seed=0).learn_many(b)
    assert losses["distill"] == 0.0 and np.isfinite(losses["loss"])


def test_grad_scale_is_identity_forward():
    x = torch.randn(5, requires_grad=True)
    assert torch.equal(grad_scale(x, 0.1), x)


def test_vm_weights_scale_every_loss_term_and_zero_weights_leave_the_model_alone():
    cfg = VMConfig(distill="kd", adapter=True)
    b = batch(cfg, n=32, seed=3)
    assert b.weights is None  # no weight field: all 1, the unweighted losses
    zero = VMLearner(cfg, seed=0)
    before = {k: v.clone() for k, v in zero.model.state_dict().items()}
    b.weights = torch.zeros(b.size)
    losses = zero.learn_many(b)
    assert losses["serving"] == 0.0 and losses["distill"] == 0.0 and losses["adapter"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in zero.model.state_dict().items())



def test_vm_featurizer_reads_the_fm_stage_weight():
    cfg = VMConfig()
    exs = [{"ad": "a1", "campaign": "c", "attrs": {}, "features": {}, "label": int(i % 20 == 0), "soft_label": None,
            "weight": 0.5 if i % 20 == 0 else 1.0} for i in range(40)]
    b = VMFeaturizer(cfg).batch(exs)
    assert b.weights is not None and b.weights.tolist() == [e["weight"] for e in exs]


def test_auxiliary_head_with_beta_zero_trains_exactly_the_base_vm():
    """The head is drawn aside, so an AH recipe starts from base's draws; with beta = 0 nothing of the
    distillation loss reaches the backbone, and the serving predictions are base's, step after step."""
    base = VMLearner(VMConfig(history="attention"), seed=5)
    ah = VMLearner(VMConfig(history="attention", distill="ah", ah_beta=0.0), seed=5)
    for s in range(4):
        b = batch(base.cfg, seed=s)
        p_base, _ = base.step(b)
        p_ah, _ = ah.step(b)
        assert np.array_equal(p_base, p_ah), s
