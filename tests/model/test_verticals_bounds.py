"""The VM stage's vertical cap: ever-new vertical strings cannot grow the learners without bound."""

import numpy as np
import pytest

from loopline.errors import ConfigError
from loopline.model.verticals import OTHER_VERTICAL, VMStage, VMStageConfig
from loopline.model.vm import VMConfig

TINY = VMConfig(table_size=64, emb_dim=4, hidden=(8, 4))


def stage(cap: int) -> VMStage:
    # "base" reads no history, so no store is needed
    return VMStage(None, VMStageConfig(variants=("base",), vm=TINY, max_verticals=cap))


def steps(n_steps: int, per_step: int, vertical_of):
    out, k = [], 0
    for s in range(n_steps):
        batch = []
        for _ in range(per_step):
            batch.append({"id": f"i{k}", "ts": float(k), "label_ts": float(k) + 1, "user": f"u{k % 50}",
                          "ad": f"a{k % 7}", "campaign": f"c{k % 3}", "vertical": vertical_of(k),
                          "attrs": {}, "features": {}, "label": int(k % 3 == 0), "soft_label": None,
                          "fm_step": s})
            k += 1
        out.append(batch)
    return out


def test_a_thousand_verticals_share_one_overflow_learner():
    """Today every vertical string gets a learner per variant; with the cap the first three keep theirs
    and the rest share OTHER_VERTICAL's, counted."""
    real = ["feed", "stories", "search"]
    vm = stage(3)
    batches = steps(10, 200, lambda k: real[k % 3] if k < 30 else f"junk{k}" if k % 2 else real[k % 3])
    rows = [r for b in batches for r in vm.step(b)]
    assert len(vm.learners) <= (3 + 1) * len(vm.cfg.variants)
    assert {vt for vt, _ in vm.learners} == set(real) | {OTHER_VERTICAL}
    b = vm.bounds()
    assert b["verticals"] == 3 and b["overflow_examples"] == sum(1 for k in range(2000) if k >= 30 and k % 2)
    assert b["overflow_names"][:2] == ["junk31", "junk33"] and len(b["overflow_names"]) == 10
    assert len(rows) == 2000 and all("vm:base" in r["scores"] for r in rows)
    assert {r["vertical"] for r in rows if r["id"] == "i31"} == {"junk31"}  # rows keep their own vertical


def test_admission_is_first_seen_in_stream_order_and_survives_a_snapshot():
    batches = steps(4, 50, lambda k: f"v{k // 20}")  # v0..v9, in order
    a = stage(4)
    for bt in batches[:2]:
        a.step(bt)
    assert a.verticals == ["v0", "v1", "v2", "v3"]
    b = stage(4)
    b.load_state_dict(a.state_dict())
    assert b.verticals == a.verticals and b.bounds() == a.bounds()
    ra, rb = a.step(batches[2]), b.step(batches[2])  # the same numbers after a restore
    assert [r["scores"] for r in ra] == [r["scores"] for r in rb]
    assert b.vertical_of("v0") == "v0" and b.vertical_of("v9") == OTHER_VERTICAL


def test_under_the_cap_nothing_changes():
    batches = steps(3, 60, lambda k: ("feed", "stories")[k % 2])
    small, large = stage(2), stage(100)
    for bt in batches:
        pa, pb = small.step(bt), large.step(bt)
        assert np.allclose([r["scores"]["vm:base"] for r in pa], [r["scores"]["vm:base"] for r in pb])
    assert small.bounds()["overflow_examples"] == 0 and set(small.learners) == set(large.learners)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_a_bad_cap_is_a_config_error_naming_the_field(bad):
    with pytest.raises(ConfigError, match="max_verticals"):
        VMStageConfig(max_verticals=bad)
