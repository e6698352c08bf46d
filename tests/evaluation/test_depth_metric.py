import math

import numpy as np
import pytest
import torch

from mtvision.registry import METRICS


def _reference(prediction, target, min_depth, max_depth):
    """Per-image errors with boolean indexing, averaged over images that have valid pixels."""
    per_image = []
    for pred, gt in zip(prediction.reshape(len(prediction), -1), target.reshape(len(target), -1)):
        valid = gt > min_depth
        if max_depth is not None:
            valid &= gt < max_depth
        if not valid.any():
            continue
        p = np.clip(pred[valid], min_depth, max_depth if max_depth is not None else np.inf)
        g = gt[valid]
        per_image.append((np.mean(np.abs(p - g) / g), np.sqrt(np.mean((p - g) ** 2)),
                          np.mean(np.maximum(p / g, g / p) < 1.25)))
    abs_rel, rmse, delta1 = np.mean(per_image, axis=0)
    return dict(abs_rel=abs_rel, rmse=rmse, delta1=delta1)


def test_hand_computed_single_image():
    target = torch.tensor([2.0, 4.0, 0.0]).reshape(1, 1, 1, 3)
    prediction = torch.tensor([1.0, 4.4, 7.0]).reshape(1, 1, 1, 3)
    metric = METRICS.build(dict(type='DepthMetric'), default_args=dict(dataset=None))
    metric.update(prediction, target)
    # the third pixel has no ground truth; ratios 2 and 1.1
    assert metric.compute() == pytest.approx(dict(abs_rel=(0.5 + 0.1) / 2, rmse=math.sqrt((1 + 0.16) / 2),
                                                  delta1=0.5))


def test_random_batches_against_numpy_with_invalid_and_clamped_pixels():
    rng = np.random.default_rng(0)
    target = rng.uniform(0.5, 10.0, size=(4, 1, 5, 6))
    target[rng.random(target.shape) < 0.3] = 0.0  # missing depth
    target[3] = 0.0  # an image without any valid pixel is skipped
    prediction = rng.uniform(-1.0, 12.0, size=target.shape)  # some below min_depth, some above max_depth
    metric = METRICS.build(dict(type='DepthMetric', min_depth=0.1, max_depth=8.0))
    metric.update(torch.from_numpy(prediction[:2]).float(), torch.from_numpy(target[:2]).float())
    metric.update(torch.from_numpy(prediction[2:]).float(), torch.from_numpy(target[2:]).float())
    expected = _reference(prediction.astype(np.float32).astype(np.float64),
                          target.astype(np.float32).astype(np.float64), 0.1, 8.0)
    assert metric.compute() == pytest.approx(expected, rel=1e-9)
    # without max_depth the far pixels count and predictions are not capped, so the numbers change accordingly
    unbounded = METRICS.build(dict(type='DepthMetric', min_depth=0.1))
    unbounded.update(torch.from_numpy(prediction), torch.from_numpy(target))
    assert unbounded.compute() == pytest.approx(_reference(prediction, target, 0.1, None), rel=1e-9)


def test_images_weigh_equally_whatever_their_valid_pixel_count():
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).reshape(2, 1, 1, 4)
    prediction = torch.tensor([[2.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]]).reshape(2, 1, 1, 4)
    metric = METRICS.build(dict(type='DepthMetric'))
    metric.update(prediction, target)
    # image 1: abs_rel 1, rmse 1, delta1 0; image 2: perfect. Pooling pixels would give abs_rel 1/5 instead.
    assert metric.compute() == pytest.approx(dict(abs_rel=0.5, rmse=0.5, delta1=0.5))


def test_empty_and_bad_input():
    metric = METRICS.build(dict(type='DepthMetric'))
    metric.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert all(math.isnan(value) for value in metric.compute().values())
    with pytest.raises(ValueError, match=r'predictions \(1, 1, 2, 2\) and targets \(1, 1, 4, 4\)'):
        metric.update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match='max_depth'):
        METRICS.build(dict(type='DepthMetric', min_depth=1.0, max_depth=0.5))
