"""ADWIN and Page-Hinkley: detect a rise in the mean soon after it, stay quiet on a stationary stream."""

import numpy as np
import pytest

from loopline.errors import ConfigError
from loopline.model.detectors import ADWIN, ADWINConfig, PageHinkley, PageHinkleyConfig, make_detector


def _loss_stream(seed: int, n: int, shift_at: int, rate0: float, rate1: float) -> np.ndarray:
    """Per-example losses of a fixed predictor p=0.05 on labels whose rate moves at ``shift_at``."""
    rng = np.random.default_rng(seed)
    rate = np.where(np.arange(n) < shift_at, rate0, rate1)
    y = rng.random(n) < rate
    return np.where(y, -np.log(0.05), -np.log(0.95))


DETECTORS = {"adwin": lambda: ADWIN(), "page_hinkley": lambda: PageHinkley()}


@pytest.mark.parametrize("kind", sorted(DETECTORS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detector_alarms_soon_after_a_rise_in_loss_and_not_before(kind, seed):
    x = _loss_stream(seed, 20000, 10000, 0.04, 0.08)
    det = DETECTORS[kind]()
    alarms = [i for i, v in enumerate(x) if det.update(v)]
    assert [a for a in alarms if a < 10000] == []
    assert alarms and 10000 <= alarms[0] < 13000


@pytest.mark.parametrize("kind", sorted(DETECTORS))
def test_detector_ignores_a_falling_loss_when_watching_for_rises(kind):
    x = _loss_stream(5, 20000, 10000, 0.08, 0.02)
    det = DETECTORS[kind]()
    assert not any(det.update(v) for v in x)


def test_adwin_window_matches_a_batch_mean_and_variance_after_every_update():
    rng = np.random.default_rng(3)
    det = ADWIN(ADWINConfig(clock=10**9))  # never cut: the window is the whole stream
    xs = rng.normal(1.0, 2.0, 3000)
    for i, v in enumerate(xs, 1):
        det.update(v)
        if i % 97 == 0:
            assert det.width == i
            assert det.mean == pytest.approx(xs[:i].mean(), rel=1e-9, abs=1e-9)
            assert det.variance == pytest.approx(xs[:i].var(), rel=1e-7)
    n_buckets = sum(len(level) for level in det.levels)
    assert n_buckets <= 5 * (len(det.levels))  # O(log n) memory


def test_adwin_shrinks_its_window_to_the_new_regime():
    det = ADWIN()
    for v in [0.0] * 5000 + [1.0] * 3000:
        det.update(v)
    assert det.width < 3500 and det.mean > 0.9


def test_bad_detector_settings_name_the_field():
    with pytest.raises(ConfigError, match="^delta"):
        ADWINConfig(delta=2.0)
    with pytest.raises(ConfigError, match="^threshold"):
        PageHinkleyConfig(threshold=0)
    with pytest.raises(ConfigError, match="^direction"):
        PageHinkleyConfig(direction="sideways")
    with pytest.raises(ConfigError, match="^detector"):
        make_detector("cusum")
